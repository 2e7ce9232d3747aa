"""The command processor: the single writer of every aggregate of the partitions it owns.

A consumer group on `<prefix>.commands`. For each owned partition there is one
`PartitionWorker` with its own transactional producer (transactional id per input
partition, so initialising it fences a stale owner) and the partition's aggregates
restored from the state topics. A fetched batch is decided command by command, and
its events, the new snapshots, dead letters and the consumed offset are committed in
one Kafka transaction. On any failure the transaction is aborted, the partition's
state is restored again and the partition re-read from its committed offset: a crash
anywhere yields neither lost nor duplicated events.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.errors import KafkaError, ProducerFenced
from redis.asyncio import Redis
from redis.exceptions import RedisError

from commands import CONTEXTS, replies
from commands.context import BoundedContext
from commands.decide import decide
from commands.serialization import EventRecord, to_record
from commands.snapshots import LoadedAggregate, dump, load
from commands.state_store import Key, PartitionState, restore
from shared_kernel import kafka
from shared_kernel.avro import AvroCodec
from shared_kernel.clock import fixed_clock, using_clock
from shared_kernel.domain import DomainError
from shared_kernel.envelope import CommandEnvelope, CommandResult, MalformedRecord
from shared_kernel.position import Position, PositionToken
from shared_kernel.settings import Settings
from shared_kernel.topics import Topics, contract_topics, ensure_topics

log = logging.getLogger(__name__)

CONSUMER_NAME = "command-processor"


@dataclass
class _Accepted:
    reply_to: str
    command: CommandEnvelope
    key: Key
    events: list[EventRecord]


@dataclass
class _Batch:
    """What one transaction will write, and the answers to give once it has committed."""

    accepted: list[_Accepted] = field(default_factory=list)
    answers: list[tuple[str, CommandResult]] = field(default_factory=list)  # ready (rejections, duplicates)
    # Copies of a command accepted earlier in this batch (a client retried while the
    # first copy was in flight): answered with the first copy's result after commit.
    repeats: list[tuple[str, Key, str]] = field(default_factory=list)
    accepted_ids: set[str] = field(default_factory=set)
    touched: dict[Key, LoadedAggregate] = field(default_factory=dict)
    dead_letters: list[tuple[ConsumerRecord[bytes, bytes], str]] = field(default_factory=list)


class PartitionWorker:
    """Owns one partition of the commands topic."""

    def __init__(self, processor: CommandProcessor, partition: int) -> None:
        self.p = processor
        self.partition = partition
        self.tp = TopicPartition(processor.topics.commands, partition)
        self.transactional_id = f"{processor.group_id}.{partition}"
        self.producer = kafka.transactional_producer(
            processor.settings, self.transactional_id, linger_ms=0, request_timeout_ms=30_000
        )
        self.state = PartitionState(processor.contexts)
        self.next_offset = 0  # first offset not yet committed
        self.queued_upto = 0  # first offset not yet handed to this worker
        self.fenced = False
        self.stopping = False
        self.pending: list[ConsumerRecord[bytes, bytes]] = []
        self.wakeup = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    async def start(self, consumer: AIOKafkaConsumer) -> None:
        # Order matters: initialising the transactional id fences the previous owner and
        # completes or aborts its open transaction; only then are the state topics and
        # the committed offset final.
        await self.producer.start()
        self.state = await restore(self.p.settings, self.p.contexts, self.partition)
        await self._rewind(consumer)
        self.task = asyncio.create_task(self._run(consumer), name=f"partition-{self.partition}")

    async def _rewind(self, consumer: AIOKafkaConsumer) -> None:
        committed = await consumer.committed(self.tp)
        self.next_offset = self.queued_upto = committed if committed is not None else 0
        self.pending.clear()
        consumer.seek(self.tp, self.next_offset)

    def offer(self, records: Sequence[ConsumerRecord[bytes, bytes]]) -> int:
        """Queue fetched records (skipping any fetched before a rewind); returns the backlog."""
        fresh = [r for r in records if r.offset >= self.queued_upto]
        if fresh:
            self.pending.extend(fresh)
            self.queued_upto = fresh[-1].offset + 1
            self.wakeup.set()
        return len(self.pending)

    async def stop(self) -> None:
        """Let the transaction in flight commit or abort, then stop."""
        self.stopping = True
        self.wakeup.set()
        if self.task is not None:
            await asyncio.gather(self.task, return_exceptions=True)
        await self.producer.stop()

    async def _run(self, consumer: AIOKafkaConsumer) -> None:
        """Group commit: whatever queued up while the last transaction was in flight
        goes into the next one, so batches grow with the load and stay small when idle."""
        settings = self.p.settings
        window = settings.command_batch_window_ms / 1000
        while not self.fenced:
            await self.wakeup.wait()
            if window and not self.stopping:
                await asyncio.sleep(window)
            if self.stopping:
                return
            self.wakeup.clear()
            records = self.pending[: settings.command_batch_max]
            del self.pending[: len(records)]
            if self.pending:
                self.wakeup.set()
            if records:
                await self.process(consumer, records)
                if len(self.pending) < settings.command_batch_max:
                    self.p.resume(self.tp)

    async def process(
        self, consumer: AIOKafkaConsumer, records: Sequence[ConsumerRecord[bytes, bytes]]
    ) -> None:
        records = [r for r in records if r.offset >= self.next_offset]
        if not records or self.fenced:
            return
        t0 = time.perf_counter()
        batch = self._decide(records)
        t1 = time.perf_counter()
        try:
            answers = await self._commit(batch, next_offset=records[-1].offset + 1)
        except ProducerFenced:
            log.warning(
                "fenced: another processor owns this partition now", extra={"partition": self.partition}
            )
            self.fenced = True
            return
        except Exception:
            log.exception("transaction failed; restoring the partition", extra={"partition": self.partition})
            await self._recover(consumer)
            return
        self.next_offset = records[-1].offset + 1
        t2 = time.perf_counter()
        await self.p.reply(answers)
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "batch committed",
                extra={
                    "partition": self.partition,
                    "commands": len(records),
                    "decide_ms": round((t1 - t0) * 1000, 2),
                    "commit_ms": round((t2 - t1) * 1000, 2),
                    "reply_ms": round((time.perf_counter() - t2) * 1000, 2),
                },
            )

    def _decide(self, records: Sequence[ConsumerRecord[bytes, bytes]]) -> _Batch:
        batch = _Batch()
        for record in records:
            try:
                command = CommandEnvelope.from_bytes(record.value)
            except MalformedRecord as exc:
                batch.dead_letters.append((record, f"malformed command: {exc}"))
                continue
            context = self.p.contexts.get(command.command_type.partition(".")[0])
            key: Key = (context.name if context else "", command.aggregate_id)
            if command.command_id in batch.accepted_ids:
                batch.repeats.append((command.reply_to, key, command.command_id))
                continue
            loaded = batch.touched.get(key) or (self.state.get(key) if context else None)
            if loaded is not None and command.command_id in loaded.recent:
                batch.answers.append((command.reply_to, loaded.recent[command.command_id]))
                continue
            if context is None:
                batch.answers.append(
                    (command.reply_to, _rejected(command, "invalid_command", "unknown command type"))
                )
                continue
            # Only an aggregate already changed in this batch differs from its committed
            # snapshot; keep its current state in case the handler fails half-way.
            rollback = dump(context, loaded) if loaded is not None and key in batch.touched else None
            occurred = datetime.fromtimestamp(record.timestamp / 1000, UTC)
            try:
                with using_clock(fixed_clock(occurred)):
                    aggregate, events = decide(
                        context,
                        loaded.aggregate if loaded else None,
                        command.command_type,
                        command.payload,
                        command.expected_version,
                    )
            except DomainError as err:
                current = loaded.version if loaded else None
                result = _rejected(command, err.code, err.message, current, err.details)
                if loaded is not None:
                    loaded.remember(result)
                    batch.touched[key] = loaded
                batch.answers.append((command.reply_to, result))
                continue
            except Exception as exc:  # a bug or a poison command: dead-letter it, keep going
                log.exception("command handler failed", extra={"command_id": command.command_id})
                if rollback is not None:
                    batch.touched[key] = load(context, command.aggregate_id, rollback)
                else:
                    self.state.forget_live(key)  # next use decodes the committed snapshot again
                batch.dead_letters.append((record, f"{type(exc).__name__}: {exc}"))
                batch.answers.append(
                    (command.reply_to, _rejected(command, "internal_error", "the command failed"))
                )
                continue
            if loaded is None:
                loaded = LoadedAggregate(aggregate)
            batch.touched[key] = loaded
            batch.accepted_ids.add(command.command_id)
            batch.accepted.append(
                _Accepted(
                    command.reply_to,
                    command,
                    key,
                    [to_record(context, self.p.codec, e, command) for e in events],
                )
            )
        return batch

    async def _commit(self, batch: _Batch, next_offset: int) -> list[tuple[str, CommandResult]]:
        topics = self.p.topics
        producer = self.producer
        answers = list(batch.answers)
        async with producer.transaction():
            # The consumed offset is known up front: its two coordinator round trips
            # (AddOffsetsToTxn, TxnOffsetCommit) overlap with the produce requests.
            offsets = asyncio.ensure_future(
                producer.send_offsets_to_transaction({self.tp: next_offset}, self.p.group_id)
            )
            offsets.add_done_callback(_retrieve)  # if the body fails first, the abort says why
            sends = []
            for acc in batch.accepted:
                topic = topics.events(acc.key[0])
                for ev in acc.events:
                    sends.append(await producer.send(topic, ev.value, key=ev.key, headers=ev.headers))
            metadata = iter(await asyncio.gather(*sends))
            for acc in batch.accepted:
                # events first: zip must not pull a record metadata that belongs to the next command
                positions = [
                    Position(m.topic, m.partition, m.offset)
                    for _, m in zip(acc.events, metadata, strict=False)
                ]
                result = CommandResult(
                    command_id=acc.command.command_id,
                    status="accepted",
                    aggregate_id=acc.command.aggregate_id,
                    version=acc.events[-1].metadata.aggregate_version if acc.events else None,
                    position=PositionToken.after(positions).encode(),
                    events=len(acc.events),
                    fingerprint=acc.command.fingerprint,
                )
                batch.touched[acc.key].remember(result)
                answers.append((acc.reply_to, result))
            for reply_to, key, command_id in batch.repeats:
                answers.append((reply_to, batch.touched[key].recent[command_id]))
            snapshots = {}
            for key, loaded in batch.touched.items():
                data = dump(self.p.contexts[key[0]], loaded)
                snapshots[key] = data
                await producer.send(topics.state(key[0]), data, key=key[1].encode())
            for record, error in batch.dead_letters:
                await producer.send(
                    topics.dlq(CONSUMER_NAME),
                    record.value,
                    key=record.key,
                    headers=[
                        *record.headers,
                        ("dlq-error", error.encode()[:4000]),
                        ("dlq-source", f"{record.topic}:{record.partition}:{record.offset}".encode()),
                    ],
                )
            await offsets
        for key, data in snapshots.items():
            self.state.commit(key, data, batch.touched[key])
        if batch.dead_letters:
            self.p.dead_lettered += len(batch.dead_letters)
        self.p.processed += len(batch.accepted) + len(batch.answers)
        return answers

    async def _recover(self, consumer: AIOKafkaConsumer) -> None:
        try:
            self.state = await restore(self.p.settings, self.p.contexts, self.partition)
            await self._rewind(consumer)
        except KafkaError:
            log.exception("recovery failed; the partition is paused until the next rebalance")
            self.fenced = True


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


def _rejected(
    command: CommandEnvelope,
    code: str,
    reason: str,
    current_version: int | None = None,
    details: dict[str, Any] | None = None,
) -> CommandResult:
    safe = {
        k: v
        for k, v in (details or {}).items()
        if isinstance(v, str | int | float | bool | list | type(None))
    }
    return CommandResult(
        command_id=command.command_id,
        status="rejected",
        aggregate_id=command.aggregate_id,
        code=code,
        reason=reason,
        current_version=current_version,
        fingerprint=command.fingerprint,
        details=safe,
    )


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, processor: CommandProcessor) -> None:
        self.p = processor

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        async with self.p.lock:  # waits for the batch in flight to commit or abort
            for tp in revoked:
                worker = self.p.workers.pop(tp.partition, None)
                if worker is not None:
                    await worker.stop()
            if revoked:
                log.info("partitions revoked", extra={"partitions": sorted(tp.partition for tp in revoked)})

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        async with self.p.lock:
            consumer = self.p.consumer
            assert consumer is not None
            for tp in assigned:
                if tp.partition in self.p.workers:
                    continue
                worker = PartitionWorker(self.p, tp.partition)
                await worker.start(consumer)
                self.p.workers[tp.partition] = worker
            log.info("partitions assigned", extra={"partitions": sorted(tp.partition for tp in assigned)})


class CommandProcessor:
    """Runs the consumer loop and the partition workers until `stop` is set."""

    def __init__(self, settings: Settings, contexts: Sequence[BoundedContext] = CONTEXTS) -> None:
        self.settings = settings
        self.contexts = {c.name: c for c in contexts}
        self.codec = AvroCodec.from_directory()
        self.topics = Topics(settings.topic_prefix)
        self.group_id = f"{settings.topic_prefix}.{CONSUMER_NAME}"
        self.workers: dict[int, PartitionWorker] = {}
        self.lock = asyncio.Lock()
        self.consumer: AIOKafkaConsumer | None = None
        self.redis: Redis | None = None
        self.processed = 0
        self.dead_lettered = 0

    def resume(self, tp: TopicPartition) -> None:
        if self.consumer is not None and tp in self.consumer.paused():
            self.consumer.resume(tp)

    async def reply(self, answers: list[tuple[str, CommandResult]]) -> None:
        if not answers or self.redis is None:
            return
        try:
            await replies.publish(self.redis, self.settings.topic_prefix, answers, self.settings.result_ttl_s)
        except RedisError:
            # The events are committed; a waiting client times out and retries with its
            # Idempotency-Key, and the state topic answers the retry.
            log.warning("could not publish command results", exc_info=True)

    async def run(self, stop: asyncio.Event) -> None:
        settings = self.settings
        await ensure_topics(settings, contract_topics(settings, self.contexts, [CONSUMER_NAME]))
        self.redis = Redis.from_url(settings.redis_url)
        self.consumer = kafka.consumer(
            settings,
            group_id=self.group_id,
            isolation_level="read_committed",
            max_poll_interval_ms=300_000,
            session_timeout_ms=10_000,
            heartbeat_interval_ms=1_000,
        )
        self.consumer.subscribe([self.topics.commands], listener=_Rebalance(self))
        await self.consumer.start()
        log.info("command processor started", extra={"group": self.group_id})
        last_report = time.monotonic()
        try:
            while not stop.is_set():
                batches = await self.consumer.getmany(timeout_ms=200, max_records=settings.command_batch_max)
                for tp, records in batches.items():
                    worker = self.workers.get(tp.partition)
                    if worker is not None and worker.offer(records) >= 4 * settings.command_batch_max:
                        self.consumer.pause(tp)  # backpressure: resumed when the worker catches up
                if time.monotonic() - last_report > 30:
                    last_report = time.monotonic()
                    log.info(
                        "progress",
                        extra={
                            "processed": self.processed,
                            "dead_lettered": self.dead_lettered,
                            "partitions": sorted(self.workers),
                        },
                    )
        finally:
            await self.consumer.stop()  # runs on_partitions_revoked: workers stop cleanly
            for worker in list(self.workers.values()):
                await worker.stop()
            self.workers.clear()
            await self.redis.aclose()
