"""Admin routes: the state of every projection (positions, lag, dead letters)."""

from __future__ import annotations

import asyncio
from typing import Any

from aiokafka.errors import KafkaError
from fastapi import APIRouter, Request

from api.errors import ReadModelsUnavailable
from api.lag import LagProbe, lag_of
from api.queries import NOT_FOUND
from api.readmodels import PoolDep
from projections.registry import PROJECTIONS
from shared_kernel.topics import Topics

router = APIRouter(prefix="/api/v1/admin", tags=["admin"])

LAG_TIMEOUT_S = 5


@router.get("/projections", operation_id="listProjections", responses=NOT_FOUND)
async def list_projections(request: Request, pool: PoolDep) -> dict[str, Any]:
    """Every projection: per partition its next offset, the end, and how far behind it
    is (events and seconds); events applied and dead-lettered, and the last error."""
    settings = request.app.state.settings
    probe: LagProbe = request.app.state.lag
    topics = Topics(settings.topic_prefix)
    positions = [
        dict(r)
        for r in await pool.fetch(
            "SELECT projection, topic, partition, next_offset, event_time FROM projection_positions"
        )
    ]
    stats = {r["projection"]: dict(r) for r in await pool.fetch("SELECT * FROM projection_stats")}
    topics_of = {name: [topics.events(c) for c in p.contexts] for name, p in PROJECTIONS.items()}
    try:
        lag = await asyncio.wait_for(lag_of(probe, topics_of, positions), LAG_TIMEOUT_S)
    except (KafkaError, TimeoutError) as exc:
        raise ReadModelsUnavailable(f"Kafka does not answer, so lag is unknown: {exc!r}") from exc
    out: dict[str, Any] = {}
    for name, p in PROJECTIONS.items():
        s = stats.get(name, {})
        out[name] = {
            "store": p.store,
            "events_behind": lag[name]["events_behind"],
            "seconds_behind": lag[name]["seconds_behind"],
            "applied": s.get("applied", 0),
            "dead_lettered": s.get("dead_lettered", 0),
            "dead_letter_topic": topics.dlq(name),
            "last_error": s.get("last_error"),
            "positions": lag[name]["positions"],
        }
    return {"projections": out}
