"""Bulk replay: how a version catches up while it is far behind the head (a version being
rebuilt, or a live projector that starts with a backlog: see streams.supervisor).

Faust's per-message machinery costs more CPU than the work itself when a projection
reads history as fast as it can, so a rebuild does not start with its Faust worker. A
replay reads the version's partitions with a plain consumer (read_committed; the
version's consumer group holds its offsets, it never joins it) from the version's own
positions and gives the projector big batches to apply by the projection's bulk path
(`Projection.load`: `COPY`, `_bulk` without refresh). The next batch is fetched and
decoded while the database works on the current one.

Each batch commits its rows, positions and counters in one PostgreSQL transaction; then
its offsets are committed to the version's consumer group, so the Faust worker that
takes over (same group) starts where the replay stopped. The positions are exact and
the group's offsets at worst behind them, so a replay killed midway resumes from the
positions and a worker taking over re-applies at most a batch, which changes nothing.

Partitions are independent (an aggregate lives in one), so a rebuild runs several
replays at once (`rebuild_lanes`), each on its share of the partitions.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import asyncpg
from aiokafka import AIOKafkaConsumer, TopicPartition

from projections import versions
from projections.db import create_pool
from projections.events import Record
from projections.migrations import migrate
from projections.projection import Projection
from projections.projector import Decoded, Projector
from shared_kernel import kafka
from shared_kernel.avro import AvroCodec
from shared_kernel.settings import Settings
from shared_kernel.topics import Topics
from streams.app import group_id

log = logging.getLogger(__name__)

DECODE_CHUNK = 500  # records decoded between two yields to the event loop
ENDS_EVERY_S = 1.0
LOG_EVERY_S = 5.0


@dataclass
class Batch:
    records: list[Record]
    decoded: Decoded
    ends: dict[TopicPartition, int]  # next offset per partition after this batch


def lane_of(partitions: list[TopicPartition], lane: int, lanes: int) -> list[TopicPartition]:
    """The share of one lane: every `lanes`-th partition of each topic (a projection of
    several contexts has as many busy partitions in each lane)."""
    return sorted(tp for tp in partitions if tp.partition % lanes == lane)


class Replay:
    """Replays one version's partitions (those of `lane` of `lanes`) until at most
    `rebuild_bulk_until_behind` events are left, in bulk; a Faust worker takes over from there. No
    Faust worker of the version may run meanwhile (the group's offsets are committed
    from outside the group)."""

    def __init__(self, settings: Settings, projection: Projection, lane: int = 0, lanes: int = 1) -> None:
        self.settings = settings
        self.projection = projection
        self.lane, self.lanes = lane, lanes
        self.topics = [Topics(settings.topic_prefix).events(c) for c in projection.contexts]
        self.consumer: AIOKafkaConsumer

    async def run(self) -> None:
        settings, projection = self.settings, self.projection
        self.consumer = kafka.consumer(
            settings,
            group_id=group_id(settings, projection),
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_poll_records=settings.rebuild_batch_max,
            max_partition_fetch_bytes=8 << 20,
            fetch_max_bytes=64 << 20,
        )
        await migrate(settings)
        await projection.open(settings)
        projection.remember(settings.rebuild_remember_rows)
        role = f"replay:{projection.name}:v{projection.version}:{self.lane}"
        pool = await create_pool(settings, role, min_size=1, max_size=1)
        producer = kafka.producer(settings)
        projector = Projector(
            projection, pool, producer, AvroCodec.from_directory(), Topics(settings.topic_prefix)
        )
        projector.bulk = True
        started = time.monotonic()
        applied = records = 0
        await self.consumer.start()
        await producer.start()
        try:
            state = await versions.state_of(pool, projection.name, projection.version)
            if state not in ("building", "live"):
                raise RuntimeError(f"{projection.name} v{projection.version} is {state}: not replayed")
            # a version being built sends no dead letters (the live one has sent them)
            # and has no readers to keep up to date batch by batch
            projector.silent = state == "building"
            projection.visible = state == "live"
            tps = await self._assign(pool)
            if not projection.visible:
                await projection.begin_load(settings)
            batches: asyncio.Queue[Batch | None] = asyncio.Queue(maxsize=2)
            reader = asyncio.create_task(self._read(projector, tps, batches))
            last_log = started
            try:
                while (batch := await batches.get()) is not None:
                    outcome = await projector.handle(batch.records, batch.decoded)
                    applied += outcome.applied
                    records += len(batch.records)
                    await self.consumer.commit(batch.ends)
                    if time.monotonic() - last_log > LOG_EVERY_S:
                        last_log = time.monotonic()
                        log.info(
                            "replaying",
                            extra={
                                "projection": projection.name,
                                "version": projection.version,
                                "lane": self.lane,
                                "records": records,
                                "per_s": round(records / (last_log - started)),
                            },
                        )
                behind = await reader
            finally:
                reader.cancel()
            if not projection.visible:
                await projection.end_load(settings)
        finally:
            await self.consumer.stop()
            await producer.stop()
            await pool.close()
            await projection.close()
        seconds = time.monotonic() - started
        log.info(
            "replay caught up",
            extra={
                "projection": projection.name,
                "version": projection.version,
                "lane": self.lane,
                "records": records,
                "applied": applied,
                "seconds": round(seconds, 2),
                "behind": behind,
            },
        )

    async def _assign(self, pool: asyncpg.Pool) -> list[TopicPartition]:
        """Assign this lane's partitions, each at the version's position (or offset 0)."""
        consumer = self.consumer
        every = []
        for topic in self.topics:
            every += [TopicPartition(topic, p) for p in await kafka.partitions_of(consumer, topic)]
        tps = lane_of(every, self.lane, self.lanes)
        consumer.assign(tps)
        rows = await pool.fetch(
            "SELECT topic, partition, next_offset FROM projection_positions "
            "WHERE projection = $1 AND version = $2",
            self.projection.name,
            self.projection.version,
        )
        at = {TopicPartition(r["topic"], r["partition"]): int(r["next_offset"]) for r in rows}
        for tp in tps:
            if tp in at:
                consumer.seek(tp, at[tp])
            else:
                await consumer.seek_to_beginning(tp)
        return tps

    async def _read(
        self, projector: Projector, tps: list[TopicPartition], batches: asyncio.Queue[Batch | None]
    ) -> int:
        """Fetch and decode batches ahead of the writer until the lane is close enough to
        the head; returns how many events it left for the Faust worker."""
        consumer = self.consumer
        behind = await self._behind(tps)
        checked = time.monotonic()
        try:
            while behind > self.settings.rebuild_bulk_until_behind:
                fetched = await consumer.getmany(*tps, timeout_ms=500)
                records = [
                    Record(r.topic, r.partition, r.offset, r.key, r.value, list(r.headers), r.timestamp)
                    for rs in fetched.values()
                    for r in rs
                ]
                if records:
                    decoded = Decoded()
                    for i in range(0, len(records), DECODE_CHUNK):
                        chunk = projector.decode(records[i : i + DECODE_CHUNK])
                        decoded.events += chunk.events
                        decoded.dead += chunk.dead
                        await asyncio.sleep(0)  # let the writer's database round trips go on
                    ends = {tp: rs[-1].offset + 1 for tp, rs in fetched.items() if rs}
                    await batches.put(Batch(records, decoded, ends))
                if not records or time.monotonic() - checked > ENDS_EVERY_S:
                    behind, checked = await self._behind(tps), time.monotonic()
        except asyncio.CancelledError:
            raise
        except BaseException:
            await batches.put(None)  # the writer stops, then finds this task's error
            raise
        await batches.put(None)
        return behind

    async def _behind(self, tps: list[TopicPartition]) -> int:
        ends = await self.consumer.end_offsets(tps)
        behind = 0
        for tp in tps:
            # the position, not the last record: a commit marker takes an offset too
            behind += max(0, ends[tp] - await self.consumer.position(tp))
        return behind
