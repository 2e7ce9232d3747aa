"""The command processor: the single writer of every aggregate of the partitions it owns.

A member of a consumer group on `<prefix>.commands`: the group decides which process
owns which partition. For each owned partition there is one `PartitionWorker`
(commands.partition) with its own transactional producer and the partition's
aggregates restored from the state topics. Commands reach a worker straight from the
API (`submit`: the HTTP path, in the same process or forwarded to this one's internal
endpoint by another) or from the commands topic (the asynchronous path). A batch is
decided command by command (commands.batch), and its events, the new snapshots, dead
letters and (for fetched commands) the consumed offset are committed in one Kafka
transaction (commands.transaction). On any failure the transaction is aborted, the
partition's state is restored again and the partition re-read from its committed
offset: a crash anywhere yields neither lost nor duplicated events.

Membership is static when the processor has an instance id (`group.instance.id`): a
member restarted after a crash takes its partitions back at once instead of after the
session timeout, and a graceful stop leaves the group explicitly so its partitions
move at once. Workers of partitions a rebalance leaves in place keep running (their
state stays loaded); a partition that moves is fenced by its new owner's producer.

This module is the consumer loop, the rebalance listener, the directory claims
(commands.routing) and the wiring.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from redis.asyncio import Redis
from redis.exceptions import RedisError

from commands import CONTEXTS, replies
from commands.batch import Answer
from commands.context import BoundedContext
from commands.parked import UNAVAILABLE
from commands.partition import Counters, NotOwner, PartitionWorker
from commands.routing import Directory, Owner, partition_for
from commands.writer import Writer
from projections import parking
from projections.db import create_pool
from shared_kernel import kafka
from shared_kernel.avro import AvroCodec
from shared_kernel.envelope import CommandEnvelope, CommandResult
from shared_kernel.group_txn import GroupMember
from shared_kernel.settings import Settings
from shared_kernel.topics import COMMAND_PROCESSOR, Topics, contract_topics, ensure_topics

log = logging.getLogger(__name__)

CONSUMER_NAME = COMMAND_PROCESSOR
REQUESTS_POLL_S = 1.0


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, processor: CommandProcessor) -> None:
        self.p = processor

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        # Workers keep running through the rebalance: those whose partition stays here
        # keep their loaded state, and none can commit once the group has a new
        # generation (commands.writer). The new assignment stops the others.
        if revoked:
            log.info("rebalance", extra={"partitions": sorted(tp.partition for tp in revoked)})

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        p = self.p
        async with p.lock:
            consumer = p.consumer
            assert consumer is not None
            assert p.writer is not None
            mine = {tp.partition for tp in assigned}
            generation = consumer._coordinator.generation
            # A partition kept from the previous generation was this process's all along;
            # after a gap (this member was out of the group meanwhile) another may have
            # owned it: every partition is restored again.
            continuous = generation - p.member.generation in (0, 1) and not p.writer.fenced
            gone = [
                p.workers.pop(n)
                for n in sorted(p.workers)
                if n not in mine or not continuous or p.workers[n].fenced
            ]
            await asyncio.gather(*(w.stop() for w in gone))
            if gone:
                log.info("partitions revoked", extra={"partitions": [w.partition for w in gone]})
            await p.writer.renew()
            p.member = GroupMember(generation, consumer._coordinator.member_id, p.instance)
            p.writer.generation_known()
            new = [p.worker(n) for n in sorted(mine - set(p.workers))]
            # In parallel: each waits for the previous owner's last transaction, then restores.
            started = await asyncio.gather(*(w.start(consumer) for w in new), return_exceptions=True)
            for w, outcome in zip(new, started, strict=True):
                if isinstance(outcome, BaseException):
                    # unowned until the next rebalance; senders get 503 with Retry-After
                    log.error("partition failed to start", extra={"partition": w.partition}, exc_info=outcome)
                    await w.stop()
                else:
                    p.workers[w.partition] = w
            log.info("partitions assigned", extra={"partitions": sorted(mine), "generation": generation})
        await p.claim(sorted(mine))


class CommandProcessor:
    """Runs the consumer loop and the partition workers until `stop` is set."""

    def __init__(
        self,
        settings: Settings,
        contexts: Sequence[BoundedContext] = CONTEXTS,
        *,
        url: str = "",
        instance: str | None = None,
    ) -> None:
        """`url`: where this process answers forwarded commands (empty: nowhere, the
        commands topic only); `instance`: its static member id (None: a dynamic member)."""
        self.settings = settings
        self.url = url
        self.instance = instance
        self.member = GroupMember(-1, "", instance)  # as of the assignment the workers act on
        self.writer: Writer | None = None
        self.directory: Directory | None = None
        self.contexts = {c.name: c for c in contexts}
        self.codec = AvroCodec.from_directory()
        self.topics = Topics(settings.topic_prefix)
        self.group_id = f"{settings.topic_prefix}.{CONSUMER_NAME}"
        self.workers: dict[int, PartitionWorker] = {}
        self.lock = asyncio.Lock()
        self.consumer: AIOKafkaConsumer | None = None
        self.redis: Redis | None = None
        self.pool: Any = None
        self.counters = Counters()

    def worker(self, partition: int) -> PartitionWorker:
        """A worker for a newly assigned partition, wired to this processor."""
        assert self.writer is not None
        return PartitionWorker(
            partition,
            settings=self.settings,
            topics=self.topics,
            group_id=self.group_id,
            dlq_topic=self.topics.dlq(CONSUMER_NAME),
            contexts=self.contexts,
            codec=self.codec,
            writer=self.writer,
            reply=self.reply,
            resume=self.resume,
            counters=self.counters,
            pool=self.pool,
        )

    async def submit(
        self, command: CommandEnvelope, value: bytes, partition: int | None = None
    ) -> CommandResult:
        """Decide and commit a command of a partition owned here; its committed result.

        `partition` is the command's, when the caller knows it already. Raises `NotOwner`
        (nothing written) when the partition is not owned here, and `Backlogged` or
        `Unsettled` (commands.partition) as the worker does."""
        if partition is None:
            partition = partition_for(command.aggregate_id, self.settings.partitions)
        worker = self.workers.get(partition)
        if worker is None:
            raise NotOwner(f"partition {partition} is not owned here")
        return await worker.submit(command, value)

    async def claim(self, partitions: list[int]) -> None:
        """Tell the API instances that these partitions are answered here."""
        if not self.url or self.directory is None or not partitions:
            return
        owner = Owner(self.url, self.instance or self.group_id, self.member.generation)
        try:
            await self.directory.claim(partitions, owner)
        except (RedisError, OSError):
            log.warning("could not write the partition directory", exc_info=True)

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

    async def _serve_requests(self, stop: asyncio.Event) -> None:
        """Retry or skip the dead letters operators asked to, for the partitions owned here."""
        assert self.pool is not None
        pause = REQUESTS_POLL_S
        while not stop.is_set():
            await asyncio.sleep(pause)
            if not self.workers:
                continue
            try:
                for worker in list(self.workers.values()):
                    await worker.refresh_parked()
                for request in await parking.requests(self.pool, CONSUMER_NAME, parking.UNVERSIONED):
                    owner = self.workers.get(request.partition)
                    if owner is None:
                        continue
                    try:
                        await owner.release(request)
                    except UNAVAILABLE:
                        raise
                    except Exception:  # a fault of ours: said loudly; the others are still served
                        extra = {"action": request.action_id, "key": request.key}
                        log.exception("a dead-letter request failed", extra=extra)
                pause = REQUESTS_POLL_S
            except UNAVAILABLE as exc:
                pause = min(pause * 2, 30.0)
                log.warning("dead-letter requests not served", extra={"error": repr(exc), "retry_s": pause})

    async def run(self, stop: asyncio.Event) -> None:
        settings = self.settings
        await ensure_topics(settings, contract_topics(settings, self.contexts, [CONSUMER_NAME]))
        self.redis = Redis.from_url(settings.redis_url)
        self.directory = Directory(self.redis, settings.topic_prefix)
        self.consumer = kafka.consumer(
            settings,
            group_id=self.group_id,
            group_instance_id=self.instance,
            isolation_level="read_committed",
            max_poll_interval_ms=300_000,
            session_timeout_ms=10_000,
            heartbeat_interval_ms=1_000,
        )
        # Parked aggregates and their held commands (commands.parked); no connection is
        # opened until one is needed, so commands flow while PostgreSQL is away.
        self.pool = await create_pool(settings, CONSUMER_NAME, min_size=0, max_size=2)
        self.writer = Writer(
            settings,
            group_id=self.group_id,
            instance=self.instance,
            topics=self.topics,
            dlq_topic=self.topics.dlq(CONSUMER_NAME),
            contexts=self.contexts,
            workers=self.workers,
            member=lambda: self.member,
        )
        await self.writer.start()  # fences a crashed predecessor of this instance first
        requests = asyncio.create_task(self._serve_requests(stop), name="dead-letter-requests")
        self.consumer.subscribe([self.topics.commands], listener=_Rebalance(self))
        await self.consumer.start()
        log.info(
            "command processor started",
            extra={"group": self.group_id, "instance": self.instance, "url": self.url},
        )
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
            requests.cancel()
            owned = sorted(self.workers)
            workers = list(self.workers.values())
            self.workers.clear()  # refuse new direct commands from here on
            await asyncio.gather(*(w.stop() for w in workers))  # in-flight transactions end
            await self.writer.stop()
            with contextlib.suppress(RedisError, OSError):
                await self.directory.release(owned, self.instance or self.group_id)
            if self.instance is not None:
                await kafka.leave_group_static(self.consumer)  # its partitions move now
            await self.consumer.stop()
            await self.redis.aclose()
            await self.pool.close()
