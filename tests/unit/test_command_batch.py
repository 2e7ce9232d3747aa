"""The command processor's batch decision, given/when/then, with no services.

Given the aggregates a partition has committed to its state topics, when a batch of
command records arrives, then: the events appended, the snapshots written, the answers
given and the records dead-lettered. Records are aiokafka's own ConsumerRecord holding
real command envelopes of the real contexts.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any, TypeAlias
from uuid import UUID, uuid4

import orjson
import pytest
from aiokafka import ConsumerRecord, TopicPartition
from aiokafka.errors import KafkaError
from aiokafka.structs import RecordMetadata

from commands import CONTEXTS, parked, transaction
from commands.batch import DIRECT, Decision, Repeat, decide_batch
from commands.context import BoundedContext, acts_on, command_payload
from commands.datasets import CONTEXT as DATASETS
from commands.datasets import commands as ds
from commands.datasets.aggregate import Dataset
from commands.incidents import CONTEXT as INCIDENTS
from commands.incidents import commands as inc
from commands.snapshots import LoadedAggregate, dump, load
from commands.state_store import PartitionState
from commands.transaction import OffsetsMoved
from shared_kernel.avro import AvroCodec
from shared_kernel.envelope import CommandEnvelope, CommandResult
from shared_kernel.position import PositionToken
from shared_kernel.topics import Topics
from tests.unit.scenario import T0, Scenario

CODEC = AvroCodec.from_directory()
COMMANDS_TOPIC = "t.commands"
Record: TypeAlias = ConsumerRecord[bytes, bytes]


def envelope(
    context: BoundedContext,
    command: Any,
    command_id: str,
    *,
    expected_version: int | None = None,
    reply_to: str = "replies:api-1",
    tenant: str = "",
) -> CommandEnvelope:
    """A command as the API puts it on the commands topic (see api/dispatch.py, commands/bus.py)."""
    command_type = context.command_type(command)
    return CommandEnvelope(
        command_id=command_id,
        command_type=command_type,
        aggregate_id=str(context.handler(command_type).aggregate_id(command)),
        payload=command_payload(command),
        expected_version=expected_version,
        actor="alice",
        tenant=tenant,
        reply_to=reply_to,
        fingerprint=f"fp-{command_id}",
    )


class Partition:
    """One partition of the commands topic: its committed aggregates and its next offset."""

    def __init__(self, contexts: Sequence[BoundedContext] = CONTEXTS) -> None:
        self.contexts = {c.name: c for c in contexts}
        self.state = PartitionState(self.contexts)
        self.offset = 0

    def given(
        self, context: BoundedContext, *commands: Any, recent: Sequence[CommandResult] = (), tenant: str = ""
    ) -> Partition:
        """The state topic holds the aggregate the commands made (in `tenant`), with these
        recent outcomes."""
        aggregate = Scenario(context).given(*commands).aggregate
        assert aggregate is not None
        loaded = LoadedAggregate(aggregate, tenant=tenant)
        for result in recent:
            loaded.remember(result)
        self.state.committed[(context.name, str(aggregate.id))] = dump(context, loaded)
        return self

    def records(self, *values: CommandEnvelope | bytes, at: datetime = T0) -> list[Record]:
        batch = []
        for value in values:
            body = value.to_bytes() if isinstance(value, CommandEnvelope) else value
            batch.append(
                ConsumerRecord(
                    topic=COMMANDS_TOPIC,
                    partition=0,
                    offset=self.offset,
                    timestamp=int(at.timestamp() * 1000),
                    timestamp_type=0,
                    key=None,
                    value=body,
                    checksum=None,
                    serialized_key_size=0,
                    serialized_value_size=len(body),
                    headers=[("traceparent", b"00-abc-01")],
                )
            )
            self.offset += 1
        return batch

    def when(self, *values: CommandEnvelope | bytes, at: datetime = T0) -> Decision[Record]:
        return decide_batch(self.records(*values, at=at), self.state, self.contexts, CODEC)


def events(decision: Decision[Any]) -> list[tuple[str, str, int]]:
    """(command id, event type, aggregate version) of every event to append, in order."""
    return [
        (acc.command.command_id, ev.metadata.event_type, ev.metadata.aggregate_version)
        for acc in decision.accepted
        for ev in acc.events
    ]


def snapshot(decision: Decision[Any], context: BoundedContext, aggregate_id: UUID) -> LoadedAggregate:
    """The snapshot the transaction will write for an aggregate, read back as the next owner would."""
    loaded = decision.touched[(context.name, str(aggregate_id))]
    return load(context, str(aggregate_id), dump(context, loaded))


def dataset(loaded: LoadedAggregate) -> Dataset:
    assert isinstance(loaded.aggregate, Dataset)
    return loaded.aggregate


def internal_error(command_id: str, aggregate_id: UUID) -> CommandResult:
    return CommandResult(
        command_id=command_id,
        status="rejected",
        aggregate_id=str(aggregate_id),
        code="internal_error",
        reason="the command failed",
        fingerprint=f"fp-{command_id}",
    )


@dataclass
class Sent:
    """One record produced inside a transaction."""

    topic: str
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]]


class FakeProducer:
    """The transactional producer as the writer uses it: keeps what each committed
    transaction held; a transaction whose body raises is aborted and leaves nothing.
    Records get offsets from 100 on, per topic, on partition 0, and a committed
    transaction's marker takes one more in each topic it wrote, as Kafka's do."""

    def __init__(self, fail_on_topic: str = "") -> None:
        self.fail_on_topic = fail_on_topic
        self.transactions: list[tuple[list[Sent], dict[TopicPartition, int], str]] = []
        self._open: list[Sent] = []
        self._offsets: tuple[dict[TopicPartition, int], str] = ({}, "")
        self._next: dict[str, int] = {}

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[None]:
        self._open, self._offsets = [], ({}, "")
        yield
        self.transactions.append((self._open, *self._offsets))
        for topic in {sent.topic for sent in self._open}:
            self._next[topic] += 1  # the commit marker

    async def send(
        self, topic: str, value: bytes | None, key: bytes | None = None, headers: Any = None
    ) -> asyncio.Future[RecordMetadata]:
        if topic == self.fail_on_topic:
            raise KafkaError(f"{topic} is unavailable")
        offset = self._next.get(topic, 100)
        self._next[topic] = offset + 1
        self._open.append(Sent(topic, key, value, list(headers or [])))
        sent: asyncio.Future[RecordMetadata] = asyncio.get_running_loop().create_future()
        sent.set_result(RecordMetadata(topic, 0, TopicPartition(topic, 0), offset, -1, 0, 0))
        return sent

    async def send_offsets_to_transaction(self, offsets: dict[TopicPartition, int], group_id: str) -> None:
        self._offsets = (dict(offsets), group_id)


async def commit(
    partition: Partition, decision: Decision[Record], producer: FakeProducer, audit_topic: str = ""
) -> list[tuple[str, CommandResult]]:
    """Write the decision as the partition worker does; returns the answers to publish."""
    [answers] = await transaction.write_many(
        producer,
        [transaction.Part(decision, partition.state, TopicPartition(COMMANDS_TOPIC, 0), partition.offset)],
        group_id="t.command-processor",
        topics=Topics("t"),
        dlq_topic="t.dlq.command-processor",
        contexts=partition.contexts,
        audit_topic=audit_topic,
    )
    return answers


# ---- repeats within one batch -------------------------------------------------------


async def test_a_command_repeated_in_one_batch_is_decided_once_and_the_copy_gets_its_result() -> None:
    ID = uuid4()
    partition = Partition()
    open_it = inc.OpenIncident(ID, "Disk full", priority="high")
    decision = partition.when(
        envelope(INCIDENTS, open_it, "c1", reply_to="replies:api-1"),
        envelope(INCIDENTS, open_it, "c1", reply_to="replies:api-2"),  # a retry via another instance
    )

    assert events(decision) == [("c1", "incidents.IncidentOpened", 1)]
    assert decision.answers == []  # nothing to say before the commit
    assert decision.repeats == [Repeat("replies:api-2", ("incidents", str(ID)), "c1")]
    assert snapshot(decision, INCIDENTS, ID).version == 1
    assert decision.dead_letters == []

    [(first_to, first), (copy_to, copy)] = await commit(partition, decision, FakeProducer())
    assert (first_to, copy_to) == ("replies:api-1", "replies:api-2")
    assert (first.status, first.version, first.events) == ("accepted", 1, 1)
    assert copy == first  # same version and position: the copy was not decided again


# ---- a handler that fails half-way ---------------------------------------------------


@dataclass(frozen=True)
class RenameThenCrash:
    dataset_id: UUID
    name: str


def _rename_then_crash(dataset: Dataset, command: RenameThenCrash) -> None:
    dataset.describe(command.name, None)  # the aggregate has changed (and has a pending event) ...
    raise RuntimeError("lost the plot")  # ... when the bug strikes


# The datasets context with one buggy handler more: it changes the aggregate, then raises.
BUGGY_DATASETS = BoundedContext(
    name=DATASETS.name,
    aggregate=Dataset,
    handlers=(*DATASETS.handlers, acts_on(RenameThenCrash, _rename_then_crash)),
    event_names=DATASETS.event_names,
)


def _two_datasets(first: UUID, second: UUID) -> Partition:
    """A partition of the buggy datasets context holding two datasets, Weather and Tides."""
    return (
        Partition([BUGGY_DATASETS, INCIDENTS])
        .given(DATASETS, ds.RegisterDataset(first, "Weather"))
        .given(DATASETS, ds.RegisterDataset(second, "Tides"))
    )


def test_a_handler_failing_half_way_rolls_the_aggregate_back_and_parks_its_later_commands() -> None:
    ID, OTHER = uuid4(), uuid4()
    partition = _two_datasets(ID, OTHER)

    records = partition.records(
        envelope(DATASETS, ds.DescribeDataset(ID, name="Climate"), "c1", expected_version=1),
        envelope(BUGGY_DATASETS, RenameThenCrash(ID, "Broken"), "c2"),
        envelope(DATASETS, ds.PublishVersion(ID, "1.0.0"), "c3", expected_version=2),
        envelope(DATASETS, ds.PublishVersion(OTHER, "1.0.0"), "c4", expected_version=1),
    )
    decision = decide_batch(records, partition.state, partition.contexts, CODEC)

    # c2's half-done rename is gone from the snapshot; c3 waits behind c2; the other flows.
    assert events(decision) == [
        ("c1", "datasets.DatasetDescribed", 2),
        ("c4", "datasets.VersionPublished", 2),
    ]
    written = snapshot(decision, DATASETS, ID)
    assert (dataset(written).name, dataset(written).latest_version, written.version) == ("Climate", None, 2)
    assert [(d.record.offset, d.error, d.parks) for d in decision.dead_letters] == [
        (1, "RuntimeError: lost the plot", str(ID))
    ]
    assert decision.held == [records[2]]
    assert decision.answers == [("replies:api-1", internal_error("c2", ID))]


def test_a_handler_failing_on_an_aggregate_untouched_in_the_batch_leaves_the_committed_state() -> None:
    ID = uuid4()
    partition = Partition([BUGGY_DATASETS, INCIDENTS]).given(DATASETS, ds.RegisterDataset(ID, "Weather"))

    decision = partition.when(envelope(BUGGY_DATASETS, RenameThenCrash(ID, "Broken"), "c1"))

    assert decision.touched == {}  # nothing to snapshot: the committed one stays right
    assert [d.error for d in decision.dead_letters] == ["RuntimeError: lost the plot"]
    assert decision.answers == [("replies:api-1", internal_error("c1", ID))]


def test_a_parked_aggregates_commands_are_held_or_refused_and_released_against_the_committed_state() -> None:
    ID, OTHER = uuid4(), uuid4()
    partition = _two_datasets(ID, OTHER)
    partition.when(envelope(BUGGY_DATASETS, RenameThenCrash(ID, "Broken"), "c1"))
    parked = {str(ID)}

    # a later batch: the queued command is held, a direct one refused, the other aggregate flows
    queued = partition.records(envelope(DATASETS, ds.PublishVersion(ID, "1.0.0"), "c2", expected_version=1))
    direct = replace(
        queued[0], topic=DIRECT, value=envelope(DATASETS, ds.PublishVersion(ID, "2.0.0"), "c3").to_bytes()
    )
    other = partition.records(envelope(DATASETS, ds.PublishVersion(OTHER, "1.0.0"), "c4"))
    later = decide_batch([*queued, direct, *other], partition.state, partition.contexts, CODEC, parked=parked)
    assert events(later) == [("c4", "datasets.VersionPublished", 2)]
    assert later.held == queued
    [(_, refused)] = later.answers
    assert (refused.command_id, refused.code, refused.current_version) == ("c3", "aggregate_parked", 1)
    assert refused.details == {"parked": str(ID)}
    assert (DATASETS.name, str(ID)) not in later.touched  # nothing of ID changes

    # released (the dead letter skipped): the held command is decided on the committed state
    released = decide_batch(queued, partition.state, partition.contexts, CODEC, parked=parked - {str(ID)})
    assert events(released) == [("c2", "datasets.VersionPublished", 2)]
    assert dataset(snapshot(released, DATASETS, ID)).name == "Weather"


def test_a_command_whose_outcome_is_known_is_answered_while_its_aggregate_is_parked() -> None:
    ID = uuid4()
    done = CommandResult("c1", "accepted", str(ID), version=1, position="p", events=1, fingerprint="fp-c1")
    partition = Partition().given(DATASETS, ds.RegisterDataset(ID, "Weather"), recent=[done])

    decision = decide_batch(
        partition.records(envelope(DATASETS, ds.RegisterDataset(ID, "Weather"), "c1")),
        partition.state,
        partition.contexts,
        CODEC,
        parked={str(ID)},
    )

    assert decision.answers == [("replies:api-1", done)]
    assert decision.held == []


# ---- records that are not commands ---------------------------------------------------


def test_poison_records_are_dead_lettered_and_the_rest_of_the_batch_is_decided() -> None:
    ID = uuid4()
    partition = Partition()
    records = partition.records(
        b"\x00\x01 not json",
        envelope(DATASETS, ds.RegisterDataset(ID, "Weather"), "c1"),
        b'{"command_id": "c2"}',  # JSON, but no command envelope
    )

    decision = decide_batch(records, partition.state, partition.contexts, CODEC)

    assert events(decision) == [("c1", "datasets.DatasetRegistered", 1)]
    # The original records themselves (value, headers, offset) go to the dead letter topic.
    assert [d.record for d in decision.dead_letters] == [records[0], records[2]]
    assert all(d.error.startswith("malformed command: not a command envelope") for d in decision.dead_letters)
    assert "missing 3 required positional arguments" in decision.dead_letters[1].error
    assert decision.answers == []  # no envelope, no one to answer


# ---- domain refusals and duplicates --------------------------------------------------


def test_a_stale_expected_version_is_rejected_with_the_current_version_and_remembered() -> None:
    ID = uuid4()
    partition = Partition().given(DATASETS, ds.RegisterDataset(ID, "Weather"), ds.PublishVersion(ID, "1.0.0"))

    decision = partition.when(
        envelope(DATASETS, ds.DescribeDataset(ID, name="Climate"), "c1", expected_version=1)
    )

    assert events(decision) == []
    [(reply_to, result)] = decision.answers
    assert (reply_to, result.status, result.code, result.current_version) == (
        "replies:api-1",
        "rejected",
        "version_conflict",
        2,
    )
    assert result.reason == "expected version 1, current version is 2"
    assert result.details == {"current_version": 2}
    # The snapshot remembers the rejection, so a retry of c1 gets the same answer.
    written = snapshot(decision, DATASETS, ID)
    assert (written.version, dataset(written).name) == (2, "Weather")
    assert written.recent["c1"].code == "version_conflict"


def test_a_command_id_in_the_aggregates_recent_outcomes_is_answered_from_there() -> None:
    ID = uuid4()
    earlier = CommandResult(
        "c1", "accepted", str(ID), version=2, position="token", events=1, fingerprint="fp-c1"
    )
    partition = Partition().given(
        DATASETS, ds.RegisterDataset(ID, "Weather"), ds.DescribeDataset(ID, name="Climate"), recent=[earlier]
    )

    decision = partition.when(
        envelope(DATASETS, ds.DescribeDataset(ID, name="Climate"), "c1", reply_to="replies:api-9")
    )

    assert events(decision) == []  # not decided a second time
    assert decision.answers == [("replies:api-9", earlier)]
    assert decision.touched == {}  # and nothing to rewrite


def test_another_tenants_aggregate_is_not_found_and_tells_nothing_of_itself() -> None:
    ID = uuid4()
    earlier = CommandResult(
        "c1", "accepted", str(ID), version=1, position="token", events=1, fingerprint="fp-c1"
    )
    partition = Partition().given(
        DATASETS, ds.RegisterDataset(ID, "Weather"), recent=[earlier], tenant="acme"
    )

    decision = partition.when(
        envelope(DATASETS, ds.DescribeDataset(ID, name="Mine"), "x1", tenant="globex"),
        envelope(DATASETS, ds.DescribeDataset(ID, name="Mine"), "c1", tenant="globex"),  # acme's command id
        envelope(DATASETS, ds.RegisterDataset(ID, "Mine too"), "x2", tenant="globex"),
        envelope(DATASETS, ds.DescribeDataset(ID, name="Ours"), "a1", tenant="acme"),
    )

    answers = {result.command_id: result for _, result in decision.answers}
    assert (answers["x1"].code, answers["x1"].current_version, answers["x1"].tenant) == (
        "not_found",
        None,
        "globex",
    )
    assert answers["c1"].code == "not_found"  # not acme's cached outcome of c1
    assert (answers["x2"].code, answers["x2"].current_version) == ("already_exists", None)
    assert events(decision) == [("a1", "datasets.DatasetDescribed", 2)]
    written = snapshot(decision, DATASETS, ID)
    assert (written.tenant, dataset(written).name) == ("acme", "Ours")  # a snapshot keeps its tenant
    assert "x1" not in written.recent  # nothing of globex's attempts is kept with acme's aggregate


def test_one_command_id_in_two_tenants_is_two_commands_and_a_new_aggregate_takes_its_tenant() -> None:
    A, B = uuid4(), uuid4()
    decision = Partition().when(
        envelope(DATASETS, ds.RegisterDataset(A, "Ours"), "same-key", tenant="acme"),
        envelope(DATASETS, ds.RegisterDataset(B, "Theirs"), "same-key", tenant="globex"),
    )
    assert events(decision) == [
        ("same-key", "datasets.DatasetRegistered", 1),
        ("same-key", "datasets.DatasetRegistered", 1),
    ]
    assert [acc.command.tenant for acc in decision.accepted] == ["acme", "globex"]
    assert (snapshot(decision, DATASETS, A).tenant, snapshot(decision, DATASETS, B).tenant) == (
        "acme",
        "globex",
    )


def test_an_unknown_command_type_is_an_invalid_command() -> None:
    ID = uuid4()
    partition = Partition().given(DATASETS, ds.RegisterDataset(ID, "Weather"))
    no_context = CommandEnvelope("c1", "billing.ChargeCard", str(ID), {}, reply_to="r")
    no_handler = CommandEnvelope("c2", "datasets.DeleteEverything", str(ID), {}, reply_to="r")

    decision = partition.when(no_context, no_handler)

    assert events(decision) == []
    assert decision.dead_letters == []
    [(_, unknown_context), (_, unknown_handler)] = decision.answers
    assert (unknown_context.code, unknown_context.reason, unknown_context.current_version) == (
        "invalid_command",
        "unknown command type",
        None,
    )
    assert (unknown_handler.code, unknown_handler.current_version, unknown_handler.details) == (
        "invalid_command",
        1,
        {"field": "command_type"},
    )
    assert unknown_handler.reason == "unknown command type 'datasets.DeleteEverything'"


# ---- time ----------------------------------------------------------------------------


@pytest.mark.parametrize("at", [T0, T0 + timedelta(days=400, milliseconds=250)])
def test_events_take_their_time_from_the_command_record_not_the_wall_clock(at: datetime) -> None:
    ID = uuid4()
    decision = Partition().when(envelope(INCIDENTS, inc.OpenIncident(ID, "Disk full"), "c1"), at=at)

    [acc] = decision.accepted
    assert [ev.metadata.occurred_at for ev in acc.events] == [at]
    assert snapshot(decision, INCIDENTS, ID).aggregate.created_on == at


# ---- the transaction writer ----------------------------------------------------------


async def test_one_transaction_holds_events_snapshots_dead_letters_and_the_offset() -> None:
    ID, MISSING = uuid4(), uuid4()
    partition = Partition()
    register = ds.RegisterDataset(ID, "Weather")
    records = partition.records(
        envelope(DATASETS, ds.ArchiveDataset(MISSING), "c0"),
        envelope(DATASETS, register, "c1", reply_to="replies:api-1"),
        b"poison",
        envelope(DATASETS, register, "c1", reply_to="replies:api-2"),
    )
    decision = decide_batch(records, partition.state, partition.contexts, CODEC)
    producer = FakeProducer()

    answers = await commit(partition, decision, producer)

    # Ready answers first, then the accepted command, then its repeat with the same result.
    [(to0, missing), (to1, accepted), (to2, repeated)] = answers
    assert (to0, missing.code) == ("replies:api-1", "not_found")
    assert (to1, to2) == ("replies:api-1", "replies:api-2")
    assert repeated == accepted
    assert (accepted.status, accepted.version, accepted.events) == ("accepted", 1, 1)
    assert PositionToken.decode(accepted.position).offsets == {"t.events.datasets": {0: 101}}

    [(sent, offsets, group)] = producer.transactions
    assert (offsets, group) == ({TopicPartition(COMMANDS_TOPIC, 0): 4}, "t.command-processor")
    assert [s.topic for s in sent] == ["t.events.datasets", "t.state.datasets", "t.dlq.command-processor"]
    event, state, dead = sent
    assert (event.key, dict(event.headers)["event-type"]) == (str(ID).encode(), b"datasets.DatasetRegistered")
    # The snapshot remembers the accepted result: a retry in a later batch gets it too.
    assert state.key == str(ID).encode()
    assert state.value is not None
    assert load(DATASETS, str(ID), state.value).recent["c1"] == accepted
    assert partition.state.committed[("datasets", str(ID))] == state.value
    assert dead.value == b"poison"
    headers = dict(dead.headers)  # the original record's headers, and why and where from
    assert (headers["traceparent"], headers["dlq-source"]) == (b"00-abc-01", b"t.commands:0:2")
    assert headers["dlq-error"].startswith(b"malformed command: not a command envelope")

    retry = partition.when(envelope(DATASETS, register, "c1", reply_to="replies:api-3"))
    assert retry.answers == [("replies:api-3", accepted)]
    assert events(retry) == []


async def test_the_outcomes_of_queued_commands_are_audited_in_their_transaction_direct_ones_are_not() -> None:
    ID, MISSING = uuid4(), uuid4()
    partition = Partition()
    queued = partition.records(
        envelope(DATASETS, ds.RegisterDataset(ID, "Weather"), "q1", tenant="acme"),
        envelope(DATASETS, ds.ArchiveDataset(MISSING), "q2", tenant="acme"),
    )
    direct = partition.records(envelope(DATASETS, ds.DescribeDataset(ID, name="W"), "d1", tenant="acme"))
    direct[0] = replace(direct[0], topic=DIRECT)  # as a command handed to its owner comes
    decision = decide_batch([*queued, *direct], partition.state, partition.contexts, CODEC)
    producer = FakeProducer()

    await commit(partition, decision, producer, audit_topic="t.audit")

    [(sent, _, _)] = producer.transactions
    records = [orjson.loads(s.value or b"") for s in sent if s.topic == "t.audit"]
    assert [(r["command_id"], r["outcome"], r["status"], r["tenant"], r["actor"]) for r in records] == [
        ("q2", "rejected", 404, "acme", "alice"),
        ("q1", "accepted", 200, "acme", "alice"),
    ]
    assert records[0]["reason"].startswith("not_found: ")
    assert {s.key for s in sent if s.topic == "t.audit"} == {b"acme"}


async def test_after_its_first_commit_a_writer_sends_snapshots_beside_events_at_the_offsets_it_expects() -> (
    None
):
    ID = uuid4()
    partition = Partition()
    producer = FakeProducer()
    first = partition.when(envelope(DATASETS, ds.RegisterDataset(ID, "Weather"), "c1"))
    await commit(partition, first, producer)  # event at 100, its commit marker at 101
    second = partition.when(envelope(DATASETS, ds.DescribeDataset(ID, name="Climate"), "c2"))

    [(_, described)] = await commit(partition, second, producer)

    assert PositionToken.decode(described.position).offsets == {"t.events.datasets": {0: 103}}
    # The snapshot, written before the broker answered, already holds that position.
    [_, state] = producer.transactions[1][0]
    assert state.value is not None
    assert load(DATASETS, str(ID), state.value).recent["c2"].position == described.position


async def test_events_at_other_offsets_than_the_single_writer_expects_abort_the_transaction() -> None:
    ID = uuid4()
    partition = Partition()
    producer = FakeProducer()
    await commit(
        partition, partition.when(envelope(DATASETS, ds.RegisterDataset(ID, "Weather"), "c1")), producer
    )
    producer._next["t.events.datasets"] += 1  # someone else wrote to the events partition
    second = partition.when(envelope(DATASETS, ds.DescribeDataset(ID, name="Climate"), "c2"))

    with pytest.raises(OffsetsMoved):
        await commit(partition, second, producer)

    assert len(producer.transactions) == 1


async def test_an_aborted_transaction_leaves_the_partition_state_as_it_was() -> None:
    ID = uuid4()
    partition = Partition().given(DATASETS, ds.RegisterDataset(ID, "Weather"))
    before = dict(partition.state.committed)
    decision = partition.when(
        envelope(DATASETS, ds.DescribeDataset(ID, name="Climate"), "c1"),
        b"poison",
    )
    producer = FakeProducer(fail_on_topic="t.dlq.command-processor")

    with pytest.raises(KafkaError):
        await commit(partition, decision, producer)

    assert producer.transactions == []
    assert partition.state.committed == before


# ---- parking without PostgreSQL ------------------------------------------------------


class _NoStore:
    """A pool whose every connection attempt is refused, as asyncpg's is while PostgreSQL is away."""

    def acquire(self) -> Any:
        raise ConnectionRefusedError("PostgreSQL is away")


async def test_without_postgresql_a_dead_letter_parks_nothing_and_a_command_to_hold_is_refused() -> None:
    ID, HELD = uuid4(), uuid4()
    partition = _two_datasets(ID, HELD)
    records = partition.records(
        envelope(BUGGY_DATASETS, RenameThenCrash(ID, "Broken"), "c1"),
        envelope(DATASETS, ds.PublishVersion(HELD, "1.0.0"), "c2", expected_version=1),
    )
    decision = decide_batch(records, partition.state, partition.contexts, CODEC, parked={str(HELD)})
    producer = FakeProducer()

    now_parked = await parked.park(
        _NoStore(),
        producer,
        decision,
        dlq_topic="t.dlq.command-processor",
        source=(COMMANDS_TOPIC, 0),
        max_record_bytes=1_000_000,
    )

    assert now_parked == set()
    # the dead letter is committed all the same, in a transaction of its own, once
    [(sent, _, _)] = producer.transactions
    assert [(s.topic, s.value) for s in sent] == [("t.dlq.command-processor", records[0].value)]
    assert decision.dead_letters == []
    assert decision.held == []
    # the command that would have been held is answered: not decided, send it again
    assert [(r.command_id, r.code) for _, r in decision.answers] == [
        ("c1", "internal_error"),
        ("c2", "aggregate_parked"),
    ]


def test_a_direct_command_is_kept_at_its_dead_letters_place_and_read_back_direct() -> None:
    ID = uuid4()
    partition = Partition()
    [record] = partition.records(envelope(DATASETS, ds.RegisterDataset(ID, "Weather"), "c1"))
    direct = replace(record, topic=DIRECT, partition=-1, offset=-1, key=str(ID).encode())

    kept = parked.to_record(direct, dlq=(2, 41))
    assert (kept.topic, kept.partition, kept.offset, kept.key) == (DIRECT, 2, -42, str(ID).encode())
    back = parked.to_consumed(kept)
    assert (back.topic, back.value, back.timestamp, back.headers) == (
        DIRECT,
        record.value,
        record.timestamp,
        record.headers,
    )
    assert parked.to_record(record) == replace(kept, topic=COMMANDS_TOPIC, partition=0, offset=0, key=None)
