"""The batch decision: what one fetched batch of commands does, with no I/O.

Commands are decided one by one, in offset order, against the partition's current
state and what the earlier commands of the same batch made of it. The outcome is a
`Decision`: the events to append, the aggregates whose snapshots change, the answers
known now and those known only after the commit, and the records to dead-letter. The
transaction writer (`commands.transaction`) puts it in Kafka.

Two refusals need more than the aggregate itself, and are made here:

- Aggregate ids are unique across contexts. The commands topic is keyed by aggregate id,
  so every command for an id, whatever its context, reaches the same partition and so
  this one decision; it refuses to create an aggregate whose id another context holds
  (`already_exists`, naming that context), whether committed or created earlier in the
  same batch. The stores keyed by id alone (the events archive, the event keys, the
  subscriptions' `aggregate_id` filter) can then never mix two aggregates.
- Every record the transaction will write fits a Kafka record (`max_record_bytes`, the
  topics' `max.message.bytes`): a command whose events, or whose aggregate's snapshot
  (the whole state, which grows with every metadata entry), would not is rejected
  (`too_large`) and its aggregate rolled back to its state before the command, so the
  transaction does not fail on it again and again and the rest of the batch commits.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Set
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Generic, Protocol, TypeVar, cast

import orjson

from commands.context import BoundedContext
from commands.decide import decide
from commands.serialization import EventRecord, to_record
from commands.sizes import KAFKA_DEFAULT_MAX_MESSAGE_BYTES, TooLarge, record_size
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

    def __contains__(self, key: Key) -> bool: ...  # committed, without decoding it


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
    # A command whose handler failed parks its aggregate (commands.parked): its later
    # commands wait behind it until an operator retries or skips it. A record that is no
    # command parks nothing.
    parks: str | None = None  # the aggregate id it parks


@dataclass
class Decision(Generic[R]):
    """What one transaction will write, and the answers to give once it has committed."""

    accepted: list[Accepted] = field(default_factory=list)
    answers: list[Answer] = field(default_factory=list)  # ready now: rejections, duplicates
    repeats: list[Repeat] = field(default_factory=list)
    # The aggregates whose state or recent outcomes the batch changed: snapshots to write.
    touched: dict[Key, LoadedAggregate] = field(default_factory=dict)
    dead_letters: list[DeadLetter[R]] = field(default_factory=list)
    # The commands read from the commands topic (the asynchronous path), by command id:
    # their outcomes are audited in the transaction (a direct one's by the API that took it).
    queued: dict[str, CommandEnvelope] = field(default_factory=dict)
    # Commands of the commands topic for a parked aggregate: held behind its dead letter,
    # in order, not decided (a direct one is answered `aggregate_parked` instead).
    held: list[R] = field(default_factory=list)


# A command handed to its owner directly (not read from the commands topic) comes in a
# record of this topic name (commands.partition.Submitted).
DIRECT = "http"

# What an accepted command's outcome adds to its aggregate's snapshot once the transaction
# remembers it (commands.snapshots: version, event count and a position token, whose
# topic name has at most 249 characters), beyond its command id and fingerprint.
OUTCOME_RESERVE = 640


def decide_batch(
    records: Iterable[R],
    states: States,
    contexts: Mapping[str, BoundedContext],
    codec: AvroCodec,
    *,
    max_record_bytes: int = KAFKA_DEFAULT_MAX_MESSAGE_BYTES,
    parked: Set[str] = frozenset(),
) -> Decision[R]:
    """Decide every record of a batch in offset order.

    The aggregates `states` hands out are changed in place (should the transaction
    fail, the worker restores the partition's state from the state topics). A domain
    refusal is a rejection; a record that is no envelope, or whose handler fails, is a
    dead letter, and the rest of the batch is still decided. No record the decision
    asks for is larger than `max_record_bytes`.

    A command whose handler fails parks its aggregate: the later commands for it (of this
    batch, and of later ones while its id is in `parked`) are not decided. Those read from
    the commands topic are held (`Decision.held`), a direct one is answered
    `aggregate_parked` (503: its caller retries once an operator has retried or skipped
    the dead letter). A command whose outcome is known already is still answered.
    """
    batch: Decision[R] = Decision()
    parked_now = set(parked)
    accepted_ids: set[tuple[str, str]] = set()  # (tenant, command id): a key is its tenant's
    # per aggregate: what outcomes of commands accepted in this batch will add to its snapshot
    outcomes: dict[Key, int] = {}
    creations = {name for ctx in contexts.values() for name, h in ctx.commands.items() if h.creates}

    def snapshot_size(context: BoundedContext, key: Key, loaded: LoadedAggregate, reserve: int) -> int:
        return record_size(key[1].encode(), dump(context, loaded)) + reserve

    def remember(context: BoundedContext, key: Key, loaded: LoadedAggregate, result: CommandResult) -> None:
        """Keep a rejection in the aggregate's recent outcomes, unless that alone would make
        its snapshot too large (then only the result cache answers a retry)."""
        before = OrderedDict(loaded.recent)
        loaded.remember(result)
        if snapshot_size(context, key, loaded, outcomes.get(key, 0)) <= max_record_bytes:
            batch.touched[key] = loaded
        else:
            loaded.recent = before

    def held_elsewhere(context: BoundedContext, aggregate_id: str) -> str | None:
        """The other context whose aggregate has this id: committed, or created in this batch."""
        for name in contexts:
            other = (name, aggregate_id)
            if name != context.name and (other in batch.touched or other in states):
                return name
        return None

    for record in records:
        try:
            # A tombstone (None) fails to parse like any other non-envelope.
            command = CommandEnvelope.from_bytes(cast(bytes, record.value))
        except MalformedRecord as exc:
            batch.dead_letters.append(DeadLetter(record, f"malformed command: {exc}"))
            continue
        if getattr(record, "topic", DIRECT) != DIRECT:
            batch.queued[command.command_id] = command
        context = contexts.get(command.command_type.partition(".")[0])
        key: Key = (context.name if context else "", command.aggregate_id)
        if (command.tenant, command.command_id) in accepted_ids:
            batch.repeats.append(Repeat(command.reply_to, key, command.command_id))
            continue
        loaded = batch.touched.get(key) or (states.get(key) if context else None)
        if context is not None and loaded is not None and loaded.tenant != command.tenant:
            # another tenant's aggregate: as if there were none (nothing of it is told)
            if command.command_type in creations:
                reason = f"{command.aggregate_id} is taken; ids are unique across tenants"
                result = rejected(command, "already_exists", reason)
            else:
                reason = f"no {context.aggregate_type} {command.aggregate_id}"
                result = rejected(command, "not_found", reason)
            batch.answers.append((command.reply_to, result))
            continue
        if loaded is not None and command.command_id in loaded.recent:
            batch.answers.append((command.reply_to, loaded.recent[command.command_id]))
            continue
        if command.aggregate_id in parked_now:
            if getattr(record, "topic", DIRECT) == DIRECT:
                reason = (
                    f"{command.aggregate_id} is parked behind a command that failed; its commands wait "
                    "until an operator retries or skips that dead letter"
                )
                current = loaded.version if loaded else None
                details = {"parked": command.aggregate_id}
                result = rejected(command, "aggregate_parked", reason, current, details)
                batch.answers.append((command.reply_to, result))
            else:
                batch.held.append(record)
            continue
        if context is None:
            batch.answers.append(
                (command.reply_to, rejected(command, "invalid_command", "unknown command type"))
            )
            continue
        if loaded is None and command.command_type in creations:
            holder = held_elsewhere(context, command.aggregate_id)
            if holder is not None:
                reason = (
                    f"{command.aggregate_id} is the id of a {contexts[holder].aggregate_type} already; "
                    "aggregate ids are unique across contexts"
                )
                result = rejected(command, "already_exists", reason, None, {"context": holder})
                batch.answers.append((command.reply_to, result))
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
                remember(context, key, loaded, result)
            batch.answers.append((command.reply_to, result))
            continue
        except Exception as exc:  # a bug or a poison command: dead-letter it, keep going
            log.exception("command handler failed", extra={"command_id": command.command_id})
            if rollback is not None:
                batch.touched[key] = load(context, command.aggregate_id, rollback)
            else:
                states.forget_live(key)  # next use decodes the committed snapshot again
            error = f"{type(exc).__name__}: {exc}"
            batch.dead_letters.append(DeadLetter(record, error, parks=command.aggregate_id))
            parked_now.add(command.aggregate_id)
            batch.answers.append(
                (command.reply_to, rejected(command, "internal_error", "the command failed"))
            )
            continue
        if loaded is None:
            loaded = LoadedAggregate(aggregate, tenant=command.tenant)
        appended = [to_record(context, codec, e, command) for e in events]
        reserve = outcomes.get(key, 0) + outcome_reserve(command)
        try:
            for ev in appended:
                size = record_size(ev.key, ev.value, ev.headers)
                if size > max_record_bytes:
                    raise TooLarge(f"the event {ev.metadata.event_type}", size, max_record_bytes)
            size = snapshot_size(context, key, loaded, reserve)
            if size > max_record_bytes:
                what = f"the state of {context.aggregate_type} {command.aggregate_id} after this command"
                raise TooLarge(what, size, max_record_bytes)
        except TooLarge as too_large:
            # As for a failing handler: back to the state before this command, which fits.
            before: LoadedAggregate | None
            if rollback is not None:
                before = batch.touched[key] = load(context, command.aggregate_id, rollback)
            else:
                states.forget_live(key)
                before = states.get(key)  # the committed snapshot; None for a creation
            result = rejected(
                command,
                "too_large",
                str(too_large),
                before.version if before else None,
                {"max_bytes": too_large.limit, "bytes": too_large.size},
            )
            if before is not None:
                remember(context, key, before, result)
            batch.answers.append((command.reply_to, result))
            continue
        outcomes[key] = reserve
        batch.touched[key] = loaded
        accepted_ids.add((command.tenant, command.command_id))
        batch.accepted.append(Accepted(command.reply_to, command, key, appended))
    return batch


def outcome_reserve(command: CommandEnvelope) -> int:
    """An upper bound of what the command's accepted outcome adds to its snapshot."""
    return OUTCOME_RESERVE + len(orjson.dumps(command.command_id)) + len(orjson.dumps(command.fingerprint))


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
        tenant=command.tenant,
    )
