"""The read side on real Kafka, PostgreSQL and Faust workers: projections and queries."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import datetime
from pathlib import Path

import asyncpg
import httpx
import orjson
import pytest

from api.changes import ChangeFollower
from api.rendered import RenderedReads
from projections.changes import channel, notify_applied
from projections.db import create_pool, schema_name
from projections.events import Record
from projections.projector import Projector
from projections.registry import PROJECTIONS
from projections.search import SearchProjection
from shared_kernel import kafka
from shared_kernel.avro import AvroCodec
from shared_kernel.settings import Settings
from shared_kernel.topics import Topics
from tests.integration.harness import WriteSide, read_records

pytestmark = pytest.mark.asyncio(loop_scope="session")


@pytest.fixture(scope="module")
async def side(settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[WriteSide]:
    ws = await WriteSide.everything(settings, tmp_path_factory.mktemp("read-side"))
    yield ws
    ws.stop()


async def _register(client: httpx.AsyncClient, **body: object) -> dict[str, str]:
    r = await client.post(
        "/api/v1/datasets",
        json={"name": "Weather", "description": "Hourly surface observations", "owner": "climate", **body},
        headers={"Idempotency-Key": str(uuid.uuid4())},
    )
    assert r.status_code == 201, r.text
    return dict(r.json())


async def test_a_query_with_the_commands_token_sees_the_change(client: httpx.AsyncClient) -> None:
    created = await _register(client, tags=["Weather", "hourly"])
    r = await client.get(f"/api/v1/datasets/{created['id']}", params={"consistent_with": created["position"]})
    assert r.status_code == 200, r.text
    assert r.headers["etag"] == '"1"'
    assert r.json()["tags"] == ["weather", "hourly"]

    r = await client.put(f"/api/v1/datasets/{created['id']}/metadata/rows", json={"value": {"n": 42}})
    assert r.status_code == 200, r.text
    token = r.json()["position"]
    r = await client.get(f"/api/v1/datasets/{created['id']}", headers={"X-Consistency-Token": token})
    assert r.status_code == 200
    assert r.json()["metadata"] == {"rows": {"n": 42}}
    assert r.json()["version"] == 2

    r = await client.get(f"/api/v1/datasets/{created['id']}/events", params={"consistent_with": token})
    types = [e["event_type"] for e in r.json()["items"]]
    assert types == ["datasets.DatasetRegistered", "datasets.MetadataSet"]


async def test_incident_filters_and_cursor_pages_are_complete(client: httpx.AsyncClient) -> None:
    assignee = f"agent-{uuid.uuid4().hex[:6]}"
    token = ""
    opened = set()
    for i in range(30):
        r = await client.post("/api/v1/incidents", json={"title": f"disk {i}", "priority": "high"})
        assert r.status_code == 201, r.text
        incident = r.json()
        r = await client.post(f"/api/v1/incidents/{incident['id']}/assign", json={"assignee": assignee})
        assert r.status_code == 200, r.text
        token = r.json()["position"] if not token else _merge(token, r.json()["position"])
        opened.add(incident["id"])
    seen: list[str] = []
    cursor = None
    while True:
        params: dict[str, str | int] = {"assignee": assignee, "limit": 7, "consistent_with": token}
        if cursor:
            params["cursor"] = cursor
        page = (await client.get("/api/v1/incidents", params=params)).json()
        seen += [i["id"] for i in page["items"]]
        assert all(i["assignee"] == assignee and i["priority"] == "high" for i in page["items"])
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert len(seen) == len(set(seen)) == 30
    assert set(seen) == opened


def _merge(a: str, b: str) -> str:
    from shared_kernel.position import PositionToken

    return PositionToken.decode(a).merge(PositionToken.decode(b)).encode()


async def test_bad_tokens_and_unknown_ids_get_clear_errors(client: httpx.AsyncClient) -> None:
    r = await client.get(f"/api/v1/datasets/{uuid.uuid4()}", params={"consistent_with": "not-a-token"})
    assert r.status_code == 422
    assert r.json()["detail"][0]["loc"] == ["query", "consistent_with"]
    r = await client.get(f"/api/v1/datasets/{uuid.uuid4()}")
    assert r.status_code == 404
    r = await client.get("/api/v1/datasets", params={"cursor": "garbage"})
    assert r.status_code == 422


async def test_a_poison_event_is_dead_lettered_and_later_events_still_apply(
    side: WriteSide, client: httpx.AsyncClient
) -> None:
    topics = Topics(side.settings.topic_prefix)
    producer = kafka.producer(side.settings)
    await producer.start()
    try:
        await producer.send_and_wait(topics.events("datasets"), b"\x00garbage", key=b"poison", partition=0)
    finally:
        await producer.stop()
    # later events, on every partition (one of them after the poison in partition 0)
    tokens = [(await _register(client))["position"] for _ in range(8)]
    token = tokens[0]
    for t in tokens[1:]:
        token = _merge(token, t)
    r = await client.get("/api/v1/datasets", params={"consistent_with": token, "limit": 500})
    assert r.status_code == 200

    admin = (await client.get("/api/v1/admin/projections")).json()["projections"]
    assert admin["datasets"]["dead_lettered"] >= 1
    assert "cannot decode" in admin["datasets"]["last_error"]
    dead = await _read_all(side.settings, topics.dlq("datasets"))
    assert any(d.value == b"\x00garbage" for d in dead)


async def _read_all(settings: Settings, topic: str) -> list[Record]:
    return [
        Record(r.topic, r.partition, r.offset, r.key, r.value, list(r.headers), r.timestamp)
        for r in await read_records(settings, [topic])
    ]


async def test_the_same_events_delivered_twice_leave_identical_rows(
    side: WriteSide, client: httpx.AsyncClient, tmp_path: Path
) -> None:
    created = await _register(client)
    await client.post(f"/api/v1/datasets/{created['id']}/versions", json={"version": "1.0.0"})
    r = await client.post(
        f"/api/v1/datasets/{created['id']}/quality-checks",
        json={"metric": "completeness", "value": 0.99, "threshold": 0.95},
    )
    quality = await client.get(
        f"/api/v1/datasets/{created['id']}/quality", params={"consistent_with": r.json()["position"]}
    )
    assert quality.json()["summary"]["checks"] == 1
    searched = await client.get("/api/v1/search/datasets", params={"consistent_with": r.json()["position"]})
    assert searched.status_code == 200

    settings = side.settings
    topics = Topics(settings.topic_prefix)
    records = await _read_all(settings, topics.events("datasets"))
    records = [r for r in records if r.value and r.value[:2] == b"\xc3\x01"]  # skip the poison, if any
    pool = await create_pool(settings)
    producer = kafka.producer(settings)
    await producer.start()
    try:

        async def checksum(conn: asyncpg.Connection) -> tuple[str, str]:
            return (
                await conn.fetchval("SELECT md5(string_agg(d::text, '|' ORDER BY id)) FROM datasets d"),
                await conn.fetchval(
                    "SELECT md5(string_agg(q::text, '|' ORDER BY dataset_id, version)) FROM quality_metrics q"
                ),
            )

        search = PROJECTIONS["datasets_search"]
        await search.open(settings)

        async def documents() -> str:
            assert isinstance(search, SearchProjection)
            assert search.client is not None
            found = await search.client.search(
                index=search.physical,
                body={"query": {"match_all": {}}, "sort": [{"id": "asc"}], "size": 10_000, "version": True},
            )
            hits = [(h["_id"], h["_version"], h["_source"]) for h in found["hits"]["hits"]]
            assert any(h[0] == created["id"] and h[2]["latest_version"] == "1.0.0" for h in hits)
            return hashlib.md5(orjson.dumps(hits, option=orjson.OPT_SORT_KEYS)).hexdigest()

        async with pool.acquire() as conn:
            before = (*await checksum(conn), await documents())
        admin = (await client.get("/api/v1/admin/projections")).json()["projections"]
        dead_before = admin["datasets_search"]["dead_lettered"]
        codec = AvroCodec.from_directory()
        for name in ("datasets", "quality_metrics", "datasets_search"):
            projector = Projector(PROJECTIONS[name], pool, producer, codec, topics)
            await projector.handle(records)  # everything again, in one batch
            await projector.handle(records[len(records) // 2 :])  # and a tail again
        async with pool.acquire() as conn:
            after = (*await checksum(conn), await documents())
            schema = await conn.fetchval("SELECT current_schema()")
        assert schema == schema_name(settings)
        assert before == after
        assert before[0] is not None
        assert before[1] is not None
        admin = (await client.get("/api/v1/admin/projections")).json()["projections"]
        assert admin["datasets_search"]["dead_lettered"] == dead_before  # redelivery is no error
    finally:
        await search.close()
        await producer.stop()
        await pool.close()


async def test_search_finds_a_dataset_by_a_word_of_its_description(client: httpx.AsyncClient) -> None:
    word = f"zx{uuid.uuid4().hex[:8]}"
    found = await _register(client, description=f"Sea surface temperature from {word} buoys", tags=["ocean"])
    other = await _register(client, name=f"Archived {word} series")
    r = await client.post(f"/api/v1/datasets/{other['id']}/archive", json={"reason": "superseded"})
    assert r.status_code == 200, r.text
    token = _merge(found["position"], r.json()["position"])

    r = await client.get("/api/v1/search/datasets", params={"q": word, "consistent_with": token})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["total"] == 2
    assert body["items"][0]["id"] == other["id"]  # a match in the name ranks first
    assert body["counts"]["status"] == {"active": 1, "archived": 1}
    hit = next(i for i in body["items"] if i["id"] == found["id"])
    assert f"<em>{word}</em>" in hit["highlights"]["description"][0]

    r = await client.get("/api/v1/search/datasets", params={"q": word, "status": "active"})
    assert [i["id"] for i in r.json()["items"]] == [found["id"]]
    assert r.json()["counts"]["status"] == {"active": 1, "archived": 1}  # facets ignore the status filter
    r = await client.get("/api/v1/search/datasets", params={"q": word, "tag": "Ocean"})
    assert [i["id"] for i in r.json()["items"]] == [found["id"]]
    r = await client.get("/api/v1/search/datasets", params={"q": f"{word} -buoys"})
    assert [i["id"] for i in r.json()["items"]] == [other["id"]]
    r = await client.get("/api/v1/search/datasets", params={"q": word, "limit": 101})
    assert r.status_code == 422
    assert r.json()["detail"][0]["loc"] == ["query", "limit"]
    r = await client.get("/api/v1/search/datasets", params={"q": word, "offset": 9990, "limit": 20})
    assert r.status_code == 422


async def test_search_finds_an_incident_by_its_comments(client: httpx.AsyncClient) -> None:
    word = f"qv{uuid.uuid4().hex[:8]}"
    r = await client.post("/api/v1/incidents", json={"title": "Checkout latency", "priority": "critical"})
    incident = r.json()
    r = await client.post(
        f"/api/v1/incidents/{incident['id']}/comments",
        json={"author": "sre", "body": f"Root cause: the {word} cache was cold"},
    )
    assert r.status_code == 200, r.text
    r = await client.get(
        "/api/v1/search/incidents", params={"q": word, "consistent_with": r.json()["position"]}
    )
    assert r.status_code == 200, r.text
    (hit,) = r.json()["items"]
    assert hit["id"] == incident["id"]
    assert hit["priority"] == "critical"
    assert hit["comments"] == 1
    assert f"<em>{word}</em>" in hit["highlights"]["comment_texts"][0]


async def test_a_temporal_query_returns_the_state_at_a_version_or_an_instant(
    client: httpx.AsyncClient,
) -> None:
    created = await _register(client, metadata={"rows": 1})
    dataset = f"/api/v1/datasets/{created['id']}"
    r2 = await client.put(f"{dataset}/metadata/rows", json={"value": 2})
    r3 = await client.post(f"{dataset}/versions", json={"version": "2.0.0"})
    r4 = await client.post(f"{dataset}/archive", json={"reason": "replaced"})
    assert [r.status_code for r in (r2, r3, r4)] == [200, 200, 200]
    token = r4.json()["position"]

    at2 = await client.get(dataset, params={"as_of_version": 2, "consistent_with": token})
    assert at2.status_code == 200, at2.text
    assert at2.headers["etag"] == '"2"'
    state = at2.json()
    assert (state["version"], state["metadata"], state["latest_version"], state["status"]) == (
        2,
        {"rows": 2},
        None,
        "active",
    )
    now = (await client.get(dataset, params={"consistent_with": token})).json()
    assert (now["version"], now["status"], now["latest_version"]) == (4, "archived", "2.0.0")

    # an instant between version 3 and version 4
    history = (await client.get(f"{dataset}/events")).json()["items"]
    at = history[2]["occurred_at"]
    r = await client.get(dataset, params={"as_of": at})
    assert (r.json()["version"], r.json()["latest_version"], r.json()["status"]) == (3, "2.0.0", "active")
    before = await client.get(dataset, params={"as_of": "2000-01-01T00:00:00Z"})
    assert before.status_code == 404
    beyond = await client.get(dataset, params={"as_of_version": 5})
    assert beyond.status_code == 404
    assert beyond.json()["current_version"] == 4
    naive = await client.get(dataset, params={"as_of": "2026-01-01T00:00:00"})
    assert naive.status_code == 422
    assert naive.json()["detail"][0]["loc"] == ["query", "as_of"]


async def test_filters_and_pages_over_a_thousand_incidents_are_correct_and_complete(
    client: httpx.AsyncClient,
) -> None:
    priorities = ["low", "medium", "high", "critical"]
    assignee = f"team-{uuid.uuid4().hex[:6]}"
    tokens: list[str] = []
    created: dict[str, dict[str, str | None]] = {}
    gate = asyncio.Semaphore(32)

    async def open_one(i: int) -> None:
        async with gate:
            r = await client.post(
                "/api/v1/incidents", json={"title": f"bulk {i}", "priority": priorities[i % 4]}
            )
            assert r.status_code == 201, r.text
            ident = r.json()["id"]
            state: dict[str, str | None] = {"priority": priorities[i % 4], "assignee": None, "status": "open"}
            if i % 3 == 0:
                r = await client.post(f"/api/v1/incidents/{ident}/assign", json={"assignee": assignee})
                assert r.status_code == 200, r.text
                state["assignee"] = assignee
            if i % 5 == 0:
                r = await client.post(f"/api/v1/incidents/{ident}/status", json={"status": "in_progress"})
                assert r.status_code == 200, r.text
                state["status"] = "in_progress"
            created[ident] = state
            tokens.append(r.json()["position"])

    await asyncio.gather(*(open_one(i) for i in range(1000)))
    token = tokens[0]
    for t in tokens[1:]:
        token = _merge(token, t)

    async def pages(order: str, limit: int, **filters: str) -> list[dict[str, str]]:
        items: list[dict[str, str]] = []
        cursor = None
        while True:
            params: dict[str, str | int] = {
                "limit": limit,
                "order": order,
                "consistent_with": token,
                **filters,
            }
            if cursor:
                params["cursor"] = cursor
            r = await client.get("/api/v1/incidents", params=params)
            assert r.status_code == 200, r.text
            items += r.json()["items"]
            cursor = r.json()["next_cursor"]
            if not cursor:
                return items

    everything = await pages("asc", 500)
    ids = [i["id"] for i in everything]
    assert len(ids) == len(set(ids))
    assert set(created) <= set(ids)
    keys = [(datetime.fromisoformat(i["opened_at"]), i["id"]) for i in everything]
    assert keys == sorted(keys)

    for filters in (
        {"assignee": assignee},
        {"assignee": assignee, "priority": "high"},
        {"status": "in_progress"},
    ):
        expected = {ident for ident, s in created.items() if all(s[k] == v for k, v in filters.items())}
        for order, limit in (("asc", 97), ("desc", 250)):
            got = await pages(order, limit, **filters)
            got_ids = [i["id"] for i in got]
            assert len(got_ids) == len(set(got_ids))
            assert all(all(i[k] == v for k, v in filters.items()) for i in got)
            mine = {g for g in got_ids if g in created}
            assert mine == expected, (filters, order, len(mine), len(expected))
            if "assignee" in filters:
                assert set(got_ids) == expected  # no other test uses this assignee


# ---- the API's memory of rendered reads (api.readcache) ----------------------------------


async def _until_cached(client: httpx.AsyncClient, path: str, **headers: str) -> httpx.Response:
    """Read `path` until the answer comes from the API's memory: the first reads go to
    PostgreSQL until the change follower has seen the batch that wrote the row."""
    deadline = time.monotonic() + 10
    while True:
        r = await client.get(path, headers=headers)
        assert r.status_code == 200, r.text
        if r.headers.get("x-read-cache") == "hit" or time.monotonic() > deadline:
            return r
        await asyncio.sleep(0.02)


async def test_repeated_reads_come_from_memory_and_a_change_replaces_them(client: httpx.AsyncClient) -> None:
    created = await _register(client)
    path = f"/api/v1/datasets/{created['id']}"
    r = await client.get(path, headers={"If-None-Match": '"1"', "X-Consistency-Token": created["position"]})
    assert (r.status_code, r.headers["etag"], r.content) == (304, '"1"', b"")  # conditional, by the route
    first = await client.get(path, params={"consistent_with": created["position"]})
    assert first.status_code == 200
    cached = await _until_cached(client, path)
    assert cached.headers["x-read-cache"] == "hit"
    assert cached.content == first.content
    assert cached.headers["etag"] == '"1"'
    assert cached.headers["content-type"] == first.headers["content-type"]
    r = await client.get(path, headers={"If-None-Match": '"1"'})
    assert (r.status_code, r.headers["etag"], r.headers["x-read-cache"]) == (304, '"1"', "hit")

    r = await client.patch(path, json={"name": "Renamed"})
    assert r.status_code == 200, r.text
    token = r.json()["position"]
    for _ in range(3):  # from PostgreSQL or from memory: the change, never the old row
        after = await client.get(path, params={"consistent_with": token})
        assert (after.json()["name"], after.json()["version"], after.headers["etag"]) == ("Renamed", 2, '"2"')
    cached = await _until_cached(client, path, **{"X-Consistency-Token": token})
    assert cached.headers["x-read-cache"] == "hit"
    assert cached.json()["name"] == "Renamed"
    r = await client.get(path, headers={"If-None-Match": '"1"'})
    assert r.status_code == 200
    assert r.json()["version"] == 2
    stats = (await client.get("/api/v1/admin/read-cache")).json()
    assert stats["enabled"] is True
    assert stats["following_changes"] is True
    assert stats["hits"] >= 3
    assert 0 < stats["entries"] <= stats["max_entries"]
    old = await client.get(path, params={"as_of_version": 1})  # temporal reads are the route's
    assert old.json()["name"] == "Weather"
    assert "x-read-cache" not in old.headers


async def test_a_lost_change_follower_forgets_what_it_kept(side: WriteSide) -> None:
    settings = side.settings.model_copy(update={"service_name": f"follower-{uuid.uuid4().hex[:6]}"})
    reads = RenderedReads(100)
    follower = ChangeFollower(settings, reads)
    running = asyncio.create_task(follower.run())
    conn = await asyncpg.connect(settings.postgres_dsn)
    try:
        await _until(lambda: follower.connected)
        k = ("datasets", str(uuid.uuid4()))

        async def change_it() -> None:
            await notify_applied(conn, channel(schema_name(settings)), "datasets", 1, {}, [k[1]])

        assert reads.keep(k, reads.lease(k), [], b"v1")
        await change_it()
        await _until(lambda: reads.get(k) is None)  # a change, through PostgreSQL's LISTEN

        assert reads.keep(k, reads.lease(k), [], b"v2")
        # the connection is lost, and PostgreSQL refuses new ones for a while
        follower.settings = settings.model_copy(update={"postgres_dsn": f"{settings.postgres_dsn}_gone"})
        killed = await conn.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = $1",
            f"{settings.service_name}:changes",
        )
        assert killed == 1
        await _until(lambda: not follower.connected)
        await change_it()  # nobody listens: this notification is lost
        follower.settings = settings
        await _until(lambda: follower.connected)
        assert reads.get(k) is None  # so what was kept is gone
    finally:
        running.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await running
        await conn.close()


async def _until(condition: Callable[[], bool], seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def test_reads_under_concurrent_changes_never_miss_a_write_nor_step_back(
    client: httpx.AsyncClient,
) -> None:
    datasets = []
    for _ in range(4):
        created = await _register(client)
        r = await client.get(
            f"/api/v1/datasets/{created['id']}", params={"consistent_with": created["position"]}
        )
        assert r.status_code == 200  # readers without a token start once it is there
        datasets.append(created["id"])
    latest = dict.fromkeys(datasets, 1)
    tokens = dict.fromkeys(datasets, "")
    hits = 0
    writing = True

    async def writer(ident: str, changes: int) -> None:
        for n in range(changes):
            r = await client.patch(f"/api/v1/datasets/{ident}", json={"description": f"change {n}"})
            assert r.status_code == 200, r.text
            version, token = r.json()["version"], r.json()["position"]
            latest[ident], tokens[ident] = version, token  # one writer per dataset
            read = await client.get(f"/api/v1/datasets/{ident}", headers={"X-Consistency-Token": token})
            assert read.json()["version"] >= version  # its own write, from memory or not

    async def reader(offset: int) -> None:
        nonlocal hits
        seen = dict.fromkeys(datasets, 0)  # what this reader saw (its reads are in order)
        i = offset
        while writing:
            ident = datasets[i % len(datasets)]
            i += 1
            r = await client.get(f"/api/v1/datasets/{ident}")
            assert r.status_code == 200, r.text
            version = r.json()["version"]
            assert version >= seen[ident], f"{ident} stepped back from {seen[ident]} to {version}"
            seen[ident] = version
            hits += r.headers.get("x-read-cache") == "hit"

    readers = [asyncio.create_task(reader(k)) for k in range(4)]
    try:
        await asyncio.gather(*(writer(ident, 12) for ident in datasets))
    finally:
        writing = False
        await asyncio.gather(*readers)
    assert hits > 0  # the memory answered some of them
    for ident in datasets:
        final = await _until_cached(
            client, f"/api/v1/datasets/{ident}", **{"X-Consistency-Token": tokens[ident]}
        )
        assert final.json()["version"] == latest[ident] == 13
        assert final.json()["description"] == "change 11"
