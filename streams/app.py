"""The Faust apps that drive the projections: one app (so one consumer group) per
projection version.

Each app has one agent on the events topics of its projection's contexts. The agent
takes events in batches (`streams.batches.take_batches`) and hands each batch to a
`Projector`, which applies it in one PostgreSQL transaction together with the
projection's positions. The agent acks a batch's events only once it is applied, so
Faust commits no offset of a batch that failed; after a crash a batch may come again,
and applying is idempotent, so that changes nothing.

An app runs alone in a process (`run`: `cqrs run projector NAME --version N`), or
beside others in one event loop (`start` / `stop`: `cqrs run projectors`, see
`streams.group`). A batch that fails after its retries stops the agent from taking any
more (a later event must not be applied before it) and calls `on_failure`: alone, the
process exits and its supervisor starts it again; in a group, the group stops this app
and starts it again, the other projections go on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg
import faust
import mode
from faust.transport.drivers import aiokafka as faust_aiokafka

from projections import versions
from projections.db import create_pool, keep_session
from projections.events import Record
from projections.migrations import migrate
from projections.projection import Projection
from projections.projector import Projector
from shared_kernel import kafka
from shared_kernel.avro import AvroCodec
from shared_kernel.settings import Settings
from shared_kernel.telemetry import logging_config
from shared_kernel.topics import Topics, dlq_topic, ensure_topics
from streams.batches import ack, take_batches
from streams.skipped import refetch_skipped_records

log = logging.getLogger(__name__)

RETRY_S = (0.2, 0.5, 1, 2, 5)
REQUESTS_S = 1.0  # how often operators' retries and skips of dead letters are looked for
HEARTBEAT_S = 2.0  # a worker is alive while its beat is under 5 s old (projections.versions.workers)


STOP_GRACE_S = 15  # how long a stopping worker lets its batch in flight finish
EXIT_UNACKED = 70


def _exit_unacked(why: str, projection: str) -> None:
    """Exit at once (a worker alone in its process): its supervisor starts it again."""
    log.critical(f"{why}; exiting without committing its offsets", extra={"projection": projection})
    logging.shutdown()
    os._exit(EXIT_UNACKED)


def group_id(settings: Settings, projection: Projection) -> str:
    """Each version of a projection reads with a consumer group of its own."""
    return f"{settings.topic_prefix}.projection.{projection.name}.v{projection.version}"


def _read_committed_consumer_thread() -> None:
    """Faust reads uncommitted data unless it runs its own exactly-once producers; the
    events topics are written in transactions, so an aborted event would be projected.
    Faust's Kafka consumer is made read_committed here, with our fetch wait."""
    thread: Any = faust_aiokafka.AIOKafkaConsumerThread
    if getattr(thread, "_cqrs_patched", False):
        return
    original = thread._create_worker_consumer

    def create(self: Any, transport: Any) -> Any:
        consumer = original(self, transport)
        consumer._isolation_level = "read_committed"
        consumer._fetch_max_wait_ms = self.app.conf.cqrs_fetch_max_wait_ms
        return consumer

    thread._create_worker_consumer = create
    thread._cqrs_patched = True


def _record(message: Any) -> Record:
    headers = message.headers or []
    if isinstance(headers, dict):
        headers = list(headers.items())
    return Record(
        topic=message.topic,
        partition=message.partition,
        offset=message.offset,
        key=message.key,
        value=message.value,
        headers=[(k, v if isinstance(v, bytes) else str(v).encode()) for k, v in headers],
        timestamp_ms=int(message.timestamp * 1000),
    )


class ProjectionApp:
    """A Faust app for one projection, with the resources its agent needs."""

    def __init__(
        self,
        settings: Settings,
        projection: Projection,
        datadir: Path | None = None,
        on_failure: Callable[[str], None] | None = None,
        on_retired: Callable[[], None] | None = None,
        in_group: bool = False,
    ) -> None:
        _read_committed_consumer_thread()
        kafka.wait_long_only_for_whole_fetches(settings)
        refetch_skipped_records(settings)
        self.settings = settings
        self.projection = projection
        # alone in a process: exit at once / stop the process; in a group: the group's
        self.on_failure = on_failure or (lambda why: _exit_unacked(why, projection.name))
        self.on_retired = on_retired or (lambda: os.kill(os.getpid(), signal.SIGTERM))
        self.failure: str | None = None
        self.topics = Topics(settings.topic_prefix)
        self.group_id = group_id(settings, projection)
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}"
        # Faust keeps local table state here; projections use no Faust tables.
        datadir = datadir or Path(tempfile.gettempdir()) / "cqrs-faust" / self.group_id
        datadir.parent.mkdir(parents=True, exist_ok=True)
        self.app = faust.App(
            self.group_id,
            broker=f"kafka://{settings.kafka_bootstrap}",
            value_serializer="raw",
            key_serializer="raw",
            web_enabled=False,
            topic_disable_leader=True,
            topic_partitions=settings.partitions,
            consumer_auto_offset_reset="earliest",
            broker_commit_interval=0.5,
            stream_wait_empty=False,
            datadir=str(datadir),
        )
        self.app.conf.cqrs_fetch_max_wait_ms = settings.kafka_fetch_max_wait_ms
        source = self.app.topic(
            *[self.topics.events(c) for c in projection.contexts],
            key_type=bytes,
            value_type=bytes,
            value_serializer="raw",
            key_serializer="raw",
        )
        self.projector: Projector | None = None
        # Beside others in one process, a crashed agent crashes its app, which the group
        # stops and starts again with a growing pause (not restarted in place at once).
        self.app.agent(
            source,
            name=f"project-{projection.name}",
            supervisor_strategy=mode.CrashingSupervisor if in_group else None,
        )(self._agent)
        self.app.timer(HEARTBEAT_S)(self._heartbeat)
        self.app.timer(REQUESTS_S)(self._serve_requests)

    async def _start_projector(self) -> Projector:
        """The projector and what it holds; what was opened is closed again if a step fails."""
        settings = self.settings
        await migrate(settings)
        await ensure_topics(settings, [dlq_topic(settings, self.projection.name)])
        async with contextlib.AsyncExitStack() as opened:
            await self.projection.open(settings)
            opened.push_async_callback(self.projection.close)
            role = f"projection:{self.projection.name}:v{self.projection.version}"
            # its connections keep no session state: released without the default reset's round trip
            pool = await create_pool(settings, role, min_size=1, max_size=2, reset=keep_session)
            opened.push_async_callback(pool.close)
            await versions.register(pool, self.projection.name)
            producer = kafka.producer(settings)
            await producer.start()
            opened.push_async_callback(producer.stop)
            projector = Projector(self.projection, pool, producer, AvroCodec.from_directory(), self.topics)
            projector.silent = (
                await versions.state_of(pool, self.projection.name, self.projection.version) == "building"
            )
            opened.pop_all()  # all open: _close_projector closes them
        return projector

    async def _agent(self, stream: Any) -> None:
        if self.projector is None:
            self.projector = await self._start_projector()
        projector = self.projector
        log.info(
            "projection started",
            extra={
                "projection": self.projection.name,
                "version": self.projection.version,
                "group": self.group_id,
            },
        )
        try:
            batches = take_batches(
                stream, self.settings.projection_batch_max, self.settings.projection_batch_wait_ms / 1000
            )
            async for events in batches:
                batch = asyncio.ensure_future(self._apply(projector, [_record(e.message) for e in events]))
                try:
                    await asyncio.shield(batch)
                except asyncio.CancelledError:
                    if await self._finished(batch):  # stopping: the batch in flight may end
                        await ack(stream, events)
                    raise
                except Exception:
                    # nothing after this batch may be applied before it: take no more
                    self.failure = "batch not applied after retries"
                    self.on_failure(self.failure)
                    await asyncio.Event().wait()  # until the app is stopped
                await ack(stream, events)
        finally:
            await self._close_projector()

    async def _apply(self, projector: Projector, records: list[Record]) -> None:
        for attempt, pause in enumerate((*RETRY_S, None)):
            try:
                await projector.handle(records)
                return
            except Exception:
                if pause is None:
                    raise
                log.warning(
                    "batch not applied; retrying",
                    extra={"projection": self.projection.name, "attempt": attempt + 1},
                    exc_info=True,
                )
                await asyncio.sleep(pause)

    async def _finished(self, batch: asyncio.Future[None]) -> bool:
        """The worker is stopping mid-batch: did the batch get applied within the grace?
        If not, it is not acked, so not committed: it comes again (applying twice is a no-op)."""
        with contextlib.suppress(BaseException):
            await asyncio.wait_for(asyncio.shield(batch), STOP_GRACE_S)
        if not batch.done():  # its transaction is rolled back; nothing of it is acked
            batch.cancel()
            with contextlib.suppress(BaseException):
                await batch
        ok = batch.done() and not batch.cancelled() and batch.exception() is None
        if not ok:
            log.warning(
                "stopped with a batch not applied; it comes again", extra={"projection": self.projection.name}
            )
        return ok

    async def _close_projector(self) -> None:
        projector, self.projector = self.projector, None
        if projector is not None:
            await projector.producer.stop()
            await projector.pool.close()
            await self.projection.close()

    async def _serve_requests(self) -> None:
        """Retry or skip the dead letters operators asked to (`projections.parking`)."""
        if self.projector is None:
            return
        try:
            await self.projector.serve_requests()
        except Exception as exc:  # the request stays waiting; tried again at the next tick
            log.warning(
                "dead-letter requests not served",
                extra={"projection": self.projection.name, "error": repr(exc)},
            )

    async def _heartbeat(self) -> None:
        """Say this worker is alive; stop it once its version is retired (a rebuild
        swapped another one in: the supervisor runs that one)."""
        if self.projector is None:
            return
        pool, name, version = self.projector.pool, self.projection.name, self.projection.version
        try:
            await versions.heartbeat(pool, name, version, self.worker_id)
            state = await versions.state_of(pool, name, version)
        except (OSError, asyncpg.PostgresError) as exc:
            log.warning("heartbeat failed", extra={"projection": name, "error": repr(exc)})
            return
        self.projector.silent = state == "building"
        if state in ("retired", "failed"):
            log.info(
                "version no longer wanted; stopping",
                extra={"projection": name, "version": version, "state": state},
            )
            self.on_retired()

    async def start(self) -> None:
        """Run in the current event loop, beside other apps (`streams.group`)."""
        await self.app.start()

    async def stop(self) -> None:
        await self.app.stop()

    def run(self) -> None:
        """Run the Faust worker until it is signalled to stop."""
        run_worker(self.app, self.settings)


def run_worker(app: faust.App, settings: Settings) -> None:
    """A Faust app alone in this process, as a worker, until it is signalled to stop."""
    worker = faust.Worker(
        app,
        loglevel=settings.log_level.upper(),
        logging_config=logging_config(settings.log_level, settings.log_json),
        quiet=True,
    )
    worker.execute_from_commandline()
