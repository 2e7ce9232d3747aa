"""The four real services answer the way the rest of the product relies on."""

from __future__ import annotations

import uuid

import asyncpg
import pytest
from aiokafka import TopicPartition
from aiokafka.admin import NewTopic
from opensearchpy import AsyncOpenSearch
from redis.asyncio import Redis

from shared_kernel import kafka
from shared_kernel.settings import Settings
from shared_kernel.topics import ensure_topics
from streams.skipped import committed_records_between

pytestmark = pytest.mark.asyncio


async def _new_topic(settings: Settings, partitions: int = 1) -> str:
    name = f"test.txn.{uuid.uuid4().hex[:10]}"
    assert await ensure_topics(settings, [NewTopic(name, partitions, 1)]) == [name]
    return name


async def _read_to_end(
    settings: Settings, topic: str, isolation_level: str = "read_committed"
) -> list[bytes]:
    """Everything a consumer of that isolation level sees in partition 0, up to the end of the log."""
    consumer = kafka.consumer(settings, isolation_level=isolation_level)
    await consumer.start()
    try:
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)
        end = (await consumer.end_offsets([tp]))[tp]
        values: list[bytes] = []
        # Compare with the consumer position, not the last record: commit markers take offsets.
        while await consumer.position(tp) < end:
            batch = await consumer.getmany(tp, timeout_ms=1000)
            values.extend(r.value for r in batch.get(tp, []))
        return values
    finally:
        await consumer.stop()


async def test_committed_transaction_is_visible_and_aborted_one_is_not(settings: Settings) -> None:
    topic = await _new_topic(settings)
    producer = kafka.transactional_producer(settings, f"test-{uuid.uuid4().hex}")
    await producer.start()
    try:
        async with producer.transaction():
            await producer.send(topic, b"committed-1")
            await producer.send(topic, b"committed-2")
        await producer.begin_transaction()
        await producer.send(topic, b"aborted")
        await producer.abort_transaction()
        async with producer.transaction():
            await producer.send(topic, b"committed-3")
    finally:
        await producer.stop()

    assert await _read_to_end(settings, topic) == [b"committed-1", b"committed-2", b"committed-3"]


async def test_read_uncommitted_consumer_does_see_the_aborted_record(settings: Settings) -> None:
    # Proves the previous test is not passing merely because aborted sends never reach the log.
    topic = await _new_topic(settings)
    producer = kafka.transactional_producer(settings, f"test-{uuid.uuid4().hex}")
    await producer.start()
    try:
        await producer.begin_transaction()
        await (await producer.send(topic, b"aborted"))
        await producer.abort_transaction()
    finally:
        await producer.stop()
    assert await _read_to_end(settings, topic, isolation_level="read_uncommitted") == [b"aborted"]


async def test_the_skipped_records_check_tells_markers_and_aborted_records_from_committed_ones(
    settings: Settings,
) -> None:
    """What the Faust workers' check of a jump in offsets asks (streams.skipped)."""
    topic = await _new_topic(settings)
    producer = kafka.transactional_producer(settings, f"test-{uuid.uuid4().hex}")
    await producer.start()
    try:
        async with producer.transaction():
            await producer.send(topic, b"a")  # 0, its marker at 1
        await producer.begin_transaction()
        await (await producer.send(topic, b"aborted"))  # 2, the abort marker at 3
        await producer.abort_transaction()
        async with producer.transaction():
            await producer.send(topic, b"b")  # 4, its marker at 5
        async with producer.transaction():
            await producer.send(topic, b"c")  # 6
    finally:
        await producer.stop()
    tp = TopicPartition(topic, 0)
    assert await committed_records_between(settings, tp, 1, 4) is False  # a jump from 0 to 4 is sound
    assert await committed_records_between(settings, tp, 1, 6) is True  # one from 0 to 6 skipped "b"
    assert await committed_records_between(settings, tp, 5, 6) is False


async def test_postgres_round_trip_with_jsonb(settings: Settings) -> None:
    conn = await asyncpg.connect(settings.postgres_dsn)
    try:
        table = f"rt_{uuid.uuid4().hex[:8]}"
        await conn.execute(f"CREATE TEMP TABLE {table} (id uuid PRIMARY KEY, doc jsonb NOT NULL)")
        key = uuid.uuid4()
        await conn.execute(f"INSERT INTO {table} VALUES ($1, $2::jsonb)", key, '{"tags": ["a", "b"]}')
        row = await conn.fetchrow(f"SELECT id, doc->'tags'->>1 AS second FROM {table}")
        assert row is not None
        assert (row["id"], row["second"]) == (key, "b")
        assert await conn.fetchval("SHOW wal_level") == "logical"
    finally:
        await conn.close()


async def test_redis_round_trip_and_pubsub(settings: Settings) -> None:
    redis = Redis.from_url(settings.redis_url)
    try:
        key = f"test:{uuid.uuid4().hex}"
        await redis.set(key, b"value", ex=60)
        assert await redis.get(key) == b"value"
        pubsub = redis.pubsub()
        await pubsub.subscribe(key)
        await pubsub.get_message(timeout=1)  # the subscribe confirmation
        assert await redis.publish(key, b"hello") == 1
        message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=5)
        assert message is not None
        assert message["data"] == b"hello"
        await pubsub.aclose()
    finally:
        await redis.aclose()


async def test_opensearch_indexes_and_finds_a_document_by_a_word(settings: Settings) -> None:
    client = AsyncOpenSearch(hosts=[settings.opensearch_url])
    index = f"test-{uuid.uuid4().hex[:8]}"
    try:
        await client.indices.create(index=index, body={"settings": {"number_of_replicas": 0}})
        await client.index(
            index=index, id="1", body={"description": "hourly weather observations"}, refresh=True
        )
        await client.index(index=index, id="2", body={"description": "ticket backlog"}, refresh=True)
        found = await client.search(index=index, body={"query": {"match": {"description": "weather"}}})
        assert [h["_id"] for h in found["hits"]["hits"]] == ["1"]
    finally:
        await client.indices.delete(index=index, ignore_unavailable=True)
        await client.close()
