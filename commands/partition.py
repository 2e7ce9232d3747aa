"""The partition worker: the single writer of every aggregate of one commands partition.

It holds the partition's aggregates, restored from the state topics once the previous
owner's last transaction has ended (`shared_kernel.group_txn.stable_committed`), and
the commands waiting for it. Commands reach it two ways: handed over directly
(`submit`, the HTTP path: the caller awaits the result) and fetched from the commands
topic (the asynchronous path: the result goes to Redis). The owner's writer
(`commands.writer`) takes whatever waits in every partition it owns into one
transaction (group commit): each partition's batch is decided here (`prepare`, by
`commands.batch`), written by `commands.transaction`, and finished here (`committed`).
On a failure the waiting callers are told the outcome is unknown, the partition's state
is restored again and the partition re-read from its committed offset.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeAlias

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.errors import KafkaError, ProducerFenced

from commands import parked, transaction
from commands.batch import DIRECT, Answer, Decision, decide_batch
from commands.context import BoundedContext
from commands.state_store import PartitionState, restore
from projections import parking
from shared_kernel import group_txn, metrics, tracing
from shared_kernel.avro import AvroCodec
from shared_kernel.envelope import CommandEnvelope, CommandResult
from shared_kernel.settings import Settings
from shared_kernel.topics import Topics

log = logging.getLogger(__name__)

Reply = Callable[[list[Answer]], Coroutine[None, None, None]]


class Writer(Protocol):
    """What a worker uses of its owner's writer (commands.writer)."""

    producer: Any  # the owner's transactional producer
    lock: asyncio.Lock  # held by every transaction and every release
    wakeup: asyncio.Event  # set when commands wait

    async def write(self, parts: list[transaction.Part]) -> list[list[Answer]]: ...


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


@dataclass(eq=False)
class Batch:
    """What one partition puts in a transaction: its records in arrival order (the
    fetched ones, `consumed`, and the direct ones, `waiting`) and their decision."""

    worker: PartitionWorker
    records: list[Item]
    consumed: list[ConsumerRecord[bytes, bytes]]
    waiting: list[Submitted]
    decision: Decision[Any]
    part: transaction.Part
    dead_lettered: int
    started_ns: int


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
        writer: Writer,
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
        self.writer = writer  # the owner's one transactional producer and its loop
        self.reply = reply  # publishes committed answers; must not raise
        self.resume = resume  # un-pauses the partition's fetching once the backlog is small
        self.counters = counters
        self.pool = pool  # PostgreSQL, where parked aggregates and their held commands are kept
        metrics.known_consumers(["command-processor"])
        self.tp = TopicPartition(topics.commands, partition)
        # The decision keeps every record within the topics' limit (commands.batch); the
        # producer must not refuse what the topics take.
        self.max_record_bytes = settings.kafka_max_message_bytes
        self.state = PartitionState(self.contexts)
        self.next_offset = 0  # first offset not yet committed
        self.queued_upto = 0  # first offset not yet handed to this worker
        self.started = False
        self.fenced = False
        self.stopping = False
        self.pending: list[Item] = []
        self.backlog_max = 4 * settings.command_batch_max
        self.replying: set[asyncio.Task[None]] = set()
        self.parked: set[str] = set()  # aggregate ids parked behind a dead letter (commands.parked)
        self.parked_known = True
        self.consumer: AIOKafkaConsumer | None = None

    @property
    def producer(self) -> Any:
        return self.writer.producer

    async def start(self, consumer: AIOKafkaConsumer) -> None:
        # Order matters: the previous owner's open transaction (one that committed offsets
        # for this partition) ends first; only then are the state topics and the
        # committed offset final.
        self.consumer = consumer
        committed = await self._stable_offset(consumer)
        self.state = await restore(self.settings, self.contexts, self.partition)
        self.parked = await self._parked()
        self._rewind(consumer, committed)
        self.started = True
        self.writer.wakeup.set()

    async def _stable_offset(self, consumer: AIOKafkaConsumer) -> int:
        timeout_s = self.settings.command_transaction_timeout_ms / 1000 + 5
        offsets = await group_txn.stable_committed(consumer, [self.tp], timeout_s)
        return offsets.get(self.tp) or 0

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
        async with self.writer.lock:
            if not self.parked_known:
                self.parked |= await self._parked()

    def _rewind(self, consumer: AIOKafkaConsumer, committed: int) -> None:
        self.next_offset = self.queued_upto = committed
        self.pending = [item for item in self.pending if isinstance(item, Submitted)]
        consumer.seek(self.tp, self.next_offset)

    def submit(self, command: CommandEnvelope, value: bytes) -> asyncio.Future[CommandResult]:
        """Queue a command for the next transaction; the future is its committed result.

        Raises `NotOwner` once the worker is stopping or fenced, `Backlogged` when more
        commands wait than a few transactions take."""
        if self.fenced or self.stopping or not self.started:
            raise NotOwner(f"partition {self.partition} is not served here")
        if len(self.pending) >= self.backlog_max:
            raise Backlogged(f"{len(self.pending)} commands wait on partition {self.partition}")
        future: asyncio.Future[CommandResult] = asyncio.get_running_loop().create_future()
        self.pending.append(
            Submitted(command, value, int(time.time() * 1000), future, key=command.aggregate_id.encode())
        )
        self.writer.wakeup.set()
        return future

    def offer(self, records: Sequence[ConsumerRecord[bytes, bytes]]) -> int:
        """Queue fetched records (skipping any fetched before a rewind); returns the backlog."""
        fresh = [r for r in records if r.offset >= self.queued_upto]
        if fresh:
            self.pending.extend(fresh)
            self.queued_upto = fresh[-1].offset + 1
            self.writer.wakeup.set()
        return len(self.pending)

    async def stop(self) -> None:
        """Let the transaction in flight commit or abort, then stop."""
        self.stopping = True
        async with self.writer.lock:  # no transaction holds this partition's commands now
            pass
        self._refuse_waiting(NotOwner(f"partition {self.partition} was handed over"))
        await asyncio.gather(*self.replying, return_exceptions=True)

    def _refuse_waiting(self, error: Exception) -> None:
        """The queued direct commands were not written: their callers may send them again."""
        for item in self.pending:
            if isinstance(item, Submitted) and not item.result.done():
                item.result.set_exception(error)
        self.pending = [item for item in self.pending if not isinstance(item, Submitted)]

    @property
    def writable(self) -> bool:
        return self.started and not self.fenced and not self.stopping

    def prepare(self) -> Batch | None:
        """Decide what waits (up to a batch) for the owner's next transaction; None if nothing."""
        if not self.writable or not self.pending:
            return None
        items = self.pending[: self.settings.command_batch_max]
        del self.pending[: len(items)]
        # In arrival order: direct commands, and fetched records not committed yet.
        records = [r for r in items if isinstance(r, Submitted) or r.offset >= self.next_offset]
        if not records:
            return None
        consumed = [r for r in records if not isinstance(r, Submitted)]
        waiting = [r for r in records if isinstance(r, Submitted)]
        started_ns = time.time_ns()
        decision = self._decide(records, self.parked)
        upto = consumed[-1].offset + 1 if consumed else self.next_offset
        return Batch(
            self,
            records,
            consumed,
            waiting,
            decision,
            # the offset goes in every transaction: the coordinator checks the owner's generation there
            transaction.Part(decision, self.state, self.tp, upto),
            len(decision.dead_letters),  # the parking ones are written apart (commands.parked)
            started_ns,
        )

    async def park(self, batch: Batch) -> None:
        """Before the transaction: the batch's parking dead letters and held commands (commands.parked)."""
        decision = batch.decision
        if self.pool is not None and (decision.held or any(d.parks for d in decision.dead_letters)):
            self.parked |= await parked.park(
                self.pool,
                self.producer,
                decision,
                dlq_topic=self.dlq_topic,
                source=(self.tp.topic, self.partition),
                max_record_bytes=self.max_record_bytes,
            )

    def committed(self, batch: Batch, answers: list[Answer]) -> None:
        """The transaction holding the batch committed: answer its callers."""
        decision, waiting = batch.decision, batch.waiting
        self.counters.dead_lettered += batch.dead_lettered
        self.counters.processed += len(decision.accepted) + len(decision.answers)
        _measure(decision, waiting, answers, batch.dead_lettered)
        _trace(decision, waiting, self.partition, batch.started_ns)
        if batch.consumed:
            self.next_offset = batch.consumed[-1].offset + 1
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
        if len(self.pending) < self.settings.command_batch_max:
            self.resume(self.tp)

    def fenced_out(self, batch: Batch | None) -> None:
        """This owner's producer was fenced: nothing of the batch was committed."""
        log.warning("fenced: another processor owns this partition now", extra={"partition": self.partition})
        self.fenced = True
        if batch is not None:
            self.pending[:0] = batch.waiting
        self._refuse_waiting(NotOwner(f"partition {self.partition} was handed over"))

    def again(self, batch: Batch) -> None:
        """The transaction aborted before anything of it was committed, for a reason not
        this partition's (another partition's events moved, or the group's generation
        changed): decide the same records again in the next one, from the committed state."""
        self.state.live.clear()
        self.pending[:0] = [r for r in batch.records if not (isinstance(r, Submitted) and r.result.done())]

    async def moved(self, batch: Batch) -> None:
        """Another producer wrote to one of this partition's events partitions (nothing of
        ours was committed: the transaction aborted before its end). Restore and decide the
        batch again, its events' offsets now read from the broker."""
        log.warning(
            "events partition written by another producer; deciding again",
            extra={"partition": self.partition},
        )
        assert self.consumer is not None
        await self._recover(self.consumer)
        self.pending[:0] = [s for s in batch.waiting if not s.result.done()]

    async def failed(self, batch: Batch, exc: Exception) -> None:
        """The transaction failed: the outcome of its commands is unknown."""
        for s in batch.waiting:
            if not s.result.done():
                s.result.set_exception(Unsettled(f"the transaction failed: {exc!r}"))
        assert self.consumer is not None
        await self._recover(self.consumer)

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

    async def _write(self, decision: Decision[Any]) -> list[Answer]:
        """Commit a decision of no fetched records on its own; the offset is unchanged,
        there for the generation's check (shared_kernel.group_txn)."""
        [answers] = await self.writer.write(
            [transaction.Part(decision, self.state, self.tp, self.next_offset)]
        )
        return answers

    async def release(self, request: parking.Request) -> None:
        """Do what an operator asked of a parked aggregate of this partition: decide its
        dead-lettered command again (`retry`, after a fix) or not (`skip`), then its held
        commands in order, each outcome published as any command's. Stops at a command
        that fails again: the aggregate stays parked behind it."""
        assert self.pool is not None
        who, version, key = parked.CONSUMER, parked.VERSION, request.key
        async with self.writer.lock:
            if not self.writable or self.consumer is None:
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
            answers = await self._write(decision)
        except ProducerFenced:
            self.fenced_out(None)
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
            committed = await self._stable_offset(consumer)
            self.state = await restore(self.settings, self.contexts, self.partition)
            # with the ones known already: without PostgreSQL those still hold
            self.parked |= await self._parked()
            self._rewind(consumer, committed)
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
    decision: Decision[Any], waiting: list[Submitted], answers: list[Answer], dead_lettered: int
) -> None:
    """Each command's outcome, and the dead letters, in the metrics."""
    if dead_lettered:
        metrics.DEAD_LETTERS.labels("command-processor").inc(dead_lettered)
    types = {s.command.command_id: s.command.command_type for s in waiting}
    types.update({cid: env.command_type for cid, env in decision.queued.items()})
    types.update({a.command.command_id: a.command.command_type for a in decision.accepted})
    for _, result in answers:
        context, _, command = types.get(result.command_id, "unknown.unknown").partition(".")
        outcome = "accepted" if result.accepted else result.code or "rejected"
        metrics.COMMANDS.labels(context, command, outcome).inc()
