"""Parking on the write side: a command whose handler fails parks its aggregate.

The command processor is a consumer like the others (`projections.parking`): when it
dead-letters a command it can read (the handler raised: a bug), the aggregate's id is
parked behind that dead letter, and its later commands are not decided while other
aggregates flow. A command of the commands topic (the asynchronous path) is held in
PostgreSQL in order, with its status pending; a direct one (the HTTP path) is answered
`aggregate_parked`, 503 with Retry-After, and nothing of it is kept. An operator then
retries the dead letter (after a fix is deployed: it and the held commands are decided
in order, with their outcomes cached and audited as any) or skips it (the held ones are
decided). Records that are no commands are dead-lettered and park nothing.

Order of the writes, so that a crash loses no command and parks nothing it should not:
the parking dead letters are committed first (their own transaction: the parked key
names its dead letter's position), then the parking rows and the held records in one
PostgreSQL transaction, then the batch's transaction with the consumed offset. A crash
between them decides the batch again: the dead letter may be written twice (the key
stays parked behind the first), the rows are written once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

import asyncpg
from aiokafka import AIOKafkaProducer, ConsumerRecord

from commands.batch import DIRECT, DeadLetter, Decision, rejected
from commands.transaction import dead_letter
from projections import parking
from projections.events import Record
from shared_kernel.envelope import CommandEnvelope
from shared_kernel.topics import COMMAND_PROCESSOR

log = logging.getLogger(__name__)

# PostgreSQL is away (or its tables are not made yet: the API migrates them)
UNAVAILABLE = (OSError, asyncpg.PostgresError, asyncpg.InterfaceError)

CONSUMER = COMMAND_PROCESSOR
VERSION = parking.UNVERSIONED


def to_record(item: Any, *, dlq: tuple[int, int] | None = None) -> Record:
    """A consumed record or a direct command as parking keeps it. A direct one has no
    place in a topic: it is kept as `http`, at its dead letter's partition and at minus
    one minus its offset (unique, and never a record's)."""
    topic, partition, offset = item.topic, item.partition, item.offset
    if topic == DIRECT:
        assert dlq is not None, "only a dead-lettered command is held without a place"
        partition, offset = dlq[0], -1 - dlq[1]
    return Record(
        topic=topic,
        partition=partition,
        offset=offset,
        key=item.key,
        value=item.value,
        headers=list(item.headers or []),
        timestamp_ms=item.timestamp,
    )


def to_consumed(record: Record) -> ConsumerRecord[bytes, bytes]:
    """A held record as the decision reads it (a direct one stays direct)."""
    value = record.value or b""
    return ConsumerRecord(
        topic=record.topic,
        partition=record.partition,
        offset=record.offset,
        timestamp=record.timestamp_ms,
        timestamp_type=0,
        key=record.key,
        value=value,
        checksum=None,
        serialized_key_size=len(record.key or b""),
        serialized_value_size=len(value),
        headers=list(record.headers),
    )


async def write_dead_letters(
    producer: AIOKafkaProducer, dlq_topic: str, dead: Sequence[DeadLetter[Any]], max_record_bytes: int
) -> list[tuple[int, int]]:
    """The dead letters, committed in a transaction of their own: their positions."""
    sends = []
    async with producer.transaction():
        for d in dead:
            value, headers = dead_letter(d.record, d.error, max_record_bytes)
            sends.append(await producer.send(dlq_topic, value, key=d.record.key, headers=headers))
    return [(m.partition, m.offset) for m in await asyncio.gather(*sends)]


async def park(
    pool: Any,
    producer: AIOKafkaProducer,
    decision: Decision[Any],
    *,
    dlq_topic: str,
    source: tuple[str, int],
    max_record_bytes: int,
) -> set[str]:
    """Before the batch's transaction: its parking dead letters written (and taken out of
    the decision), their keys parked and the decision's held records kept. The keys
    parked now.

    Without PostgreSQL the write side still flows: a dead letter then parks nothing (it
    is written as before, said in the log) and a command that would be held is answered
    `aggregate_parked` (its status says so: send it again later)."""
    heads = [d for d in decision.dead_letters if d.parks]
    positions = await write_dead_letters(producer, dlq_topic, heads, max_record_bytes) if heads else []
    decision.dead_letters = [d for d in decision.dead_letters if not d.parks]
    try:
        async with pool.acquire() as conn, conn.transaction():
            if heads:
                await parking.park(
                    conn,
                    CONSUMER,
                    VERSION,
                    [
                        parking.Head(to_record(d.record, dlq=at), d.error, *at, source=source)
                        for d, at in zip(heads, positions, strict=True)
                    ],
                    [],
                )
            if decision.held:
                await parking.park(conn, CONSUMER, VERSION, [], [to_record(r) for r in decision.held])
    except UNAVAILABLE as exc:
        log.error(
            "PostgreSQL unavailable: dead letters park nothing, parked aggregates' commands are refused",
            extra={"error": repr(exc), "dead_letters": len(heads), "refused": len(decision.held)},
        )
        for record in decision.held:
            command = CommandEnvelope.from_bytes(record.value)
            reason = f"{command.aggregate_id} is parked behind a dead letter and cannot hold commands now"
            result = rejected(command, "aggregate_parked", reason, None, {"parked": command.aggregate_id})
            decision.answers.append((command.reply_to, result))
        decision.held = []
        return set()
    return {str(d.parks) for d in heads}
