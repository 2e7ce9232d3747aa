"""The FastAPI application: the composition root of the HTTP process.

Clients are created in the lifespan, never at import. The API starts even when Kafka
is down: commands then get 503 with Retry-After until the producer connects.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import asyncpg
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from fastapi import Depends, FastAPI
from fastapi.middleware.cors import CORSMiddleware
from redis.asyncio import Redis

from api import (
    admin,
    asyncapi,
    commands,
    console,
    dead_letters,
    errors,
    health,
    inputs,
    internal,
    limits,
    runtime,
    subscriptions,
)
from api import metrics as api_metrics
from api.auth import access
from api.auth import routes as auth_routes
from api.auth.edge import Authenticate, Identity
from api.auth.local import ensure_keys
from api.changes import ChangeFollower, ChangeListener
from api.command_path import CommandPath
from api.consistency import CommittedPositions
from api.readcache import CachedReads
from api.registry import CONTEXTS, cached_routes
from api.rendered import RenderedReads
from commands.bus import CommandBus
from commands.processor import CommandProcessor
from projections.db import create_pool, keep_session
from projections.lag import LagProbe
from projections.migrations import migrate
from projections.registry import PROJECTIONS
from projections.search import SearchProjection, alias_name, ensure_index, index_name, search_client
from shared_kernel import heap, kafka, tracing
from shared_kernel.settings import LOCAL_ISSUER, Settings, get_settings

log = logging.getLogger(__name__)


async def _connect_producer(bus: CommandBus) -> None:
    delay = 0.5
    while True:
        try:
            await bus.producer.start()
            bus.producer_ready.set()
            log.info("connected to Kafka")
            return
        except KafkaError as exc:
            log.warning("Kafka unreachable; retrying", extra={"error": repr(exc), "retry_in_s": delay})
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10)


async def _connect_read_models(app: FastAPI, settings: Settings) -> None:
    """Migrate and open the pool, then follow the projectors' changes (until shutdown)."""
    delay = 0.5
    while True:
        try:
            await migrate(settings)  # the tables exist before any projector has run
            app.state.pool = await create_pool(settings, min_size=2, max_size=10, reset=keep_session)
            app.state.identity.pool = app.state.pool  # API keys
            log.info("connected to the read models")
            break
        except (OSError, asyncpg.PostgresError) as exc:
            log.warning("PostgreSQL unreachable; retrying", extra={"error": repr(exc), "retry_in_s": delay})
        except Exception:  # a fault of ours: said loudly, not a task that dies unseen (never ready)
            log.exception("could not prepare the read models; retrying", extra={"retry_in_s": delay})
        await asyncio.sleep(delay)
        delay = min(delay * 2, 10)
    await app.state.changes.run()  # its tables exist now


async def _connect_search(app: FastAPI, settings: Settings) -> None:
    """Create the search indexes (and their aliases) when missing, as `migrate` does for
    PostgreSQL, so searches answer (empty) before any projector has run."""
    delay = 0.5
    while True:
        try:
            for p in PROJECTIONS.values():
                if isinstance(p, SearchProjection):
                    await ensure_index(
                        app.state.search,
                        index_name(settings, p.index, p.version),
                        alias_name(settings, p.index),
                        p.mapping,
                    )
            app.state.search_ready = True
            log.info("connected to the search indexes")
            return
        except Exception as exc:  # any failure: OpenSearch is not usable yet
            log.warning("OpenSearch unreachable; retrying", extra={"error": repr(exc), "retry_in_s": delay})
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10)


async def _close(
    app: FastAPI,
    bus: CommandBus,
    producer: AIOKafkaProducer,
    redis: Redis,
    background: list[asyncio.Task[None]],
) -> None:
    for task in (*background, *app.state.rebuilds):
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    await app.state.identity.audit.stop()
    await app.state.feed.stop()
    if app.state.pool is not None:
        await app.state.pool.close()
    await app.state.search.close()
    await app.state.lag.stop()
    await bus.stop()
    if bus.producer_ready.is_set():
        await producer.stop()
    await redis.aclose()


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        producer = kafka.producer(
            settings, request_timeout_ms=int(settings.command_timeout_s * 1000), linger_ms=0
        )
        redis = Redis.from_url(settings.redis_url, socket_timeout=5, socket_connect_timeout=2)
        owner = (
            CommandProcessor(settings, url=settings.advertised_url, instance=settings.instance_id or None)
            if settings.api_owns_partitions
            else None
        )
        bus = CommandBus(settings, producer, redis, owner)
        identity.attach(redis)
        identity.audit.start()
        app.state.bus = bus
        app.state.owner = None
        app.state.settings = settings
        app.state.pool = None
        app.state.search = search_client(settings)
        app.state.search_ready = False
        app.state.lag = LagProbe(settings)
        app.state.rebuilds = set()
        app.state.feed = subscriptions.LiveFeed(settings)
        app.state.feed.start()
        # what projectors commit, as they commit it: read-your-writes waits on it, and
        # the rendered reads kept in memory are dropped by it
        app.state.reads = (
            RenderedReads(settings.query_cache_entries, settings.query_cache_mb << 20)
            if settings.query_cache_entries
            else None
        )
        app.state.positions = CommittedPositions(settings.topic_prefix)
        listeners: list[ChangeListener] = [app.state.positions]
        if app.state.reads is not None:
            listeners.append(app.state.reads)
        app.state.changes = ChangeFollower(settings, *listeners)
        background = [asyncio.create_task(_connect_read_models(app, settings))]
        background.append(asyncio.create_task(_connect_search(app, settings)))
        await bus.start()
        background.append(asyncio.create_task(_connect_producer(bus)))
        background.append(asyncio.create_task(heap.freeze_when_settled()))
        try:
            async with contextlib.AsyncExitStack() as owning:
                await owning.enter_async_context(
                    api_metrics.lag_refresher(app, settings.metrics_lag_interval_s)
                )
                if owner is not None:  # stops first: its transactions in flight end and are answered
                    await owning.enter_async_context(internal.run_owner(app, owner))
                yield
        finally:
            await _close(app, bus, producer, redis, background)

    app = FastAPI(
        title="kafka-cqrs",
        version="0.1.0",
        summary="Event-sourced CQRS on Kafka: commands, queries, subscriptions.",
        lifespan=lifespan,
        dependencies=[Depends(inputs.check_path_params)],  # every route's path parameters
        # FastAPI's own OpenTelemetry (on by default since 0.16x once a tracer provider
        # is set) would make a second server span per request beside tracing.server_span:
        # S11 measured it at 0.56 of off for cached reads at the default ratio; 1.0 without.
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )
    errors.install(app)
    tracing.configure(settings.service_name)
    if settings.environment != "production" and settings.auth_issuer == LOCAL_ISSUER:
        ensure_keys(settings)  # the local issuer's key: `cqrs auth token` signs with it
    identity = Identity(settings)
    app.state.identity = identity
    app.state.settings = settings
    app.add_middleware(CommandPath)  # innermost: the command routes' common case (api.command_path)
    app.add_middleware(CachedReads, routes=cached_routes())
    app.add_middleware(inputs.InputGuard)  # ahead of the read cache and of every route
    app.add_middleware(Authenticate, identity=identity)  # a credential before anything is read
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "PUT", "PATCH", "DELETE"],
            allow_headers=[
                "Authorization",
                "X-API-Key",
                "Content-Type",
                "Idempotency-Key",
                "If-Match",
                "If-None-Match",
                "X-Consistency-Token",
                "X-Correlation-Id",
                "Prefer",
                "traceparent",
            ],
            expose_headers=[
                "ETag",
                "Location",
                "Retry-After",
                "X-Consistency-Token",
                "RateLimit-Limit",
                "RateLimit-Remaining",
                "RateLimit-Reset",
                "RateLimit-Policy",
            ],
            max_age=600,
        )
    app.add_middleware(limits.BodyLimit, max_bytes=settings.max_body_bytes)  # before any route
    app.add_middleware(api_metrics.HttpMetrics)  # outermost: every request timed and traced
    app.include_router(health.router)
    app.include_router(asyncapi.router)
    app.include_router(console.router)
    app.include_router(api_metrics.router)
    for context in CONTEXTS:
        for router in context.routers:
            app.include_router(router)
    app.include_router(commands.router)
    app.include_router(admin.router)
    app.include_router(dead_letters.router)
    app.include_router(runtime.router)
    app.include_router(internal.router)
    app.include_router(auth_routes.router)
    subscriptions.install(app)
    access.document(app)  # every route's permission in the OpenAPI document
    return app
