"""The dead letters of every consumer (the platform's: they hold every tenant's records):
the newest, filtered by consumer, key and state, one of them decoded as far as it can be
(`streams.dead_letters`); the keys parked behind them, and the operators' retries and
skips (`projections.parking`), each kept with its actor and outcome."""

from __future__ import annotations

import asyncio
import time
from typing import Annotated, Any, Literal

from aiokafka.errors import KafkaError
from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import JSONResponse
from pydantic import Field

from api.auth import permissions as p
from api.auth.access import PrincipalDep, requires
from api.bodies import RequestBody
from api.errors import ReadModelsUnavailable, RequestProblem
from api.readmodels import PoolDep
from projections import parking
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
Partition = Annotated[int, Path(ge=0, le=100_000)]
Offset = Annotated[int, Path(ge=0, le=2**62)]
ConsumerQuery = Annotated[str | None, Query(min_length=1, max_length=200)]
KeyQuery = Annotated[
    str | None, Query(min_length=1, max_length=200, description="the record's key (an aggregate id)")
]
ACTION_WAIT_S = 10.0  # how long a retry or skip is waited for before 202


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
    pool: PoolDep,
    consumer: ConsumerQuery = None,
    key: KeyQuery = None,
    state: Annotated[
        Literal["all", "unresolved", "parked", "open", "retried", "skipped"],
        Query(description="`unresolved`: parked or open (not retried or skipped yet)"),
    ] = "all",
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
) -> dict[str, Any]:
    """The newest dead letters, newest first: consumer, position, key, the error, where
    the record came from (`source`), its event type and aggregate when it has them, and
    its `state`: `parked` (its key's later records are held behind it), `retried` or
    `skipped` by an operator, or `open` (a consumer that does not park, or no key)."""
    if consumer is not None:
        _known(consumer)
    try:
        found = await asyncio.wait_for(
            dead_letters.listing(request.app.state.settings, consumer, key, limit, scan=state != "all"),
            READ_TIMEOUT_S,
        )
    except (KafkaError, TimeoutError) as exc:
        raise ReadModelsUnavailable(f"the dead letters could not be read: {exc!r}") from exc
    found["items"] = await parking.with_states(pool, found["items"], state, limit)
    return found


@router.get(
    "/parked",
    operation_id="listParkedKeys",
    dependencies=[requires(p.ADMIN_DEAD_LETTERS)],
    responses=RESPONSES,
)
async def list_parked(
    pool: PoolDep,
    consumer: ConsumerQuery = None,
    key: KeyQuery = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
) -> dict[str, Any]:
    """The keys parked behind a dead letter, newest first: which dead letter holds each
    back, its error, how many later records are held, and a request waiting for it."""
    if consumer is not None:
        _known(consumer)
    return {"items": await parking.parked_listing(pool, consumer, key, limit)}


@router.get(
    "/actions",
    operation_id="listDeadLetterActions",
    dependencies=[requires(p.ADMIN_DEAD_LETTERS)],
    responses=RESPONSES,
)
async def list_actions(
    pool: PoolDep, consumer: ConsumerQuery = None, limit: Annotated[int, Query(ge=1, le=500)] = 50
) -> dict[str, Any]:
    """What operators did to dead letters, newest first: who, what, when, how it ended."""
    if consumer is not None:
        _known(consumer)
    return {"items": await parking.actions(pool, consumer, limit)}


@router.get(
    "/actions/{action_id}",
    operation_id="getDeadLetterAction",
    dependencies=[requires(p.ADMIN_DEAD_LETTERS)],
    responses=RESPONSES,
)
async def get_action(pool: PoolDep, action_id: Annotated[int, Path(ge=1, le=2**62)]) -> dict[str, Any]:
    """One retry or skip: `pending` until the consumer has done it, then `applied`
    (with how many records), `failed` (the dead letter failed again: still parked) or
    `parked-again` (a held record failed in its turn: the key is parked behind it now)."""
    found = await parking.action(pool, action_id)
    if found is None:
        raise RequestProblem(404, "no_action", f"no dead-letter action {action_id}")
    return found


class BulkRetry(RequestBody):
    consumer: str = Field(min_length=1, max_length=200, description="e.g. `incidents`")
    key: str | None = Field(default=None, min_length=1, max_length=200, description="only this key's")


@router.post(
    "/retry",
    operation_id="retryDeadLetters",
    dependencies=[requires(p.ADMIN_DEAD_LETTERS)],
    status_code=202,
    responses={**RESPONSES, 409: {"description": "The consumer does not park keys."}},
)
async def retry_all(body: BulkRetry, pool: PoolDep, principal: PrincipalDep) -> dict[str, Any]:
    """Retry every dead letter of `consumer` that holds a key back (or that key's): one
    action each, done by the consumer in order; follow them at `/actions/{id}`."""
    _parks(body.consumer)
    asked = await parking.request_all(pool, body.consumer, body.key, principal.subject)
    return {"actions": asked}


async def _act(
    pool: Any, consumer: str, partition: int, offset: int, action: str, actor: str
) -> JSONResponse:
    _parks(consumer)
    try:
        asked = await parking.request(pool, consumer, partition, offset, action, actor)
    except parking.NotParked as exc:
        raise RequestProblem(409, "not_parked", str(exc)) from exc
    deadline = time.monotonic() + ACTION_WAIT_S
    while time.monotonic() < deadline:
        now = await parking.action(pool, asked["id"])
        if now is not None and now["outcome"] != "pending":
            return JSONResponse(now)
        await asyncio.sleep(0.05)
    location = f"/api/v1/admin/dead-letters/actions/{asked['id']}"
    return JSONResponse(asked, status_code=202, headers={"Location": location})


def _parks(consumer: str) -> None:
    _known(consumer)
    if not parking.parks(consumer):
        raise RequestProblem(
            409,
            "does_not_park",
            f"{consumer} does not park keys behind its dead letters: the projections, the stream jobs "
            "and the command processor do",
        )


ACTION_RESPONSES: dict[int | str, dict[str, Any]] = {
    **RESPONSES,
    202: {"description": "Asked; not done within 10 s: follow it at `Location`."},
    409: {"description": "The dead letter holds no key back, or a request for it is waiting."},
}


@router.post(
    "/{consumer}/{partition}/{offset}/{action}",
    operation_id="actOnDeadLetter",
    dependencies=[requires(p.ADMIN_DEAD_LETTERS)],
    responses=ACTION_RESPONSES,
)
async def act_on_dead_letter(
    pool: PoolDep,
    consumer: Consumer,
    partition: Partition,
    offset: Offset,
    action: Annotated[Literal["retry", "skip"], Path()],
    principal: PrincipalDep,
) -> JSONResponse:
    """`retry`: apply the dead-lettered record again (after a fix), then the key's held
    records in order. `skip`: leave it unapplied and apply the held records in order.
    The outcome says how far it got."""
    return await _act(pool, consumer, partition, offset, action, principal.subject)


@router.get(
    "/{consumer}/{partition}/{offset}",
    operation_id="getDeadLetter",
    dependencies=[requires(p.ADMIN_DEAD_LETTERS)],
    responses=RESPONSES,
)
async def get_dead_letter(
    request: Request, pool: PoolDep, consumer: Consumer, partition: Partition, offset: Offset
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
    found["state"] = (await parking.states(pool, [(consumer, partition, offset)])).get(
        (consumer, partition, offset), "open"
    )
    found["parked"] = await parking.parked_listing(pool, consumer, found["key"], 1) if found["key"] else []
    return found
