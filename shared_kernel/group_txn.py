"""Transactions fenced by the consumer group's generation (Kafka's KIP-447), for aiokafka.

One transactional producer can then write for every partition a process owns: its
TxnOffsetCommit names the member and the group generation that gave it the
partitions, so the group coordinator refuses it (ILLEGAL_GENERATION, UNKNOWN_MEMBER_ID,
FENCED_INSTANCE_ID) once the group has moved on, and the transaction aborts. A new
owner asks for its partitions' committed offsets with `require_stable`: while a
transaction of the old owner that committed offsets for them is still open, the
coordinator answers UNSTABLE_OFFSET_COMMIT, and the new owner waits for that transaction
to end before it reads the partition's state. Nothing decided on old state can then be
committed after the new owner started deciding.

aiokafka sends TxnOffsetCommit v0 (no generation) and OffsetFetch up to v3 (no
`require_stable`); this module adds TxnOffsetCommit v3 and OffsetFetch v7 (both in
Kafka since 2.5) and puts the former in place of aiokafka's on one producer.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka import errors as Errors
from aiokafka.client import CoordinationType
from aiokafka.producer.sender import TxnOffsetCommitHandler
from aiokafka.producer.transaction_manager import TransactionState
from aiokafka.protocol.api import Request, RequestStruct, Response
from aiokafka.protocol.types import (
    Boolean,
    CompactArray,
    CompactString,
    Int16,
    Int32,
    Int64,
    Schema,
    TaggedFields,
)

log = logging.getLogger(__name__)

ILLEGAL_GENERATION, UNKNOWN_MEMBER_ID, REBALANCE_IN_PROGRESS, FENCED_INSTANCE_ID = 22, 25, 27, 82
UNSTABLE_OFFSET_COMMIT = 88
STALE = {ILLEGAL_GENERATION, UNKNOWN_MEMBER_ID, REBALANCE_IN_PROGRESS, FENCED_INSTANCE_ID}
RETRIABLE = {14, 15, 16}  # coordinator loading, not available, not the coordinator


@dataclass(frozen=True)
class GroupMember:
    """Who this process is in its consumer group, as of the assignment it acts on."""

    generation: int
    member_id: str
    instance_id: str | None


class StaleGeneration(Errors.KafkaError):  # type: ignore[misc]
    """The group has moved on from the generation this transaction was decided in."""


# ---- TxnOffsetCommit v3 ------------------------------------------------------------------

TEXT = CompactString("utf-8")


def _by_topic(*partition: tuple[str, Any]) -> CompactArray:
    """A flexible version's array of topics, each with its array of `partition` fields."""
    return CompactArray(
        ("name", TEXT),
        ("partitions", CompactArray(*partition, ("tags", TaggedFields))),
        ("tags", TaggedFields),
    )


class _TxnOffsetCommitResponseV3(Response):  # type: ignore[misc]
    API_KEY = 28
    API_VERSION = 3
    SCHEMA = Schema(
        ("throttle_time_ms", Int32),
        ("topics", _by_topic(("partition", Int32), ("error_code", Int16))),
        ("tags", TaggedFields),
    )


class _TxnOffsetCommitRequestV3(RequestStruct):  # type: ignore[misc]
    FLEXIBLE_VERSION = True
    API_KEY = 28
    API_VERSION = 3
    RESPONSE_TYPE = _TxnOffsetCommitResponseV3
    SCHEMA = Schema(
        ("transactional_id", TEXT),
        ("group_id", TEXT),
        ("producer_id", Int64),
        ("producer_epoch", Int16),
        ("generation_id", Int32),
        ("member_id", TEXT),
        ("group_instance_id", TEXT),
        (
            "topics",
            _by_topic(("partition", Int32), ("offset", Int64), ("leader_epoch", Int32), ("metadata", TEXT)),
        ),
        ("tags", TaggedFields),
    )


class _TxnOffsetCommit(Request[_TxnOffsetCommitRequestV3]):  # type: ignore[misc]
    API_KEY = 28

    def __init__(self, fields: tuple[Any, ...]) -> None:
        self.fields = fields

    def build(self, request_struct_class: type[_TxnOffsetCommitRequestV3]) -> _TxnOffsetCommitRequestV3:
        return request_struct_class(*self.fields)


class _GroupTxnOffsetCommit(TxnOffsetCommitHandler):  # type: ignore[misc]
    """aiokafka's TxnOffsetCommit handler, sending the member and its generation."""

    def __init__(self, sender: Any, offsets: Any, group_id: str, member: GroupMember) -> None:
        super().__init__(sender, offsets, group_id)
        self.member = member

    def create_request(self) -> _TxnOffsetCommit:
        txn = self._sender._txn_manager
        topics: dict[str, list[tuple[Any, ...]]] = collections.defaultdict(list)
        for tp, offset in sorted(self._offsets.items()):
            topics[tp.topic].append((tp.partition, offset.offset, -1, offset.metadata or "", {}))
        m = self.member
        return _TxnOffsetCommit(
            (
                txn.transactional_id,
                self._group_id,
                txn.producer_id,
                txn.producer_epoch,
                m.generation,
                m.member_id,
                m.instance_id,
                [(topic, parts, {}) for topic, parts in topics.items()],
                {},
            )
        )

    def handle_response(self, resp: Any) -> float | None:
        txn = self._sender._txn_manager
        for topic, partitions, _ in resp.topics:
            for partition, code, _ in partitions:
                tp = TopicPartition(topic, partition)
                if code == 0:
                    txn.offset_committed(tp, self._offsets[tp].offset, self._group_id)
                elif code in STALE:
                    # The group moved on: this transaction must not commit. Its abort is the
                    # caller's (the offsets' future raises).
                    _refuse(txn, StaleGeneration(f"generation {self.member.generation}: error {code}"))
                    return None
                elif code in RETRIABLE or code == 3:
                    if code in (15, 16):
                        self._sender._coordinator_dead(CoordinationType.GROUP)
                    return float(self._default_backoff)
                elif code == 47:
                    raise Errors.ProducerFenced()
                else:
                    raise Errors.for_code(code)()
        return None


def _refuse(txn: Any, exc: Exception) -> None:
    """Make the open transaction abortable only, failing its offsets' future with `exc`.

    Not aiokafka's `error_transaction`: that forgets the partitions the transaction holds,
    so the abort that follows sends no EndTxn and the broker keeps the transaction open;
    the producer's next transaction then continues it, and commits what was meant to be
    aborted (found by tests/integration/test_group_txn.py)."""
    txn._transition_to(TransactionState.ABORTABLE_ERROR)
    for _, _, fut in txn._pending_txn_offsets:
        if not fut.done():
            fut.set_exception(exc)
    txn._pending_txn_offsets.clear()
    if txn._transaction_waiter is not None and not txn._transaction_waiter.done():
        txn._transaction_waiter.set_exception(exc)


def bind_to_group(producer: AIOKafkaProducer, member: Callable[[], GroupMember]) -> None:
    """Make `producer`'s offset commits in transactions carry `member()` (read when the
    request is made), as Java's `sendOffsetsToTransaction(offsets, groupMetadata)` does."""
    sender = producer._sender

    async def _do_txn_offset_commit(self: Any, offsets: Any, group_id: str) -> None:
        if not offsets:
            return
        try:
            node_id = await self._find_coordinator(CoordinationType.GROUP, group_id)
        except Errors.GroupAuthorizationFailedError as exc:
            self._txn_manager.error_transaction(exc)
            return
        await _GroupTxnOffsetCommit(self, offsets, group_id, member()).do(node_id)

    sender._do_txn_offset_commit = types.MethodType(_do_txn_offset_commit, sender)


# ---- OffsetFetch v7, require_stable ------------------------------------------------------


class _OffsetFetchResponseV7(Response):  # type: ignore[misc]
    API_KEY = 9
    API_VERSION = 7
    SCHEMA = Schema(
        ("throttle_time_ms", Int32),
        (
            "topics",
            _by_topic(
                ("partition", Int32),
                ("offset", Int64),
                ("leader_epoch", Int32),
                ("metadata", TEXT),
                ("error_code", Int16),
            ),
        ),
        ("error_code", Int16),
        ("tags", TaggedFields),
    )


class _OffsetFetchRequestV7(RequestStruct):  # type: ignore[misc]
    FLEXIBLE_VERSION = True
    API_KEY = 9
    API_VERSION = 7
    RESPONSE_TYPE = _OffsetFetchResponseV7
    SCHEMA = Schema(
        ("group_id", TEXT),
        (
            "topics",
            CompactArray(("name", TEXT), ("partitions", CompactArray(Int32)), ("tags", TaggedFields)),
        ),
        ("require_stable", Boolean),
        ("tags", TaggedFields),
    )


class _StableOffsetFetch(Request[_OffsetFetchRequestV7]):  # type: ignore[misc]
    API_KEY = 9

    def __init__(self, group_id: str, tps: list[TopicPartition]) -> None:
        self.group_id, self.tps = group_id, tps

    def build(self, request_struct_class: type[_OffsetFetchRequestV7]) -> _OffsetFetchRequestV7:
        topics: dict[str, list[int]] = collections.defaultdict(list)
        for tp in self.tps:
            topics[tp.topic].append(tp.partition)
        return request_struct_class(self.group_id, [(t, ps, {}) for t, ps in topics.items()], True, {})


async def stable_committed(
    consumer: AIOKafkaConsumer, tps: list[TopicPartition], timeout_s: float
) -> dict[TopicPartition, int | None]:
    """The committed offsets of `tps` once no open transaction holds offsets for them:
    the previous owner's last transaction has committed or aborted (or timed out)."""
    coordinator = consumer._coordinator
    deadline = time.monotonic() + timeout_s
    pause, since, waited = 0.005, time.monotonic(), False
    while True:
        response = await coordinator._send_req(_StableOffsetFetch(coordinator.group_id, tps))
        if response.error_code:
            raise Errors.for_code(response.error_code)()
        offsets: dict[TopicPartition, int | None] = {}
        unstable = False
        for topic, partitions, _ in response.topics:
            for partition, offset, _epoch, _meta, code, _ in partitions:
                if code == UNSTABLE_OFFSET_COMMIT:
                    unstable = True
                elif code:
                    raise Errors.for_code(code)()
                offsets[TopicPartition(topic, partition)] = offset if offset >= 0 else None
        if not unstable:
            if waited:
                log.info(
                    "the previous owner's transaction ended",
                    extra={"partitions": sorted(tp.partition for tp in tps), "waited_ms": _ms(since)},
                )
            return offsets
        if time.monotonic() > deadline:
            raise Errors.KafkaTimeoutError(f"offsets of {tps} still unstable after {timeout_s} s")
        if not waited:
            waited = True
            log.info(
                "waiting for the previous owner's open transaction",
                extra={"partitions": sorted(tp.partition for tp in tps)},
            )
        await asyncio.sleep(pause)
        pause = min(pause * 2, 0.2)


def _ms(since: float) -> int:
    return round((time.monotonic() - since) * 1000)
