"""Aggregate ids unique across contexts, and the size limits of the whole write path,
with no services: the batch decision, the transaction writer, the bus, the body limit,
the history and the temporal queries.

Given/when/then on the partition of tests/unit/test_command_batch.py: real command
envelopes of the real contexts, decided by the same pure function the processor calls.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, cast
from uuid import UUID, uuid4

import httpx
import orjson
import pytest
from aiokafka import ConsumerRecord
from aiokafka.errors import MessageSizeTooLargeError
from fastapi import Response
from starlette.types import Message, Receive, Scope, Send

from api import temporal
from api.deps import CommandMeta
from api.dispatch import dispatch
from api.errors import RequestProblem
from api.limits import BodyLimit
from api.reads import history
from commands.batch import decide_batch, outcome_reserve
from commands.bus import CommandBus, CommandTooLarge
from commands.datasets import CONTEXT as DATASETS
from commands.datasets import commands as ds
from commands.incidents import CONTEXT as INCIDENTS
from commands.incidents import commands as inc
from commands.sizes import KAFKA_DEFAULT_MAX_MESSAGE_BYTES, record_size
from commands.snapshots import LoadedAggregate, dump
from commands.transaction import dead_letter
from shared_kernel.audit import STATUS_OF_CODE
from shared_kernel.envelope import CommandEnvelope, CommandResult
from shared_kernel.settings import Settings
from shared_kernel.topics import contract_topics
from tests.auth import bearer
from tests.unit.test_command_batch import (
    CODEC,
    FakeProducer,
    Partition,
    Record,
    commit,
    dataset,
    envelope,
    events,
    snapshot,
)

LIMIT = KAFKA_DEFAULT_MAX_MESSAGE_BYTES
BIG = "x" * 300_000  # a metadata value: four of them make a snapshot larger than a record


def answer(decision: Any, command_id: str) -> CommandResult:
    [result] = [r for _, r in decision.answers if r.command_id == command_id]
    return cast(CommandResult, result)


# ---- one id, one context ------------------------------------------------------------


def test_creating_an_aggregate_whose_id_another_context_has_committed_is_refused_naming_it() -> None:
    ID = uuid4()
    partition = Partition().given(DATASETS, ds.RegisterDataset(ID, "Weather"))

    decision = partition.when(envelope(INCIDENTS, inc.OpenIncident(ID, "Disk full"), "c1"))

    assert events(decision) == []
    result = answer(decision, "c1")
    assert (result.status, result.code, result.details) == (
        "rejected",
        "already_exists",
        {"context": "datasets"},
    )
    assert "datasets.Dataset" in result.reason
    assert STATUS_OF_CODE[result.code] == 409
    assert decision.touched == {}
    # a membership check: the dataset's snapshot was not even decoded
    assert ("datasets", str(ID)) not in partition.state.live


def test_two_creations_of_one_id_in_two_contexts_in_one_batch_the_second_is_refused() -> None:
    ID, OTHER = uuid4(), uuid4()
    partition = Partition()

    decision = partition.when(
        envelope(INCIDENTS, inc.OpenIncident(ID, "Disk full"), "c1"),
        envelope(DATASETS, ds.RegisterDataset(ID, "Weather"), "c2"),
        envelope(DATASETS, ds.RegisterDataset(OTHER, "Rain"), "c3"),  # another id: no matter
    )

    assert events(decision) == [
        ("c1", "incidents.IncidentOpened", 1),
        ("c3", "datasets.DatasetRegistered", 1),
    ]
    refused = answer(decision, "c2")
    assert (refused.code, refused.details, refused.current_version) == (
        "already_exists",
        {"context": "incidents"},
        None,
    )
    assert set(decision.touched) == {("incidents", str(ID)), ("datasets", str(OTHER))}


def test_the_same_id_in_the_same_context_is_still_the_ordinary_already_exists() -> None:
    ID = uuid4()
    partition = Partition().given(DATASETS, ds.RegisterDataset(ID, "Weather"))

    decision = partition.when(envelope(DATASETS, ds.RegisterDataset(ID, "Weather"), "c1"))

    result = answer(decision, "c1")
    assert (result.code, result.current_version, result.details) == (
        "already_exists",
        1,
        {"current_version": 1},
    )


def test_a_command_on_an_id_of_another_context_finds_no_aggregate() -> None:
    ID = uuid4()
    partition = Partition().given(DATASETS, ds.RegisterDataset(ID, "Weather"))

    decision = partition.when(envelope(INCIDENTS, inc.AssignIncident(ID, "bob"), "c1"))

    assert answer(decision, "c1").code == "not_found"


def test_a_creation_refused_as_too_large_leaves_the_id_free_for_another_context() -> None:
    ID = uuid4()
    partition = Partition()

    decision = partition.when(
        envelope(DATASETS, ds.RegisterDataset(ID, "Huge", metadata={"blob": "x" * (LIMIT + 1)}), "c1"),
        envelope(INCIDENTS, inc.OpenIncident(ID, "Disk full"), "c2"),
    )

    assert answer(decision, "c1").code == "too_large"
    assert events(decision) == [("c2", "incidents.IncidentOpened", 1)]
    assert set(decision.touched) == {("incidents", str(ID))}


# ---- too large is not "try again" ---------------------------------------------------


def test_an_event_larger_than_a_record_is_rejected_and_the_aggregate_rolled_back() -> None:
    ID = uuid4()
    partition = Partition().given(DATASETS, ds.RegisterDataset(ID, "Weather"))

    decision = partition.when(
        envelope(DATASETS, ds.SetMetadataEntry(ID, "rows", 1), "c1"),
        envelope(DATASETS, ds.SetMetadataEntry(ID, "blob", "x" * (LIMIT + 1)), "c2"),
        envelope(DATASETS, ds.PublishVersion(ID, "1.0.0"), "c3", expected_version=2),
    )

    # c3 saw the aggregate as c1 left it: c2's entry is gone and took no version
    assert events(decision) == [("c1", "datasets.MetadataSet", 2), ("c3", "datasets.VersionPublished", 3)]
    refused = answer(decision, "c2")
    assert (refused.status, refused.code, refused.current_version) == ("rejected", "too_large", 2)
    assert refused.details["max_bytes"] == LIMIT
    assert refused.details["bytes"] > LIMIT
    assert refused.reason.startswith("the event datasets.MetadataSet would be")
    assert STATUS_OF_CODE["too_large"] == 413
    written = snapshot(decision, DATASETS, ID)
    assert (written.version, dataset(written).metadata) == (3, {"rows": "1"})
    assert written.recent["c2"].code == "too_large"  # a retry gets the same answer


def test_a_creation_larger_than_a_record_is_rejected_and_nothing_is_created() -> None:
    ID = uuid4()
    decision = Partition().when(
        envelope(DATASETS, ds.RegisterDataset(ID, "Huge", metadata={"blob": "x" * (LIMIT + 1)}), "c1")
    )

    assert events(decision) == []
    assert (answer(decision, "c1").code, answer(decision, "c1").current_version) == ("too_large", None)
    assert decision.touched == {}


async def test_a_snapshot_that_would_outgrow_a_record_rejects_that_command_and_the_rest_commits() -> None:
    ID, OTHER = uuid4(), uuid4()
    partition = Partition().given(
        DATASETS,
        ds.RegisterDataset(ID, "Weather"),
        ds.SetMetadataEntry(ID, "a", BIG),
        ds.SetMetadataEntry(ID, "b", BIG),
    )

    decision = partition.when(
        envelope(DATASETS, ds.SetMetadataEntry(ID, "c", BIG), "c1"),  # ~900 kB: fits
        envelope(DATASETS, ds.SetMetadataEntry(ID, "d", BIG), "c2"),  # ~1.2 MB: would not
        envelope(DATASETS, ds.DescribeDataset(ID, name="Climate"), "c3", expected_version=4),
        envelope(INCIDENTS, inc.OpenIncident(OTHER, "Disk full"), "c4"),
    )

    assert events(decision) == [
        ("c1", "datasets.MetadataSet", 4),
        ("c3", "datasets.DatasetDescribed", 5),
        ("c4", "incidents.IncidentOpened", 1),
    ]
    refused = answer(decision, "c2")
    assert (refused.code, refused.current_version) == ("too_large", 4)
    assert refused.reason.startswith(f"the state of datasets.Dataset {ID} after this command would be")

    producer = FakeProducer()
    answers = await commit(partition, decision, producer)

    [(sent, _, _)] = producer.transactions
    assert all(record_size(s.key, s.value, s.headers) <= LIMIT for s in sent)
    [state] = [s for s in sent if s.topic == "t.state.datasets"]
    assert state.value is not None
    written = partition.state.get(("datasets", str(ID)))
    assert written is not None
    assert (written.version, dataset(written).name, sorted(dataset(written).metadata)) == (
        5,
        "Climate",
        ["a", "b", "c"],
    )
    assert {r.command_id: r.status for _, r in answers} == {
        "c1": "accepted",
        "c2": "rejected",
        "c3": "accepted",
        "c4": "accepted",
    }


def test_an_aggregate_already_at_the_limit_takes_no_growth_in_a_later_batch() -> None:
    ID = uuid4()
    partition = Partition().given(
        DATASETS,
        ds.RegisterDataset(ID, "Weather"),
        *(ds.SetMetadataEntry(ID, k, BIG) for k in "abc"),
    )

    decision = partition.when(envelope(DATASETS, ds.SetMetadataEntry(ID, "d", BIG), "c1"))

    assert (answer(decision, "c1").code, answer(decision, "c1").current_version) == ("too_large", 4)
    assert events(decision) == []
    written = snapshot(decision, DATASETS, ID)  # the committed state and the remembered rejection
    assert (written.version, sorted(dataset(written).metadata)) == (4, ["a", "b", "c"])
    # shrinking it is still possible
    after = partition.when(envelope(DATASETS, ds.RemoveMetadataEntry(ID, "a"), "c2"))
    assert events(after) == [("c2", "datasets.MetadataRemoved", 5)]


def test_a_rejection_that_would_not_fit_the_snapshot_is_answered_but_not_remembered() -> None:
    ID = uuid4()
    partition = Partition().given(DATASETS, ds.RegisterDataset(ID, "Weather"))
    exact = record_size(str(ID).encode(), partition.state.committed[("datasets", str(ID))])
    records = partition.records(
        envelope(DATASETS, ds.DescribeDataset(ID, name="Climate"), "c1", expected_version=7)
    )

    decision = decide_batch(records, partition.state, partition.contexts, CODEC, max_record_bytes=exact + 10)

    assert answer(decision, "c1").code == "version_conflict"
    assert decision.touched == {}  # the committed snapshot stays as it is
    live = partition.state.get(("datasets", str(ID)))
    assert live is not None
    assert "c1" not in live.recent


async def test_the_outcome_reserve_covers_what_the_transaction_remembers() -> None:
    """The snapshot measured at decision time, plus the reserve, bounds the one written."""
    ID = uuid4()
    partition = Partition()
    decision = partition.when(envelope(DATASETS, ds.RegisterDataset(ID, "Weather"), "c" * 200))
    measured = record_size(str(ID).encode(), dump(DATASETS, decision.touched[("datasets", str(ID))]))

    await commit(partition, decision, FakeProducer())

    [acc] = decision.accepted
    written = record_size(str(ID).encode(), partition.state.committed[("datasets", str(ID))])
    assert measured < written <= measured + outcome_reserve(acc.command)


def _record(value: bytes, headers: list[tuple[str, bytes]]) -> Record:
    return ConsumerRecord(
        topic="t.commands",
        partition=0,
        offset=7,
        timestamp=0,
        timestamp_type=0,
        key=b"k",
        value=value,
        checksum=None,
        serialized_key_size=1,
        serialized_value_size=len(value),
        headers=headers,
    )


def test_a_dead_letter_always_fits_its_topic() -> None:
    small = _record(b"poison", [("traceparent", b"00-abc-01")])
    value, headers = dead_letter(small, "boom " * 2000, LIMIT)
    assert value == b"poison"
    assert dict(headers)["dlq-error"] == (b"boom " * 2000)[:4000]
    assert dict(headers)["dlq-source"] == b"t.commands:0:7"

    near = _record(b"x" * (LIMIT - 200), [])  # fitted the commands topic, not with 4 kB more
    value, headers = dead_letter(near, "boom " * 2000, LIMIT)
    assert value == near.value
    assert record_size(b"k", value, headers) <= LIMIT
    assert dict(headers)["dlq-error"].startswith(b"boom")

    at = _record(b"x" * (LIMIT - 90), [])
    value, headers = dead_letter(at, "boom", LIMIT)
    assert value is None
    assert dict(headers)["dlq-value-dropped"] == str(LIMIT - 90).encode()
    assert record_size(b"k", value, headers) <= LIMIT


# ---- the bus and dispatch -----------------------------------------------------------


class _Producer:
    _max_request_size = 1_048_576

    def __init__(self, fail: Exception | None = None) -> None:
        self.fail = fail
        self.sent: list[bytes] = []

    async def send_and_wait(self, topic: str, value: bytes, key: bytes) -> None:
        if self.fail is not None:
            raise self.fail
        self.sent.append(value)


class _Redis:
    async def get(self, key: str) -> None:
        return None


def _bus(producer: _Producer) -> CommandBus:
    bus = CommandBus(Settings(environment="test"), producer, _Redis())  # type: ignore[arg-type]
    bus.producer_ready.set()
    return bus


def _command(ID: UUID, value: Any) -> CommandEnvelope:
    return envelope(DATASETS, ds.SetMetadataEntry(ID, "blob", value), "c1")


async def test_a_command_larger_than_a_record_is_refused_by_the_bus_before_producing() -> None:
    producer = _Producer()
    bus = _bus(producer)
    assert bus.max_record_bytes == 1_048_576  # the producer's limit is the tighter one

    with pytest.raises(CommandTooLarge) as refused:
        await bus.send(_command(uuid4(), "x" * 5_000_000))

    assert producer.sent == []
    assert refused.value.size > refused.value.limit == 1_048_576


async def test_kafkas_own_size_refusal_of_an_asynchronous_command_is_too_large_not_unavailable() -> None:
    bus = _bus(_Producer(fail=MessageSizeTooLargeError("the broker says no")))

    with pytest.raises(CommandTooLarge):
        await bus.enqueue(_command(uuid4(), "small"))


async def test_dispatch_answers_a_command_too_large_with_413() -> None:
    producer = _Producer()
    meta = CommandMeta("c1", None, "alice", "", "c1", "")
    command = ds.SetMetadataEntry(uuid4(), "blob", "x" * 2_000_000)

    with pytest.raises(RequestProblem) as problem:
        await dispatch(_bus(producer), DATASETS, command, meta, Response())

    assert (problem.value.status, problem.value.code) == (413, "too_large")
    assert problem.value.extra["max_bytes"] == 1_048_576
    assert producer.sent == []


def test_every_topic_is_created_with_the_limit_the_write_side_checks() -> None:
    settings = Settings(environment="test", kafka_max_message_bytes=2_000_000)
    topics = contract_topics(settings, ["datasets", "incidents"], ["command-processor"])
    assert {t.name: (t.topic_configs or {})["max.message.bytes"] for t in topics} == {
        t.name: "2000000" for t in topics
    }
    defaults = Settings(environment="test")
    assert (defaults.kafka_max_message_bytes, defaults.max_body_bytes) == (1_048_588, 1024 * 1024)


# ---- the request body limit ---------------------------------------------------------


class _Echo:
    """An app that reads the whole body and answers its length."""

    def __init__(self) -> None:
        self.calls = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.calls += 1
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body", False):
                break
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": str(len(body)).encode()})


async def _call(
    app: Callable[[Scope, Receive, Send], Awaitable[None]],
    chunks: list[bytes],
    headers: list[tuple[bytes, bytes]],
) -> tuple[int, bytes, int]:
    """(status, body, chunks the server was asked for)."""
    asked = 0
    sent: list[Message] = []

    async def receive() -> Message:
        nonlocal asked
        asked += 1
        if asked > len(chunks):
            return {"type": "http.disconnect"}
        return {"type": "http.request", "body": chunks[asked - 1], "more_body": asked < len(chunks)}

    async def send(message: Message) -> None:
        sent.append(message)

    scope: Scope = {"type": "http", "method": "POST", "path": "/", "headers": headers}
    await app(scope, receive, send)
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return sent[0]["status"], body, asked


async def test_a_content_length_over_the_limit_is_413_before_the_body_is_read() -> None:
    echo = _Echo()
    status, body, asked = await _call(BodyLimit(echo, 1000), [b"x" * 1001], [(b"content-length", b"1001")])
    assert (status, asked, echo.calls) == (413, 0, 0)
    assert orjson.loads(body) == {
        "error": "too_large",
        "detail": "the request body is larger than 1,000 bytes",
        "extra": {"max_bytes": 1000},
    }


async def test_a_content_length_at_the_limit_passes() -> None:
    status, body, _ = await _call(BodyLimit(_Echo(), 1000), [b"x" * 1000], [(b"content-length", b"1000")])
    assert (status, body) == (200, b"1000")


async def test_a_chunked_body_over_the_limit_is_413_and_the_rest_is_not_read() -> None:
    echo = _Echo()
    chunks = [b"x" * 400] * 10
    status, body, asked = await _call(BodyLimit(echo, 1000), chunks, [(b"transfer-encoding", b"chunked")])
    assert (status, orjson.loads(body)["error"], echo.calls) == (413, "too_large", 0)
    assert asked == 3  # 1,200 bytes read, then no more


async def test_a_chunked_body_at_the_limit_reaches_the_route_whole() -> None:
    chunks = [b"x" * 250] * 4
    status, body, _ = await _call(BodyLimit(_Echo(), 1000), chunks, [(b"transfer-encoding", b"chunked")])
    assert (status, body) == (200, b"1000")


async def test_requests_without_a_body_and_websockets_pass_untouched() -> None:
    status, body, _ = await _call(BodyLimit(_Echo(), 1000), [b""], [])
    assert (status, body) == (200, b"0")
    seen: list[str] = []

    async def ws_app(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(scope["type"])

    async def nothing() -> Message:
        return {}

    async def ignore(message: Message) -> None:
        return None

    await BodyLimit(ws_app, 10)({"type": "websocket", "headers": []}, nothing, ignore)
    assert seen == ["websocket"]


async def test_the_api_refuses_a_body_over_its_limit_with_413() -> None:
    from api.app import create_app

    app = create_app(Settings(environment="test", max_body_bytes=2048))
    # no lifespan: nothing is connected, and the refusal needs nothing
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://api", headers=bearer()
    ) as client:
        by_length = await client.post("/api/v1/datasets", json={"name": "x" * 4096})

        async def chunks() -> Any:
            for _ in range(4):
                yield b'{"name": "' + b"x" * 1000

        chunked = await client.post("/api/v1/datasets", content=chunks())
    assert (by_length.status_code, by_length.json()["error"]) == (413, "too_large")
    assert "retry-after" not in by_length.headers
    assert (chunked.status_code, chunked.json()["error"]) == (413, "too_large")


# ---- reads of an id of another context ----------------------------------------------


class _Pool:
    def __init__(self, rows: list[dict[str, Any]]) -> None:
        self.rows = rows
        self.queries: list[tuple[str, tuple[Any, ...]]] = []

    async def fetch(self, sql: str, *args: Any) -> list[dict[str, Any]]:
        self.queries.append((sql, args))
        return self.rows


async def test_the_history_reads_the_contexts_own_events_only() -> None:
    ID = uuid4()
    pool = _Pool([])
    with pytest.raises(RequestProblem) as problem:
        await history(pool, "acme", "incidents", ID, "incident")
    assert (problem.value.status, problem.value.code) == (404, "not_found")
    [(sql, args)] = pool.queries
    assert "context = $2" in sql
    assert "tenant = $3" in sql
    assert args == (str(ID), "incidents", "acme")


async def test_a_temporal_query_of_an_unknown_or_broken_history_is_none_never_an_error() -> None:
    ID = str(uuid4())
    unknown = _Pool([])
    assert await temporal.state_at(unknown, "incidents", ID, version=1, tenant="acme") is None
    assert unknown.queries[0][1][:2] == (ID, "incidents")
    assert unknown.queries[0][1][-1] == "acme"
    # an archive from before ids were unique: the second aggregate's first events were dropped
    broken = _Pool([{"version": 3, "headers": {}, "payload": {}}])
    assert await temporal.state_at(broken, "incidents", ID, version=3, tenant="acme") is None


def test_loaded_aggregate_snapshot_roundtrip_of_a_big_state_stays_under_the_limit() -> None:
    """The state given by the snapshot tests above is really near the limit (not a vacuous test)."""
    ID = uuid4()
    partition = Partition().given(
        DATASETS, ds.RegisterDataset(ID, "Weather"), *(ds.SetMetadataEntry(ID, k, BIG) for k in "abc")
    )
    size = record_size(str(ID).encode(), partition.state.committed[("datasets", str(ID))])
    assert LIMIT - 200_000 < size <= LIMIT
    loaded = partition.state.get(("datasets", str(ID)))
    assert isinstance(loaded, LoadedAggregate)
