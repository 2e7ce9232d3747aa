"""The dead letters of every consumer (the platform's: they hold every tenant's records):
the newest, filtered by consumer and key, and one of them decoded as far as it can be
(`streams.dead_letters`)."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from aiokafka.errors import KafkaError
from fastapi import APIRouter, Path, Query, Request

from api.auth import permissions as p
from api.auth.access import requires
from api.errors import ReadModelsUnavailable, RequestProblem
from streams import dead_letters

router = APIRouter(prefix="/api/v1/admin/dead-letters", tags=["admin"])
READ_TIMEOUT_S = 15
RESPONSES: dict[int | str, dict[str, Any]] = {
    404: {"description": "No such consumer, or no dead letter at that position."},
    503: {"description": "Kafka did not answer in time."},
}
Consumer = Annotated[
    str, Path(min_length=1, max_length=200, description="e.g. `incidents`, `job-incident-deadlines`")
]


def _known(consumer: str) -> None:
    if consumer not in dead_letters.consumers():
        raise RequestProblem(
            404, "unknown_consumer", f"no consumer named {consumer!r}", known=dead_letters.consumers()
        )


@router.get(
    "", operation_id="listDeadLetters", dependencies=[requires(p.ADMIN_DEAD_LETTERS)], responses=RESPONSES
)
async def list_dead_letters(
    request: Request,
    consumer: Annotated[str | None, Query(min_length=1, max_length=200)] = None,
    key: Annotated[
        str | None, Query(min_length=1, max_length=200, description="the record's key (an aggregate id)")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
) -> dict[str, Any]:
    """The newest dead letters, newest first: consumer, position, key, the error, where
    the record came from (`source`), its event type and aggregate when it has them."""
    if consumer is not None:
        _known(consumer)
    try:
        return await asyncio.wait_for(
            dead_letters.listing(request.app.state.settings, consumer, key, limit), READ_TIMEOUT_S
        )
    except (KafkaError, TimeoutError) as exc:
        raise ReadModelsUnavailable(f"the dead letters could not be read: {exc!r}") from exc


@router.get(
    "/{consumer}/{partition}/{offset}",
    operation_id="getDeadLetter",
    dependencies=[requires(p.ADMIN_DEAD_LETTERS)],
    responses=RESPONSES,
)
async def get_dead_letter(
    request: Request,
    consumer: Consumer,
    partition: Annotated[int, Path(ge=0, le=100_000)],
    offset: Annotated[int, Path(ge=0, le=2**62)],
) -> dict[str, Any]:
    """One dead letter: its headers, the error, its original position, and its value
    decoded where it can be (an Avro event's payload, a JSON command) or its first bytes."""
    _known(consumer)
    try:
        found = await asyncio.wait_for(
            dead_letters.one(request.app.state.settings, consumer, partition, offset), READ_TIMEOUT_S
        )
    except (KafkaError, TimeoutError) as exc:
        raise ReadModelsUnavailable(f"the dead letter could not be read: {exc!r}") from exc
    if found is None:
        raise RequestProblem(404, "no_dead_letter", f"no dead letter of {consumer} at {partition}:{offset}")
    return found
