"""The API's Prometheus metrics: every request timed by its route template, and
`/metrics` (public, like `/health`: Prometheus scrapes it without a credential; it
carries no tenant's data, only counts under bounded labels).

A background task keeps the projections' and consumer groups' lag gauges fresh
(`APP_METRICS_LAG_INTERVAL_S`), from the same figures `GET /api/v1/admin/projections`
shows, so any API instance can be scraped for them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, FastAPI, Response
from fastapi.responses import PlainTextResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.auth.access import public
from projections.status import overview
from shared_kernel import kafka, metrics, tracing
from shared_kernel.topics import Topics

log = logging.getLogger(__name__)
router = APIRouter(tags=["health"])


@router.get(
    "/metrics",
    operation_id="metrics",
    dependencies=[public()],
    response_class=PlainTextResponse,
    responses={200: {"content": {"text/plain": {}}, "description": "Prometheus's text format"}},
)
async def prometheus_metrics() -> Response:
    """This process's metrics in Prometheus's text format."""
    body, content_type = metrics.exposition()
    return Response(body, media_type=content_type)


access = logging.getLogger("api.access")


class HttpMetrics:
    """Times every HTTP request (to its last byte) under its route template, method and
    status (a request no route took is `unmatched`), handles it in its server span
    (`shared_kernel.tracing.server_span`), and logs it on `api.access`: method,
    path (no query string: it may hold a stream ticket), route, status, duration, client
    and user agent, never a credential; the log line carries the request's trace id."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        with tracing.server_span(scope) as span:
            try:
                await self.app(scope, receive, sending)
            finally:
                seconds = time.perf_counter() - started
                route = getattr(scope.get("route"), "path", None) or scope.get("cqrs.route") or "unmatched"
                metrics.HTTP_DURATION.labels(route, scope["method"], str(status)).observe(seconds)
                tracing.name_by_route(span, scope["method"], route, status)
                if access.isEnabledFor(logging.INFO) and route != "/metrics":
                    _log_access(scope, route, status, seconds)


def _log_access(scope: Scope, route: str, status: int, seconds: float) -> None:
    agent = next((v for k, v in scope.get("headers", ()) if k == b"user-agent"), b"")
    client = scope.get("client")
    principal = scope.get("state", {}).get("principal")
    access.info(
        "request",
        extra={
            "method": scope["method"],
            "path": scope["path"],
            "route": route,
            "status": status,
            "duration_ms": round(seconds * 1000, 2),
            "client_ip": client[0] if client else "",
            "user_agent": agent.decode("latin-1")[:200],
            "actor": getattr(principal, "subject", ""),
        },
    )


async def _jobs_lag(app: FastAPI, admin: Any) -> None:
    """Each stream-processing job's consumer group against its topics' ends."""
    from aiokafka.structs import TopicPartition

    from streams.registry import JOBS

    settings = app.state.settings
    topics = Topics(settings.topic_prefix)
    for job in JOBS.values():
        group = f"{settings.topic_prefix}.job.{job.name}"
        committed = await admin.list_consumer_group_offsets(group)
        if not committed:
            continue  # the job never ran under this prefix
        ends = await app.state.lag.ends(job(settings).source_topics(topics))
        behind = 0
        for (topic, partition), end in ends.items():
            meta = committed.get(TopicPartition(topic, partition))
            behind += max(0, end - (meta.offset if meta is not None and meta.offset >= 0 else 0))
        metrics.CONSUMER_GROUP_LAG.labels(group).set(behind)


async def refresh_lag(app: FastAPI, interval_s: float) -> None:
    """Until cancelled: the lag gauges from the projections' overview and the jobs'
    consumer groups, every interval."""
    admin = kafka.admin(app.state.settings)
    started = False
    try:
        while True:
            await asyncio.sleep(interval_s)
            if not started:
                with contextlib.suppress(Exception):  # Kafka away: tried again next time
                    await admin.start()
                    started = True
            await _refresh(app, interval_s)
            if started:
                try:
                    await asyncio.wait_for(_jobs_lag(app, admin), interval_s * 2)
                except Exception as exc:  # the gauges keep their last values
                    log.debug("jobs' lag not refreshed", extra={"error": repr(exc)})
    finally:
        if started:
            await admin.close()


async def _refresh(app: FastAPI, interval_s: float) -> None:
    state = app.state
    if state.pool is None:
        return
    try:
        found = await asyncio.wait_for(overview(state.settings, state.pool, state.lag), interval_s * 2)
    except Exception as exc:  # Kafka or PostgreSQL away: the gauges keep their last values
        log.debug("lag not refreshed", extra={"error": repr(exc)})
        return
    for name, p in found.items():
        version = str(p.get("live_version"))
        metrics.PROJECTION_LAG_EVENTS.labels(name, version).set(p["events_behind"])
        metrics.PROJECTION_LAG_SECONDS.labels(name, version).set(p["seconds_behind"])
        group = f"{state.settings.topic_prefix}.projection.{name}.v{version}"
        metrics.CONSUMER_GROUP_LAG.labels(group).set(p["events_behind"])


@contextlib.asynccontextmanager
async def lag_refresher(app: FastAPI, interval_s: float) -> AsyncIterator[None]:
    task = asyncio.create_task(refresh_lag(app, interval_s), name="metrics-lag")
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
