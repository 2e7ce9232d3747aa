"""Any command body the API accepts survives the rest of the system, with no services.

For each command route of the real app (its OpenAPI operations under /api/v1 that
change something), hypothesis draws bodies and path parameters from the route's own
JSON schema, nastily: texts with NUL, lone surrogates and control characters, numbers
past every range, NaN and infinities (`tests/unit/strategies.py`). Each request goes
through the app itself (httpx's ASGITransport, no lifespan: a bus that keeps what it is
given stands in for Kafka), so the edge validation is exactly the API's. A refusal
(4xx) is fine; a 500 is not. What the API accepted then goes where it goes in
production, in memory:

- the command envelope's bytes (as the bus produces them) into the processor's batch
  decision (`commands.batch.decide_batch`) against a real aggregate; a domain refusal
  is fine, a dead letter or an exception is not;
- the snapshot the transaction would write, read back as the next owner reads it;
- each event's record (Avro and headers) decoded as a projector decodes it;
- every projection of the context folded over the aggregate's events (the rows of
  `FoldedRows` and `AppendOnly` tables, the documents of `SearchProjection`s), and
  each value checked against what its store takes: for PostgreSQL (the column types
  of the projection's DDL) no NUL in text, text[] or in any string of a json(b) value,
  every string encodable as UTF-8 (no lone surrogate), int and bigint in range, floats
  finite, and a json(b) value that the pool's codec (orjson) can write; for OpenSearch
  a document orjson can write, integer/long fields in range, finite numbers, and no
  keyword term over Lucene's 32,766 bytes.

Bounded: `MAX_EXAMPLES` per route (100; `ACCEPTED_INPUTS_EXAMPLES=1000` for a deeper run),
derandomized (the same examples on every run), about 25 s in all on a 2-core machine.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote
from uuid import UUID

import httpx
import orjson
import pytest
from aiokafka import ConsumerRecord
from hypothesis import HealthCheck, Phase, event, given, settings
from hypothesis import strategies as st

from api.app import create_app
from api.deps import get_bus
from commands import CONTEXTS
from commands.batch import Decision, decide_batch
from commands.context import BoundedContext, command_payload
from commands.datasets import commands as ds
from commands.incidents import commands as inc
from commands.snapshots import dump, load
from commands.state_store import PartitionState
from commands.webhooks import commands as wh
from projections.append_only import AppendOnly
from projections.datasets.windows import QualityWindowsProjection, count
from projections.events import Record, StoredEvent, decode
from projections.folded import FoldedRows, fold
from projections.projection import Projection
from projections.registry import PROJECTIONS
from projections.search import SearchProjection
from shared_kernel.avro import AvroCodec
from shared_kernel.envelope import CommandEnvelope, CommandResult
from shared_kernel.settings import Settings
from tests.auth import bearer
from tests.unit.strategies import from_schema, json_bytes, resolve

MAX_EXAMPLES = int(os.environ.get("ACCEPTED_INPUTS_EXAMPLES", "100"))  # per route; more for a deep run
CODEC = AvroCodec.from_directory()
BY_NAME: dict[str, BoundedContext] = {c.name: c for c in CONTEXTS}
T0 = datetime(2026, 5, 6, 7, 8, 9, tzinfo=UTC)
BASE_ID = uuid.uuid5(uuid.NAMESPACE_URL, "tests/unit/test_accepted_inputs")  # the aggregate acted on
COMMAND_METHODS = {"post", "put", "patch", "delete"}
INT4 = (-(2**31), 2**31 - 1)
INT8 = (-(2**63), 2**63 - 1)
LUCENE_MAX_TERM_BYTES = 32_766

APP = create_app(Settings(environment="test"))  # never started: no lifespan, no services
OPENAPI: dict[str, Any] = APP.openapi()
COMPONENTS: Mapping[str, Any] = OPENAPI.get("components", {}).get("schemas", {})


# ---- the API's edge, with a bus that keeps the commands -----------------------------


class KeepingBus:
    """Stands in for `commands.bus.CommandBus`: serialises each command exactly as the
    real bus produces it to Kafka, keeps the bytes, and answers "accepted"."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []

    async def send(self, command: CommandEnvelope) -> CommandResult:
        self.sent.append(dataclasses.replace(command, reply_to="replies:unit").to_bytes())
        return CommandResult(
            command_id=command.command_id,
            status="accepted",
            aggregate_id=command.aggregate_id,
            version=1,
            position="e30",
        )


@dataclass(frozen=True)
class Operation:
    """One command route, from the app's OpenAPI document."""

    operation_id: str
    method: str
    path: str
    parameters: tuple[dict[str, Any], ...]
    body: dict[str, Any] | None

    @property
    def context(self) -> str:
        return self.path.removeprefix("/api/v1/").split("/", 1)[0]


def command_operations() -> list[Operation]:
    found = []
    for path, methods in OPENAPI["paths"].items():
        if not path.startswith("/api/v1/") or path.startswith("/api/v1/admin"):
            continue
        for method, op in methods.items():
            if method not in COMMAND_METHODS or {"identity", "integrations", "deliveries"} & set(
                op.get("tags", ())
            ):
                continue  # (identity routes issue credentials; integrations send several commands each;
                # a redelivery changes the delivery job's tables, no aggregate)
            content = op.get("requestBody", {}).get("content", {})
            body = content.get("application/json", {}).get("schema")
            params = tuple(p for p in op.get("parameters", ()) if p["in"] == "path")
            found.append(Operation(op["operationId"], method.upper(), path, params, body))
    return found


OPERATIONS = command_operations()


# ---- the write side and the projectors' decoding, in memory -------------------------


@dataclass
class WriteSide:
    """One partition of the commands topic, decided as the processor decides it; the
    snapshots it writes are read back as the next owner reads them, and the events are
    decoded as the projectors decode them."""

    state: PartitionState = field(default_factory=lambda: PartitionState(BY_NAME))
    events: list[StoredEvent] = field(default_factory=list)
    offset: int = 0

    def submit(self, wire: bytes) -> Decision[Any]:
        at = T0 + timedelta(minutes=self.offset)
        record: ConsumerRecord[bytes, bytes] = ConsumerRecord(
            topic="unit.commands",
            partition=0,
            offset=self.offset,
            timestamp=int(at.timestamp() * 1000),
            timestamp_type=0,
            key=None,
            value=wire,
            checksum=None,
            serialized_key_size=0,
            serialized_value_size=len(wire),
            headers=[],
        )
        self.offset += 1
        decision = decide_batch([record], self.state, BY_NAME, CODEC)
        for key, loaded in decision.touched.items():
            context = BY_NAME[key[0]]
            snapshot = dump(context, loaded)
            self.state.commit(key, snapshot, load(context, key[1], snapshot))
        for accepted in decision.accepted:
            for produced in accepted.events:
                topic = f"unit.events.{accepted.key[0]}"
                self.events.append(
                    decode(
                        CODEC,
                        Record(
                            topic=topic,
                            partition=0,
                            offset=len(self.events),
                            key=produced.key,
                            value=produced.value,
                            headers=produced.headers,
                            timestamp_ms=record.timestamp,
                        ),
                    )
                )
        return decision

    def given(self, context: BoundedContext, *commands: Any) -> WriteSide:
        """Commands decided before the one under test (a refused one is left out)."""
        for command in commands:
            command_type = context.command_type(command)
            envelope = CommandEnvelope(
                command_id=str(uuid.uuid4()),
                command_type=command_type,
                aggregate_id=str(context.handler(command_type).aggregate_id(command)),
                payload=command_payload(command),
                actor="alice",
            )
            self.submit(envelope.to_bytes())
        return self


def rejection(decision: Decision[Any]) -> CommandResult | None:
    return next((r for _, r in decision.answers if not r.accepted), None)


# What exists before each route's command: the aggregate it acts on, in a state where
# the command may apply. `payload` is the command as the API sent it.
def _dataset(*more: Any) -> tuple[Any, ...]:
    return (ds.RegisterDataset(BASE_ID, "Base", "a dataset", "team", ["t"], {"k": 1}), *more)


def _incident(*statuses: str) -> tuple[Any, ...]:
    return (
        inc.OpenIncident(BASE_ID, "Base", "an incident", "high", "pager", "PD-1"),
        *(inc.ChangeIncidentStatus(BASE_ID, s) for s in statuses),
    )


def _webhook(*more: Any) -> tuple[Any, ...]:
    return (wh.RegisterWebhook(BASE_ID, "https://hooks.example.com/in", ["incidents"]), *more)


THROUGH = {  # the statuses an incident passes to reach each one
    "open": (),
    "in_progress": ("in_progress",),
    "resolved": ("in_progress", "resolved"),
    "closed": ("in_progress", "resolved", "closed"),
}


def given_for(operation_id: str, payload: Mapping[str, Any], status: str) -> tuple[Any, ...]:
    givens: dict[str, tuple[Any, ...]] = {
        "registerDataset": (),
        "describeDataset": _dataset(),
        "setDatasetMetadata": _dataset(),
        "removeDatasetMetadata": _dataset(ds.SetMetadataEntry(BASE_ID, str(payload.get("key", "k")), 1)),
        "publishDatasetVersion": _dataset(),
        "recordDatasetQualityCheck": _dataset(),
        "archiveDataset": _dataset(),
        "openIncident": (),
        "assignIncident": _incident(*THROUGH[status]),
        "changeIncidentStatus": _incident(*THROUGH[status]),
        "reopenIncident": _incident(*THROUGH["closed"]),
        "commentOnIncident": _incident(*THROUGH[status]),
        "registerWebhook": (),
        "pauseWebhook": _webhook(),
        "resumeWebhook": _webhook(wh.PauseWebhook(BASE_ID)),
        "rotateWebhookSecret": _webhook(),
        "deleteWebhook": _webhook(),
    }
    assert operation_id in givens, f"{operation_id}: a new command route; say what exists before it here"
    return givens[operation_id]


# ---- what the stores take ------------------------------------------------------------


def column_types(ddl: str) -> dict[str, str]:
    """Column -> PostgreSQL type, from a projection's CREATE TABLE."""
    table = ddl.split("(", 1)[1]
    types = {}
    for line in table.splitlines():
        m = re.match(r'\s*"?([a-z_][a-z0-9_]*)"?\s+([a-z]+(?: precision)?(?:\[\])?)', line)
        if m:
            types[m.group(1)] = m.group(2)
    return types


def strings_in(value: Any) -> Iterator[str]:
    """Every string in a JSON-like value, keys included."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, Mapping):
        for k, v in value.items():
            yield from strings_in(k)
            yield from strings_in(v)
    elif isinstance(value, list | tuple):
        for v in value:
            yield from strings_in(v)


def numbers_in(value: Any) -> Iterator[int | float]:
    if isinstance(value, bool):
        return
    if isinstance(value, int | float):
        yield value
    elif isinstance(value, Mapping):
        for v in value.values():
            yield from numbers_in(v)
    elif isinstance(value, list | tuple):
        for v in value:
            yield from numbers_in(v)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 120 else text[:117] + "..."


def check_text(where: str, value: str) -> None:
    assert "\x00" not in value, f"{where}: PostgreSQL text cannot hold NUL: {_short(value)}"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise AssertionError(f"{where}: not encodable as UTF-8 (lone surrogate): {_short(value)}") from None


def check_json(where: str, value: Any) -> None:
    for number in numbers_in(value):
        assert not isinstance(number, float) or math.isfinite(number), (
            f"{where}: json(b) number {number} (orjson writes it as null)"
        )
    try:
        written = orjson.loads(orjson.dumps(value))  # the pool's json/jsonb codec
    except orjson.JSONEncodeError as exc:
        raise AssertionError(f"{where}: the jsonb codec cannot write it ({exc}): {_short(value)}") from None
    for text in strings_in(written):
        assert "\x00" not in text, f"{where}: PostgreSQL json(b) cannot hold \\u0000: {_short(value)}"


def check_column(where: str, pg_type: str, value: Any) -> None:
    if value is None:
        return
    if pg_type == "text":
        assert isinstance(value, str), f"{where}: text column given {_short(value)}"
        check_text(where, value)
    elif pg_type == "text[]":
        assert isinstance(value, list), f"{where}: text[] column given {_short(value)}"
        for item in value:
            assert isinstance(item, str), f"{where}: text[] item {_short(item)}"
            check_text(where, item)
    elif pg_type in ("jsonb", "json"):
        check_json(where, value)
    elif pg_type in ("int", "integer", "bigint"):
        lo, hi = INT8 if pg_type == "bigint" else INT4
        assert isinstance(value, int), f"{where}: {pg_type} given {value!r}"
        assert not isinstance(value, bool), f"{where}: {pg_type} given {value!r}"
        assert lo <= value <= hi, f"{where}: {value} is out of {pg_type} range"
    elif pg_type == "double precision":
        assert isinstance(value, int | float), f"{where}: given {value!r}"
        assert not isinstance(value, bool), f"{where}: given {value!r}"
        assert math.isfinite(value), f"{where}: double precision given {value}"
    elif pg_type == "boolean":
        assert isinstance(value, bool), f"{where}: boolean given {value!r}"
    elif pg_type == "uuid":
        assert isinstance(value, UUID), f"{where}: uuid given {value!r}"
    elif pg_type == "timestamptz":
        assert isinstance(value, datetime), f"{where}: given {value!r}"
        assert value.tzinfo is not None, f"{where}: a naive time {value!r}"
    else:
        raise AssertionError(f"{where}: a column type this test does not know: {pg_type}")


def check_rows(projection: Projection, rows: list[dict[str, Any]]) -> None:
    types = column_types(projection.ddl)
    columns: tuple[str, ...] = getattr(projection, "columns")  # noqa: B009  (every PostgreSQL shape has them)
    for column in columns:
        assert column in types, f"{projection.name}: no type found for column {column} in its DDL"
    for row in rows:
        for column in columns:
            check_column(f"{projection.name}.{column}", types[column], row[column])


def check_document(projection: SearchProjection, doc: dict[str, Any]) -> None:
    try:
        orjson.dumps(doc)  # as `_index_documents` writes it into the _bulk body
    except orjson.JSONEncodeError as exc:
        raise AssertionError(
            f"{projection.name}: the document cannot be written ({exc}): {_short(doc)}"
        ) from None
    properties = projection.mapping["mappings"]["properties"]
    for name, value in doc.items():
        where = f"{projection.name}.{name}"
        for number in numbers_in(value):
            assert not isinstance(number, float) or math.isfinite(number), f"{where}: {number}"
        kind = properties.get(name, {}).get("type")
        if kind in ("integer", "long") and value is not None:
            lo, hi = INT4 if kind == "integer" else INT8
            assert lo <= value <= hi, f"{where}: {value} is out of {kind} range"
        terms: list[str] = []
        if kind == "keyword" and "ignore_above" not in properties[name]:
            terms = list(strings_in(value))
        elif kind == "flat_object":  # each leaf is indexed as a keyword, with and without its path
            terms = [s for s in strings_in(value)]
        for term in terms:
            size = len(term.encode("utf-8", "surrogatepass"))
            assert size <= LUCENE_MAX_TERM_BYTES, f"{where}: a {size}-byte keyword term (Lucene takes 32,766)"


def check_projections(context: str, events: list[StoredEvent]) -> None:
    """Every projection of `context`, folded over `events` as its worker folds a batch."""
    for projection in PROJECTIONS.values():
        if context not in projection.contexts:
            continue
        if isinstance(projection, SearchProjection):
            docs = fold(projection.evolvers, {}, events, lambda e: e.meta.aggregate_id)
            for doc in docs.values():
                check_document(projection, doc)
        elif isinstance(projection, FoldedRows):
            rows = fold(projection.evolvers, {}, events, lambda e: UUID(e.meta.aggregate_id))
            check_rows(projection, list(rows.values()))
        elif isinstance(projection, AppendOnly):
            check_rows(
                projection, [dict(zip(projection.columns, r, strict=True)) for r in projection.rows(events)]
            )
        elif isinstance(projection, QualityWindowsProjection):
            added = count(events, {}, projection.windows, projection.lateness_ms)
            check_rows(
                projection, [dict(zip(projection.columns, r, strict=True)) for r in projection.rows(added)]
            )
        else:
            raise AssertionError(f"{projection.name}: a kind of projection this test does not know")


# ---- the property --------------------------------------------------------------------


def _segment(value: Any) -> str:
    """A path parameter as a client puts it in the URL (percent-encoded UTF-8; a lone
    surrogate as the bytes a client would send for it)."""
    return quote(str(value).encode("utf-8", "surrogatepass"), safe="")


@pytest.fixture(scope="module")
def bus() -> Iterator[KeepingBus]:
    keeping = KeepingBus()
    APP.dependency_overrides[get_bus] = lambda: keeping
    yield keeping
    APP.dependency_overrides.pop(get_bus, None)


@pytest.fixture(scope="module")
async def api(bus: KeepingBus) -> AsyncIterator[httpx.AsyncClient]:
    """The app over ASGI, never started (no lifespan); its exceptions are raised here."""
    transport = httpx.ASGITransport(app=APP)
    async with httpx.AsyncClient(transport=transport, base_url="http://api", headers=bearer()) as client:
        yield client


def test_every_command_route_is_covered() -> None:
    assert {o.operation_id for o in OPERATIONS} >= {"registerDataset", "openIncident", "commentOnIncident"}
    for operation in OPERATIONS:
        given_for(operation.operation_id, {}, "open")  # each has its given state


@pytest.mark.parametrize("operation", OPERATIONS, ids=lambda o: o.operation_id)
@settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    derandomize=True,
    phases=[Phase.explicit, Phase.generate, Phase.shrink],  # no explain phase: it costs more runs
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
@given(data=st.data())
async def test_an_accepted_command_survives_the_write_side_and_every_projection(
    operation: Operation, data: st.DataObject, bus: KeepingBus, api: httpx.AsyncClient
) -> None:
    bus.sent.clear()
    path = operation.path
    for parameter in operation.parameters:
        name = parameter["name"]
        if name.endswith("_id"):
            value: Any = BASE_ID  # the aggregate acted on
        else:
            value = data.draw(from_schema(parameter.get("schema", {}), COMPONENTS), label=name)
        path = path.replace("{" + name + "}", _segment(value))
    content = b""
    if operation.body is not None:
        body = data.draw(from_schema(resolve(operation.body, COMPONENTS), COMPONENTS), label="body")
        content = data.draw(json_bytes(body), label="bytes")
    status = data.draw(st.sampled_from(sorted(THROUGH)), label="incident status")
    event(await survives(api, bus, operation, path, content, status))


async def survives(
    api: httpx.AsyncClient, bus: KeepingBus, operation: Operation, path: str, content: bytes, status: str
) -> str:
    """The property, for one request: what became of it (or an exception saying why not)."""
    bus.sent.clear()
    response = await api.request(
        operation.method,
        path,
        content=content,
        headers={"content-type": "application/json", "idempotency-key": f"unit-{uuid.uuid4()}"},
    )
    assert response.status_code < 500, f"{response.status_code} {response.text[:300]}"
    if not response.is_success:
        return f"refused at the edge: {response.status_code}"
    (wire,) = bus.sent
    sent = CommandEnvelope.from_bytes(wire)
    context = BY_NAME[operation.context]
    side = WriteSide().given(context, *given_for(operation.operation_id, sent.payload, status))
    before = len(side.events)
    decision = side.submit(wire)
    assert not decision.dead_letters, f"the processor dead-lettered it: {decision.dead_letters[0].error}"
    refused = rejection(decision)
    if refused is not None:
        assert refused.code != "internal_error", refused.reason
        return f"refused by the domain: {refused.code}"
    assert len(side.events) > before, "accepted, yet no event"
    check_projections(context.name, side.events)
    return "accepted, and every projection takes it"


# ---- what the property found, as ordinary regression tests ----------------------------

BASE = str(BASE_ID)
FOUND: list[tuple[str, str, str, bytes]] = [
    # (what it broke, operation, rest of the path, raw body): the minimal examples the
    # property found on the code as it was (a 500 at the edge, or a row a projection
    # cannot write, so dead-letters); the last two were found on the real services
    # (tests/integration/test_fuzz.py), the property having stopped at the first two kinds
    ("NUL in a dataset name: datasets.name, events.payload", "registerDataset", "", b'{"name": "\\u0000"}'),
    ("lone surrogate: 500 rendering the 422", "registerDataset", "", b'{"name": "\\ud800"}'),
    ("lone surrogate as UTF-8 bytes: 500", "registerDataset", "", b'{"name": "\xed\xa0\x80"}'),
    (
        "lone surrogate in a metadata key: 500 in dispatch (orjson)",
        "setDatasetMetadata",
        "/k",
        b'{"value": {"\\ud800": null}}',
    ),
    ("NUL in a metadata key (path): datasets.metadata", "setDatasetMetadata", "/%00", b'{"value": null}'),
    ("NUL in a metadata key to remove: events.payload", "removeDatasetMetadata", "/%00", b""),
    ("lone surrogate in a version: 500", "publishDatasetVersion", "", b'{"version": "0000\\ud800"}'),
    (
        "NUL in a metric: datasets.quality",
        "recordDatasetQualityCheck",
        "",
        b'{"metric": "\\u0000", "value": 0, "threshold": 0}',
    ),
    (
        "NaN threshold: 500 rendering the 422",
        "recordDatasetQualityCheck",
        "",
        b'{"metric": "0", "value": 0, "threshold": NaN}',
    ),
    ("NUL in an archive reason: datasets.archived_reason", "archiveDataset", "", b'{"reason": "\\u0000"}'),
    ("NUL in a new name: datasets.name", "describeDataset", "", b'{"name": "\\u0000"}'),
    ("NUL in an incident title: incidents.title", "openIncident", "", b'{"title": "\\u0000"}'),
    ("NUL in an assignee: incidents.assignee", "assignIncident", "", b'{"assignee": "\\u0000"}'),
    ("lone surrogate in a status: 500", "changeIncidentStatus", "", b'{"status": "\\ud800"}'),
    ("NUL in a reopen reason: events.payload", "reopenIncident", "", b'{"reason": "\\u0000"}'),
    ("NUL in a comment: events.payload", "commentOnIncident", "", b'{"author": "0", "body": "\\u0000"}'),
    (
        "a metadata string over Lucene's term limit: datasets_search",
        "registerDataset",
        "",
        b'{"name": "n", "metadata": {"k": "' + b"x" * 40_000 + b'"}}',
    ),
    (
        "an integer past 64 bits in metadata: 500 in dispatch (orjson)",
        "registerDataset",
        "",
        b'{"name": "n", "metadata": {"k": 18446744073709551616}}',
    ),
]


@pytest.mark.parametrize(("what", "operation_id", "rest", "body"), FOUND, ids=[f[0] for f in FOUND])
async def test_what_the_property_found_stays_fixed(
    what: str, operation_id: str, rest: str, body: bytes, bus: KeepingBus, api: httpx.AsyncClient
) -> None:
    (operation,) = [o for o in OPERATIONS if o.operation_id == operation_id]
    path = operation.path.replace("{dataset_id}", BASE).replace("{incident_id}", BASE)
    if "{key}" in path:
        path = path.replace("/{key}", rest)
    await survives(api, bus, operation, path, body, "open")
