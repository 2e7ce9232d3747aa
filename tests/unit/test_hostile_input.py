"""Hostile input at the edge (api.inputs): every refusal is a 422 naming the input, it
always renders, and nothing reaches a service. The app is the real one
(`api.app.create_app`), its lifespan not run: the bus, the pool, the search client and
the live feed are stubs that record what reaches them."""

from __future__ import annotations

import base64
import logging
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson
import pytest
from fastapi import FastAPI

from api import inputs
from api.app import create_app
from api.consistency import CommittedPositions
from shared_kernel.envelope import CommandEnvelope, CommandResult
from shared_kernel.position import MAX_TOKEN_CHARS, MAX_TOKEN_PARTITIONS, InvalidToken, PositionToken
from shared_kernel.settings import Settings
from tests.auth import bearer

SETTINGS = Settings(environment="test", topic_prefix="unit")
DATASETS = "/api/v1/datasets"
TOPIC = "unit.events.datasets"


class Untouchable:
    """A service that must not be reached: any call is recorded and fails."""

    def __init__(self, name: str, calls: list[str]) -> None:
        self.name, self.calls = name, calls

    def __getattr__(self, attr: str) -> Any:
        def call(*_: Any, **__: Any) -> Any:
            self.calls.append(f"{self.name}.{attr}")
            raise AssertionError(f"{self.name}.{attr} reached")

        return call


class Bus:
    """Records the commands that reach it and accepts them."""

    def __init__(self) -> None:
        self.sent: list[CommandEnvelope] = []

    async def send(self, envelope: CommandEnvelope) -> CommandResult:
        self.sent.append(envelope)
        return CommandResult(
            envelope.command_id, "accepted", envelope.aggregate_id, version=1, position="e30"
        )


@pytest.fixture
def touched() -> list[str]:
    return []


@pytest.fixture
def bus() -> Bus:
    return Bus()


@pytest.fixture
def app(bus: Bus, touched: list[str]) -> FastAPI:
    app = create_app(SETTINGS)
    state = app.state
    state.settings, state.bus = SETTINGS, bus
    state.pool = Untouchable("pool", touched)
    state.search, state.search_ready = Untouchable("search", touched), True
    state.feed = Untouchable("feed", touched)
    state.positions = CommittedPositions(SETTINGS.topic_prefix)
    state.reads = None
    return app


@pytest.fixture
async def client(app: FastAPI, bus: Bus, touched: list[str]) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://api", headers=bearer()) as c:
        yield c
    assert not touched, f"a refused request reached {touched}"


def refused(r: httpx.Response, *loc: str | int) -> dict[str, Any]:
    """The first error of a 422, which renders as strict JSON and names `loc`."""
    assert r.status_code == 422, r.text
    body = orjson.loads(r.content)  # orjson refuses lone surrogates: the answer is valid UTF-8
    error: dict[str, Any] = body["detail"][0]
    assert set(error) == {"loc", "msg", "type"}, error  # the input is never echoed
    assert error["loc"][: len(loc)] == list(loc), error
    return error


def json_body(raw: bytes) -> dict[str, Any]:
    return {"content": raw, "headers": {"content-type": "application/json"}}


def token(raw: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(orjson.dumps(raw)).decode().rstrip("=")


def cursor(at: str) -> str:
    return base64.urlsafe_b64encode(orjson.dumps([at, str(uuid.uuid4())])).decode().rstrip("=")


def dataset() -> str:
    return f"{DATASETS}/{uuid.uuid4()}"


# ---- strings in bodies ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "loc"),
    [
        ({"name": "a\x00b"}, ("body", "name")),
        ({"name": "ok", "description": "x\x00"}, ("body", "description")),
        ({"name": "ok", "owner": "\x00"}, ("body", "owner")),
        ({"name": "ok", "tags": ["fine", "x\x00"]}, ("body", "tags", 1)),
        ({"name": "ok", "metadata": {"k\x00": 1}}, ("body", "metadata", "k\x00", "[key]")),
        ({"name": "ok", "metadata": {"k": {"a": ["x", "y\x00"]}}}, ("body", "metadata", "k")),
        ({"name": "ok", "metadata": {"k": {"a\x00": 1}}}, ("body", "metadata", "k")),
        ({"name": "line\nbreak"}, ("body", "name")),
    ],
)
async def test_nul_anywhere_in_a_create_is_refused(
    client: httpx.AsyncClient, bus: Bus, body: dict[str, Any], loc: tuple[str, ...]
) -> None:
    r = await client.post(DATASETS, json=body)
    error = refused(r, *loc)
    assert error["type"] in {"string_nul", "string_control", "json_value"}
    assert not bus.sent


async def test_a_nested_nul_is_named_by_its_path_in_the_value(client: httpx.AsyncClient) -> None:
    r = await client.post(DATASETS, json={"name": "ok", "metadata": {"k": {"a": ["x", "y\x00"]}}})
    assert "a[1]" in refused(r, "body", "metadata", "k")["msg"]


@pytest.mark.parametrize(
    ("raw", "loc"),
    [
        (b'{"name": "\\ud800"}', ("body", "name")),
        (b'{"name": "ok", "tags": ["\\udfff"]}', ("body", "tags", 0)),
        (b'{"name": "ok", "metadata": {"\\ud800": 1}}', ("body", "metadata")),
        (b'{"name": "ok", "metadata": {"k": ["\\ud800"]}}', ("body", "metadata", "k")),
        (b'{"\\ud800": 1, "name": "ok"}', ("body",)),
        (b'{"name": "ok", "tags": ["\xed\xa0\x80"]}', ("body",)),  # a surrogate in UTF-8 bytes
    ],
)
async def test_a_lone_surrogate_in_a_body_is_a_422_that_renders(
    client: httpx.AsyncClient, bus: Bus, raw: bytes, loc: tuple[str, ...]
) -> None:
    r = await client.post(DATASETS, **json_body(raw))
    error = refused(r, *loc)
    assert not any(0xD800 <= ord(c) <= 0xDFFF for c in r.text)
    assert error["msg"]
    assert not bus.sent


async def test_a_comment_of_nul_is_refused(client: httpx.AsyncClient, bus: Bus) -> None:
    r = await client.post(f"/api/v1/incidents/{uuid.uuid4()}/comments", json={"author": "al", "body": "\x00"})
    refused(r, "body", "body")
    assert not bus.sent


# ---- numbers in bodies -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "number", [b"NaN", b"Infinity", b"-Infinity", b"1e400", b"-1e400", b"1" + b"0" * 400]
)
async def test_numbers_no_double_holds_are_refused(
    client: httpx.AsyncClient, bus: Bus, number: bytes
) -> None:
    raw = b'{"metric": "rows", "value": ' + number + b', "threshold": 1}'
    r = await client.post(f"{dataset()}/quality-checks", **json_body(raw))
    assert refused(r, "body")["type"] in {"json_invalid", "float_type", "finite_number"}
    assert not bus.sent


@pytest.mark.parametrize("number", [2**63, -(2**63) - 1, 2**64, 10**30])
async def test_integers_beyond_64_bits_in_json_values_are_refused(
    client: httpx.AsyncClient, bus: Bus, number: int
) -> None:
    r = await client.post(DATASETS, json={"name": "ok", "metadata": {"n": {"deep": [number]}}})
    assert "64 bits" in refused(r, "body", "metadata", "n")["msg"]
    r = await client.put(f"{dataset()}/metadata/n", json={"value": number})
    refused(r, "body", "value")
    assert not bus.sent


async def test_a_number_of_thousands_of_digits_is_a_422_not_a_500(client: httpx.AsyncClient) -> None:
    r = await client.put(f"{dataset()}/metadata/n", **json_body(b'{"value": ' + b"9" * 5000 + b"}"))
    refused(r, "body")


async def test_json_nested_beyond_any_parser_is_a_422_not_a_500(client: httpx.AsyncClient) -> None:
    deep = b"[" * 100_000 + b"]" * 100_000
    r = await client.put(f"{dataset()}/metadata/n", **json_body(b'{"value": ' + deep + b"}"))
    refused(r, "body")


def nested(depth: int) -> Any:
    value: Any = "leaf"
    for i in range(depth):
        value = {f"level{i}": value} if i % 2 else [value]
    return value


async def test_json_values_are_bounded_in_depth_values_and_entries(client: httpx.AsyncClient) -> None:
    r = await client.put(f"{dataset()}/metadata/n", json={"value": nested(inputs.JSON_DEPTH_MAX + 1)})
    assert "nest" in refused(r, "body", "value")["msg"]
    r = await client.put(f"{dataset()}/metadata/n", json={"value": list(range(inputs.JSON_VALUES_MAX))})
    refused(r, "body", "value")
    r = await client.put(f"{dataset()}/metadata/n", json={"value": ["x" * (inputs.JSON_TEXT_MAX // 16)] * 17})
    refused(r, "body", "value")
    r = await client.put(f"{dataset()}/metadata/n", json={"value": "x" * (inputs.JSON_TEXT_MAX + 1)})
    refused(r, "body", "value")
    many = {f"k{i}": i for i in range(inputs.METADATA_MAX + 1)}
    refused(await client.post(DATASETS, json={"name": "ok", "metadata": many}), "body", "metadata")


async def test_a_create_at_the_bounds_reaches_the_bus(client: httpx.AsyncClient, bus: Bus) -> None:
    body = {
        "name": "n" * inputs.NAME_MAX,
        "description": "d\n" * (inputs.TEXT_MAX // 2),
        "owner": "o" * inputs.NAME_MAX,
        "tags": [f"t{i}".ljust(inputs.TAG_MAX, "x") for i in range(50)],
        "metadata": {
            "deep": nested(inputs.JSON_DEPTH_MAX),
            "wide": list(range(inputs.JSON_VALUES_MAX - 1)),
            "numbers": [2**63 - 1, -(2**63), 1.5e308, -0.0],
            "unicode": "émoji \U0001f600 and \u00a0 are fine",
        },
    }
    r = await client.post(DATASETS, json=body)
    assert r.status_code == 201, r.text
    (sent,) = bus.sent
    assert sent.payload["metadata"]["numbers"] == [2**63 - 1, -(2**63), 1.5e308, -0.0]


# ---- query parameters --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "name"),
    [
        (DATASETS, "owner"),
        (DATASETS, "tag"),
        ("/api/v1/incidents", "assignee"),
        ("/api/v1/search/datasets", "q"),
        ("/api/v1/search/datasets", "owner"),
        ("/api/v1/search/datasets", "tag"),
        ("/api/v1/search/incidents", "q"),
        ("/api/v1/search/incidents", "assignee"),
    ],
)
async def test_nul_in_a_filter_is_refused_before_the_read_models(
    client: httpx.AsyncClient, path: str, name: str
) -> None:
    refused(await client.get(path, params={name: "a\x00b"}), "query", name)


async def test_a_lone_surrogate_in_a_query_parameter_is_a_422_that_renders(client: httpx.AsyncClient) -> None:
    # %ED%A0%80 is U+D800 in UTF-8 form: Starlette would make it U+FFFD silently
    error = refused(await client.get(f"{DATASETS}?owner=%ED%A0%80"), "query", "owner")
    assert error["type"] == "string_unicode"
    refused(await client.get("/api/v1/search/datasets?q=%FF"), "query", "q")


async def test_a_lone_surrogate_in_a_path_is_a_422(client: httpx.AsyncClient) -> None:
    refused(await client.put(f"{dataset()}/metadata/%ED%A0%80", json={"value": 1}), "path")


async def test_over_long_filters_are_refused(client: httpx.AsyncClient) -> None:
    refused(await client.get(DATASETS, params={"owner": "o" * 201}), "query", "owner")
    refused(await client.get("/api/v1/search/datasets", params={"q": "w" * 1001}), "query", "q")


@pytest.mark.parametrize(
    "at",
    [
        "0001-01-01T00:00:00+05:00",  # before 0001-01-01 in UTC
        "9999-12-31T23:59:59-05:00",  # after 9999-12-31 in UTC
        "2026-01-01T00:00:00",  # no zone
        "not a date",
    ],
)
async def test_cursors_decoding_to_instants_postgresql_cannot_take_are_refused(
    client: httpx.AsyncClient, at: str
) -> None:
    for path in (DATASETS, "/api/v1/incidents"):
        r = await client.get(path, params={"cursor": cursor(at)})
        assert r.json()["field"] == "cursor"
        refused(r, "query", "cursor")


@pytest.mark.parametrize(
    "at", ["0001-01-01T00:00:00+05:00", "9999-12-31T23:59:59-05:00", "2026-01-01T00:00:00", "99999-01-01"]
)
async def test_as_of_out_of_range_is_refused(client: httpx.AsyncClient, at: str) -> None:
    refused(await client.get(dataset(), params={"as_of": at}), "query", "as_of")
    refused(await client.get(f"/api/v1/incidents/{uuid.uuid4()}", params={"as_of": at}), "query", "as_of")


@pytest.mark.parametrize("version", [0, 2**31, 2**63, 2**64])
async def test_as_of_version_must_fit_an_int(client: httpx.AsyncClient, version: int) -> None:
    refused(await client.get(dataset(), params={"as_of_version": version}), "query", "as_of_version")


# ---- position tokens ---------------------------------------------------------------------------

HOSTILE_TOKENS = {
    "partition beyond int32": token({TOPIC: {str(2**31): 1}}),
    "offset beyond int64": token({TOPIC: {"0": 2**63}}),
    "negative offset": token({TOPIC: {"0": -1}}),
    "float offset": token({TOPIC: {"0": 1.5}}),
    "non-canonical partition": token({TOPIC: {"01": 1}}),
    "bad topic": token({"a topic\x00": {"0": 1}}),
    "too many partitions": token({TOPIC: {str(p): 0 for p in range(MAX_TOKEN_PARTITIONS + 1)}}),
    "too long": "A" * (MAX_TOKEN_CHARS + 1),
    "not base64": "e30\x00",
}


@pytest.mark.parametrize("raw", HOSTILE_TOKENS.values(), ids=HOSTILE_TOKENS.keys())
def test_tokens_out_of_bounds_are_invalid(raw: str) -> None:
    with pytest.raises(InvalidToken):
        PositionToken.decode(raw)


def test_tokens_at_the_bounds_decode() -> None:
    offsets = {TOPIC: {2**31 - 1: 2**63 - 1, 0: 0}}
    assert PositionToken.decode(PositionToken(offsets).encode()).offsets == offsets


@pytest.mark.parametrize("raw", HOSTILE_TOKENS.values(), ids=HOSTILE_TOKENS.keys())
async def test_hostile_tokens_are_refused_on_queries_and_streams(client: httpx.AsyncClient, raw: str) -> None:
    refused(await client.get(dataset(), params={"consistent_with": raw}), "query", "consistent_with")
    refused(await client.get(DATASETS, params={"consistent_with": raw}), "query", "consistent_with")
    if "\x00" not in raw:  # no HTTP client sends a NUL in a header
        r = await client.get(dataset(), headers={"X-Consistency-Token": raw})
        refused(r, "header", "x-consistency-token")
        r = await client.get("/api/v1/events/stream", headers={"Last-Event-ID": raw})
        refused(r, "header", "last-event-id")
    refused(await client.get("/api/v1/events/stream", params={"from": raw}), "query", "from")
    r = await client.get(f"{dataset()}/stream", params={"from": raw})
    refused(r, "query", "from")


# ---- headers -------------------------------------------------------------------------------------

COMMAND_HEADERS = ["Idempotency-Key", "If-Match", "X-Correlation-Id", "traceparent"]


@pytest.mark.parametrize("name", COMMAND_HEADERS)
@pytest.mark.parametrize("value", ["", "   "])
async def test_an_empty_command_header_is_an_error_not_an_absence(
    client: httpx.AsyncClient, bus: Bus, name: str, value: str
) -> None:
    r = await client.post(DATASETS, json={"name": "ok"}, headers={name: value})
    refused(r, "header", name.lower())
    assert not bus.sent


@pytest.mark.parametrize("name", ["If-None-Match", "X-Consistency-Token"])
async def test_an_empty_read_header_is_an_error_not_an_absence(client: httpx.AsyncClient, name: str) -> None:
    refused(await client.get(dataset(), headers={name: ""}), "header", name.lower())


async def test_an_empty_last_event_id_is_an_error(client: httpx.AsyncClient) -> None:
    r = await client.get("/api/v1/events/stream", headers={"Last-Event-ID": ""})
    refused(r, "header", "last-event-id")


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("Idempotency-Key", "k" * 201),
        ("X-Correlation-Id", "c" * 201),
        ("If-Match", '"1"' * 400),
        ("traceparent", "00-abc-01"),
        ("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-and-more"),
        ("X-Correlation-Id", "tab\there"),
    ],
)
async def test_over_long_or_malformed_headers_are_refused_not_truncated(
    client: httpx.AsyncClient, bus: Bus, name: str, value: str
) -> None:
    r = await client.post(DATASETS, json={"name": "ok"}, headers={name: value})
    refused(r, "header", name.lower())
    assert not bus.sent


async def test_valid_headers_reach_the_command_and_actor_and_tenant_come_from_the_token(
    client: httpx.AsyncClient, bus: Bus
) -> None:
    trace = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    # X-Actor and X-Tenant are what a client could claim: they are not read
    headers = {"Idempotency-Key": " k1 ", "X-Actor": "mallory", "X-Tenant": "evil", "traceparent": trace}
    r = await client.post(DATASETS, json={"name": "ok"}, headers=headers)
    assert r.status_code == 201, r.text
    (sent,) = bus.sent
    assert (sent.command_id, sent.actor, sent.tenant) == ("k1", "tester", "acme")
    # the command continues the caller's trace from the request's own span (a child of theirs)
    version, trace_id, span_id, flags = sent.traceparent.split("-")
    assert (version, trace_id, flags) == ("00", "0af7651916cd43dd8448eb211c80319c", "01")
    assert span_id != "b7ad6b7169203331"
    assert sent.correlation_id == "k1"


async def test_the_if_match_format_error_keeps_its_shape(client: httpx.AsyncClient) -> None:
    r = await client.post(f"{dataset()}/archive", json={}, headers={"If-Match": "abc"})
    assert (r.status_code, r.json()["field"]) == (422, "If-Match")


# ---- path parameters -------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["a%00b", "tab%09key"])
async def test_a_metadata_key_in_the_path_is_one_line_of_text(
    client: httpx.AsyncClient, bus: Bus, key: str
) -> None:
    refused(await client.put(f"{dataset()}/metadata/{key}", json={"value": 1}), "path", "key")
    refused(await client.delete(f"{dataset()}/metadata/{key}"), "path", "key")
    assert not bus.sent


# ---- the 500 that still happens ----------------------------------------------------------------


async def test_an_unexpected_error_is_a_logged_500_without_internals(
    app: FastAPI, client: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    @app.get("/test-only/boom")
    async def boom() -> None:
        raise RuntimeError("secret internals: password=hunter2")

    with caplog.at_level(logging.ERROR, logger="api.errors"):
        given = await client.get("/test-only/boom", headers={"X-Correlation-Id": "corr-42"})
        generated = await client.get("/test-only/boom")
    for r in (given, generated):
        assert r.status_code == 500
        body = r.json()
        assert set(body) == {"error", "detail", "correlation_id"}
        assert body["error"] == "internal_error"
        for internal in ("secret", "RuntimeError", "hunter2", "Traceback"):
            assert internal not in r.text
        assert r.headers["x-correlation-id"] == body["correlation_id"]
    assert given.json()["correlation_id"] == "corr-42"
    assert str(uuid.UUID(generated.json()["correlation_id"])) == generated.json()["correlation_id"]
    logged = [rec for rec in caplog.records if rec.name == "api.errors"]
    assert [getattr(rec, "correlation_id", None) for rec in logged] == [
        "corr-42",
        generated.json()["correlation_id"],
    ]
    assert all(rec.exc_info is not None for rec in logged)


# ---- rendering and documentation -----------------------------------------------------------------


def test_validation_errors_never_echo_and_always_render() -> None:
    errors = [
        {
            "loc": ("body", "\ud800", 3),
            "msg": "bad \udc00",
            "type": "x",
            "input": "\ud800",
            "ctx": {"e": object()},
        }
    ]
    (rendered,) = inputs.validation_errors(errors)
    assert rendered == {"loc": ["body", "\ufffd", 3], "msg": "bad \ufffd", "type": "x"}
    assert orjson.loads(orjson.dumps(rendered)) == rendered


async def test_the_openapi_document_states_the_rules(client: httpx.AsyncClient) -> None:
    spec = (await client.get("/openapi.json")).json()
    register = spec["components"]["schemas"]["RegisterDatasetRequest"]["properties"]
    assert (register["name"]["maxLength"], register["name"]["pattern"]) == (200, inputs.LINE_PATTERN)
    assert register["description"]["pattern"] == inputs.TEXT_PATTERN
    assert register["metadata"]["propertyNames"]["pattern"] == inputs.LINE_PATTERN
    assert register["metadata"]["maxProperties"] == inputs.METADATA_MAX
    params = {
        (p["in"], p["name"]): p["schema"] for p in spec["paths"]["/api/v1/datasets"]["post"]["parameters"]
    }
    assert params[("header", "idempotency-key")]["anyOf"][0]["minLength"] == 1
    assert ("header", "x-actor") not in params
    assert params[("header", "traceparent")]["anyOf"][0]["pattern"] == inputs.TRACEPARENT
    reads = {
        p["name"]: p["schema"] for p in spec["paths"]["/api/v1/datasets/{dataset_id}"]["get"]["parameters"]
    }
    assert reads["as_of_version"]["anyOf"][0]["maximum"] == 2**31 - 1
    assert reads["consistent_with"]["anyOf"][0]["maxLength"] == MAX_TOKEN_CHARS
    assert "if-none-match" in reads
