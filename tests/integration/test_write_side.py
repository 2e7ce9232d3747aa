"""The write side on real Kafka and Redis: HTTP in, events on the topic exactly once."""

from __future__ import annotations

import asyncio
import random
import uuid
from collections import Counter, defaultdict
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from commands import CONTEXTS
from commands.replies import result_key
from shared_kernel.avro import AvroCodec
from shared_kernel.settings import Settings
from shared_kernel.topics import contract_topics, ensure_topics
from tests.auth import TENANT, api_client, bearer
from tests.integration.harness import Proc, WriteSide, free_port, read_events, read_records, wait_until_up

pytestmark = pytest.mark.asyncio(loop_scope="session")


@pytest.fixture(scope="module")
async def side(settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[WriteSide]:
    ws = WriteSide.create(settings, tmp_path_factory.mktemp("write-side"))
    await ws.start_serving()
    yield ws
    ws.stop()


async def test_an_http_command_puts_its_event_on_the_topic_with_every_header(
    side: WriteSide, client: httpx.AsyncClient
) -> None:
    key = str(uuid.uuid4())
    trace = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    r = await client.post(
        "/api/v1/datasets",
        json={"name": "Weather", "description": "Hourly obs", "owner": "climate", "tags": ["Weather"]},
        # what a client claims in X-Actor / X-Tenant is not read: the token says who and where
        headers={
            **bearer("operator", "acme", "alice"),
            "Idempotency-Key": key,
            "X-Actor": "mallory",
            "X-Tenant": "evil",
            "traceparent": trace,
        },
    )
    assert r.status_code == 201, r.text
    body = r.json()
    assert r.headers["etag"] == '"1"'
    assert body["version"] == 1
    assert body["position"] == r.headers["x-consistency-token"]

    events = [
        e for e in await read_events(side.settings, ["datasets"]) if e["headers"]["causation-id"] == key
    ]
    assert len(events) == 1
    ev = events[0]
    assert ev["type"] == "datasets.DatasetRegistered"
    assert ev["payload"] == {
        "name": "Weather",
        "description": "Hourly obs",
        "owner": "climate",
        "tags": ["weather"],
        "metadata": {},
    }
    h = ev["headers"]
    assert set(h) >= {
        "event-id",
        "event-type",
        "aggregate-type",
        "aggregate-id",
        "aggregate-version",
        "occurred-at",
        "correlation-id",
        "causation-id",
        "actor",
        "tenant",
        "traceparent",
        "content-type",
    }
    assert (h["event-type"], h["aggregate-type"], h["aggregate-id"], h["aggregate-version"]) == (
        "datasets.DatasetRegistered",
        "datasets.Dataset",
        body["id"],
        "1",
    )
    assert (h["actor"], h["tenant"]) == ("alice", "acme")
    # the event continues the caller's trace, from the request's own span (a child of theirs)
    assert h["traceparent"].split("-")[1] == trace.split("-")[1]
    assert h["traceparent"].split("-")[2] != trace.split("-")[2]
    # The value names its writer schema: decodable by fingerprint alone.
    assert ev["type"] == AvroCodec.from_directory().current("datasets.DatasetRegistered").full_name


async def test_twenty_concurrent_commands_with_the_same_if_match_give_one_success_and_nineteen_conflicts(
    client: httpx.AsyncClient,
) -> None:
    r = await client.post("/api/v1/incidents", json={"title": "Disk full", "priority": "high"})
    assert r.status_code == 201
    incident = r.json()["id"]

    async def assign(i: int) -> httpx.Response:
        return await client.post(
            f"/api/v1/incidents/{incident}/assign",
            json={"assignee": f"agent-{i}"},
            headers={"If-Match": '"1"'},
        )

    responses = await asyncio.gather(*(assign(i) for i in range(20)))
    codes = Counter(r.status_code for r in responses)
    assert codes == {200: 1, 409: 19}
    conflicts = [r.json() for r in responses if r.status_code == 409]
    assert all(c["error"] == "version_conflict" and c["current_version"] == 2 for c in conflicts)


async def test_the_same_idempotency_key_gives_one_set_of_events_and_identical_answers_across_a_restart(
    side: WriteSide, client: httpx.AsyncClient, settings: Settings
) -> None:
    r = await client.post("/api/v1/incidents", json={"title": "Latency", "priority": "low"})
    incident = r.json()["id"]
    key = str(uuid.uuid4())

    async def comment() -> httpx.Response:
        return await client.post(
            f"/api/v1/incidents/{incident}/comments",
            json={"author": "bob", "body": "looking"},
            headers={"Idempotency-Key": key},
        )

    first, second = await comment(), await comment()
    assert first.status_code == second.status_code == 200
    assert first.json() == second.json()

    # Restart the API (the partitions' owner) and forget the cached result: the answer
    # must now come from the durable state topic, not from Redis.
    assert side.api is not None
    side.api.stop()
    redis = Redis.from_url(settings.redis_url)
    assert await redis.delete(result_key(side.settings.topic_prefix, TENANT, key)) == 1
    await redis.aclose()
    await wait_until_up(side.restart(side.api), "/ready")
    await side.wait_until_commands_flow(client)
    third = await comment()
    assert (third.status_code, third.json(), third.headers["etag"]) == (
        200,
        first.json(),
        first.headers["etag"],
    )

    events = [
        e for e in await read_events(side.settings, ["incidents"]) if e["headers"]["causation-id"] == key
    ]
    assert [e["type"] for e in events] == ["incidents.IncidentCommented"]


async def test_unknown_aggregates_and_bad_input_get_clear_errors(client: httpx.AsyncClient) -> None:
    missing = await client.post(f"/api/v1/incidents/{uuid.uuid4()}/assign", json={"assignee": "x"})
    assert (missing.status_code, missing.json()["error"]) == (404, "not_found")
    invalid = await client.post("/api/v1/incidents", json={"title": "x", "priority": "urgent"})
    assert invalid.status_code == 422
    assert invalid.json()["detail"][0]["loc"] == ["body", "priority"]
    bad_header = await client.post(
        f"/api/v1/incidents/{uuid.uuid4()}/assign", json={"assignee": "x"}, headers={"If-Match": "abc"}
    )
    assert (bad_header.status_code, bad_header.json()["field"]) == (422, "If-Match")


async def test_an_invalid_transition_is_a_409_that_names_the_allowed_ones(client: httpx.AsyncClient) -> None:
    r = await client.post("/api/v1/incidents", json={"title": "Nightly load failed", "priority": "high"})
    incident = r.json()["id"]
    refused = await client.post(f"/api/v1/incidents/{incident}/status", json={"status": "closed"})
    assert refused.status_code == 409
    body = refused.json()
    assert (body["error"], body["current_version"]) == ("invariant_violation", 1)
    assert body["extra"] == {"status": "open", "allowed": ["in_progress"]}
    assert "in_progress" in body["detail"]


async def _load(
    urls: list[str], incidents: list[str], commands: int, concurrency: int, on_progress: Any
) -> dict[str, tuple[str, int]]:
    """Comment commands from concurrent clients, spread over the API instances at `urls`;
    each retried with its key until 2xx (on another instance when one is unreachable).

    Returns command id -> (incident id, version) for every command that got a 2xx.
    """
    accepted: dict[str, tuple[str, int]] = {}
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(commands):
        queue.put_nowait(i)

    async def client_loop(c: int) -> None:
        async with api_client(timeout=60) as client:
            while not queue.empty():
                i = queue.get_nowait()
                incident = random.choice(incidents)
                key = f"load-{i}-{uuid.uuid4().hex[:6]}"
                at = c
                for _attempt in range(40):
                    try:
                        r = await client.post(
                            f"{urls[at % len(urls)]}/api/v1/incidents/{incident}/comments",
                            json={"author": "load", "body": f"comment {i}"},
                            headers={"Idempotency-Key": key},
                        )
                    except httpx.TransportError:
                        at += 1  # that instance is down: the same command through another
                        await asyncio.sleep(0.2)
                        continue
                    if r.status_code == 200:
                        accepted[key] = (incident, r.json()["version"])
                        break
                    assert r.status_code == 503, r.text  # never a 500: only "retry later"
                    assert "Retry-After" in r.headers
                    await asyncio.sleep(float(r.headers["retry-after"]) / 4)
                else:
                    raise AssertionError(f"command {key} never accepted")
                await on_progress(len(accepted))

    await asyncio.gather(*(client_loop(c) for c in range(concurrency)))
    return accepted


async def _assert_exactly_once(
    ws: WriteSide, accepted: dict[str, tuple[str, int]], creates: set[str]
) -> None:
    events = await read_events(ws.settings, ["incidents"])
    by_cause = Counter(e["headers"]["causation-id"] for e in events)
    # Every command that got a 2xx has its event exactly once...
    assert {k: by_cause[k] for k in accepted if by_cause[k] != 1} == {}
    # ...and no event exists without an accepted command.
    assert set(by_cause) - set(accepted) - creates == set()
    # Versions are contiguous per aggregate, and each answer named its event's version.
    versions: dict[str, list[int]] = defaultdict(list)
    for e in events:
        versions[e["meta"].aggregate_id].append(e["meta"].aggregate_version)
    for aggregate, vs in versions.items():
        assert vs == list(range(1, len(vs) + 1)), aggregate
    version_of = {e["headers"]["causation-id"]: e["meta"].aggregate_version for e in events}
    assert {k: v for k, (_, v) in accepted.items() if version_of[k] != v} == {}


async def _open_incidents(ws: WriteSide, n: int) -> tuple[list[str], set[str]]:
    ids, keys = [], set()
    async with api_client(base_url=ws.api_url, timeout=30) as client:
        await ws.wait_until_commands_flow(client)
        for i in range(n):
            key = f"create-{i}-{uuid.uuid4().hex[:6]}"
            r = await client.post(
                "/api/v1/incidents", json={"title": f"load {i}"}, headers={"Idempotency-Key": key}
            )
            assert r.status_code == 201
            ids.append(r.json()["id"])
            keys.add(key)
    return ids, keys


async def _probe_keys(ws: WriteSide) -> set[str]:
    events = await read_events(ws.settings, ["incidents"])
    return {e["headers"]["causation-id"] for e in events if e["headers"]["causation-id"].startswith("probe-")}


async def _load_with_disruption(ws: WriteSide, disrupt: Any, at: int = 500) -> None:
    """2,000 commands from 32 clients over 40 incidents, spread over every API instance
    started; `disrupt()` runs once `at` of them are accepted."""
    incidents, creates = await _open_incidents(ws, 40)
    disrupted = asyncio.Event()

    async def progress(done: int) -> None:
        if done >= at and not disrupted.is_set():
            disrupted.set()
            await disrupt()

    urls = [p.url for p in ws.apis]
    accepted = await _load(urls, incidents, 2000, 32, progress)
    assert disrupted.is_set()
    assert len(accepted) == 2000
    await _assert_exactly_once(ws, accepted, creates | await _probe_keys(ws))


def _owned(proc: Proc) -> list[int]:
    """The partitions the process was last given (its log's latest assignment)."""
    import json

    lines = proc.log.read_text().splitlines()
    assigned = [json.loads(line) for line in lines if "partitions assigned" in line]
    return list(assigned[-1]["partitions"]) if assigned else []


async def test_kill_9_of_an_owner_at_a_random_point_under_load_loses_and_duplicates_nothing(
    settings: Settings, tmp_path: Path
) -> None:
    """Two API instances own the partitions between them; one is killed -9 at a random
    point of the load and restarted on its port (its static member id): clients whose
    instance is down send the same command through the other."""
    ws = WriteSide.create(settings, tmp_path, command_timeout_s=3.0)
    await ws.start_api()
    await ws.start_api()
    victim = ws.apis[1]

    async def kill_and_restart() -> None:
        assert _owned(victim), "the second instance owned no partition before the kill"
        victim.kill9()
        await asyncio.sleep(random.uniform(0.2, 1.5))
        ws.restart(victim)

    try:
        await _load_with_disruption(ws, kill_and_restart, at=random.randint(200, 1200))
    finally:
        ws.stop()


async def test_a_rebalance_to_a_second_and_a_third_instance_under_load_loses_and_duplicates_nothing(
    settings: Settings, tmp_path: Path
) -> None:
    ws = WriteSide.create(settings, tmp_path, command_timeout_s=3.0, partitions=6)
    await ws.start_api()

    async def two_more_join() -> None:
        ws.start_processor()
        ws.start_processor()

    try:
        await _load_with_disruption(ws, two_more_join)
        # The newcomers really took partitions over, and every partition has one owner.
        owned = [_owned(p) for p in [*ws.apis, *ws.processors]]
        assert all(owned), owned
        assert sorted(p for ps in owned for p in ps) == list(range(6))
    finally:
        ws.stop()


async def test_commands_get_503_with_retry_after_when_kafka_is_unreachable(
    settings: Settings, tmp_path: Path
) -> None:
    ws = WriteSide.create(
        settings, tmp_path, kafka_bootstrap=f"127.0.0.1:{free_port()}", command_timeout_s=2.0
    )
    await ws.start_api(env={**ws.env, "APP_KAFKA_BOOTSTRAP": ws.settings.kafka_bootstrap}, wait_ready=False)
    try:
        async with api_client(base_url=ws.api_url, timeout=30) as client:
            r = await client.post("/api/v1/incidents", json={"title": "x"})
            assert r.status_code == 503
            assert r.headers["retry-after"] == "1"
            ready = await client.get("/ready")
            assert ready.status_code == 503
            assert ready.json()["checks"]["kafka"] is False
    finally:
        ws.stop()


async def test_a_command_whose_partition_has_no_owner_is_a_503_with_retry_after_not_a_500(
    settings: Settings, tmp_path: Path
) -> None:
    ws = WriteSide.create(settings, tmp_path, command_timeout_s=1.0)
    # the topics exist, as in a deployment (`cqrs topics create`), but no process owns a partition
    await ensure_topics(ws.settings, contract_topics(ws.settings, [c.name for c in CONTEXTS]))
    await ws.start_api(env={**ws.env, "APP_API_OWNS_PARTITIONS": "false"})
    try:
        async with api_client(base_url=ws.api_url, timeout=30) as client:
            r = await client.post("/api/v1/incidents", json={"title": "x"})
            assert r.status_code == 503
            assert r.json()["error"] == "unavailable"
            assert "has no owner" in r.json()["detail"]
            assert r.headers["retry-after"] == "1"
    finally:
        ws.stop()


async def test_a_poison_command_goes_to_the_dead_letter_topic_and_the_partition_keeps_flowing(
    side: WriteSide, client: httpx.AsyncClient
) -> None:
    from shared_kernel import kafka
    from shared_kernel.topics import Topics

    topics = Topics(side.settings.topic_prefix)
    dataset_id = str(uuid.uuid4())
    poison = b"\x00not a command envelope"
    producer = kafka.producer(side.settings)
    await producer.start()
    try:
        sent = await producer.send_and_wait(topics.commands, poison, key=dataset_id.encode())
    finally:
        await producer.stop()

    # A command for the same aggregate is still answered (the HTTP path does not wait for
    # the commands topic)...
    r = await client.post("/api/v1/datasets", json={"id": dataset_id, "name": "after the poison"})
    assert r.status_code == 201, r.text
    assert r.json()["id"] == dataset_id

    # ...and the poison, read from the topic by its partition's owner, is dead-lettered.
    ours: list[Any] = []
    deadline = asyncio.get_running_loop().time() + 30
    while not ours:
        assert asyncio.get_running_loop().time() < deadline, "the poison was never dead-lettered"
        dead = await read_records(side.settings, [topics.dlq("command-processor")])
        ours = [d for d in dead if d.key == dataset_id.encode()]
        if not ours:
            await asyncio.sleep(0.2)
    assert len(ours) == 1
    assert ours[0].value == poison
    headers = {k: v.decode() for k, v in ours[0].headers}
    assert headers["dlq-error"].startswith("malformed command")
    assert headers["dlq-source"] == f"{topics.commands}:{sent.partition}:{sent.offset}"
