"""Stream-processing jobs: Faust agents beside the projections that keep state in Faust
tables and act by sending commands through the normal command path.

A job (`Job`) reads the events topics of some contexts with a consumer group of its
own (`<prefix>.job.<name>`), one event at a time in partition order, and may keep
state in Faust tables (each with its changelog topic on our Kafka, restored when a
worker takes a partition). What it decides it sends as commands through the command
bus, to the owner of the aggregate's partition, exactly as the API does; each command
id is derived from what the job reacted to, so a redelivered event, a restart or a
replay sends the same ids again, which the owner answers with their first outcome
(and the aggregates refuse repeats of a decision older than their state).

Delivery is at least once: an event is acked (its offset committed, after the table's
changelog writes are flushed) only once its handler returned. Table values keep the
version of the last event of their aggregate they reflect, and skip events at or
below it, so applying twice changes nothing. While the command path is away
(no owner, Kafka or Redis down) the handler retries the same command, in order, with a
growing pause. An event that cannot be decoded or that the handler refuses goes to
`<prefix>.dlq.job-<name>` with the error and parks its key: the job's later records of
that key are held (in PostgreSQL, before they are acked) while the rest keeps flowing,
until an operator retries or skips the dead letter (`projections.parking`); the worker
that holds the key's partition then handles the held records in order.

A job may read other topics than events (`source_topics`, `decode`: the CDC job reads
Debezium's change events), and may handle records of different keys at once
(`concurrency` above 1): it then takes what arrived in a batch, handles each key's
records in order and up to `concurrency` keys at a time, and acks the batch when all
of it is handled. A handler that finds it cannot go on without a person (`Halt`: a
source table lost a column it maps, say) stops the job where it is: the record and
those after it are not acked, the error is logged and kept in Redis for the admin
routes, and the job waits to be restarted once the cause is mended.

`cqrs run jobs` runs every job in one process (each its own Faust app and group,
restarted with a growing pause when it crashes); `cqrs run job NAME` one.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import socket
import tempfile
import time
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar
from uuid import UUID, uuid5

import faust
import mode
import orjson
from faust.streams import _current_event
from redis.asyncio import Redis
from redis.exceptions import RedisError

from commands.bus import BusUnavailable, CommandBus, ResultTimeout
from commands.context import BoundedContext
from commands.transaction import dead_letter
from projections import parking
from projections.db import create_pool
from projections.events import Record, StoredEvent, decode
from projections.migrations import migrate
from shared_kernel import kafka, metrics, tracing
from shared_kernel.avro import AvroCodec
from shared_kernel.envelope import CommandResult
from shared_kernel.settings import Settings
from shared_kernel.topics import Topics, dlq_topic, ensure_topics
from streams import skipped
from streams.app import _read_committed_consumer_thread, _record, run_worker
from streams.batches import ack, take_batches
from streams.skipped import refetch_skipped_records

log = logging.getLogger(__name__)

JOB_COMMANDS = UUID("5b0f3c1e-7a4d-4c62-9a0e-2f6d8b1c4e77")  # namespace of derived command ids
RETRY_S = (0.2, 0.5, 1, 2, 5, 10)
PROGRESS_S = 30.0  # how often a job logs what it has done (like the command processor)
REQUESTS_S = 0.5  # how often operators' retries and skips of dead letters are looked for
HANDLED_REFUSALS = frozenset({"invariant_violation", "already_exists", "not_found"})


class _Message:
    """What a Faust table asks of the event being handled (partition, topic, time)."""

    def __init__(self, record: Record) -> None:
        self.topic, self.partition, self.offset = record.topic, record.partition, record.offset
        self.key, self.value, self.headers = record.key, record.value, record.headers
        self.timestamp = record.timestamp_ms / 1000
        self.tp = faust.types.TP(record.topic, record.partition)


class _HeldEvent:
    """A held record handled again outside the stream, as Faust's current event."""

    def __init__(self, record: Record) -> None:
        self.message = _Message(record)


class Poison(ValueError):
    """The handler cannot act on this event (it is malformed for it): dead-letter it."""


class Halt(RuntimeError):
    """The job cannot go on without a person (its input changed shape): stop it here."""


def halt_key(prefix: str, job: str) -> str:
    """Where a halted job keeps its error (Redis), for the admin routes."""
    return f"{prefix}:job:{job}:halted"


async def halted(redis: Redis, prefix: str, job: str) -> dict[str, Any] | None:
    """The error a job halted on, if it is halted."""
    raw = await redis.get(halt_key(prefix, job))
    return None if raw is None else dict(orjson.loads(raw))


def derived_id(*parts: object) -> str:
    """A command id that is a function of what it answers (the same on every replay)."""
    return str(uuid5(JOB_COMMANDS, "/".join(str(p) for p in parts)))


class JsonTable:
    """A Faust table of JSON values under text keys (stored as bytes: the apps' serializer
    is raw). A write goes to the changelog partition of the event being handled."""

    def __init__(self, app: faust.App, name: str, partitions: int) -> None:
        """The table `name` of `app`, co-partitioned with the events topics."""
        self.table = app.Table(name, default=None, partitions=partitions, key_type=bytes, value_type=bytes)

    def get(self, key: str) -> Any:
        raw = self.table.get(key.encode())
        return None if raw is None else orjson.loads(raw)

    def __setitem__(self, key: str, value: Any) -> None:
        self.table[key.encode()] = orjson.dumps(value)

    def __delitem__(self, key: str) -> None:
        with contextlib.suppress(KeyError):
            del self.table[key.encode()]

    def items(self) -> list[tuple[str, Any]]:
        return [(k.decode(), orjson.loads(v)) for k, v in list(self.table.items()) if v is not None]


class Job:
    """What a job is: the contexts it reads, its tables, and what it does per event."""

    name: ClassVar[str]
    contexts: ClassVar[tuple[str, ...]] = ()
    concurrency: int = 1  # keys handled at once (each key's records in order)
    batch_max: int = 1000  # records taken in one batch when concurrency > 1

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.runner: JobApp | None = None

    def source_topics(self, topics: Topics) -> list[str]:
        """The topics the job reads: by default the events topics of its contexts."""
        return [topics.events(c) for c in self.contexts]

    def decode(self, codec: AvroCodec, record: Any) -> Any:
        """What `handle` is given for a record (None: nothing to handle); an exception
        dead-letters the record."""
        return decode(codec, record)

    async def prepare(self) -> None:
        """Before the job's Faust app starts (whatever it needs outside, its input topics)."""

    def tables(self, app: faust.App) -> None:
        """Declare the job's Faust tables on `app`."""

    def timers(self, app: faust.App) -> None:
        """Declare the job's timers on `app`."""

    async def handle(self, event: Any) -> None:
        raise NotImplementedError

    def progress(self) -> dict[str, Any]:
        """What the job adds to its periodic `progress` log line (its timers, say)."""
        return {}

    async def send(
        self,
        context: BoundedContext,
        command: Any,
        command_id: str,
        tenant: str,
        cause: StoredEvent | None,
        correlation_id: str = "",
    ) -> CommandResult:
        """A command through the command path, as the job's actor (see `JobApp.send`)."""
        assert self.runner is not None
        return await self.runner.send(context, command, command_id, tenant, cause, correlation_id)


class JobApp:
    """A job's Faust app (its consumer group), its command bus and its dead letters."""

    def __init__(self, settings: Settings, job: Job, in_group: bool = False) -> None:
        _read_committed_consumer_thread()
        kafka.wait_long_only_for_whole_fetches(settings)
        refetch_skipped_records(settings)
        self.settings = settings
        self.job = job
        job.runner = self
        self.topics = Topics(settings.topic_prefix)
        self.group_id = f"{settings.topic_prefix}.job.{job.name}"
        self.consumer_name = f"job-{job.name}"
        self.dlq = self.topics.dlq(self.consumer_name)
        metrics.known_consumers([self.consumer_name])
        self.codec = AvroCodec.from_directory()
        self.handled = 0
        self.dead = 0
        self.commands = 0
        self.held = 0
        self.bus: CommandBus | None = None
        self.redis: Redis | None = None
        # the keys parked behind a dead letter, and one hold or release at a time
        self.pool: Any = None
        self.parked: set[str] = set()
        self.parking_lock = asyncio.Lock()
        self.halted: str | None = None
        self._halt_cleared = False
        self._resources: contextlib.AsyncExitStack | None = None
        self.producer: Any = None
        datadir = (
            Path(tempfile.gettempdir())
            / "cqrs-faust"
            / f"{self.group_id}-{socket.gethostname()}-{os.getpid()}"
        )
        datadir.parent.mkdir(parents=True, exist_ok=True)
        self.app = faust.App(
            self.group_id,
            broker=f"kafka://{settings.kafka_bootstrap}",
            value_serializer="raw",
            key_serializer="raw",
            web_enabled=False,
            topic_disable_leader=True,
            topic_partitions=settings.partitions,
            topic_replication_factor=settings.replication_factor,
            consumer_auto_offset_reset="earliest",
            broker_commit_interval=0.5,
            # a worker killed outright holds its partitions until the broker gives up on it
            # (Faust's default is 60 s): 10 s, beating every 2 s
            broker_session_timeout=10.0,
            broker_heartbeat_interval=2.0,
            table_standby_replicas=0,
            # a stopping worker does not wait for events in flight (a halted job's never
            # end): what was not acked comes again to the next owner
            stream_wait_empty=False,
            store="memory://",
            datadir=str(datadir),
        )
        self.app.conf.cqrs_fetch_max_wait_ms = settings.kafka_fetch_max_wait_ms
        source = self.app.topic(
            *job.source_topics(self.topics),
            key_type=bytes,
            value_type=bytes,
            value_serializer="raw",
            key_serializer="raw",
        )
        job.tables(self.app)
        job.timers(self.app)
        self.app.timer(PROGRESS_S)(self._progress)
        self.app.timer(REQUESTS_S)(self._serve_requests)
        self.app.agent(
            source,
            name=f"job-{job.name}",
            supervisor_strategy=mode.CrashingSupervisor if in_group else None,
        )(self._agent)

    async def _progress(self) -> None:
        """What the job has done so far and where it reads: a job that holds partitions
        but handles nothing shows it here."""
        consumer: Any = self.app.consumer
        sources = set(self.job.source_topics(self.topics))
        mine = sorted((tp for tp in consumer.assignment() if tp.topic in sources), key=lambda tp: tp[:2])
        reading = [f"{tp.topic}:{tp.partition}" for tp in mine]
        # where each partition is read and how far it goes: a partition paused, or read
        # no further than an open transaction lets it, shows here
        at: dict[str, dict[str, Any]] = {}
        for tp in mine:
            with contextlib.suppress(Exception):
                at[str(tp.partition)] = {
                    "position": await consumer.position(tp),
                    "highwater": consumer.highwater(tp),
                    "stable": consumer._thread._ensure_consumer().last_stable_offset(tp),
                    "paused": tp in consumer._paused_partitions,
                }
        log.info(
            "progress",
            extra={
                "job": self.job.name,
                "handled": self.handled,
                "dead_lettered": self.dead,
                "held": self.held,
                "parked": len(self.parked),
                "commands": self.commands,
                "partitions": reading,
                "reading": at,
                "halted": self.halted or "",
                "reread": dict(skipped.rereads),
                **self.job.progress(),
            },
        )

    async def _open(self) -> CommandBus:
        if self.bus is not None:
            return self.bus
        await ensure_topics(self.settings, [dlq_topic(self.settings, f"job-{self.job.name}")])
        stack = contextlib.AsyncExitStack()
        producer = kafka.producer(self.settings)
        await producer.start()
        stack.push_async_callback(producer.stop)
        redis = Redis.from_url(self.settings.redis_url, socket_timeout=5, socket_connect_timeout=2)
        stack.push_async_callback(redis.aclose)
        bus = CommandBus(self.settings, producer, redis)
        await bus.start()
        stack.push_async_callback(bus.stop)
        await migrate(self.settings)
        pool = await create_pool(self.settings, f"job:{self.job.name}", min_size=1, max_size=2)
        stack.push_async_callback(pool.close)
        self.parked = await parking.parked(pool, self.consumer_name, parking.UNVERSIONED)
        self._resources, self.bus, self.producer, self.redis, self.pool = stack, bus, producer, redis, pool
        return bus

    async def close(self) -> None:
        stack, self._resources, self.bus = self._resources, None, None
        if stack is not None:
            await stack.aclose()

    async def _agent(self, stream: Any) -> None:
        await self._open()
        log.info("job started", extra={"job": self.job.name, "group": self.group_id})
        try:
            if self.job.concurrency > 1:
                async for batch in take_batches(stream, self.job.batch_max, 0.05):
                    await self._handle_batch(batch)
                    await ack(stream, batch)
                    await self._resumed()
            else:
                async for message in stream.events():
                    await self._handle(message.message)
                    await self._resumed()
        except Halt as exc:
            await self._halt(exc)
        finally:
            await self.close()

    async def _handle(self, message: Any) -> None:
        """One record: held behind its parked key, or decoded and handled, or
        dead-lettered with the reason (its key parked)."""
        record = _record(message)
        key = parking.key_of(record)
        if key is not None and key in self.parked:
            async with self.parking_lock:
                if key in self.parked:
                    if await parking.hold(self.pool, self.consumer_name, parking.UNVERSIONED, record):
                        self.held += 1
                        return
                    self.parked.discard(key)  # let go by another worker meanwhile
        error = await self._attempt(record)
        if error is not None:
            await self._dead_letter(record, error)

    async def _attempt(self, record: Record) -> str | None:
        """Decode and handle `record`: None, or why it cannot be (it is poison)."""
        try:
            item = self.job.decode(self.codec, record)
        except Exception as exc:  # anything undecodable is poison
            return f"cannot decode: {type(exc).__name__}: {exc}"
        if item is None:
            return None
        traceparent = item.meta.traceparent if isinstance(item, StoredEvent) else ""
        try:
            with tracing.continued(f"job {self.job.name}", traceparent, **{"cqrs.job": self.job.name}):
                await self.job.handle(item)
        except (Poison, KeyError, TypeError, ValueError) as exc:
            return f"{type(exc).__name__}: {exc}"
        self.handled += 1
        metrics.JOB_EVENTS.labels(self.job.name, "handled").inc()
        return None

    async def _handle_batch(self, events: list[Any]) -> None:
        """Each key's records in order, up to `concurrency` keys at once. A table write
        goes to the changelog partition of the record being handled (each key's task
        has its own current event)."""
        by_key: dict[tuple[int, bytes | None], list[Any]] = {}
        for event in events:
            by_key.setdefault((event.message.partition, event.message.key), []).append(event)
        room = asyncio.Semaphore(self.job.concurrency)

        async def in_order(its: list[Any]) -> None:
            async with room:
                for event in its:
                    _current_event.set(weakref.ref(event))
                    await self._handle(event.message)

        outcomes = await asyncio.gather(*(in_order(its) for its in by_key.values()), return_exceptions=True)
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome  # the batch is not acked: it comes again after a restart

    async def _halt(self, exc: Halt) -> None:
        """Stop here: nothing more is handled or acked until the job is restarted."""
        self.halted = str(exc)
        log.error("job halted: it needs a person", extra={"job": self.job.name, "error": str(exc)})
        if self.redis is not None:
            record = {"error": str(exc), "since": time.time(), "group": self.group_id}
            with contextlib.suppress(RedisError, OSError):
                await self.redis.set(
                    halt_key(self.settings.topic_prefix, self.job.name), orjson.dumps(record)
                )
        await asyncio.Event().wait()  # until the app stops (it cancels the agent)

    async def _resumed(self) -> None:
        """A record went through: a halt recorded before a restart is over."""
        if self._halt_cleared or not (self.handled or self.dead) or self.redis is None:
            return
        with contextlib.suppress(RedisError, OSError):
            await self.redis.delete(halt_key(self.settings.topic_prefix, self.job.name))
            self._halt_cleared = True

    async def _dead_letter(self, record: Record, error: str) -> None:
        """Send `record` to the dead letters and park its key behind it (before the record
        is acked: a crash in between sends it again, and parks it once)."""
        at = await self._send_dead_letter(record, error)
        key = parking.key_of(record)
        if key is not None:
            async with self.parking_lock:
                head = parking.Head(record, error, *at)
                await parking.park_behind(self.pool, self.consumer_name, parking.UNVERSIONED, head)
                self.parked.add(key)

    async def _send_dead_letter(self, record: Record, error: str) -> tuple[int, int]:
        value, headers = dead_letter(record, error, self.settings.kafka_max_message_bytes)
        assert self.producer is not None
        sent = await self.producer.send_and_wait(self.dlq, value, key=record.key, headers=headers)
        self.dead += 1
        metrics.DEAD_LETTERS.labels(f"job-{self.job.name}").inc()
        metrics.JOB_EVENTS.labels(self.job.name, "dead_lettered").inc()
        log.warning(
            "event dead-lettered",
            extra={
                "job": self.job.name,
                "error": error,
                "partition": record.partition,
                "offset": record.offset,
                "key": parking.key_of(record),
            },
        )
        return sent.partition, sent.offset

    async def _serve_requests(self) -> None:
        """Retry or skip the dead letters operators asked to, for the keys of the
        partitions this worker holds (their table state is here)."""
        if self.pool is None or self.halted:
            return
        try:
            requests = await parking.requests(self.pool, self.consumer_name, parking.UNVERSIONED)
            if not requests:
                return
            mine = {(tp.topic, tp.partition) for tp in self.app.consumer.assignment()}
            for request in requests:
                if (request.topic, request.partition) in mine:
                    async with self.parking_lock:
                        await self._release(request)
        except Exception as exc:  # the request stays waiting; tried again at the next tick
            log.warning("dead-letter requests not served", extra={"job": self.job.name, "error": repr(exc)})

    async def _release(self, request: parking.Request) -> None:
        """The held records in order (without the dead letter on a skip), each handled as
        the stream would, its table writes flushed before it is let go; until one fails,
        which the key is parked behind then (or, on a retry, the same one still fails)."""
        name, version, key = self.consumer_name, parking.UNVERSIONED, request.key
        async with self.pool.acquire() as conn:
            if await parking.requested(conn, name, version, key) != request.action_id:
                return  # done already
            items, drop = await parking.release_start(conn, name, version, request)
            applied = 0
            while True:
                for i, (seq, record) in enumerate(items):
                    error = await self._replay(record)
                    if error is None:
                        await self.app.producer.flush()  # its table writes are in the changelog
                        async with conn.transaction():
                            await parking.let_go(conn, name, version, key, [*drop, seq])
                        drop = []
                        applied += 1
                        continue
                    same = i == 0 and applied == 0 and request.action == "retry"
                    at = None if same else await self._send_dead_letter(record, error)
                    failed = None if at is None else parking.Head(record, error, *at)
                    await parking.stopped(conn, name, version, request, drop, failed, error, applied)
                    return
                if not await parking.released(conn, name, version, request, drop, applied):
                    drop = []
                    async with conn.transaction():
                        items = await parking.held(conn, name, version, key)
                    continue
                self.parked.discard(key)
                log.info(
                    "parked key released",
                    extra={"job": self.job.name, "key": key, "action": request.action, "applied": applied},
                )
                return

    async def _replay(self, record: Record) -> str | None:
        """Handle a held record outside the stream: its table writes go to the changelog
        partition of the record, as when the stream hands it over."""
        stand_in = _HeldEvent(record)
        token = _current_event.set(weakref.ref(stand_in))  # type: ignore[arg-type]
        try:
            return await self._attempt(record)
        except Halt as exc:
            return f"Halt: {exc}"
        finally:
            _current_event.reset(token)

    async def send(
        self,
        context: BoundedContext,
        command: Any,
        command_id: str,
        tenant: str,
        cause: StoredEvent | None = None,
        correlation_id: str = "",
    ) -> CommandResult:
        """Send a command and return its outcome; a refusal the domain makes of a repeat
        (already decided, already there) is an outcome too. While the command path is
        away, the same command is sent again (same id) with a growing pause."""
        bus = await self._open()
        envelope = context.envelope(
            command,
            command_id,
            actor=f"job:{self.job.name}",
            tenant=tenant,
            correlation_id=correlation_id or (cause.meta.correlation_id if cause else command_id),
            traceparent=tracing.current_traceparent(cause.meta.traceparent if cause else ""),
        )
        command_type = envelope.command_type
        for attempt in itertools.count():
            try:
                result = await bus.send(envelope)
            except (BusUnavailable, ResultTimeout) as exc:
                pause = RETRY_S[min(attempt, len(RETRY_S) - 1)]
                log.warning(
                    "command not sent yet; retrying",
                    extra={
                        "job": self.job.name,
                        "command": command_type,
                        "error": repr(exc),
                        "pause_s": pause,
                    },
                )
                await asyncio.sleep(pause)
                continue
            self.commands += 1
            if not result.accepted and result.code not in HANDLED_REFUSALS:
                raise Poison(f"{command_type} refused: {result.code}: {result.reason}")
            log.info(
                "command sent",
                extra={
                    "job": self.job.name,
                    "command": command_type,
                    "aggregate_id": envelope.aggregate_id,
                    "command_id": command_id,
                    "status": result.status,
                    "code": result.code,
                },
            )
            return result
        raise AssertionError("itertools.count() ends")

    async def start(self) -> None:
        await self.job.prepare()
        await self.app.start()

    async def stop(self) -> None:
        await self.app.stop()

    def run(self) -> None:
        """Alone in this process: prepared on the loop the worker then runs on (the
        topics it reads must exist before Faust checks its tables against them)."""
        self.app.loop.run_until_complete(self.job.prepare())
        run_worker(self.app, self.settings)


async def run_jobs(settings: Settings, jobs: Sequence[type[Job]], stop: asyncio.Event) -> None:
    """Each job a Faust app in this event loop, started again with a growing pause when it
    crashes or fails to start, until `stop` is set."""
    await asyncio.gather(*(_keep_running(settings, job, stop) for job in jobs))


async def _keep_running(settings: Settings, job_class: type[Job], stop: asyncio.Event) -> None:
    pause = 1.0
    while not stop.is_set():
        runner = JobApp(settings, job_class(settings), in_group=True)
        try:
            await runner.start()
            log.info("job running in this process", extra={"job": job_class.name})
            while not stop.is_set() and not runner.app.crashed:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 1.0)
            if runner.app.crashed:
                log.error("job crashed; starting it again", extra={"job": job_class.name, "pause_s": pause})
        except Exception:
            log.exception("job failed to start; starting it again", extra={"job": job_class.name})
        finally:
            with contextlib.suppress(Exception):
                await runner.stop()
            with contextlib.suppress(Exception):
                await runner.close()
        if stop.is_set():
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), pause)
        pause = min(pause * 2, 30)
