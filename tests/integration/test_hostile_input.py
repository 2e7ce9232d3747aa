"""Hostile input end to end: what the edge refuses reaches neither Kafka nor any read
model, and what it accepts at its bounds every projection applies (no dead letter)."""

from __future__ import annotations

import base64
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson
import pytest

from api import inputs
from shared_kernel.settings import Settings
from shared_kernel.topics import Topics
from tests.integration.harness import WriteSide, read_events

pytestmark = pytest.mark.asyncio(loop_scope="session")


@pytest.fixture(scope="module")
async def side(settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[WriteSide]:
    ws = await WriteSide.everything(settings, tmp_path_factory.mktemp("hostile-input"))
    yield ws
    ws.stop()


async def _no_dead_letters(client: httpx.AsyncClient) -> None:
    r = await client.get("/api/v1/admin/projections")
    assert r.status_code == 200, r.text
    dead = {name: p["last_error"] for name, p in r.json()["projections"].items() if p["dead_lettered"]}
    assert not dead


def _nested(depth: int, key: str) -> Any:
    """Arrays and objects nested `depth` deep, objects keyed by long keys."""
    value: Any = "leaf \U0001f600"
    for i in range(depth):
        value = {f"{i:02d}{key}"[: inputs.NAME_MAX]: value} if i % 2 else [value, i]
    return value


HOSTILE: list[dict[str, Any]] = [
    {"json": {"name": "nul\x00name"}},
    {"json": {"name": "ok", "tags": ["nul\x00tag"]}},
    {"json": {"name": "ok", "metadata": {"nul\x00key": 1}}},
    {"json": {"name": "ok", "metadata": {"k": {"deep": ["nul\x00value"]}}}},
    {"json": {"name": "ok", "metadata": {"k": 2**64}}},
    {"content": b'{"name": "\\ud800"}'},
    {"content": b'{"name": "ok", "metadata": {"k": NaN}}'},
    {"content": b'{"name": "ok", "metadata": {"k": 1e400}}'},
]


async def test_a_nul_laden_create_is_refused_and_reaches_nothing(
    side: WriteSide, client: httpx.AsyncClient
) -> None:
    ident = str(uuid.uuid4())
    keys = []
    for request in HOSTILE:
        key = f"hostile-{uuid.uuid4()}"
        keys.append(key)
        if "json" in request:
            r = await client.post(
                "/api/v1/datasets", json={"id": ident, **request["json"]}, headers={"Idempotency-Key": key}
            )
        else:
            raw = request["content"].replace(b"{", b'{"id": "' + ident.encode() + b'", ', 1)
            r = await client.post(
                "/api/v1/datasets",
                content=raw,
                headers={"Idempotency-Key": key, "content-type": "application/json"},
            )
        assert r.status_code == 422, r.text
        assert r.json()["detail"][0]["loc"][0] == "body"
    headers = {"X-Correlation-Id": "c" * 201}
    r = await client.post("/api/v1/datasets", json={"id": ident, "name": "x"}, headers=headers)
    assert (r.status_code, r.json()["detail"][0]["loc"]) == (422, ["header", "x-correlation-id"])

    # a command accepted after them: the log and the read models are past anything refused
    after = await client.post("/api/v1/datasets", json={"name": "after the hostile ones"})
    assert after.status_code == 201, after.text
    token = after.json()["position"]
    for path in (f"/api/v1/datasets/{ident}", f"/api/v1/datasets/{ident}/events"):
        r = await client.get(path, params={"consistent_with": token})
        assert r.status_code == 404, r.text
    found = await client.get("/api/v1/search/datasets", params={"q": "hostile", "consistent_with": token})
    assert found.status_code == 200, found.text
    assert ident not in {hit["id"] for hit in found.json()["items"]}
    events = await read_events(side.settings, ["datasets"])
    assert not [e for e in events if e["meta"].aggregate_id == ident or e["meta"].causation_id in keys]
    await _no_dead_letters(client)


async def test_a_create_at_the_bounds_is_applied_by_every_read_model(client: httpx.AsyncClient) -> None:
    ident = str(uuid.uuid4())
    wide = "\U0001f600"  # four bytes in UTF-8: the bounds are characters
    metadata = {f"{i:03d}".ljust(inputs.NAME_MAX, "k"): i for i in range(inputs.METADATA_MAX - 4)} | {
        "deepest": _nested(inputs.JSON_DEPTH_MAX, wide * inputs.NAME_MAX),
        "numbers": [2**63 - 1, -(2**63), 1.5e308, -2.5e-300, 0],
        "longest": "x" * inputs.JSON_TEXT_MAX,  # one string as long as a value may hold
        "unicode": "é\u00a0\u2028\ufeff",
    }
    body: dict[str, Any] = {
        "id": ident,
        "name": "Bounds " + wide * (inputs.NAME_MAX - 7),
        "description": (("gauges " + wide + "\n") * inputs.TEXT_MAX)[: inputs.TEXT_MAX - 3] + "end",
        "owner": wide * inputs.NAME_MAX,
        "tags": [f"{i:02d}".ljust(inputs.TAG_MAX, "\u00e9") for i in range(50)],
        "metadata": metadata,
    }
    headers = {
        "Idempotency-Key": "k" * inputs.NAME_MAX,
        "X-Correlation-Id": "c" * inputs.NAME_MAX,
        "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    }
    r = await client.post("/api/v1/datasets", json=body, headers=headers)
    assert r.status_code == 201, r.text
    token = r.json()["position"]

    got = await client.get(f"/api/v1/datasets/{ident}", params={"consistent_with": token})
    assert got.status_code == 200, got.text
    row = got.json()
    assert (row["name"], row["description"], row["owner"]) == (
        body["name"],
        body["description"],
        body["owner"],
    )
    assert row["tags"] == body["tags"]
    assert row["metadata"] == metadata
    history = await client.get(f"/api/v1/datasets/{ident}/events", params={"consistent_with": token})
    assert history.status_code == 200, history.text
    assert [e["event_type"] for e in history.json()["items"]] == ["datasets.DatasetRegistered"]
    found = await client.get(
        "/api/v1/search/datasets",
        params={"q": "gauges", "owner": body["owner"], "consistent_with": token},
    )
    assert found.status_code == 200, found.text
    assert [hit["id"] for hit in found.json()["items"]] == [ident]
    listed = await client.get("/api/v1/datasets", params={"owner": body["owner"], "tag": body["tags"][-1]})
    assert [item["id"] for item in listed.json()["items"]] == [ident]

    # and an incident at its bounds: title, description, comment
    r = await client.post(
        "/api/v1/incidents",
        json={"title": wide * inputs.NAME_MAX, "description": wide * inputs.TEXT_MAX, "source": "s" * 200},
    )
    assert r.status_code == 201, r.text
    incident = r.json()["id"]
    r = await client.post(
        f"/api/v1/incidents/{incident}/comments",
        json={"author": wide * inputs.NAME_MAX, "body": wide * inputs.TEXT_MAX},
    )
    assert r.status_code == 200, r.text
    got = await client.get(f"/api/v1/incidents/{incident}", params={"consistent_with": r.json()["position"]})
    assert got.status_code == 200, got.text
    searched = await client.get("/api/v1/search/incidents", params={"consistent_with": r.json()["position"]})
    assert searched.status_code == 200, searched.text
    await _no_dead_letters(client)


def _cursor(at: str) -> str:
    return base64.urlsafe_b64encode(orjson.dumps([at, str(uuid.uuid4())])).decode().rstrip("=")


async def test_hostile_reads_are_422_against_the_real_read_models(client: httpx.AsyncClient) -> None:
    ident = uuid.uuid4()
    for params, field in [
        ({"owner": "a\x00b"}, "owner"),
        ({"tag": "a\x00b"}, "tag"),
        ({"cursor": _cursor("0001-01-01T00:00:00+05:00")}, "cursor"),
        ({"cursor": _cursor("9999-12-31T23:59:59-05:00")}, "cursor"),
    ]:
        r = await client.get("/api/v1/datasets", params=params)
        assert r.status_code == 422, r.text
        assert r.json()["detail"][0]["loc"] == ["query", field]
    r = await client.get("/api/v1/incidents", params={"assignee": "\x00"})
    assert (r.status_code, r.json()["detail"][0]["loc"]) == (422, ["query", "assignee"])
    r = await client.get("/api/v1/search/incidents", params={"q": "\x00"})
    assert (r.status_code, r.json()["detail"][0]["loc"]) == (422, ["query", "q"])
    r = await client.get(f"/api/v1/datasets/{ident}", params={"as_of": "0001-01-01T00:00:00+05:00"})
    assert (r.status_code, r.json()["detail"][0]["loc"]) == (422, ["query", "as_of"])
    r = await client.get(f"/api/v1/datasets/{ident}", params={"as_of_version": 2**31})
    assert (r.status_code, r.json()["detail"][0]["loc"]) == (422, ["query", "as_of_version"])


async def test_a_stream_from_a_position_beyond_int64_is_refused_not_started(
    side: WriteSide, client: httpx.AsyncClient
) -> None:
    topic = Topics(side.settings.topic_prefix).events("datasets")
    for offsets in ({"0": 2**63}, {str(2**31): 1}):
        raw = base64.urlsafe_b64encode(orjson.dumps({topic: offsets})).decode().rstrip("=")
        r = await client.get("/api/v1/events/stream", params={"from": raw})
        assert (r.status_code, r.json()["detail"][0]["loc"]) == (422, ["query", "from"])
        r = await client.get("/api/v1/events/stream", headers={"Last-Event-ID": raw})
        assert (r.status_code, r.json()["detail"][0]["loc"]) == (422, ["header", "last-event-id"])
