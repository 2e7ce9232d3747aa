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
`<prefix>.dlq.job-<name>` with the error and the rest keeps flowing.

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
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar
from uuid import UUID, uuid5

import faust
import mode
import orjson
from redis.asyncio import Redis

from commands.bus import BusUnavailable, CommandBus, ResultTimeout
from commands.context import BoundedContext
from commands.transaction import dead_letter
from projections.events import StoredEvent, decode
from shared_kernel import kafka
from shared_kernel.avro import AvroCodec
from shared_kernel.envelope import CommandResult
from shared_kernel.settings import Settings
from shared_kernel.topics import Topics, dlq_topic, ensure_topics
from streams.app import _read_committed_consumer_thread, _record, run_worker

log = logging.getLogger(__name__)

JOB_COMMANDS = UUID("5b0f3c1e-7a4d-4c62-9a0e-2f6d8b1c4e77")  # namespace of derived command ids
RETRY_S = (0.2, 0.5, 1, 2, 5, 10)
HANDLED_REFUSALS = frozenset({"invariant_violation", "already_exists", "not_found"})


class Poison(ValueError):
    """The handler cannot act on this event (it is malformed for it): dead-letter it."""


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
    contexts: ClassVar[tuple[str, ...]]

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.runner: JobApp | None = None

    def tables(self, app: faust.App) -> None:
        """Declare the job's Faust tables on `app`."""

    def timers(self, app: faust.App) -> None:
        """Declare the job's timers on `app`."""

    async def handle(self, event: StoredEvent) -> None:
        raise NotImplementedError

    async def send(
        self, context: BoundedContext, command: Any, command_id: str, tenant: str, cause: StoredEvent | None
    ) -> CommandResult:
        """A command through the command path, as the job's actor (see `JobApp.send`)."""
        assert self.runner is not None
        return await self.runner.send(context, command, command_id, tenant, cause)


class JobApp:
    """A job's Faust app (its consumer group), its command bus and its dead letters."""

    def __init__(self, settings: Settings, job: Job, in_group: bool = False) -> None:
        _read_committed_consumer_thread()
        kafka.wait_long_only_for_whole_fetches(settings)
        self.settings = settings
        self.job = job
        job.runner = self
        self.topics = Topics(settings.topic_prefix)
        self.group_id = f"{settings.topic_prefix}.job.{job.name}"
        self.dlq = self.topics.dlq(f"job-{job.name}")
        self.codec = AvroCodec.from_directory()
        self.handled = 0
        self.dead = 0
        self.commands = 0
        self.bus: CommandBus | None = None
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
            store="memory://",
            datadir=str(datadir),
        )
        self.app.conf.cqrs_fetch_max_wait_ms = settings.kafka_fetch_max_wait_ms
        source = self.app.topic(
            *[self.topics.events(c) for c in job.contexts],
            key_type=bytes,
            value_type=bytes,
            value_serializer="raw",
            key_serializer="raw",
        )
        job.tables(self.app)
        job.timers(self.app)
        self.app.agent(
            source,
            name=f"job-{job.name}",
            supervisor_strategy=mode.CrashingSupervisor if in_group else None,
        )(self._agent)

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
        self._resources, self.bus, self.producer = stack, bus, producer
        return bus

    async def close(self) -> None:
        stack, self._resources, self.bus = self._resources, None, None
        if stack is not None:
            await stack.aclose()

    async def _agent(self, stream: Any) -> None:
        await self._open()
        log.info("job started", extra={"job": self.job.name, "group": self.group_id})
        try:
            async for message in stream.events():
                record = _record(message.message)
                try:
                    event = decode(self.codec, record)
                except Exception as exc:  # anything undecodable is poison
                    await self._dead_letter(record, f"cannot decode: {type(exc).__name__}: {exc}")
                    continue
                try:
                    await self.job.handle(event)
                except (Poison, KeyError, TypeError, ValueError) as exc:
                    await self._dead_letter(record, f"{type(exc).__name__}: {exc}")
                    continue
                self.handled += 1
        finally:
            await self.close()

    async def _dead_letter(self, record: Any, error: str) -> None:
        value, headers = dead_letter(record, error, self.settings.kafka_max_message_bytes)
        assert self.producer is not None
        await self.producer.send_and_wait(self.dlq, value, key=record.key, headers=headers)
        self.dead += 1
        log.warning(
            "event dead-lettered",
            extra={
                "job": self.job.name,
                "error": error,
                "partition": record.partition,
                "offset": record.offset,
            },
        )

    async def send(
        self,
        context: BoundedContext,
        command: Any,
        command_id: str,
        tenant: str,
        cause: StoredEvent | None = None,
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
            correlation_id=cause.meta.correlation_id if cause else command_id,
            traceparent=cause.meta.traceparent if cause else "",
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
        await self.app.start()

    async def stop(self) -> None:
        await self.app.stop()

    def run(self) -> None:
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
