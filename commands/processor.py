"""The command processor: the single writer of every aggregate of the partitions it owns.

A consumer group on `<prefix>.commands`. For each owned partition there is one
`PartitionWorker` (commands.partition) with its own transactional producer and the
partition's aggregates restored from the state topics. A fetched batch is decided
command by command (commands.batch), and its events, the new snapshots, dead letters
and the consumed offset are committed in one Kafka transaction (commands.transaction).
On any failure the transaction is aborted, the partition's state is restored again
and the partition re-read from its committed offset: a crash anywhere yields neither
lost nor duplicated events.

This module is the consumer loop, the rebalance listener and the wiring.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from redis.asyncio import Redis
from redis.exceptions import RedisError

from commands import CONTEXTS, replies
from commands.batch import Answer
from commands.context import BoundedContext
from commands.partition import Counters, PartitionWorker
from shared_kernel import kafka
from shared_kernel.avro import AvroCodec
from shared_kernel.settings import Settings
from shared_kernel.topics import Topics, contract_topics, ensure_topics

log = logging.getLogger(__name__)

CONSUMER_NAME = "command-processor"


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
                worker = self.p.worker(tp.partition)
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
        self.counters = Counters()

    def worker(self, partition: int) -> PartitionWorker:
        """A worker for a newly assigned partition, wired to this processor."""
        return PartitionWorker(
            partition,
            settings=self.settings,
            topics=self.topics,
            group_id=self.group_id,
            dlq_topic=self.topics.dlq(CONSUMER_NAME),
            contexts=self.contexts,
            codec=self.codec,
            reply=self.reply,
            resume=self.resume,
            counters=self.counters,
        )

    def resume(self, tp: TopicPartition) -> None:
        if self.consumer is not None and tp in self.consumer.paused():
            self.consumer.resume(tp)

    async def reply(self, answers: list[Answer]) -> None:
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
                            "processed": self.counters.processed,
                            "dead_lettered": self.counters.dead_lettered,
                            "partitions": sorted(self.workers),
                        },
                    )
        finally:
            await self.consumer.stop()  # runs on_partitions_revoked: workers stop cleanly
            for worker in list(self.workers.values()):
                await worker.stop()
            self.workers.clear()
            await self.redis.aclose()
