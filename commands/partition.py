"""The partition worker: the single writer of every aggregate of one commands partition.

It has its own transactional producer (transactional id per input partition, so
initialising it fences a stale owner) and the partition's aggregates restored from
the state topics. Fetched records queue up while a transaction is in flight and go
into the next one: decided by `commands.batch`, written by `commands.transaction`.
On any failure the partition's state is restored again and the partition re-read
from its committed offset.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.errors import KafkaError, ProducerFenced

from commands import transaction
from commands.batch import Answer, decide_batch
from commands.context import BoundedContext
from commands.state_store import PartitionState, restore
from shared_kernel import kafka
from shared_kernel.avro import AvroCodec
from shared_kernel.settings import Settings
from shared_kernel.topics import Topics

log = logging.getLogger(__name__)

Reply = Callable[[list[Answer]], Awaitable[None]]


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
        self.pending: list[ConsumerRecord[bytes, bytes]] = []
        self.wakeup = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    async def start(self, consumer: AIOKafkaConsumer) -> None:
        # Order matters: initialising the transactional id fences the previous owner and
        # completes or aborts its open transaction; only then are the state topics and
        # the committed offset final.
        await self.producer.start()
        self.state = await restore(self.settings, self.contexts, self.partition)
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

    async def process(
        self, consumer: AIOKafkaConsumer, records: Sequence[ConsumerRecord[bytes, bytes]]
    ) -> None:
        records = [r for r in records if r.offset >= self.next_offset]
        if not records or self.fenced:
            return
        t0 = time.perf_counter()
        decision = decide_batch(
            records, self.state, self.contexts, self.codec, max_record_bytes=self.max_record_bytes
        )
        t1 = time.perf_counter()
        try:
            answers = await transaction.write(
                self.producer,
                decision,
                consumed=self.tp,
                next_offset=records[-1].offset + 1,
                group_id=self.group_id,
                topics=self.topics,
                dlq_topic=self.dlq_topic,
                contexts=self.contexts,
                state=self.state,
                max_record_bytes=self.max_record_bytes,
            )
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
        self.counters.dead_lettered += len(decision.dead_letters)
        self.counters.processed += len(decision.accepted) + len(decision.answers)
        self.next_offset = records[-1].offset + 1
        t2 = time.perf_counter()
        await self.reply(answers)
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

    async def _recover(self, consumer: AIOKafkaConsumer) -> None:
        try:
            self.state = await restore(self.settings, self.contexts, self.partition)
            await self._rewind(consumer)
        except KafkaError:
            log.exception("recovery failed; the partition is paused until the next rebalance")
            self.fenced = True
