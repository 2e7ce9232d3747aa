"""The read side on real Kafka, PostgreSQL and Faust workers: projections and queries."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import httpx
import pytest
from aiokafka import TopicPartition

from projections.db import create_pool, schema_name
from projections.events import Record
from projections.projector import Projector
from projections.registry import PROJECTIONS
from shared_kernel import kafka
from shared_kernel.avro import AvroCodec
from shared_kernel.settings import Settings
from shared_kernel.topics import Topics
from tests.integration.harness import WriteSide

pytestmark = pytest.mark.asyncio(loop_scope="session")


@pytest.fixture(scope="module")
async def side(settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[WriteSide]:
    ws = WriteSide.create(settings, tmp_path_factory.mktemp("read-side"))
    await ws.start_serving()
    for name in PROJECTIONS:
        ws.start_projector(name)
    await ws.wait_until_projected()
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
    consumer = kafka.consumer(settings)
    await consumer.start()
    out: list[Record] = []
    try:
        tps = [TopicPartition(topic, p) for p in range(settings.partitions)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        while any([await consumer.position(tp) < ends[tp] for tp in tps]):
            for records in (await consumer.getmany(timeout_ms=1000)).values():
                out += [
                    Record(r.topic, r.partition, r.offset, r.key, r.value, list(r.headers), r.timestamp)
                    for r in records
                ]
    finally:
        await consumer.stop()
    return out


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

        async with pool.acquire() as conn:
            before = await checksum(conn)
        codec = AvroCodec.from_directory()
        for name in ("datasets", "quality_metrics"):
            projector = Projector(PROJECTIONS[name], pool, producer, codec, topics)
            await projector.handle(records)  # everything again, in one batch
            await projector.handle(records[len(records) // 2 :])  # and a tail again
        async with pool.acquire() as conn:
            after = await checksum(conn)
            schema = await conn.fetchval("SELECT current_schema()")
        assert schema == schema_name(settings)
        assert before == after
        assert before[0] is not None
        assert before[1] is not None
    finally:
        await producer.stop()
        await pool.close()
