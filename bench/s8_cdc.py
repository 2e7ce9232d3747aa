"""S8, change data capture: rows/s from a commit in the source database to the datasets
read model, and commit-to-readable latency, beside Debezium alone (commit to its topic)
in the same run.

Under an isolated prefix (6 partitions), a source table `<prefix>.datasets` of the
stack's `legacy` database (the legacy catalogue's shape) is captured by the stack's
Kafka Connect worker: `cqrs run job legacy-catalog` (which configures the connector)
beside the API (the command path) and the datasets projector.

- **throughput**: `BENCH_S8_ROWS` rows inserted in one transaction. From its commit, the
  change topic's end offsets are read (Debezium alone: rows on its topic) and the read
  model is counted (ours: datasets registered and projected), every 20 ms; rows/s is
  rows over the time the last one took.
- **latency**: `BENCH_S8_LATENCY_ROWS` rows, each its own transaction, at
  `BENCH_S8_RATE` rows/s; each row's commit time against when it was first seen on the
  change topic (a consumer of it, from its end) and in the read model (polled every
  20 ms, so figures are up to 20 ms late).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import asyncpg
import orjson
from aiokafka import TopicPartition

from bench.common import Proc, WriteSide, drop_prefix
from bench.results import show, summary_ms, write
from projections.db import schema_name
from shared_kernel import kafka
from shared_kernel.settings import Settings
from streams import cdc

ROWS = int(os.environ.get("BENCH_S8_ROWS", "5000"))
LATENCY_ROWS = int(os.environ.get("BENCH_S8_LATENCY_ROWS", "200"))
RATE = float(os.environ.get("BENCH_S8_RATE", "20"))
PARTITIONS = 6
POLL_S = 0.02
CATALOG_SQL = Path(__file__).resolve().parent.parent / "infra" / "legacy" / "catalog.sql"


async def _on_topic(settings: Settings, source: cdc.Source) -> int:
    consumer = kafka.consumer(settings, isolation_level="read_uncommitted")
    await consumer.start()
    try:
        tps = [TopicPartition(source.topic, p) for p in range(PARTITIONS)]
        return sum((await consumer.end_offsets(tps)).values())
    finally:
        await consumer.stop()


async def _readable(pool: asyncpg.Pool, settings: Settings, owner: str) -> int:
    n: int = await pool.fetchval(
        f'SELECT count(*) FROM "{schema_name(settings)}".datasets WHERE owner = $1', owner
    )
    return n


async def _until_running(connect: cdc.Connect) -> None:
    """Until the connector's task streams (its snapshot of the empty table is done)."""
    deadline = time.monotonic() + 120
    while True:
        found = await connect.status() or {}
        if [t.get("state") for t in found.get("tasks", [])] == ["RUNNING"]:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"the connector does not run: {found}")
        await asyncio.sleep(0.2)


async def _throughput(side: WriteSide, source: cdc.Source, pool: asyncpg.Pool, job: Proc) -> dict[str, Any]:
    settings = side.settings
    before = await _on_topic(settings, source)
    conn = await asyncpg.connect(settings.cdc_source_dsn)
    try:
        await conn.execute(
            f'INSERT INTO "{source.schema}".datasets (id, name, owner_id, metadata) '
            "SELECT 'tp-' || g, 'Row ' || g, 'bench-s8', jsonb_build_object('n', g) "
            "FROM generate_series(1, $1) g",
            ROWS,
        )
    finally:
        await conn.close()
    committed = time.monotonic()
    topic_done = readable_done = None
    last_report = committed
    while readable_done is None:
        now = time.monotonic()
        if topic_done is None and await _on_topic(settings, source) - before >= ROWS:
            topic_done = now - committed
        if await _readable(pool, settings, "bench-s8") >= ROWS:
            readable_done = now - committed
        if now - last_report > 5:
            print(f"  {await _readable(pool, settings, 'bench-s8'):,}/{ROWS:,} rows readable", flush=True)
            last_report = now
        if now - committed > 900:
            raise RuntimeError(f"not all rows readable in 900 s; job log:\n{job.tail()}")
        await asyncio.sleep(POLL_S)
    assert topic_done is not None
    return {
        "rows": ROWS,
        "debezium_seconds": round(topic_done, 2),
        "debezium_rows_per_s": round(ROWS / topic_done, 1),
        "ours_seconds": round(readable_done, 2),
        "ours_rows_per_s": round(ROWS / readable_done, 1),
    }


async def _latency(side: WriteSide, source: cdc.Source, pool: asyncpg.Pool) -> dict[str, Any]:
    settings = side.settings
    committed: dict[str, float] = {}
    on_topic: dict[str, float] = {}
    readable: dict[str, float] = {}
    consumer = kafka.consumer(settings, isolation_level="read_uncommitted", auto_offset_reset="latest")
    tps = [TopicPartition(source.topic, p) for p in range(PARTITIONS)]
    await consumer.start()
    consumer.assign(tps)
    await consumer.seek_to_end(*tps)
    for tp in tps:
        await consumer.position(tp)
    done = asyncio.Event()
    all_readable = asyncio.Event()

    async def watch_topic() -> None:
        while not done.is_set():
            for records in (await consumer.getmany(timeout_ms=100)).values():
                now = time.monotonic()
                for r in records:
                    on_topic.setdefault(orjson.loads(r.key)["id"], now)

    async def watch_reads() -> None:
        table = f'"{schema_name(settings)}".datasets'
        while not done.is_set():
            rows = await pool.fetch(f"SELECT name FROM {table} WHERE owner = 'bench-s8-latency'")
            now = time.monotonic()
            for row in rows:
                readable.setdefault(row["name"], now)
            if len(readable) >= LATENCY_ROWS:
                all_readable.set()
            await asyncio.sleep(POLL_S)

    watchers = [asyncio.create_task(watch_topic()), asyncio.create_task(watch_reads())]
    insert = (
        f"INSERT INTO \"{source.schema}\".datasets (id, name, owner_id) VALUES ($1, $1, 'bench-s8-latency')"
    )
    conn = await asyncpg.connect(settings.cdc_source_dsn)
    try:
        for i in range(LATENCY_ROWS):
            key = f"lat-{i}"
            await conn.execute(insert, key)
            committed[key] = time.monotonic()
            await asyncio.sleep(1 / RATE)
        with contextlib.suppress(TimeoutError):  # what is missing then is reported
            await asyncio.wait_for(all_readable.wait(), 120)
    finally:
        done.set()
        await asyncio.gather(*watchers, return_exceptions=True)
        await consumer.stop()
        await conn.close()
    return {
        "rows": LATENCY_ROWS,
        "rate_per_s": RATE,
        "debezium_commit_to_topic": summary_ms(
            [on_topic[k] - t for k, t in committed.items() if k in on_topic]
        ),
        "ours_commit_to_readable": summary_ms(
            [readable[k] - t for k, t in committed.items() if k in readable]
        ),
        "missing": LATENCY_ROWS - len(readable),
    }


async def run(base: Settings) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="bench-s8-"))
    side = WriteSide.create(base, workdir, "S8", PARTITIONS, log_level="info")  # readiness is logged
    schema = side.settings.topic_prefix
    side.settings = side.settings.model_copy(update={"cdc_source_table": f"{schema}.datasets"})
    side.env["APP_CDC_SOURCE_TABLE"] = f"{schema}.datasets"
    settings = side.settings
    source = cdc.Source.of(settings)
    conn = await asyncpg.connect(settings.cdc_source_dsn)
    try:
        await conn.execute(CATALOG_SQL.read_text().replace("catalog", schema))
    finally:
        await conn.close()
    pool = await asyncpg.create_pool(settings.postgres_dsn, min_size=1, max_size=2)
    try:
        await side.start_serving()
        side.start_projector("datasets")
        await side.wait_until_projected()
        job = side._spawn("job-legacy-catalog", "run", "job", "legacy-catalog")
        side.projectors.append(job)  # stopped with the others
        while b"Worker ready" not in job.log.read_bytes():
            assert job.popen.poll() is None, job.tail()
            await asyncio.sleep(0.05)
        await _until_running(cdc.connect_of(settings, source))
        throughput = await _throughput(side, source, pool, job)
        latency = await _latency(side, source, pool)
        result = {"throughput": throughput, "latency": latency, "connector": source.connector}
        write("S8", result)
        show(
            "S8",
            "change data capture (Debezium on Connect -> CDC job -> read model)",
            [
                (
                    "rows/s, commit to read model",
                    f"{throughput['ours_rows_per_s']:,.0f}",
                    f"Debezium alone (to its topic) {throughput['debezium_rows_per_s']:,.0f}/s",
                ),
                (
                    "commit to readable p50 / p99",
                    f"{latency['ours_commit_to_readable']['p50_ms']:.0f} / "
                    f"{latency['ours_commit_to_readable']['p99_ms']:.0f} ms",
                    f"Debezium alone {latency['debezium_commit_to_topic']['p50_ms']:.0f} / "
                    f"{latency['debezium_commit_to_topic']['p99_ms']:.0f} ms",
                ),
            ],
        )
        return result
    finally:
        await pool.close()
        side.stop()
        await cdc.remove(settings, source)
        conn = await asyncpg.connect(settings.cdc_source_dsn)
        try:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        finally:
            await conn.close()
        groups = [
            f"{settings.topic_prefix}.job.legacy-catalog",
            f"{settings.topic_prefix}.projection.datasets.v1",
        ]
        await drop_prefix(settings, schema_name(settings), groups)
