"""S10, stream-processing jobs: `QualityCheckRecorded` events/s through the windowed
quality monitor, beside a plain aiokafka loop computing the same windows in the same
run, and the process manager's command rate. (The issue that asked for it called it S7;
S7 is the footprint at rest, so the jobs are S10.)

Under an isolated prefix (6 partitions), `BENCH_S10_EVENTS` quality checks of
`BENCH_S10_DATASETS` datasets, made by the real aggregate (all passing, so the monitor
decides nothing and its figure is the windowing alone), are produced to
`<prefix>.events.datasets`.

- **ours**: `cqrs run job quality-monitor` (its Faust app, group and table); the clock
  starts when its worker is ready (partitions assigned, table restored) and stops when
  the group's committed offsets reach the end of the topic.
- **limit**: in this process, an aiokafka consumer (read_committed, assigned, from the
  beginning) `getmany`s the same records, decodes each as the job does and counts it in
  its hopping windows with the same lateness rule, in a dict.
- **process manager**: `BENCH_S10_DEGRADATIONS` `DatasetQualityDegraded` events, then
  `cqrs run job quality-incidents` beside the API (the command path): each opens an
  incident; commands/s from its worker's readiness to its last committed offset.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from aiokafka import TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from bench.common import WriteSide, drop_prefix, end_offsets, produce_events
from bench.results import show, write
from commands.datasets import CONTEXT as DATASETS
from commands.datasets.aggregate import Dataset
from commands.serialization import to_record
from projections.datasets.windows import check_time
from projections.db import schema_name
from projections.events import Record, decode
from shared_kernel import kafka
from shared_kernel.avro import AvroCodec
from shared_kernel.envelope import CommandEnvelope
from shared_kernel.settings import Settings
from shared_kernel.topics import Topics, contract_topics, ensure_topics
from shared_kernel.windows import kinds, takes, to_ms

EVENTS = int(os.environ.get("BENCH_S10_EVENTS", "30000"))
DATASETS_N = int(os.environ.get("BENCH_S10_DATASETS", "300"))
DEGRADATIONS = int(os.environ.get("BENCH_S10_DEGRADATIONS", "300"))
PARTITIONS = 6
GOAL_VS_LIMIT = 0.5


def _records(kind: str, n: int, per: int) -> list[Any]:
    codec = AvroCodec.from_directory()
    base = datetime.now(UTC) - timedelta(days=2)
    out = []
    for d in range(max(1, n // per)):
        ds = Dataset.register(uuid.uuid4(), f"bench {d}", "", "", [], {})
        for k in range(per):
            if kind == "checks":
                at = (base + timedelta(minutes=k * 3 + (7 if k % 5 == 0 else 0))).isoformat()
                ds.record_quality_check("rows", 10.0, 5.0, ">=", at)
            else:
                figures: dict[str, Any] = {
                    "window_start": base.isoformat(),
                    "window_end": (base + timedelta(days=1)).isoformat(),
                }
                figures |= {"checks": 10, "failed": 9, "failure_rate": 0.9, "threshold": 0.5}
                ds.mark_quality_degraded("rows", figures, k + 2)
        events = ds.collect_events()[1:]  # the registration is not what is measured
        envelope = CommandEnvelope(str(uuid.uuid4()), "bench", str(ds.id), {}, actor="bench", tenant="bench")
        out += [to_record(DATASETS, codec, e, envelope) for e in events]
    return out


async def _committed(settings: Settings, group: str) -> int:
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
    await admin.start()
    try:
        offsets = await admin.list_consumer_group_offsets(group)
        return sum(o.offset for o in offsets.values() if o.offset > 0)
    finally:
        await admin.close()


async def _run_job(side: WriteSide, name: str, total: int) -> dict[str, Any]:
    proc = side._spawn(f"job-{name}", "run", "job", name)
    while b"Worker ready" not in proc.log.read_bytes():
        assert proc.popen.poll() is None, proc.tail()
        await asyncio.sleep(0.05)
    started = time.monotonic()
    group = f"{side.settings.topic_prefix}.job.{name}"
    # Faust may commit a partition's last processed offset rather than the next one: done
    # within one record per partition of the end (at most 6 of the thousands measured)
    while await _committed(side.settings, group) < total - PARTITIONS:
        assert proc.popen.poll() is None, proc.tail()
        await asyncio.sleep(0.1)
    seconds = time.monotonic() - started
    proc.stop()
    return {"events": total, "seconds": round(seconds, 2), "per_s": round(total / seconds, 1)}


async def _limit(settings: Settings, total: int) -> dict[str, Any]:
    """The same windows by a plain aiokafka loop: getmany, decode, count."""
    codec = AvroCodec.from_directory()
    hopping = kinds(settings)[1]
    lateness = settings.quality_window_lateness_s * 1000
    consumer = kafka.consumer(settings, isolation_level="read_committed")
    await consumer.start()
    topic = Topics(settings.topic_prefix).events("datasets")
    tps = [TopicPartition(topic, p) for p in range(PARTITIONS)]
    consumer.assign(tps)
    await consumer.seek_to_beginning(*tps)
    state: dict[str, Any] = {}
    seen = 0
    started = time.monotonic()
    try:
        while seen < total:
            batch = await consumer.getmany(timeout_ms=1000, max_records=1000)
            for records in batch.values():
                for m in records:
                    e = decode(
                        codec, Record(m.topic, m.partition, m.offset, m.key, m.value, m.headers, m.timestamp)
                    )
                    seen += 1
                    s = state.setdefault(e.meta.aggregate_id, {"v": 0, "t": 0, "w": {}})
                    if e.version <= s["v"]:
                        continue
                    s["v"] = e.version
                    t = to_ms(check_time(e))
                    s["t"] = max(s["t"], t)
                    for start, end in hopping.containing(t):
                        if takes(end, s["t"], lateness):
                            w = s["w"].setdefault(start, [0, 0])
                            w[0] += 1
                            w[1] += 0 if e.payload["passed"] else 1
    finally:
        await consumer.stop()
    seconds = time.monotonic() - started
    return {"events": seen, "seconds": round(seconds, 2), "per_s": round(seen / seconds, 1)}


async def run(base: Settings) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="bench-s10-"))
    side = WriteSide.create(base, workdir, "S10", PARTITIONS, log_level="info")  # readiness is logged
    settings = side.settings
    try:
        await ensure_topics(settings, contract_topics(settings, ["datasets", "incidents"]))
        produced = await produce_events(
            settings, "datasets", _records("checks", EVENTS, max(1, EVENTS // DATASETS_N))
        )
        print(f"  {produced:,} quality checks produced", flush=True)
        limit = await _limit(settings, produced)
        ours = await _run_job(side, "quality-monitor", produced)
        await side.start_serving()
        degradations = await produce_events(settings, "datasets", _records("degraded", DEGRADATIONS, 1))
        manager = await _run_job(side, "quality-incidents", produced + degradations)
        manager["events"] = degradations
        manager["per_s"] = round(degradations / manager["seconds"], 1)
        ratio = ours["per_s"] / limit["per_s"]
        result = {
            "quality_monitor": ours,
            "limit_aiokafka_loop": limit,
            "ratio_vs_limit": round(ratio, 2),
            "goal_vs_limit": GOAL_VS_LIMIT,
            "process_manager_commands": manager,
            "end_offsets": await end_offsets(settings),
        }
        write("S10", result)
        show(
            "S10",
            "stream-processing jobs",
            [
                (
                    "quality monitor (Faust, table)",
                    f"{ours['per_s']:,.0f} events/s",
                    f"limit {limit['per_s']:,.0f}/s",
                ),
                ("ratio vs limit", f"{ratio:.2f}", f"goal >= {GOAL_VS_LIMIT}"),
                (
                    "process manager",
                    f"{manager['per_s']:,.0f} commands/s",
                    f"{degradations} incidents opened",
                ),
            ],
        )
        return result
    finally:
        side.stop()
        groups = [f"{settings.topic_prefix}.job.{job}" for job in ("quality-monitor", "quality-incidents")]
        await drop_prefix(settings, schema_name(settings), groups)
