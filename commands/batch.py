"""The batch decision: what one fetched batch of commands does, with no I/O.

Commands are decided one by one, in offset order, against the partition's current
state and what the earlier commands of the same batch made of it. The outcome is a
`Decision`: the events to append, the aggregates whose snapshots change, the answers
known now and those known only after the commit, and the records to dead-letter. The
transaction writer (`commands.transaction`) puts it in Kafka.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Generic, Protocol, TypeVar, cast

from commands.context import BoundedContext
from commands.decide import decide
from commands.serialization import EventRecord, to_record
from commands.snapshots import LoadedAggregate, dump, load
from commands.state_store import Key
from shared_kernel.avro import AvroCodec
from shared_kernel.clock import fixed_clock, using_clock
from shared_kernel.domain import DomainError
from shared_kernel.envelope import CommandEnvelope, CommandResult, MalformedRecord

log = logging.getLogger(__name__)

Answer = tuple[str, CommandResult]  # (reply channel, result)


class CommandRecord(Protocol):
    """What the decision reads from a consumed record (aiokafka's ConsumerRecord is one)."""

    @property
    def value(self) -> bytes | None: ...

    @property
    def timestamp(self) -> int: ...  # ms since the epoch: the clock of the command's events


R = TypeVar("R", bound=CommandRecord)


class States(Protocol):
    """The partition's aggregates as the decision sees them (`PartitionState` is one)."""

    def get(self, key: Key) -> LoadedAggregate | None: ...

    def forget_live(self, key: Key) -> None: ...


@dataclass
class Accepted:
    """A command that produced events; its result is known once they have offsets."""

    reply_to: str
    command: CommandEnvelope
    key: Key
    events: list[EventRecord]


@dataclass
class Repeat:
    """A copy of a command accepted earlier in the batch (a client retried while the first
    copy was in flight): answered with the first copy's result after commit."""

    reply_to: str
    key: Key
    command_id: str


@dataclass
class DeadLetter(Generic[R]):
    record: R  # the original record, copied to the dead letter topic as it was
    error: str


@dataclass
class Decision(Generic[R]):
    """What one transaction will write, and the answers to give once it has committed."""

    accepted: list[Accepted] = field(default_factory=list)
    answers: list[Answer] = field(default_factory=list)  # ready now: rejections, duplicates
    repeats: list[Repeat] = field(default_factory=list)
    # The aggregates whose state or recent outcomes the batch changed: snapshots to write.
    touched: dict[Key, LoadedAggregate] = field(default_factory=dict)
    dead_letters: list[DeadLetter[R]] = field(default_factory=list)


def decide_batch(
    records: Iterable[R],
    states: States,
    contexts: Mapping[str, BoundedContext],
    codec: AvroCodec,
) -> Decision[R]:
    """Decide every record of a batch in offset order.

    The aggregates `states` hands out are changed in place (should the transaction
    fail, the worker restores the partition's state from the state topics). A domain
    refusal is a rejection; a record that is no envelope, or whose handler fails, is a
    dead letter, and the rest of the batch is still decided.
    """
    batch: Decision[R] = Decision()
    accepted_ids: set[str] = set()
    for record in records:
        try:
            # A tombstone (None) fails to parse like any other non-envelope.
            command = CommandEnvelope.from_bytes(cast(bytes, record.value))
        except MalformedRecord as exc:
            batch.dead_letters.append(DeadLetter(record, f"malformed command: {exc}"))
            continue
        context = contexts.get(command.command_type.partition(".")[0])
        key: Key = (context.name if context else "", command.aggregate_id)
        if command.command_id in accepted_ids:
            batch.repeats.append(Repeat(command.reply_to, key, command.command_id))
            continue
        loaded = batch.touched.get(key) or (states.get(key) if context else None)
        if loaded is not None and command.command_id in loaded.recent:
            batch.answers.append((command.reply_to, loaded.recent[command.command_id]))
            continue
        if context is None:
            batch.answers.append(
                (command.reply_to, rejected(command, "invalid_command", "unknown command type"))
            )
            continue
        # Only an aggregate already changed in this batch differs from its committed
        # snapshot; keep its current state in case the handler fails half-way.
        rollback = dump(context, loaded) if loaded is not None and key in batch.touched else None
        occurred = datetime.fromtimestamp(record.timestamp / 1000, UTC)
        try:
            with using_clock(fixed_clock(occurred)):
                aggregate, events = decide(
                    context,
                    loaded.aggregate if loaded else None,
                    command.command_type,
                    command.payload,
                    command.expected_version,
                )
        except DomainError as err:
            current = loaded.version if loaded else None
            result = rejected(command, err.code, err.message, current, err.details)
            if loaded is not None:
                loaded.remember(result)
                batch.touched[key] = loaded
            batch.answers.append((command.reply_to, result))
            continue
        except Exception as exc:  # a bug or a poison command: dead-letter it, keep going
            log.exception("command handler failed", extra={"command_id": command.command_id})
            if rollback is not None:
                batch.touched[key] = load(context, command.aggregate_id, rollback)
            else:
                states.forget_live(key)  # next use decodes the committed snapshot again
            batch.dead_letters.append(DeadLetter(record, f"{type(exc).__name__}: {exc}"))
            batch.answers.append(
                (command.reply_to, rejected(command, "internal_error", "the command failed"))
            )
            continue
        if loaded is None:
            loaded = LoadedAggregate(aggregate)
        batch.touched[key] = loaded
        accepted_ids.add(command.command_id)
        batch.accepted.append(
            Accepted(command.reply_to, command, key, [to_record(context, codec, e, command) for e in events])
        )
    return batch


def rejected(
    command: CommandEnvelope,
    code: str,
    reason: str,
    current_version: int | None = None,
    details: dict[str, Any] | None = None,
) -> CommandResult:
    safe = {
        k: v
        for k, v in (details or {}).items()
        if isinstance(v, str | int | float | bool | list | type(None))
    }
    return CommandResult(
        command_id=command.command_id,
        status="rejected",
        aggregate_id=command.aggregate_id,
        code=code,
        reason=reason,
        current_version=current_version,
        fingerprint=command.fingerprint,
        details=safe,
    )
