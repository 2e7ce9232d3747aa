"""One id, one context; and too large is a 413, never "try again": on real Kafka,
Redis, PostgreSQL, the command processor, the API and the events archive's projector."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import httpx
import pytest
from aiokafka import TopicPartition

from shared_kernel import kafka
from shared_kernel.settings import Settings
from shared_kernel.topics import Topics
from tests.auth import api_client
from tests.integration.harness import WriteSide, read_events, read_records

pytestmark = pytest.mark.asyncio(loop_scope="session")


@pytest.fixture(scope="module")
async def side(settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[WriteSide]:
    ws = WriteSide.create(settings, tmp_path_factory.mktemp("limits-and-ids"))
    await ws.start_serving()
    ws.start_projector("events")
    await ws.wait_until_projected()
    yield ws
    ws.stop()


async def _end_offsets(settings: Settings, topics: list[str]) -> dict[TopicPartition, int]:
    consumer = kafka.consumer(settings, isolation_level="read_uncommitted")
    await consumer.start()
    try:
        tps = [TopicPartition(t, p) for t in topics for p in range(settings.partitions)]
        return dict(await consumer.end_offsets(tps))
    finally:
        await consumer.stop()


async def _state_keys(settings: Settings, context: str) -> set[bytes]:
    """The keys on a context's state topic (committed records)."""
    records = await read_records(settings, [Topics(settings.topic_prefix).state(context)])
    return {r.key for r in records if r.key is not None}


def _too_large(r: httpx.Response) -> None:
    assert r.status_code == 413, r.text
    assert r.json()["error"] == "too_large"
    assert "retry-after" not in r.headers  # nothing to wait for


# ---- one id, one context ------------------------------------------------------------


async def test_a_dataset_and_an_incident_cannot_share_an_id(
    side: WriteSide, client: httpx.AsyncClient
) -> None:
    shared = str(uuid.uuid4())
    dataset = await client.post("/api/v1/datasets", json={"id": shared, "name": "Weather"})
    assert dataset.status_code == 201, dataset.text

    incident = await client.post("/api/v1/incidents", json={"id": shared, "title": "Disk full"})

    assert incident.status_code == 409, incident.text
    body = incident.json()
    assert body["error"] == "already_exists"
    assert body["extra"] == {"context": "datasets"}
    assert "datasets.Dataset" in body["detail"]
    # nothing of the incident is in Kafka: no event, no snapshot
    assert [
        e for e in await read_events(side.settings, ["incidents"]) if e["meta"].aggregate_id == shared
    ] == []
    assert shared.encode() not in await _state_keys(side.settings, "incidents")
    ours = [e for e in await read_events(side.settings, ["datasets"]) if e["meta"].aggregate_id == shared]
    assert [e["type"] for e in ours] == ["datasets.DatasetRegistered"]

    # the other way round too
    other = str(uuid.uuid4())
    first = await client.post("/api/v1/incidents", json={"id": other, "title": "Latency"})
    assert first.status_code == 201, first.text
    second = await client.post("/api/v1/datasets", json={"id": other, "name": "Rain"})
    assert (second.status_code, second.json()["extra"]) == (409, {"context": "incidents"})


async def test_the_history_and_the_past_of_an_id_of_another_context_are_404(
    client: httpx.AsyncClient,
) -> None:
    created = await client.post("/api/v1/datasets", json={"id": str(uuid.uuid4()), "name": "Weather"})
    assert created.status_code == 201, created.text
    ident, token = created.json()["id"], created.json()["position"]

    own = await client.get(f"/api/v1/datasets/{ident}/events", params={"consistent_with": token})
    assert own.status_code == 200, own.text
    assert [e["event_type"] for e in own.json()["items"]] == ["datasets.DatasetRegistered"]

    foreign = await client.get(f"/api/v1/incidents/{ident}/events", params={"consistent_with": token})
    assert (foreign.status_code, foreign.json()["error"]) == (404, "not_found")
    for past in ({"as_of_version": 1}, {"as_of": "2100-01-01T00:00:00Z"}):
        r = await client.get(f"/api/v1/incidents/{ident}", params={**past, "consistent_with": token})
        assert (r.status_code, r.json()["error"]) == (404, "not_found"), r.text
    unknown = await client.get(f"/api/v1/incidents/{uuid.uuid4()}", params={"as_of_version": 1})
    assert unknown.status_code == 404, unknown.text


# ---- too large ----------------------------------------------------------------------


async def test_a_5_mb_metadata_value_is_413_and_nothing_is_produced(
    side: WriteSide, client: httpx.AsyncClient
) -> None:
    created = await client.post("/api/v1/datasets", json={"name": "Weather"})
    assert created.status_code == 201, created.text
    ident = created.json()["id"]
    topics = Topics(side.settings.topic_prefix)
    watched = [topics.commands, topics.events("datasets"), topics.state("datasets")]
    before = await _end_offsets(side.settings, watched)

    by_length = await client.put(f"/api/v1/datasets/{ident}/metadata/blob", json={"value": "x" * 5_000_000})
    _too_large(by_length)
    assert by_length.json()["extra"]["max_bytes"] == side.settings.max_body_bytes

    async def chunked() -> AsyncIterator[bytes]:
        yield b'{"value": "'
        for _ in range(50):
            yield b"x" * 100_000
        yield b'"}'

    by_counting = await client.put(
        f"/api/v1/datasets/{ident}/metadata/blob",
        content=chunked(),
        headers={"content-type": "application/json"},
    )
    _too_large(by_counting)

    assert await _end_offsets(side.settings, watched) == before
    # the connection and the API are fine: the next command goes through
    ok = await client.put(f"/api/v1/datasets/{ident}/metadata/rows", json={"value": 1})
    assert (ok.status_code, ok.json()["version"]) == (200, 2)


# A metadata value of 65,536 characters of strings (api.inputs lets one hold 262,144).
PLAIN = ["x" * 4096] * 16
# The same in quotes: escaped once in the body and the event (2 bytes each) and once more in
# the snapshot, which holds the value's JSON text as a JSON string (4 bytes each, 262 kB).
QUOTES = ['"' * 4096] * 16


async def test_a_command_within_the_body_limit_but_over_kafkas_is_413_before_producing(
    side: WriteSide, tmp_path_factory: pytest.TempPathFactory
) -> None:
    # an API that reads bodies up to 8 MiB: the command envelope is the limit now
    generous = WriteSide(
        settings=side.settings,
        workdir=tmp_path_factory.mktemp("generous-api"),
        env={**side.env, "APP_MAX_BODY_BYTES": str(8 << 20)},
    )
    await generous.start_api()
    try:
        async with api_client(base_url=generous.api_url, timeout=30) as big:
            topics = Topics(side.settings.topic_prefix)
            before = await _end_offsets(side.settings, [topics.commands])
            metadata = {f"k{i}": PLAIN for i in range(30)}  # 2 MB, every value valid

            r = await big.post("/api/v1/datasets", json={"name": "Weather", "metadata": metadata})

            _too_large(r)
            assert r.json()["detail"].startswith("the command would be")
            assert await _end_offsets(side.settings, [topics.commands]) == before
    finally:
        generous.stop()


async def test_metadata_growing_the_snapshot_past_a_record_is_413_for_the_one_that_would_exceed(
    side: WriteSide, client: httpx.AsyncClient
) -> None:
    created = await client.post("/api/v1/datasets", json={"name": "Weather"})
    assert created.status_code == 201, created.text
    ident = created.json()["id"]

    answers = []
    for i in range(4):
        answers.append(await client.put(f"/api/v1/datasets/{ident}/metadata/k{i}", json={"value": QUOTES}))

    assert [r.status_code for r in answers[:3]] == [200, 200, 200], [r.text[:300] for r in answers]
    assert [r.json()["version"] for r in answers[:3]] == [2, 3, 4]
    refused = answers[3]
    _too_large(refused)
    body = refused.json()
    assert body["current_version"] == 4
    assert body["detail"].startswith(f"the state of datasets.Dataset {ident} after this command would be")
    assert body["extra"]["max_bytes"] == side.settings.kafka_max_message_bytes

    # a retry with the same key gets the same answer; the aggregate and the partition go on
    key = str(uuid.uuid4())
    for _ in range(2):
        again = await client.put(
            f"/api/v1/datasets/{ident}/metadata/k9", json={"value": QUOTES}, headers={"Idempotency-Key": key}
        )
        _too_large(again)
    renamed = await client.patch(f"/api/v1/datasets/{ident}", json={"name": "Climate"})
    assert (renamed.status_code, renamed.json()["version"]) == (200, 5)
    shrunk = await client.delete(f"/api/v1/datasets/{ident}/metadata/k0")
    assert (shrunk.status_code, shrunk.json()["version"]) == (200, 6)
    grown = await client.put(f"/api/v1/datasets/{ident}/metadata/k3", json={"value": QUOTES})
    assert (grown.status_code, grown.json()["version"]) == (200, 7)
    other = await client.post("/api/v1/incidents", json={"title": "Disk full"})
    assert other.status_code == 201, other.text

    ours = [e for e in await read_events(side.settings, ["datasets"]) if e["meta"].aggregate_id == ident]
    assert [e["meta"].aggregate_version for e in ours] == list(range(1, 8))
    assert [e["payload"].get("key") for e in ours if e["type"] == "datasets.MetadataSet"] == [
        "k0",
        "k1",
        "k2",
        "k3",
    ]
    assert side.api is not None
    assert "transaction failed" not in side.api.log.read_text()
