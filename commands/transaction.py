"""The transaction writer: the batch decisions of an owner's partitions, written in one
Kafka transaction.

Events, the touched aggregates' snapshots, dead letters, audit records and each
partition's commands offset commit together or not at all; each partition's store takes
the new snapshots only after the commit. The answers it returns are safe to give: their
events are durable.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from aiokafka import AIOKafkaProducer, ConsumerRecord, TopicPartition

from commands.batch import Answer, Decision
from commands.context import BoundedContext
from commands.sizes import KAFKA_DEFAULT_MAX_MESSAGE_BYTES, record_size
from commands.snapshots import dump
from commands.state_store import Key, PartitionState
from shared_kernel.audit import STATUS_OF_CODE, audit_record
from shared_kernel.envelope import CommandResult
from shared_kernel.position import Position, PositionToken
from shared_kernel.topics import Topics


@dataclass
class Part:
    """One partition's decision in a transaction: `offsets` is the commands partition whose
    committed offset the transaction sets to `next_offset` (None: no offset is written)."""

    decision: Decision[Any]
    state: PartitionState
    offsets: TopicPartition | None
    next_offset: int
    answers: list[Answer] = field(default_factory=list)
    snapshots: dict[Key, bytes] = field(default_factory=dict)
    actual: list[Position] = field(default_factory=list)


async def write_many(
    producer: AIOKafkaProducer,
    parts: list[Part],
    *,
    group_id: str,
    topics: Topics,
    dlq_topic: str,
    contexts: Mapping[str, BoundedContext],
    audit_topic: str = "",
    max_record_bytes: int = KAFKA_DEFAULT_MAX_MESSAGE_BYTES,
) -> list[list[Answer]]:
    """Commit the decisions of several partitions in one transaction, with each part's
    commands offset (the group coordinator checks the owner's generation there, see
    `shared_kernel.group_txn`).

    Returns each part's answers (the ready ones, then the accepted, then the repeats);
    raises, with the transaction aborted, if any write fails (`OffsetsMoved` names the
    part whose events went elsewhere than predicted).
    """
    for part in parts:
        part.answers = list(part.decision.answers)
        part.snapshots = {}
    async with producer.transaction():
        # The offsets are known up front: their coordinator round trips (AddOffsetsToTxn,
        # TxnOffsetCommit) overlap with the produce requests.
        offsets = {p.offsets: p.next_offset for p in parts if p.offsets is not None}
        committing = None
        if offsets:
            committing = asyncio.ensure_future(producer.send_offsets_to_transaction(offsets, group_id))
            committing.add_done_callback(_retrieve)  # if the body fails first, the abort says why
        try:
            sends: list[list[asyncio.Future[Any]]] = []
            for part in parts:
                mine = []
                for acc in part.decision.accepted:
                    topic = topics.events(acc.key[0])
                    for ev in acc.events:
                        mine.append(await producer.send(topic, ev.value, key=ev.key, headers=ev.headers))
                sends.append(mine)
            # This owner is the single writer of its events partitions: after a transaction of
            # its own commits, the next event of a partition goes at the last one's offset + 2
            # (the commit marker takes one). With every offset known before the broker assigns
            # it, the snapshots (which keep each recent command's position) go out beside the
            # events, in the same round trip, and the broker's offsets are checked before the
            # commit.
            predicted = [_predicted(part, topics) for part in parts]
            for part, expected in zip(parts, predicted, strict=True):
                if expected is not None:
                    await _rest(
                        producer, part, expected, topics, dlq_topic, contexts, audit_topic, max_record_bytes
                    )
            for i, (part, mine, expected) in enumerate(zip(parts, sends, predicted, strict=True)):
                part.actual = [Position(m.topic, m.partition, m.offset) for m in await asyncio.gather(*mine)]
                if expected is None:
                    await _rest(
                        producer,
                        part,
                        part.actual,
                        topics,
                        dlq_topic,
                        contexts,
                        audit_topic,
                        max_record_bytes,
                    )
                elif part.actual != expected:  # someone else wrote there: abort; the worker restores
                    raise OffsetsMoved(f"events went to {part.actual[:3]}..., not {expected[:3]}...", i)
        except Exception as exc:
            # The group refused the offsets (a stale generation) while records were still
            # being sent: that is why the transaction fails, whatever the sends then said.
            refused = _failure(committing)
            if refused is not None and refused is not exc:
                raise refused from exc
            raise
        if committing is not None:
            await committing
    for part in parts:
        for position in part.actual:
            part.state.next_event_offsets[position.topic] = replace(position, offset=position.offset + 2)
        for key, data in part.snapshots.items():
            part.state.commit(key, data, part.decision.touched[key])
    return [part.answers for part in parts]


def _predicted(part: Part, topics: Topics) -> list[Position] | None:
    """Where the part's events will go, if this owner knows each of its partitions' ends."""
    known = part.state.next_event_offsets
    accepted = part.decision.accepted
    if not all(topics.events(acc.key[0]) in known for acc in accepted if acc.events):
        return None
    expected, following = [], dict(known)
    for topic in (topics.events(acc.key[0]) for acc in accepted for _ in acc.events):
        expected.append(following[topic])
        following[topic] = replace(following[topic], offset=following[topic].offset + 1)
    return expected


async def _rest(
    producer: AIOKafkaProducer,
    part: Part,
    positions: list[Position],
    topics: Topics,
    dlq_topic: str,
    contexts: Mapping[str, BoundedContext],
    audit_topic: str,
    max_record_bytes: int,
) -> None:
    """Answers from the events' positions, then the snapshots, dead letters and audit records."""
    decision, answers = part.decision, part.answers
    at = iter(positions)
    for acc in decision.accepted:
        # events first: zip must not pull a position that belongs to the next command
        mine = [p for _, p in zip(acc.events, at, strict=False)]
        result = CommandResult(
            command_id=acc.command.command_id,
            status="accepted",
            aggregate_id=acc.command.aggregate_id,
            version=acc.events[-1].metadata.aggregate_version if acc.events else None,
            position=PositionToken.after(mine).encode(),
            events=len(acc.events),
            fingerprint=acc.command.fingerprint,
            tenant=acc.command.tenant,
        )
        decision.touched[acc.key].remember(result)
        answers.append((acc.reply_to, result))
    for repeat in decision.repeats:
        answers.append((repeat.reply_to, decision.touched[repeat.key].recent[repeat.command_id]))
    for key, loaded in decision.touched.items():
        data = dump(contexts[key[0]], loaded)
        part.snapshots[key] = data
        await producer.send(topics.state(key[0]), data, key=key[1].encode())
    for dead in decision.dead_letters:
        value, headers = dead_letter(dead.record, dead.error, max_record_bytes)
        await producer.send(dlq_topic, value, key=dead.record.key, headers=headers)
    if audit_topic:
        for tenant, record in audited(decision, answers):
            await producer.send(audit_topic, record, key=tenant)


def audited(decision: Decision[Any], answers: list[Answer]) -> list[tuple[bytes, bytes]]:
    """The audit records of the outcomes of commands read from the commands topic (their
    callers were answered 202 by the API, which audited them as queued): committed with
    the outcome, or not at all."""
    records = []
    for _, result in answers:
        command = decision.queued.get(result.command_id)
        if command is None:
            continue
        records.append(
            audit_record(
                tenant=command.tenant,
                actor=command.actor,
                outcome=result.status,
                status=200 if result.accepted else STATUS_OF_CODE.get(result.code, 409),
                reason="" if result.accepted else f"{result.code}: {result.reason}",
                method="ASYNC",
                route=command.command_type,
                aggregate_id=command.aggregate_id,
                command_id=command.command_id,
                correlation_id=command.correlation_id,
            )
        )
    return records


class OffsetsMoved(RuntimeError):
    """The broker put the events at other offsets than this single writer expected
    (`part`: the index of the part whose events moved)."""

    def __init__(self, message: str, part: int = 0) -> None:
        super().__init__(message)
        self.part = part


def dead_letter(
    record: ConsumerRecord[bytes, bytes], error: str, max_record_bytes: int
) -> tuple[bytes | None, list[tuple[str, bytes]]]:
    """The dead letter of a record: its value and headers, why and where from.

    The record fitted the commands topic, but with the two headers more it may not fit
    the dead letter topic: then the error is cut shorter, and if that is not enough the
    value is left out (its size and source are kept), so the transaction never fails on it.
    """
    source = ("dlq-source", f"{record.topic}:{record.partition}:{record.offset}".encode())
    reason = error.encode()[:4000]
    headers = [*record.headers, ("dlq-error", reason), source]
    over = record_size(record.key, record.value, headers) - max_record_bytes
    if over <= 0:
        return record.value, headers
    headers = [*record.headers, ("dlq-error", reason[: max(0, len(reason) - over)]), source]
    if record_size(record.key, record.value, headers) <= max_record_bytes:
        return record.value, headers
    dropped = ("dlq-value-dropped", str(len(record.value or b"")).encode())
    return None, [*record.headers, ("dlq-error", reason[:200]), source, dropped]


def _failure(future: asyncio.Future[Any] | None) -> BaseException | None:
    if future is None or not future.done() or future.cancelled():
        return None
    return future.exception()


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()
