"""Kafka client factories: every producer, consumer and admin client is made here.

Callers start and stop the clients themselves (in a FastAPI lifespan, a processor's
run loop, a test fixture); nothing connects at import time.
"""

from __future__ import annotations

import logging
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.consumer import fetcher as _fetcher
from aiokafka.producer import sender as _aiokafka_sender
from aiokafka.protocol.api import Request, RequestStruct, Response
from aiokafka.protocol.types import Array, Int16, Int32, Schema, String
from aiokafka.structs import TopicPartition

from shared_kernel.settings import Settings

log = logging.getLogger(__name__)


def producer(settings: Settings, **overrides: Any) -> AIOKafkaProducer:
    """An idempotent producer (acks=all): no duplicates from its own retries."""
    options: dict[str, Any] = {
        "bootstrap_servers": settings.kafka_bootstrap,
        "client_id": settings.service_name,
        "enable_idempotence": True,
        "acks": "all",
        "linger_ms": 2,
        "max_batch_size": 256 * 1024,
        "request_timeout_ms": 15_000,
    }
    options.update(overrides)
    return AIOKafkaProducer(**options)


def transactional_producer(settings: Settings, transactional_id: str, **overrides: Any) -> AIOKafkaProducer:
    """A producer whose writes become visible only when its transaction commits.

    Initialising a transactional id fences every older producer that used it.

    Right after a commit the coordinator is still writing the transaction markers, and
    the next transaction's first AddPartitionsToTxn is answered CONCURRENT_TRANSACTIONS
    (KAFKA-5477). aiokafka then waits a fixed 20 ms, which made every back-to-back
    transaction cost about 29 ms at p50 on loopback; waiting `kafka_txn_retry_backoff_ms`
    (2 ms) instead brings it to about 7 ms. aiokafka exposes this only as a module
    constant, so it is set here, where every transactional producer is made.

    Brokers since 3.6 verify that a produce request's partition joined the transaction
    (KIP-890); while the coordinator still finishes the previous transaction that check
    answers NOT_ENOUGH_REPLICAS (KAFKA-15459), which the client retries after
    `retry_backoff_ms`. The 100 ms default put 100 ms spikes into command latency, so
    the same short backoff is used there.
    """
    _aiokafka_sender.BACKOFF_OVERRIDE = settings.kafka_txn_retry_backoff_ms / 1000
    options: dict[str, Any] = {"retry_backoff_ms": settings.kafka_txn_retry_backoff_ms}
    options.update(overrides)
    return producer(settings, transactional_id=transactional_id, **options)


def consumer(
    settings: Settings,
    *topics: str,
    group_id: str | None = None,
    isolation_level: str = "read_committed",
    **overrides: Any,
) -> AIOKafkaConsumer:
    """A consumer that sees committed transactional data only, unless told otherwise.

    Its fetches wait at the broker for new data (see `wait_long_only_for_whole_fetches`):
    at rest a consumer costs one fetch a second, not fifty.
    """
    wait_long_only_for_whole_fetches(settings)
    options: dict[str, Any] = {
        "bootstrap_servers": settings.kafka_bootstrap,
        "client_id": settings.service_name,
        "group_id": group_id,
        "isolation_level": isolation_level,
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        "max_partition_fetch_bytes": 4 * 1024 * 1024,
        "fetch_max_wait_ms": settings.kafka_fetch_max_wait_ms,
    }
    options.update(overrides)
    return AIOKafkaConsumer(*topics, **options)


def wait_long_only_for_whole_fetches(settings: Settings) -> None:
    """A fetch waits at the broker up to `kafka_fetch_max_wait_ms` only when it asks for
    every partition the consumer reads from that broker, else `kafka_partial_fetch_wait_ms`.

    aiokafka keeps one fetch in flight per broker and leaves out of it a partition whose
    fetched records are not consumed yet (or that is paused). New data on a partition
    left out waits until the fetch in flight returns: with a long wait and the other
    partitions quiet, up to that wait (1 s here), which is why every consumer here used
    to poll with a 20 ms wait, 50 fetches a second each, at rest too. A fetch that asks
    for every partition returns as soon as any of them has data, so its wait costs no
    latency; only a partial fetch needs a short one. aiokafka builds its requests in
    `Fetcher._get_actions_per_node`: the wait is set there, per request, for every
    consumer of the process (the two waits come from the settings, the same for all).
    """
    _fetcher.Fetcher._cqrs_partial_wait_ms = settings.kafka_partial_fetch_wait_ms
    if getattr(_fetcher.Fetcher, "_cqrs_patched", False):
        return
    build = _fetcher.Fetcher._get_actions_per_node

    def actions(self: Any, assignment: Any) -> Any:
        found = build(self, assignment)
        for node_id, request in found[0]:
            asked = sum(len(partitions) for _, partitions in request.topics)
            led = sum(1 for tp in assignment.tps if self._select_read_replica(tp) == node_id)
            if asked < led:
                request._max_wait_ms = min(request._max_wait_ms, self._cqrs_partial_wait_ms)
        return found

    _fetcher.Fetcher._get_actions_per_node = actions
    _fetcher.Fetcher._cqrs_patched = True


async def partitions_of(consumer: AIOKafkaConsumer, topic: str) -> set[int]:
    """The partitions of `topic` (none if it does not exist), asking the brokers when the
    consumer's metadata does not know the topic yet (it knows only what it reads)."""
    partitions = consumer.partitions_for_topic(topic)
    if not partitions:
        await consumer._client.force_metadata_update()
        partitions = consumer.partitions_for_topic(topic)
    return set(partitions or ())


def admin(settings: Settings) -> AIOKafkaAdminClient:
    return AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap, client_id=settings.service_name)


class _LeaveGroupResponseV3(Response):  # type: ignore[misc]
    API_KEY = 13
    API_VERSION = 3
    SCHEMA = Schema(
        ("throttle_time_ms", Int32),
        ("error_code", Int16),
        (
            "members",
            Array(
                ("member_id", String("utf-8")), ("group_instance_id", String("utf-8")), ("error_code", Int16)
            ),
        ),
    )


class _LeaveGroupRequestV3(RequestStruct):  # type: ignore[misc]
    API_KEY = 13
    API_VERSION = 3
    RESPONSE_TYPE = _LeaveGroupResponseV3
    SCHEMA = Schema(
        ("group_id", String("utf-8")),
        ("members", Array(("member_id", String("utf-8")), ("group_instance_id", String("utf-8")))),
    )


class _StaticLeave(Request[_LeaveGroupRequestV3]):  # type: ignore[misc]
    """LeaveGroup v3 (KIP-345): the only way a static member leaves; aiokafka sends v0/v1."""

    API_KEY = 13

    def __init__(self, group_id: str, member_id: str, instance_id: str) -> None:
        self.group_id, self.member_id, self.instance_id = group_id, member_id, instance_id

    def build(self, request_struct_class: type[_LeaveGroupRequestV3]) -> _LeaveGroupRequestV3:
        return request_struct_class(self.group_id, [(self.member_id, self.instance_id)])


async def leave_group_static(consumer: AIOKafkaConsumer) -> None:
    """Take a static member out of its group now, so its partitions move at once.

    A consumer with a `group_instance_id` does not leave when it stops (a restart is
    meant to find its partitions waiting); a member that stops for good must say so, or
    its partitions wait out the session timeout."""
    coordinator = getattr(consumer, "_coordinator", None)
    instance = getattr(consumer, "_group_instance_id", None)
    if coordinator is None or instance is None or coordinator.generation <= 0:
        return
    try:
        response = await coordinator._send_req(
            _StaticLeave(coordinator.group_id, coordinator.member_id, instance)
        )
    except Exception as exc:  # best effort: the session timeout still applies
        log.warning("could not leave the group", extra={"error": repr(exc)})
        return
    if response.error_code:
        log.warning("leaving the group was refused", extra={"error_code": response.error_code})


async def after_last_records(consumer: AIOKafkaConsumer, tps: list[TopicPartition]) -> list[int]:
    """For each partition, the offset after its last committed record (0 if it has none):
    read from a little before the end, further back while nothing committed is found.
    (The last stable offset is past the transaction markers: a consumer that applied
    every record has a position below it.) `consumer` has `tps` assigned."""
    ends: dict[TopicPartition, int] = await consumer.end_offsets(tps)  # last stable offsets
    found = {tp: 0 for tp in tps if ends[tp] == 0}
    back = 8
    while len(found) < len(tps):
        todo = [tp for tp in tps if tp not in found]
        for tp in todo:
            consumer.seek(tp, max(0, ends[tp] - back))
        last: dict[TopicPartition, int] = {}
        reading = set(todo)
        while reading:
            batch = await consumer.getmany(*reading, timeout_ms=1000)
            for tp, records in batch.items():
                for r in records:
                    if r.offset < ends[tp]:
                        last[tp] = r.offset
            reading = {tp for tp in reading if await consumer.position(tp) < ends[tp]}
        for tp in todo:
            if tp in last:
                found[tp] = last[tp] + 1
            elif ends[tp] <= back:
                found[tp] = 0  # nothing committed at all (aborted transactions only)
        back *= 8
    return [found[tp] for tp in tps]
