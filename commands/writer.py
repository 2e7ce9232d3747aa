"""The owner's writer: one transactional producer, one transaction at a time, for every
partition the process owns.

Whatever waits in any owned partition when a transaction starts goes into it (group
commit across partitions): each partition decides its batch against its own state
(`PartitionWorker.prepare`), and the events, snapshots, dead letters, audit records and
every partition's commands offset commit together (`commands.transaction.write_many`).
A transaction then carries every command waiting in the process, not only one
partition's, so the broker's and the client's cost per transaction (about five round
trips) is shared by all of them.

Fencing: the transactional id is the process's (`<group>.<instance>`, so a restarted
static member fences its predecessor at once), and each transaction's TxnOffsetCommit
names the member and the group generation its partitions were assigned in
(`shared_kernel.group_txn`). Once the group has moved on, the coordinator refuses it
and the transaction aborts; the records are decided again once the new assignment is
known (or refused, if the partition went elsewhere). A new owner waits for the previous
owner's open transaction before it reads a partition's state.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any

from aiokafka.errors import ProducerFenced

from commands import transaction
from commands.batch import Answer
from commands.context import BoundedContext
from commands.partition import Batch, PartitionWorker
from commands.transaction import OffsetsMoved
from shared_kernel import group_txn, kafka, metrics
from shared_kernel.group_txn import GroupMember, StaleGeneration
from shared_kernel.settings import Settings
from shared_kernel.topics import Topics

log = logging.getLogger(__name__)

STALE_WAIT_S = 1.0  # after a refused generation, how long to wait for the new assignment at most


class Writer:
    """Takes every owned partition's waiting commands into one transaction at a time."""

    def __init__(
        self,
        settings: Settings,
        *,
        group_id: str,
        instance: str | None,
        topics: Topics,
        dlq_topic: str,
        contexts: Mapping[str, BoundedContext],
        workers: dict[int, PartitionWorker],
        member: Callable[[], GroupMember],
    ) -> None:
        self.settings = settings
        self.group_id = group_id
        # stable across a static member's restarts: its first InitProducerId fences the crashed one
        self.transactional_id = f"{group_id}.{instance or uuid.uuid4().hex}"
        self.topics = topics
        self.dlq_topic = dlq_topic
        self.contexts = dict(contexts)
        self.workers = workers
        self.member = member
        self.max_record_bytes = settings.kafka_max_message_bytes
        self.producer: Any = None
        self.lock = asyncio.Lock()  # one transaction at a time: batches and releases
        self.wakeup = asyncio.Event()
        self.assigned = asyncio.Event()  # set when the processor knows a new assignment
        self.fenced = False
        self.stale = False
        self.task: asyncio.Task[None] | None = None

    def _producer(self) -> Any:
        producer = kafka.transactional_producer(
            self.settings,
            self.transactional_id,
            linger_ms=0,
            request_timeout_ms=30_000,
            max_request_size=self.max_record_bytes,
            transaction_timeout_ms=self.settings.command_transaction_timeout_ms,
        )
        group_txn.bind_to_group(producer, self.member)
        return producer

    async def start(self) -> None:
        self.producer = self._producer()
        await self.producer.start()
        self.task = asyncio.create_task(self._run(), name="command-writer")

    async def renew(self) -> None:
        """After being fenced (a transaction outlived its timeout while this process was
        stopped): a new producer epoch, for the partitions assigned from here on."""
        async with self.lock:
            if not self.fenced:
                return
            old, self.producer = self.producer, self._producer()
            await asyncio.gather(old.stop(), return_exceptions=True)
            await self.producer.start()
            self.fenced = False
            log.info("transactional producer renewed", extra={"transactional_id": self.transactional_id})

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
        if self.producer is not None:
            await self.producer.stop()

    def generation_known(self) -> None:
        """The processor has a new assignment (its member and generation changed)."""
        self.assigned.set()
        self.wakeup.set()

    async def _run(self) -> None:
        window = self.settings.command_batch_window_ms / 1000
        while True:
            await self.wakeup.wait()
            if self.stale:
                # The group refused the last generation: wait for the new assignment.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.assigned.wait(), STALE_WAIT_S)
                self.stale = False
            if window:
                await asyncio.sleep(window)
            self.wakeup.clear()
            self.assigned.clear()
            async with self.lock:
                if self.fenced:
                    continue
                batches = [b for w in list(self.workers.values()) if (b := w.prepare()) is not None]
                if any(w.pending and w.writable for w in self.workers.values()):
                    self.wakeup.set()
                if batches:
                    await self._commit(batches)

    async def write(self, parts: list[transaction.Part]) -> list[list[Answer]]:
        """Commit these partitions' decisions in one transaction (hold `lock`)."""
        return await transaction.write_many(
            self.producer,
            parts,
            group_id=self.group_id,
            topics=self.topics,
            dlq_topic=self.dlq_topic,
            audit_topic=self.topics.audit(self.settings.audit_topic_suffix),
            contexts=self.contexts,
            max_record_bytes=self.max_record_bytes,
        )

    async def _commit(self, batches: list[Batch]) -> None:
        t0 = time.perf_counter()
        try:
            for batch in batches:
                await batch.worker.park(batch)
            answers = await self.write([b.part for b in batches])
        except ProducerFenced:
            # Not committed: the transaction timed out, or another process took this
            # transactional id. The next assignment renews the producer.
            self.fenced = True
            for batch in batches:
                batch.worker.fenced_out(batch)
            return
        except StaleGeneration as exc:
            log.info("the group moved on; deciding again on the new assignment", extra={"error": str(exc)})
            self.stale = True
            for batch in batches:
                batch.worker.again(batch)
            self.wakeup.set()
            return
        except OffsetsMoved as exc:
            for i, batch in enumerate(batches):
                if i == exc.part:
                    await batch.worker.moved(batch)
                else:
                    batch.worker.again(batch)
            self.wakeup.set()
            return
        except Exception as exc:
            log.exception(
                "transaction failed; restoring its partitions",
                extra={"partitions": [b.worker.partition for b in batches]},
            )
            for batch in batches:
                await batch.worker.failed(batch, exc)
            return
        metrics.TRANSACTION_DURATION.observe(time.perf_counter() - t0)
        metrics.COMMANDS_PER_TRANSACTION.observe(sum(len(b.records) for b in batches))
        for batch, mine in zip(batches, answers, strict=True):
            batch.worker.committed(batch, mine)
