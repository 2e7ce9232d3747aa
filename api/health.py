"""Liveness and readiness."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from api.auth.access import public
from streams.cdc import connect_of

router = APIRouter(tags=["health"])


@router.get("/health", operation_id="health", dependencies=[public()])
async def health() -> dict[str, str]:
    """The process is up."""
    return {"status": "ok"}


@router.get(
    "/ready",
    operation_id="ready",
    dependencies=[public()],
    responses={503: {"description": "A dependency is unreachable."}},
)
async def ready(request: Request) -> JSONResponse:
    """Kafka, Redis, PostgreSQL and OpenSearch are reachable, and the live feed of the
    subscriptions follows the event log (503 with Retry-After when not: a stream opened
    before that would be refused). `cdc` reports the change data capture's connector
    (RUNNING, PAUSED, FAILED, MISSING or UNREACHABLE): the API serves without it, so it
    does not make the API unready."""
    checks: dict[str, Any] = {}
    bus = request.app.state.bus
    checks["kafka"] = bus.producer_ready.is_set() and await _kafka_answers(request)
    feed = getattr(request.app.state, "feed", None)
    checks["event_log"] = feed is not None and feed.ready
    try:
        checks["redis"] = bool(await asyncio.wait_for(bus.redis.ping(), 2))
    except Exception:  # any failure means not ready
        checks["redis"] = False
    pool = getattr(request.app.state, "pool", None)
    try:
        checks["postgres"] = pool is not None and await asyncio.wait_for(pool.fetchval("SELECT 1"), 2) == 1
    except Exception:
        checks["postgres"] = False
    try:
        checks["opensearch"] = request.app.state.search_ready and bool(
            await asyncio.wait_for(request.app.state.search.ping(), 2)
        )
    except Exception:
        checks["opensearch"] = False
    ok = all(checks.values())
    return JSONResponse(
        {"status": "ready" if ok else "unavailable", "checks": checks, "cdc": await _cdc_state(request)},
        status_code=200 if ok else 503,
        headers={} if ok else {"Retry-After": "1"},
    )


async def _cdc_state(request: Request) -> str:
    try:
        found = await asyncio.wait_for(connect_of(request.app.state.settings).status(), 0.5)
    except Exception:  # any failure: it cannot be told
        return "UNREACHABLE"
    if found is None:
        return "MISSING"
    states = [found["connector"]["state"], *(t["state"] for t in found.get("tasks", []))]
    return "FAILED" if "FAILED" in states else str(found["connector"]["state"])


async def _kafka_answers(request: Request) -> bool:
    client = request.app.state.bus.producer.client
    try:
        return bool(await asyncio.wait_for(client.ready(client.get_random_node()), 2))
    except Exception:  # any failure means not ready
        return False
