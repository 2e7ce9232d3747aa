"""S3, search indexing: events/s into OpenSearch by the `datasets_search` projection,
beside raw `async_bulk` with the same bulk size over the same events.

- **ours**: `cqrs run projector datasets_search` (the supervisor) on an isolated prefix,
  from offset 0 of `BENCH_S3_EVENTS` realistic dataset events (made by the real
  aggregate, see `bench.generator`): that far behind it catches up by bulk replays
  (refreshing each batch, as the version is live), then its Faust worker takes over.
  Its rate is taken from its first committed batch to its last, so start-up is not in it.
- **ours, Faust worker alone**: `cqrs run projector datasets_search --version 2` (its
  own index and group), the live path with no catch-up, reported beside.
- **limit**: in this process, an aiokafka consumer (read_committed, no group) reads the
  same events, decodes them (Avro and headers, as the projector does) and indexes one
  document per event with external versioning through `helpers.async_bulk`, in chunks of
  `projection_batch_max`, without refresh: what indexing these events costs at least.

What ours does more, per batch: an `mget` of the documents it changes, the fold of the
events into them, a `_bulk` that refreshes the index before it returns (so that a
consistency token is honoured for search) and a PostgreSQL transaction that records
its positions.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import asyncpg
from aiokafka import TopicPartition
from opensearchpy import AsyncOpenSearch, helpers

from bench.common import end_offsets
from bench.generator import produce_dataset_events
from bench.results import show, write
from projections.db import create_pool, schema_name
from projections.events import Record, decode
from projections.migrations import migrate
from projections.search import alias_name, search_client
from shared_kernel import kafka
from shared_kernel.avro import AvroCodec
from shared_kernel.settings import Settings
from shared_kernel.topics import Topics, contract_topics, ensure_topics

EVENTS = int(os.environ.get("BENCH_S3_EVENTS", "100000"))
GOAL_VS_LIMIT = 0.7
PROJECTION = "datasets_search"


async def _ours(
    settings: Settings, env: dict[str, str], ends: dict[int, int], workdir: Path, version: int
) -> dict[str, Any]:
    """Version 1 under its supervisor (`cqrs run projector`, which catches up by the bulk
    path when far behind); another version by its Faust worker alone."""
    pool = await create_pool(settings)
    log = (workdir / f"projector-v{version}.log").open("ab")
    cmd = [sys.executable, "-m", "cli", "run", "projector", PROJECTION]
    if version != 1:
        cmd += ["--version", str(version)]
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)  # noqa: ASYNC220
    target = sum(ends.values())
    first: tuple[float, int] | None = None
    try:
        deadline = time.monotonic() + 1800
        while time.monotonic() < deadline:
            done = int(
                await pool.fetchval(
                    "SELECT coalesce(sum(next_offset), 0) FROM projection_positions "
                    "WHERE projection = $1 AND version = $2",
                    PROJECTION,
                    version,
                )
            )
            now = time.monotonic()
            if done and first is None:
                first = (now, done)
            if done >= target:
                break
            if proc.poll() is not None:
                raise RuntimeError(f"the projector exited; see {workdir / 'projector.log'}")
            await asyncio.sleep(0.05)
        else:
            raise RuntimeError("the projector did not finish in time")
        assert first is not None
        seconds = max(now - first[0], 1e-6)
        stats = await pool.fetchrow(
            "SELECT applied, dead_lettered FROM projection_stats WHERE projection = $1 AND version = $2",
            PROJECTION,
            version,
        )
        return {
            "events": target - first[1],
            "seconds": round(seconds, 3),
            "events_per_s": round((target - first[1]) / seconds),
            "applied": stats["applied"],
            "dead_lettered": stats["dead_lettered"],
        }
    finally:
        proc.terminate()
        proc.wait(60)
        log.close()
        await pool.close()


async def _limit(settings: Settings, ends: dict[int, int], index: str) -> dict[str, Any]:
    topic = Topics(settings.topic_prefix).events("datasets")
    codec = AvroCodec.from_directory()
    consumer = kafka.consumer(settings, max_poll_records=settings.projection_batch_max)
    client: AsyncOpenSearch = search_client(settings)
    await client.indices.create(
        index=index, body={"settings": {"number_of_shards": 1, "number_of_replicas": 0}}
    )
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in ends]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)

        async def actions() -> Any:
            left = sum(ends.values())
            while left > 0:
                for records in (await consumer.getmany(timeout_ms=1000)).values():
                    for r in records:
                        left -= 1
                        e = decode(
                            codec,
                            Record(
                                r.topic, r.partition, r.offset, r.key, r.value, list(r.headers), r.timestamp
                            ),
                        )
                        yield {
                            "_index": index,
                            "_id": e.meta.aggregate_id,
                            "version": e.version,
                            "version_type": "external",
                            "_source": {"type": e.type_name, "version": e.version, **e.payload},
                        }

        started = time.monotonic()
        ok, errors = await helpers.async_bulk(
            client, actions(), chunk_size=settings.projection_batch_max, raise_on_error=False
        )
        seconds = time.monotonic() - started
        total = sum(ends.values())
        return {
            "events": total,
            "seconds": round(seconds, 3),
            "events_per_s": round(total / seconds),
            "bulk_size": settings.projection_batch_max,
            "indexed": ok,
            "errors": len(errors) if isinstance(errors, list) else errors,
        }
    finally:
        await consumer.stop()
        await client.indices.delete(index=index, ignore_unavailable=True)
        await client.close()


async def _cleanup(settings: Settings) -> None:
    admin = kafka.admin(settings)
    await admin.start()
    try:
        prefix = settings.topic_prefix + "."
        await admin.delete_topics([t for t in await admin.list_topics() if t.startswith(prefix)])
    finally:
        await admin.close()
    async with search_client(settings) as client:
        await client.indices.delete(index=f"{alias_name(settings, 'datasets')}-*", ignore_unavailable=True)
        await client.indices.delete(index=f"{alias_name(settings, 'incidents')}-*", ignore_unavailable=True)
    conn = await asyncpg.connect(settings.postgres_dsn)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema_name(settings)}" CASCADE')
    finally:
        await conn.close()


async def run(base: Settings) -> dict[str, Any]:
    prefix = f"bench{uuid.uuid4().hex[:6]}"
    settings = base.model_copy(update={"topic_prefix": prefix, "partitions": 6})
    env = {**os.environ, "APP_TOPIC_PREFIX": prefix, "APP_PARTITIONS": "6", "APP_LOG_LEVEL": "warning"}
    workdir = Path(os.environ.get("TMPDIR", "/tmp")) / f"bench-s3-{prefix}"
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        await ensure_topics(settings, contract_topics(settings, ["datasets", "incidents"], []))
        await migrate(settings)
        print(f"S3: producing {EVENTS:,} dataset events", flush=True)
        produced = await produce_dataset_events(settings, EVENTS)
        ends = await end_offsets(settings)
        print("S3: limit (raw async_bulk)", flush=True)
        limit = await _limit(settings, ends, f"{prefix}-s3-limit")
        print("S3: ours (cqrs run projector datasets_search)", flush=True)
        ours = await _ours(settings, env, ends, workdir, version=1)
        print("S3: ours, its Faust worker alone (version 2)", flush=True)
        faust = await _ours(settings, env, ends, workdir, version=2)
    finally:
        await _cleanup(settings)
    ratio = ours["events_per_s"] / limit["events_per_s"] if limit["events_per_s"] else 0.0
    faust_ratio = faust["events_per_s"] / limit["events_per_s"] if limit["events_per_s"] else 0.0
    result = {
        "what": "events/s into OpenSearch: datasets_search projection vs raw async_bulk, same events",
        "events": produced,
        "ours": ours,
        "limit": limit,
        "ratio_vs_limit": round(ratio, 3),
        "ours_faust_worker_alone": faust,
        "ratio_vs_limit_faust_worker_alone": round(faust_ratio, 3),
        "goal_ratio_vs_limit": GOAL_VS_LIMIT,
        "goal_met": ratio >= GOAL_VS_LIMIT,
    }
    write("S3", result)
    show(
        "S3",
        "search indexing",
        [
            ("ours (cqrs run projector)", f"{ours['events_per_s']:,} events/s", f"{ours['events']:,} events"),
            (
                "ours: Faust worker alone",
                f"{faust['events_per_s']:,} events/s",
                f"ratio {faust_ratio:.2f} (the live path, no catch-up)",
            ),
            ("limit (raw async_bulk)", f"{limit['events_per_s']:,} events/s", f"bulk {limit['bulk_size']}"),
            ("ratio_vs_limit", f"{ratio:.2f}", f"goal >= {GOAL_VS_LIMIT}"),
        ],
    )
    return result
