"""Fencing by the consumer group's generation (shared_kernel.group_txn) on the real broker:
what lets one transactional producer write for every partition an owner holds."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import NewTopic

from shared_kernel import group_txn, kafka
from shared_kernel.group_txn import GroupMember, StaleGeneration
from shared_kernel.settings import Settings
from shared_kernel.topics import ensure_topics


@pytest.fixture
async def member(settings: Settings) -> AsyncIterator[tuple[AIOKafkaConsumer, str, str]]:
    """A member of a new group holding the one partition of a new topic."""
    topic, group = f"t-gtxn-{uuid.uuid4().hex[:8]}", f"t-gtxn-{uuid.uuid4().hex[:8]}"
    await ensure_topics(settings, [NewTopic(topic, 1, 1)])
    consumer = kafka.consumer(settings, group_id=group, isolation_level="read_committed")
    consumer.subscribe([topic])
    await consumer.start()
    try:
        async with asyncio.timeout(30):
            while not consumer.assignment():
                await consumer.getmany(timeout_ms=100)
        yield consumer, topic, group
    finally:
        await consumer.stop()


def current(consumer: AIOKafkaConsumer) -> GroupMember:
    return GroupMember(consumer._coordinator.generation, consumer._coordinator.member_id, None)


async def committed_values(settings: Settings, topic: str) -> list[bytes]:
    reader = kafka.consumer(settings, isolation_level="read_committed")
    await reader.start()
    try:
        tp = TopicPartition(topic, 0)
        end = (await reader.end_offsets([tp]))[tp]
        reader.assign([tp])
        await reader.seek_to_beginning(tp)
        values: list[bytes] = []
        while await reader.position(tp) < end:
            for records in (await reader.getmany(tp, timeout_ms=500)).values():
                values += [r.value for r in records if r.value is not None]
        return values
    finally:
        await reader.stop()


async def test_a_transaction_of_an_older_generation_is_refused_and_leaves_nothing(
    settings: Settings, member: tuple[AIOKafkaConsumer, str, str]
) -> None:
    consumer, topic, group = member
    tp = TopicPartition(topic, 0)
    now = current(consumer)
    told = now
    producer = kafka.transactional_producer(settings, f"t-gtxn-{uuid.uuid4().hex[:8]}")
    group_txn.bind_to_group(producer, lambda: told)
    await producer.start()
    try:
        async with producer.transaction():
            await producer.send_and_wait(topic, b"current", key=b"k")
            await producer.send_offsets_to_transaction({tp: 1}, group)

        told = GroupMember(now.generation - 1, now.member_id, None)  # as a stale owner would

        async def stale() -> None:
            async with producer.transaction():
                await producer.send_and_wait(topic, b"stale", key=b"k")
                await producer.send_offsets_to_transaction({tp: 2}, group)

        with pytest.raises(StaleGeneration):
            await stale()

        told = now  # the same producer goes on once its owner acts on the current generation
        async with producer.transaction():
            await producer.send_and_wait(topic, b"after", key=b"k")
            await producer.send_offsets_to_transaction({tp: 3}, group)
    finally:
        await producer.stop()

    assert await committed_values(settings, topic) == [b"current", b"after"]
    assert await group_txn.stable_committed(consumer, [tp], 5) == {tp: 3}


async def test_a_new_owner_reads_the_offset_only_once_the_open_transaction_has_ended(
    settings: Settings, member: tuple[AIOKafkaConsumer, str, str]
) -> None:
    consumer, topic, group = member
    tp = TopicPartition(topic, 0)
    producer = kafka.transactional_producer(settings, f"t-gtxn-{uuid.uuid4().hex[:8]}")
    group_txn.bind_to_group(producer, lambda: current(consumer))
    await producer.start()
    try:
        await producer.begin_transaction()
        await producer.send_and_wait(topic, b"in flight", key=b"k")
        await producer.send_offsets_to_transaction({tp: 7}, group)
        # The offsets are pending in the open transaction: the new owner must wait.
        waiting = asyncio.create_task(group_txn.stable_committed(consumer, [tp], 30))
        await asyncio.sleep(0.5)  # it asks again and again meanwhile; nothing to answer yet
        assert not waiting.done()
        await producer.commit_transaction()
        assert await asyncio.wait_for(waiting, 10) == {tp: 7}
        # and what the transaction wrote is readable by then
        assert await committed_values(settings, topic) == [b"in flight"]
    finally:
        await producer.stop()
