"""S0, calibration: the limits of this machine with the raw clients, no product code.

Later scenarios divide their figures by these (`ratio_vs_limit`), measured in the same run.
`BENCH_S0_MESSAGES` (Kafka records per producer mode), `BENCH_S0_PG_ROWS` (PostgreSQL
rows) and `BENCH_S0_OS_DOCS` (OpenSearch documents) size it.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from typing import Any

import asyncpg
import orjson
from aiokafka import TopicPartition
from aiokafka.admin import NewTopic
from opensearchpy import AsyncOpenSearch
from opensearchpy.helpers import async_bulk

from bench.results import show, summary_ms, write
from shared_kernel import kafka
from shared_kernel.settings import Settings
from shared_kernel.topics import ensure_topics

MESSAGES = int(os.environ.get("BENCH_S0_MESSAGES", "50000"))
PAYLOAD = orjson.dumps(
    {
        "name": "hourly-weather-observations",
        "description": "Hourly surface observations from 1,200 stations, quality controlled.",
        "owner": "climate-team",
        "tags": ["weather", "observations", "hourly"],
        "metadata": {"source": "stations", "licence": "CC-BY-4.0", "rows": 18234411},
    }
)
TXN_BATCH = 500
COMMIT_SAMPLES = 300
PG_ROWS = int(os.environ.get("BENCH_S0_PG_ROWS", "100000"))
OS_DOCS = int(os.environ.get("BENCH_S0_OS_DOCS", "20000"))
OS_CHUNK = 500


async def _topic(settings: Settings, partitions: int = 6) -> str:
    name = f"bench.s0.{uuid.uuid4().hex[:8]}"
    await ensure_topics(settings, [NewTopic(name, partitions, 1)])
    return name


async def _delete_topics(settings: Settings, names: list[str]) -> None:
    admin = kafka.admin(settings)
    await admin.start()
    try:
        await admin.delete_topics(names)
    finally:
        await admin.close()


async def _produce(settings: Settings, topic: str, mode: str) -> float:
    """Messages per second for `MESSAGES` keyed sends in the given producer mode."""
    if mode == "plain":
        producer = kafka.producer(settings, enable_idempotence=False, acks=1, linger_ms=5)
    elif mode == "idempotent":
        producer = kafka.producer(settings, linger_ms=5)
    else:
        producer = kafka.transactional_producer(settings, f"bench-s0-{uuid.uuid4().hex}", linger_ms=5)
    await producer.start()
    keys = [uuid.uuid4().hex.encode() for _ in range(1000)]
    try:
        t0 = time.perf_counter()
        if mode == "transactional":
            for start in range(0, MESSAGES, TXN_BATCH):
                async with producer.transaction():
                    futures = [
                        await producer.send(topic, PAYLOAD, key=keys[i % 1000])
                        for i in range(start, min(MESSAGES, start + TXN_BATCH))
                    ]
                await asyncio.gather(*futures)
        else:
            futures = []
            for i in range(MESSAGES):
                futures.append(await producer.send(topic, PAYLOAD, key=keys[i % 1000]))
                if len(futures) >= 5000:
                    await asyncio.gather(*futures)
                    futures.clear()
            await asyncio.gather(*futures)
        return MESSAGES / (time.perf_counter() - t0)
    finally:
        await producer.stop()


async def _commit_latency(settings: Settings, topic: str) -> dict[str, float]:
    """One small transaction at a time: begin, send one record, commit."""
    producer = kafka.transactional_producer(settings, f"bench-s0-lat-{uuid.uuid4().hex}", linger_ms=0)
    await producer.start()
    samples = []
    try:
        for i in range(COMMIT_SAMPLES):
            t0 = time.perf_counter()
            async with producer.transaction():
                await producer.send(topic, PAYLOAD, key=str(i).encode())
            samples.append(time.perf_counter() - t0)
    finally:
        await producer.stop()
    return summary_ms(samples)


async def _consume(settings: Settings, topic: str, expected: int) -> float:
    consumer = kafka.consumer(settings, isolation_level="read_committed")
    await consumer.start()
    try:
        parts = [TopicPartition(topic, p) for p in (consumer.partitions_for_topic(topic) or set())]
        if not parts:
            await consumer._client.force_metadata_update()
            parts = [TopicPartition(topic, p) for p in (consumer.partitions_for_topic(topic) or set())]
        consumer.assign(parts)
        await consumer.seek_to_beginning(*parts)
        ends = await consumer.end_offsets(parts)
        seen = 0
        t0 = time.perf_counter()
        while any([await consumer.position(tp) < ends[tp] for tp in parts]):
            batch = await consumer.getmany(timeout_ms=1000, max_records=10000)
            seen += sum(len(v) for v in batch.values())
        elapsed = time.perf_counter() - t0
        assert seen >= expected, f"consumed {seen} of {expected}"
        return seen / elapsed
    finally:
        await consumer.stop()


async def _postgres(settings: Settings) -> dict[str, float]:
    conn = await asyncpg.connect(settings.postgres_dsn)
    table = f"bench_s0_{uuid.uuid4().hex[:8]}"
    try:
        await conn.execute(
            f"CREATE UNLOGGED TABLE {table} (id uuid PRIMARY KEY, version int NOT NULL, doc jsonb NOT NULL)"
        )
        doc = PAYLOAD.decode()
        rows = [(uuid.uuid4(), 1, doc) for _ in range(PG_ROWS)]
        t0 = time.perf_counter()
        await conn.copy_records_to_table(table, records=rows, columns=["id", "version", "doc"])
        copy_rate = PG_ROWS / (time.perf_counter() - t0)

        n = PG_ROWS // 5
        upserts = [(uuid.uuid4(), 1, doc) for _ in range(n)]
        t0 = time.perf_counter()
        async with conn.transaction():
            await conn.executemany(
                f"INSERT INTO {table} (id, version, doc) VALUES ($1, $2, $3::jsonb) "
                "ON CONFLICT (id) DO UPDATE SET version = EXCLUDED.version, doc = EXCLUDED.doc "
                f"WHERE {table}.version < EXCLUDED.version",
                upserts,
            )
        exec_rate = n / (time.perf_counter() - t0)
        return {"copy_rows_per_s": round(copy_rate), "executemany_upsert_rows_per_s": round(exec_rate)}
    finally:
        await conn.execute(f"DROP TABLE IF EXISTS {table}")
        await conn.close()


async def _opensearch(settings: Settings) -> float:
    client = AsyncOpenSearch(hosts=[settings.opensearch_url])
    index = f"bench-s0-{uuid.uuid4().hex[:8]}"
    try:
        await client.indices.create(
            index=index, body={"settings": {"number_of_shards": 1, "number_of_replicas": 0}}
        )
        doc = orjson.loads(PAYLOAD)
        actions = (
            {"_index": index, "_id": str(i), "_version": 1, "_version_type": "external", "_source": doc}
            for i in range(OS_DOCS)
        )
        t0 = time.perf_counter()
        ok, errors = await async_bulk(client, actions, chunk_size=OS_CHUNK, stats_only=True)
        elapsed = time.perf_counter() - t0
        if ok != OS_DOCS or errors:
            raise RuntimeError(f"bulk indexed {ok} of {OS_DOCS} documents ({errors} errors)")
        return OS_DOCS / elapsed
    finally:
        await client.indices.delete(index=index, ignore_unavailable=True)
        await client.close()


async def run(settings: Settings) -> dict[str, Any]:
    topics: list[str] = []
    produce: dict[str, float] = {}
    for mode in ("plain", "idempotent", "transactional"):
        topic = await _topic(settings)
        topics.append(topic)
        produce[mode] = round(await _produce(settings, topic, mode))
    consume_rate = round(await _consume(settings, topics[-1], MESSAGES))
    latency_topic = await _topic(settings, partitions=1)
    topics.append(latency_topic)
    commit = await _commit_latency(settings, latency_topic)
    await _delete_topics(settings, topics)
    pg = await _postgres(settings)
    os_rate = round(await _opensearch(settings))
    result = {
        "what": "raw client limits on this machine (no product code)",
        "message_bytes": len(PAYLOAD),
        "messages": MESSAGES,
        "kafka_produce_msgs_per_s": produce,
        "kafka_transaction_batch": TXN_BATCH,
        "kafka_consume_read_committed_msgs_per_s": consume_rate,
        "kafka_transaction_commit_latency": commit,
        "postgres": pg,
        "opensearch_async_bulk_docs_per_s": os_rate,
        "opensearch_bulk_chunk": OS_CHUNK,
    }
    write("S0", result)
    show(
        "S0",
        "calibration (raw clients)",
        [
            ("produce plain (acks=1)", f"{produce['plain']:,} msg/s", f"{len(PAYLOAD)} B values"),
            ("produce idempotent (acks=all)", f"{produce['idempotent']:,} msg/s", ""),
            ("produce transactional", f"{produce['transactional']:,} msg/s", f"{TXN_BATCH} per txn"),
            ("consume read_committed", f"{consume_rate:,} msg/s", ""),
            ("txn commit p50 / p99", f"{commit['p50_ms']} / {commit['p99_ms']} ms", "1 record per txn"),
            ("asyncpg COPY", f"{pg['copy_rows_per_s']:,} rows/s", "jsonb rows"),
            ("asyncpg executemany upsert", f"{pg['executemany_upsert_rows_per_s']:,} rows/s", ""),
            ("opensearch async_bulk", f"{os_rate:,} docs/s", f"chunk {OS_CHUNK}"),
        ],
    )
    return result
