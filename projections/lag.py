"""How far each projection is behind the events topics: in events and in seconds.

The end of a partition is its last stable offset (what a read_committed reader can
reach). Offsets count the commit marker each transaction leaves, so a projection that
has applied everything is one offset short of the end: `events_behind` is 0 then.
While it is behind, the markers in between are counted too (at most one per
transaction), so `events_behind` is an upper bound. `seconds_behind` is the age of the
oldest event not applied yet (0 when caught up), read from that record's timestamp.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import asyncpg
from aiokafka import AIOKafkaConsumer, TopicPartition

from shared_kernel import kafka
from shared_kernel.settings import Settings

PROBE_TIMEOUT_MS = 1000


class LagProbe:
    """One group-less consumer of the API that reads end offsets and single records."""

    def __init__(self, settings: Settings) -> None:
        self.consumer: AIOKafkaConsumer = kafka.consumer(settings, isolation_level="read_committed")
        self.lock = asyncio.Lock()  # seek and fetch must not interleave
        self.started = False

    async def stop(self) -> None:
        if self.started:
            await self.consumer.stop()

    async def _start(self) -> None:
        if not self.started:
            await self.consumer.start()
            self.started = True

    async def ends(self, topics: list[str]) -> dict[tuple[str, int], int]:
        async with self.lock:
            await self._start()
            tps = [
                TopicPartition(t, p)
                for t in topics
                for p in sorted(self.consumer.partitions_for_topic(t) or await self._partitions(t))
            ]
            ends = await self.consumer.end_offsets(tps) if tps else {}
            return {(tp.topic, tp.partition): end for tp, end in ends.items()}

    async def _partitions(self, topic: str) -> set[int]:
        client = self.consumer._client
        client.add_topic(topic)  # tracked, so the update names topics instead of asking for all
        await client.force_metadata_update()
        return self.consumer.partitions_for_topic(topic) or set()

    async def timestamps(self, wanted: list[tuple[str, int, int]]) -> dict[tuple[str, int, int], float]:
        """The timestamp (s) of the first committed record at or after each (topic,
        partition, offset); fetched in rounds, since a partition is read at one offset."""
        out: dict[tuple[str, int, int], float] = {}
        remaining = list(dict.fromkeys(wanted))
        async with self.lock:
            await self._start()
            while remaining:
                round_: dict[TopicPartition, int] = {}
                for t, p, o in remaining:
                    round_.setdefault(TopicPartition(t, p), o)
                remaining = [w for w in remaining if round_.get(TopicPartition(w[0], w[1])) != w[2]]
                out.update(await self._first_stamps(round_))
            # Paused, not unassigned: a consumer left with no topics asks the broker for the
            # metadata of every topic it has (aiokafka's empty topic list means all), which
            # took 50-230 ms of the API's event loop every refresh on a broker with a few
            # hundred topics (S1's latency spikes).
            self.consumer.pause(*self.consumer.assignment())
        return out

    async def _first_stamps(self, tps: dict[TopicPartition, int]) -> dict[tuple[str, int, int], float]:
        self.consumer.assign(list(tps))
        self.consumer.resume(*tps)
        for tp, offset in tps.items():
            self.consumer.seek(tp, offset)
        found: dict[tuple[str, int, int], float] = {}
        pending = set(tps)
        deadline = time.monotonic() + PROBE_TIMEOUT_MS / 1000
        while pending and time.monotonic() < deadline:
            batch = await self.consumer.getmany(*pending, timeout_ms=PROBE_TIMEOUT_MS, max_records=1)
            for tp, records in batch.items():
                if records:
                    found[(tp.topic, tp.partition, tps[tp])] = records[0].timestamp / 1000
                    pending.discard(tp)
        return found


async def lag_of(
    probe: LagProbe,
    topics_of: dict[str, list[str]],
    positions: list[dict[str, Any]],
    with_seconds: bool = True,
) -> dict[str, dict[str, Any]]:
    """Per projection: its partitions with next/end offsets and lag, and totals."""
    topics = sorted({t for ts in topics_of.values() for t in ts})
    ends = await probe.ends(topics)
    applied = {(r["projection"], r["topic"], r["partition"]): r for r in positions}
    out: dict[str, dict[str, Any]] = {}
    behind: list[tuple[str, str, int, int]] = []
    for name, its_topics in topics_of.items():
        parts = []
        for (topic, partition), end in sorted(ends.items()):
            if topic not in its_topics:
                continue
            row = applied.get((name, topic, partition))
            next_offset = row["next_offset"] if row else 0
            events = max(0, end - next_offset - 1)
            parts.append(
                {
                    "topic": topic,
                    "partition": partition,
                    "next_offset": next_offset,
                    "end_offset": end,
                    "events_behind": events,
                    "event_time": row["event_time"] if row else None,
                }
            )
            if events:
                behind.append((name, topic, partition, next_offset))
        out[name] = {"positions": parts}
    stamps = await probe.timestamps(sorted({(t, p, o) for _, t, p, o in behind})) if with_seconds else {}
    now = time.time()
    for entry in out.values():
        seconds = 0.0
        for part in entry["positions"]:
            key = (part["topic"], part["partition"], part["next_offset"])
            stamp = stamps.get(key) if part["events_behind"] else None
            part["seconds_behind"] = round(max(0.0, now - stamp), 3) if stamp else 0.0
            seconds = max(seconds, part["seconds_behind"])
        entry["events_behind"] = sum(p["events_behind"] for p in entry["positions"])
        entry["seconds_behind"] = seconds
    return out


async def version_lag(
    pool: asyncpg.Pool, probe: LagProbe, name: str, version: int, topics: list[str]
) -> tuple[int, int]:
    """(events behind, offsets done) of one version of a projection. Done is counted in
    offsets, like the topics' ends: a caught-up partition is done up to its end (its
    last offset is a transaction marker, never applied)."""
    rows = [
        dict(r)
        for r in await pool.fetch(
            "SELECT projection, topic, partition, next_offset, event_time FROM projection_positions "
            "WHERE projection = $1 AND version = $2",
            name,
            version,
        )
    ]
    lag = (await lag_of(probe, {name: topics}, rows, with_seconds=False))[name]
    done = sum(p["end_offset"] - p["events_behind"] for p in lag["positions"])
    return int(lag["events_behind"]), done
