"""The partition worker: the single writer of every aggregate of one commands partition.

It has its own transactional producer (transactional id per partition, so
initialising it fences a stale owner) and the partition's aggregates restored from
the state topics. Commands reach it two ways: handed over directly (`submit`, the
HTTP path: the caller awaits the result) and fetched from the commands topic (the
asynchronous path: the result goes to Redis). Whatever queued up while a transaction
was in flight goes into the next one (group commit): decided by `commands.batch`,
written by `commands.transaction`. On any failure the waiting callers are told the
outcome is unknown, the partition's state is restored again and the partition re-read
from its committed offset.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeAlias

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.errors import KafkaError, ProducerFenced

from commands import parked, transaction
from commands.batch import DIRECT, Answer, Decision, decide_batch
from commands.context import BoundedContext
from commands.state_store import PartitionState, restore
from commands.transaction import OffsetsMoved
from projections import parking
from shared_kernel import kafka, metrics, tracing
from shared_kernel.avro import AvroCodec
from shared_kernel.envelope import CommandEnvelope, CommandResult
from shared_kernel.settings import Settings
from shared_kernel.topics import Topics

log = logging.getLogger(__name__)

Reply = Callable[[list[Answer]], Coroutine[None, None, None]]


class NotOwner(RuntimeError):
    """This process does not own the command's partition (any more): nothing was written."""


class Unsettled(RuntimeError):
    """The transaction failed: the command may or may not have been committed."""


class Backlogged(RuntimeError):
    """The partition has more commands waiting than it takes: try again shortly."""


@dataclass(eq=False)
class Submitted:
    """A command handed to the owner directly, its caller awaiting `result`.

    It looks like a consumed record to the decision and to the dead letter writer
    (`key`, `value`, `headers`, `timestamp`, and a source of `http:-1:-1`)."""

    command: CommandEnvelope
    value: bytes
    timestamp: int  # ms since the epoch: the clock of its events
    result: asyncio.Future[CommandResult]
    key: bytes | None = None
    headers: list[tuple[str, bytes]] = field(default_factory=list)
    topic: str = DIRECT
    partition: int = -1
    offset: int = -1


Item: TypeAlias = ConsumerRecord[bytes, bytes] | Submitted


@dataclass
class Counters:
    """Totals over every partition of one processor, for its progress log."""

    processed: int = 0  # commands answered by a committed transaction (repeats aside)
    dead_lettered: int = 0


class PartitionWorker:
    """Owns one partition of the commands topic."""

    def __init__(
        self,
        partition: int,
        *,
        settings: Settings,
        topics: Topics,
        group_id: str,
        dlq_topic: str,
        contexts: Mapping[str, BoundedContext],
        codec: AvroCodec,
        reply: Reply,
        resume: Callable[[TopicPartition], None],
        counters: Counters,
        pool: Any = None,
    ) -> None:
        self.partition = partition
        self.settings = settings
        self.topics = topics
        self.group_id = group_id
        self.dlq_topic = dlq_topic
        self.contexts = dict(contexts)
        self.codec = codec
        self.reply = reply  # publishes committed answers; must not raise
        self.resume = resume  # un-pauses the partition's fetching once the backlog is small
        self.counters = counters
        self.pool = pool  # PostgreSQL, where parked aggregates and their held commands are kept
        metrics.known_consumers(["command-processor"])
        self.tp = TopicPartition(topics.commands, partition)
        self.transactional_id = f"{group_id}.{partition}"
        # The decision keeps every record within the topics' limit (commands.batch); the
        # producer must not refuse what the topics take.
        self.max_record_bytes = settings.kafka_max_message_bytes
        self.producer = kafka.transactional_producer(
            settings,
            self.transactional_id,
            linger_ms=0,
            request_timeout_ms=30_000,
            max_request_size=self.max_record_bytes,
        )
        self.state = PartitionState(self.contexts)
        self.next_offset = 0  # first offset not yet committed
        self.queued_upto = 0  # first offset not yet handed to this worker
        self.fenced = False
        self.stopping = False
        self.pending: list[Item] = []
        self.wakeup = asyncio.Event()
        self.task: asyncio.Task[None] | None = None
        self.backlog_max = 4 * settings.command_batch_max
        self.replying: set[asyncio.Task[None]] = set()
        self.parked: set[str] = set()  # aggregate ids parked behind a dead letter (commands.parked)
        self.parked_known = True
        self.writing = asyncio.Lock()  # one decision and transaction at a time: batches and releases
        self.consumer: AIOKafkaConsumer | None = None

    async def start(self, consumer: AIOKafkaConsumer) -> None:
        # Order matters: initialising the transactional id fences the previous owner and
        # completes or aborts its open transaction; only then are the state topics and
        # the committed offset final.
        await self.producer.start()
        self.consumer = consumer
        self.state = await restore(self.settings, self.contexts, self.partition)
        self.parked = await self._parked()
        await self._rewind(consumer)
        self.task = asyncio.create_task(self._run(consumer), name=f"partition-{self.partition}")

    async def _parked(self) -> set[str]:
        """The partition's parked aggregates. Without PostgreSQL none, until the processor
        reads them again (`refresh_parked`): commands keep flowing meanwhile."""
        self.parked_known = False
        if self.pool is None:
            return set()
        try:
            keys = await parking.parked_from(self.pool, parked.CONSUMER, parked.VERSION, [self.partition])
        except parked.UNAVAILABLE as exc:
            log.error(
                "parked aggregates unknown: PostgreSQL unavailable",
                extra={"partition": self.partition, "error": repr(exc)},
            )
            return set()
        self.parked_known = True
        return keys

    async def refresh_parked(self) -> None:
        async with self.writing:
            if not self.parked_known:
                self.parked |= await self._parked()

    async def _rewind(self, consumer: AIOKafkaConsumer) -> None:
        committed = await consumer.committed(self.tp)
        self.next_offset = self.queued_upto = committed if committed is not None else 0
        self.pending = [item for item in self.pending if isinstance(item, Submitted)]
        consumer.seek(self.tp, self.next_offset)

    def submit(self, command: CommandEnvelope, value: bytes) -> asyncio.Future[CommandResult]:
        """Queue a command for the next transaction; the future is its committed result.

        Raises `NotOwner` once the worker is stopping or fenced, `Backlogged` when more
        commands wait than a few transactions take."""
        if self.fenced or self.stopping or self.task is None:
            raise NotOwner(f"partition {self.partition} is not served here")
        if len(self.pending) >= self.backlog_max:
            raise Backlogged(f"{len(self.pending)} commands wait on partition {self.partition}")
        future: asyncio.Future[CommandResult] = asyncio.get_running_loop().create_future()
        self.pending.append(
            Submitted(command, value, int(time.time() * 1000), future, key=command.aggregate_id.encode())
        )
        self.wakeup.set()
        return future

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
        self._refuse_waiting(NotOwner(f"partition {self.partition} was handed over"))
        await asyncio.gather(*self.replying, return_exceptions=True)
        await self.producer.stop()

    def _refuse_waiting(self, error: Exception) -> None:
        """The queued direct commands were not written: their callers may send them again."""
        for item in self.pending:
            if isinstance(item, Submitted) and not item.result.done():
                item.result.set_exception(error)
        self.pending = [item for item in self.pending if not isinstance(item, Submitted)]

    async def _run(self, consumer: AIOKafkaConsumer) -> None:
        """Group commit: whatever queued up while the last transaction was in flight
        goes into the next one, so batches grow with the load and stay small when idle."""
        settings = self.settings
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
                    self.resume(self.tp)

    async def process(self, consumer: AIOKafkaConsumer, items: Sequence[Item]) -> None:
        async with self.writing:
            await self._process(consumer, items)

    async def _process(self, consumer: AIOKafkaConsumer, items: Sequence[Item]) -> None:
        # In arrival order: direct commands, and fetched records not committed yet.
        records = [r for r in items if isinstance(r, Submitted) or r.offset >= self.next_offset]
        consumed = [r for r in records if not isinstance(r, Submitted)]
        waiting = [r for r in records if isinstance(r, Submitted)]
        if self.fenced:
            self.pending[:0] = waiting
            self._refuse_waiting(NotOwner(f"partition {self.partition} was handed over"))
            return
        if not records:
            return
        t0, started_ns = time.perf_counter(), time.time_ns()
        decision = self._decide(records, self.parked)
        t1 = time.perf_counter()
        dead_lettered = len(decision.dead_letters)  # the parking ones are written apart (commands.parked)
        try:
            if self.pool is not None and (decision.held or any(d.parks for d in decision.dead_letters)):
                self.parked |= await parked.park(
                    self.pool,
                    self.producer,
                    decision,
                    dlq_topic=self.dlq_topic,
                    source=(self.tp.topic, self.partition),
                    max_record_bytes=self.max_record_bytes,
                )
            answers = await self._write(decision, consumed[-1].offset + 1 if consumed else None)
        except ProducerFenced:
            log.warning(
                "fenced: another processor owns this partition now", extra={"partition": self.partition}
            )
            self.fenced = True
            # Not committed: the new owner's InitProducerId aborted the open transaction.
            self.pending[:0] = waiting
            self._refuse_waiting(NotOwner(f"partition {self.partition} was handed over"))
            return
        except OffsetsMoved as exc:
            # Another producer wrote to an events partition (nothing of ours was committed:
            # the transaction aborted before its end). Restore and decide the batch again,
            # its events' offsets now read from the broker.
            log.warning(
                "events partition written by another producer; deciding again",
                extra={"partition": self.partition, "error": str(exc)},
            )
            await self._recover(consumer)
            self.pending[:0] = [s for s in waiting if not s.result.done()]
            self.wakeup.set()
            return
        except Exception as exc:
            log.exception("transaction failed; restoring the partition", extra={"partition": self.partition})
            for s in waiting:
                s.result.set_exception(Unsettled(f"the transaction failed: {exc!r}"))
            await self._recover(consumer)
            return
        self.counters.dead_lettered += dead_lettered
        self.counters.processed += len(decision.accepted) + len(decision.answers)
        _measure(decision, waiting, answers, len(records), time.perf_counter() - t0, dead_lettered)
        _trace(decision, waiting, self.partition, started_ns)
        if consumed:
            self.next_offset = consumed[-1].offset + 1
        t2 = time.perf_counter()
        by_id = {result.command_id: result for _, result in answers}
        for s in waiting:
            if s.result.done():
                continue
            result = by_id.get(s.command.command_id)
            if result is None:  # every decided command has an answer; never leave a caller waiting
                s.result.set_exception(Unsettled("the command got no answer"))
            else:
                s.result.set_result(result)
        # Off the critical path: the result cache and the asynchronous callers' channels
        # (a command sent without a key was answered above, and nobody can ask again).
        once = {s.command.command_id for s in waiting if not s.command.retriable}
        if once:
            answers = [a for a in answers if a[1].command_id not in once]
        self._publish(answers)
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "batch committed",
                extra={
                    "partition": self.partition,
                    "commands": len(records),
                    "decide_ms": round((t1 - t0) * 1000, 2),
                    "commit_ms": round((t2 - t1) * 1000, 2),
                    "answer_ms": round((time.perf_counter() - t2) * 1000, 2),
                },
            )

    def _publish(self, answers: list[Answer]) -> None:
        """Off the critical path: the committed answers to the result cache and their callers."""
        replying = asyncio.create_task(self.reply(answers), name=f"replies-{self.partition}")
        self.replying.add(replying)
        replying.add_done_callback(self.replying.discard)

    def _decide(self, records: Sequence[Any], parked_keys: set[str]) -> Decision[Any]:
        return decide_batch(
            records,
            self.state,
            self.contexts,
            self.codec,
            max_record_bytes=self.max_record_bytes,
            parked=parked_keys,
        )

    async def _write(self, decision: Decision[Any], consumed_upto: int | None) -> list[Answer]:
        """Commit the decision (commands.transaction), with the commands topic's offset
        `consumed_upto` when it holds fetched records."""
        return await transaction.write(
            self.producer,
            decision,
            consumed=self.tp if consumed_upto is not None else None,
            next_offset=self.next_offset if consumed_upto is None else consumed_upto,
            group_id=self.group_id,
            topics=self.topics,
            dlq_topic=self.dlq_topic,
            audit_topic=self.topics.audit(self.settings.audit_topic_suffix),
            contexts=self.contexts,
            state=self.state,
            max_record_bytes=self.max_record_bytes,
        )

    async def release(self, request: parking.Request) -> None:
        """Do what an operator asked of a parked aggregate of this partition: decide its
        dead-lettered command again (`retry`, after a fix) or not (`skip`), then its held
        commands in order, each outcome published as any command's. Stops at a command
        that fails again: the aggregate stays parked behind it."""
        assert self.pool is not None
        who, version, key = parked.CONSUMER, parked.VERSION, request.key
        async with self.writing:
            if self.fenced or self.stopping or self.consumer is None:
                return
            async with self.pool.acquire() as conn:
                if await parking.requested(conn, who, version, key) != request.action_id:
                    return  # done already
                items, drop = await parking.release_start(conn, who, version, request)
            applied = 0
            while True:
                outcome = await self._decide_held(request, items, first=applied == 0)
                if outcome is None:
                    return  # not committed; the request stays waiting and is served again
                upto, failed, head = outcome
                applied += upto
                let_go = [*drop, *(seq for seq, _ in items[:upto])]
                async with self.pool.acquire() as conn:
                    if failed is not None:
                        await parking.stopped(conn, who, version, request, let_go, head, failed, applied)
                        log.warning(
                            "released commands stopped at a command that fails",
                            extra={"partition": self.partition, "key": key, "applied": applied},
                        )
                        return
                    if await parking.released(conn, who, version, request, let_go, applied):
                        self.parked.discard(key)
                        log.info(
                            "parked aggregate released",
                            extra={"partition": self.partition, "key": key, "applied": applied},
                        )
                        return
                    async with conn.transaction():  # more were held meanwhile: those too
                        items = await parking.held(conn, who, version, key)
                    drop = []

    async def _decide_held(
        self, request: parking.Request, items: Sequence[tuple[int, Any]], *, first: bool
    ) -> tuple[int, str | None, parking.Head | None] | None:
        """Decide and commit held commands in order, up to the first that fails: (how
        many were decided, the error of the one that failed, the dead letter its key is
        parked behind now unless it is the one retried); None if nothing was committed."""
        assert self.consumer is not None
        key = request.key
        records = [parked.to_consumed(r) for _, r in items]
        if not records:
            return 0, None, None  # a skip with nothing held behind it
        decision = self._decide(records, self.parked - {key})
        decision.held = []  # the ones after a failure are kept already
        failed = next((d for d in decision.dead_letters if d.parks == key), None)
        upto = len(records) if failed is None else records.index(failed.record)
        head = None
        try:
            if failed is not None:
                decision.dead_letters.remove(failed)
                if not (first and upto == 0 and request.action == "retry"):
                    # a held command failed in its turn: the key parks behind it now
                    [at] = await parked.write_dead_letters(
                        self.producer, self.dlq_topic, [failed], self.max_record_bytes
                    )
                    head = parking.Head(items[upto][1], failed.error, *at)
                    metrics.DEAD_LETTERS.labels("command-processor").inc()
            answers = await self._write(decision, None)
        except ProducerFenced:
            self.fenced = True
            return None
        except Exception:
            log.exception("held commands not committed; restoring", extra={"partition": self.partition})
            await self._recover(self.consumer)
            return None
        self.counters.processed += len(answers)
        self._publish(answers)
        return upto, None if failed is None else failed.error, head

    async def _recover(self, consumer: AIOKafkaConsumer) -> None:
        try:
            self.state = await restore(self.settings, self.contexts, self.partition)
            # with the ones known already: without PostgreSQL those still hold
            self.parked |= await self._parked()
            await self._rewind(consumer)
        except KafkaError:
            log.exception("recovery failed; the partition is paused until the next rebalance")
            self.fenced = True
            self._refuse_waiting(NotOwner(f"partition {self.partition} is not served here"))


def _trace(decision: Decision[Any], waiting: list[Submitted], partition: int, start_ns: int) -> None:
    """The transaction, in the trace of each command it decided (one span per trace)."""
    traceparents = [s.command.traceparent for s in waiting]
    traceparents += [env.traceparent for env in decision.queued.values()]
    traceparents += [a.command.traceparent for a in decision.accepted]
    if any(traceparents):
        tracing.in_each_trace(
            "commands.transaction",
            traceparents,
            start_ns,
            time.time_ns(),
            **{"messaging.destination.partition.id": partition, "cqrs.commands": len(traceparents)},
        )


def _measure(
    decision: Decision[Any],
    waiting: list[Submitted],
    answers: list[Answer],
    n: int,
    seconds: float,
    dead_lettered: int,
) -> None:
    """The batch's transaction, its size, and each command's outcome, in the metrics."""
    metrics.TRANSACTION_DURATION.observe(seconds)
    metrics.COMMANDS_PER_TRANSACTION.observe(n)
    if dead_lettered:
        metrics.DEAD_LETTERS.labels("command-processor").inc(dead_lettered)
    types = {s.command.command_id: s.command.command_type for s in waiting}
    types.update({cid: env.command_type for cid, env in decision.queued.items()})
    types.update({a.command.command_id: a.command.command_type for a in decision.accepted})
    for _, result in answers:
        context, _, command = types.get(result.command_id, "unknown.unknown").partition(".")
        outcome = "accepted" if result.accepted else result.code or "rejected"
        metrics.COMMANDS.labels(context, command, outcome).inc()
