"""Stream-processing jobs on the real stack: the quality windows against an offline
computation (and a rebuild), degradation to incident and back under kill -9 and a
second instance, durable deadlines, Alertmanager's webhook, and poison records."""

from __future__ import annotations

import asyncio
import copy
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import httpx
import orjson
import pytest

from commands.routing import partition_for
from shared_kernel import kafka
from shared_kernel.settings import Settings
from shared_kernel.topics import Topics
from tests.auth import api_client
from tests.integration.harness import CQRS, WriteSide, read_records, until

pytestmark = pytest.mark.asyncio(loop_scope="session")

FIXTURES = Path(__file__).parent / "fixtures"
SLA_S = 4  # every priority: assigned within 4 s (the tests' service level)
HOUR = timedelta(hours=1)
T = TypeVar("T")


@pytest.fixture(scope="module")
async def side(settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[WriteSide]:
    ws = WriteSide.create(settings, tmp_path_factory.mktemp("jobs"))
    ws.env["APP_INCIDENT_SLA_ASSIGN_S"] = orjson.dumps(
        dict.fromkeys(("low", "medium", "high", "critical"), SLA_S)
    ).decode()
    ws.env["APP_INCIDENT_SLA_RESOLVE_S"] = orjson.dumps(
        dict.fromkeys(("low", "medium", "high", "critical"), 3600)
    ).decode()
    ws.env["APP_DEADLINE_SCAN_S"] = "0.5"
    await ws.start_serving()
    ws.start_projectors("datasets", "quality_windows", "incidents", "events")
    await ws.wait_until_projected()
    yield ws
    ws.stop()


@pytest.fixture(scope="module")
async def client(side: WriteSide) -> AsyncIterator[httpx.AsyncClient]:
    async with api_client(base_url=side.api_url, timeout=30) as c:
        yield c


async def new_dataset(client: httpx.AsyncClient, name: str) -> str:
    r = await client.post("/api/v1/datasets", json={"name": name})
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


async def check(client: httpx.AsyncClient, dataset: str, passed: bool, at: datetime | None = None) -> str:
    body: dict[str, Any] = {"metric": "rows", "value": 10 if passed else 1, "threshold": 5}
    if at is not None:
        body["measured_at"] = at.isoformat()
    r = await client.post(f"/api/v1/datasets/{dataset}/quality-checks", json=body)
    assert r.status_code == 200, r.text
    return str(r.json()["position"])


def offline(
    times: list[tuple[datetime, bool]], size: timedelta, step: timedelta, lateness: timedelta
) -> dict[Any, Any]:
    """Every window of `size` every `step` over the checks in their order: (checks, passed),
    a check counting where its window's end + lateness is past the latest time so far."""
    out: Counter[Any] = Counter()
    ok: Counter[Any] = Counter()
    latest = datetime.min.replace(tzinfo=UTC)
    epoch = datetime(2026, 1, 1, tzinfo=UTC)
    for at, passed in times:
        latest = max(latest, at)
        start = epoch
        while start <= at:
            if start + size > at and start + size + lateness > latest:
                out[start] += 1
                ok[start] += passed
            start += step
    return {s: (out[s], ok[s]) for s in out}


async def windows(client: httpx.AsyncClient, dataset: str, kind: str, token: str) -> dict[Any, Any]:
    r = await client.get(
        f"/api/v1/datasets/{dataset}/quality/windows",
        params={"kind": kind, "consistent_with": token, "limit": 1000},
    )
    assert r.status_code == 200, r.text
    return {
        datetime.fromisoformat(w["window_start"]): (w["checks"], w["passed"]) for w in r.json()["windows"]
    }


async def test_windows_equal_an_offline_computation_with_late_and_out_of_order_checks_and_after_a_rebuild(
    side: WriteSide, client: httpx.AsyncClient
) -> None:
    dataset = await new_dataset(client, "windowed")
    base = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(days=3)
    minutes = [10, 50, 70, 65, 30, 200, 125, 190, 20, 260, 250, 100, 320, 95, 330]  # some late, one too late
    times = [(base + timedelta(minutes=m), n % 3 != 0) for n, m in enumerate(minutes)]
    token = ""
    for at, passed in times:
        token = await check(client, dataset, passed, at)
    got_tumbling = await windows(client, dataset, "tumbling", token)
    got_hopping = await windows(client, dataset, "hopping", token)
    assert got_tumbling == offline(times, HOUR, HOUR, HOUR)
    assert got_hopping == offline(times, 24 * HOUR, HOUR, HOUR)
    r = await client.get(f"/api/v1/datasets/{dataset}/quality/windows", params={"consistent_with": token})
    # minutes 20 (after 200), 100 (after 260) and 95 (after 330) missed their hour's window
    # by more than the lateness: dropped there (still counted in the longer hopping windows)
    assert r.json()["late_dropped"] == 3

    rebuild = await asyncio.create_subprocess_exec(
        CQRS, "projections", "rebuild", "quality_windows", env=side.env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(rebuild.communicate(), 300)
    assert rebuild.returncode == 0, out.decode()[-3000:]
    assert await windows(client, dataset, "tumbling", token) == got_tumbling
    assert await windows(client, dataset, "hopping", token) == got_hopping


async def quality_incidents(client: httpx.AsyncClient, dataset: str) -> list[dict[str, Any]]:
    r = await client.get("/api/v1/incidents", params={"source": "quality", "external_id": f"{dataset}/rows"})
    assert r.status_code == 200, r.text
    return list(r.json()["items"])


async def test_failing_checks_open_one_incident_and_passing_ones_resolve_it_through_kills_and_a_rebalance(
    side: WriteSide, client: httpx.AsyncClient, settings: Settings
) -> None:
    monitor = side.start_job("quality-monitor")
    manager = side.start_job("quality-incidents")
    await side.wait_until_job_runs(monitor)
    await side.wait_until_job_runs(manager)
    # a poison record on the events topic: dead-lettered by each job, the rest flows
    producer = kafka.producer(settings.model_copy(update={"topic_prefix": side.settings.topic_prefix}))
    await producer.start()
    try:
        await producer.send_and_wait(
            Topics(side.settings.topic_prefix).events("datasets"), b"\x00poison", key=b"x"
        )
    finally:
        await producer.stop()

    dataset = await new_dataset(client, "degrading")
    second = None
    for n in range(12):
        await check(client, dataset, passed=False)
        if n == 3:
            monitor.kill9()  # mid-stream: its table and offsets are what it had committed
            monitor = side.restart(monitor)
        if n == 6:
            second = side.start_job("quality-monitor")  # joins mid-load: a rebalance
            manager.kill9()
            manager = side.restart(manager)
    opened = await until(lambda: quality_incidents(client, dataset), 120, "the incident opened")
    assert len(opened) == 1
    assert opened[0]["status"] == "open"
    assert opened[0]["priority"] == "critical"  # every check failed: as far past the threshold as can be
    assert second is not None
    await side.wait_until_job_runs(second)
    for _ in range(50):
        await check(client, dataset, passed=True)

    async def resolved() -> list[dict[str, Any]] | None:
        items = await quality_incidents(client, dataset)
        return items if items and items[0]["status"] == "resolved" else None

    done = await until(resolved, 120, "the incident resolved")
    assert len(done) == 1
    assert done[0]["comments"] == 1  # the figures of the restoration
    r = await client.get(f"/api/v1/datasets/{dataset}/events")
    names = Counter(e["event_type"].rpartition(".")[2] for e in r.json()["items"])
    assert names["DatasetQualityDegraded"] == 1
    assert names["DatasetQualityRestored"] == 1

    dead = await read_records(side.settings, [Topics(side.settings.topic_prefix).dlq("job-quality-monitor")])
    assert [d.value for d in dead][:1] == [b"\x00poison"]
    assert "SchemaError" in dict(dead[0].headers)["dlq-error"].decode()
    for job in (monitor, manager, second):
        job.stop()


async def incident_events(client: httpx.AsyncClient, incident: str) -> list[dict[str, Any]]:
    r = await client.get(f"/api/v1/incidents/{incident}/events")
    if r.status_code == 404:  # not archived yet
        return []
    assert r.status_code == 200, r.text
    return list(r.json()["items"])


async def escalations(client: httpx.AsyncClient, incident: str) -> list[dict[str, Any]]:
    return [
        e for e in await incident_events(client, incident) if e["event_type"].endswith("IncidentEscalated")
    ]


async def open_incident(client: httpx.AsyncClient, title: str) -> dict[str, Any]:
    r = await client.post("/api/v1/incidents", json={"title": title, "priority": "critical"})
    assert r.status_code == 201, r.text
    return dict(r.json())


async def test_deadlines_fire_once_across_restarts_late_after_an_outage_and_never_when_met_in_time(
    side: WriteSide, client: httpx.AsyncClient
) -> None:
    job = side.start_job("incident-deadlines")
    await side.wait_until_job_runs(job)
    missed = await open_incident(client, "nobody takes it")
    met = await open_incident(client, "taken at once")
    r = await client.post(f"/api/v1/incidents/{met['id']}/assign", json={"assignee": "alice"})
    assert r.status_code == 200, r.text

    fired = await until(lambda: escalations(client, missed["id"]), 30, "the escalation")
    assert fired[0]["payload"]["deadline"] == "assignment"
    assert fired[0]["payload"]["level"] == 1
    job.kill9()  # its timers are in its table's changelog
    job = side.restart(job)

    # an outage: the job is down while a deadline passes
    job.kill9()
    late = await open_incident(client, "due while the job is down")
    await asyncio.sleep(SLA_S + 1)  # the outage itself: the deadline passes while nothing runs
    assert await escalations(client, late["id"]) == []
    job = side.restart(job)
    await side.wait_until_job_runs(job)
    try:
        late_fired = await until(lambda: escalations(client, late["id"]), 60, "the late escalation")
    except AssertionError as exc:  # what the restarted job did: its partitions and progress
        raise AssertionError(f"{exc}; the job's log:\n{job.output().decode()[-6000:]}") from None
    due = datetime.fromisoformat(late_fired[0]["payload"]["due_at"])
    assert datetime.fromisoformat(late_fired[0]["occurred_at"]) > due + timedelta(
        seconds=1
    )  # late, not never

    # one more scan round trip after everything: nothing fired twice, nothing for the met one
    probe = await open_incident(client, "a later one, to know the scans ran")
    await until(lambda: escalations(client, probe["id"]), 30, "the probe's escalation")
    assert len(await escalations(client, missed["id"])) == 1
    assert len(await escalations(client, late["id"])) == 1
    assert await escalations(client, met["id"]) == []

    async def breached() -> dict[str, Any] | None:
        row = (await client.get(f"/api/v1/incidents/{missed['id']}")).json()
        return row if row["escalation_level"] == 1 else None

    assert (await until(breached, 30, "the breach in the read model"))["assign_breached"] is True
    assert (await client.get(f"/api/v1/incidents/{met['id']}")).json()["assign_breached"] is False
    job.stop()


async def test_alertmanager_alerts_open_one_incident_per_fingerprint_and_resolve_it(
    client: httpx.AsyncClient,
) -> None:
    payload = orjson.loads((FIXTURES / "alertmanager-firing.json").read_bytes())
    fingerprint = f"{uuid.uuid4().hex[:16]}"
    payload["alerts"][0]["fingerprint"] = fingerprint
    r = await client.post("/api/v1/integrations/alertmanager", json=payload)
    assert r.status_code == 200, r.text
    (first,) = r.json()["alerts"]
    assert first["action"] == "opened"
    incident = first["incident_id"]

    async def row(**expect: Any) -> dict[str, Any] | None:
        got = (await client.get(f"/api/v1/incidents/{incident}")).json()
        return got if all(got.get(k) == v for k, v in expect.items()) else None

    opened = await until(lambda: row(status="open"), 30, "the incident")
    assert (opened["source"], opened["external_id"], opened["priority"]) == (
        "alertmanager",
        fingerprint,
        "critical",
    )
    assert opened["title"] == "High 5xx ratio on the API"
    # Alertmanager's retry of the same notification: nothing new
    again = await client.post("/api/v1/integrations/alertmanager", json=payload)
    assert again.json()["alerts"][0]["incident_id"] == incident
    # the same fingerprint firing in a later notification (a repeat interval): a comment, no new incident
    later = copy.deepcopy(payload)
    later["alerts"][0]["annotations"]["description"] = "Still above 10%."
    r = await client.post("/api/v1/integrations/alertmanager", json=later)
    assert r.json()["alerts"][0] == {
        "fingerprint": fingerprint,
        "incident_id": incident,
        "action": "commented",
    }
    await until(lambda: row(comments=2), 30, "two comments (the retry and the repeat: one each)")
    listed = (await client.get("/api/v1/incidents", params={"external_id": fingerprint})).json()["items"]
    assert [i["id"] for i in listed] == [incident]

    resolved = copy.deepcopy(payload)
    resolved["status"] = resolved["alerts"][0]["status"] = "resolved"
    resolved["alerts"][0]["endsAt"] = "2026-12-02T10:30:00Z"
    r = await client.post("/api/v1/integrations/alertmanager", json=resolved)
    assert r.json()["alerts"][0]["action"] == "resolved"
    await until(lambda: row(status="resolved"), 30, "the incident resolved")


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda p: p.update(version="3"), "version"),
        (lambda p: p.update(alerts=[]), "alerts"),
        (lambda p: p["alerts"][0].pop("fingerprint"), "fingerprint"),
        (lambda p: p["alerts"][0].update(startsAt="yesterday"), "startsAt"),
        (lambda p: p["alerts"][0].update(status="pending"), "status"),
    ],
)
async def test_a_bad_alertmanager_payload_is_a_422_naming_the_field(
    client: httpx.AsyncClient, change: Callable[[dict[str, Any]], Any], field: str
) -> None:
    payload = orjson.loads((FIXTURES / "alertmanager-firing.json").read_bytes())
    change(payload)
    r = await client.post("/api/v1/integrations/alertmanager", json=payload)
    assert r.status_code == 422, r.text
    assert field in r.text


async def test_a_record_the_monitor_cannot_read_parks_its_dataset_until_skipped_while_others_flow(
    side: WriteSide, client: httpx.AsyncClient, settings: Settings
) -> None:
    monitor = side.start_job("quality-monitor")
    await side.wait_until_job_runs(monitor)
    parked_one = await new_dataset(client, "parked in the monitor")
    flowing = await new_dataset(client, "flowing")
    producer = kafka.producer(settings)
    await producer.start()
    try:  # between the dataset's creation and its checks, in its partition
        await producer.send_and_wait(
            Topics(side.settings.topic_prefix).events("datasets"),
            b"\x00garbled",
            key=parked_one.encode(),
            partition=partition_for(parked_one, side.settings.partitions),
        )
    finally:
        await producer.stop()
    for _ in range(6):  # enough failing checks to degrade either
        await check(client, parked_one, passed=False)
        await check(client, flowing, passed=False)

    async def degraded(dataset: str) -> int:
        """Its DatasetQualityDegraded events in the log (the projections of the dataset
        park behind the unreadable record too: the log is read, not them)."""
        records = await read_records(side.settings, [Topics(side.settings.topic_prefix).events("datasets")])
        return sum(
            (h := dict(r.headers)).get("event-type") == b"datasets.DatasetQualityDegraded"
            and h.get("aggregate-id") == dataset.encode()
            for r in records
        )

    async def flowing_degraded() -> int | None:
        return await degraded(flowing) or None

    await until(flowing_degraded, 60, "the other dataset degraded")

    async def held() -> dict[str, Any] | None:
        r = await client.get(
            "/api/v1/admin/dead-letters/parked", params={"consumer": "job-quality-monitor", "key": parked_one}
        )
        items = r.json()["items"]
        return items[0] if items and items[0]["held"] == 6 else None

    parked = await until(held, 60, "the dataset parked in the monitor, its six checks held")
    assert "cannot decode" in parked["error"]
    assert await degraded(parked_one) == 0
    path = f"/api/v1/admin/dead-letters/job-quality-monitor/{parked['dead_letter']['partition']}"
    path += f"/{parked['dead_letter']['offset']}"
    r = await client.post(f"{path}/retry")  # the same bytes: still unreadable
    assert r.status_code == 200, r.text
    assert (r.json()["outcome"], r.json()["applied"]) == ("failed", 0)
    r = await client.post(f"{path}/skip")
    assert r.status_code == 200, r.text
    assert (r.json()["outcome"], r.json()["applied"]) == ("applied", 6)

    async def parked_degraded() -> int | None:
        return await degraded(parked_one) or None

    assert await until(parked_degraded, 60, "the parked dataset degraded once its checks were handled") == 1
    r = await client.get("/api/v1/admin/dead-letters/parked", params={"key": parked_one})
    # the projections of the dataset parked it as well; skipped there too, they catch up
    projections = {k["consumer"] for k in r.json()["items"]}
    assert "job-quality-monitor" not in projections
    assert {"datasets", "events"} <= projections
    for k in r.json()["items"]:
        at = k["dead_letter"]
        skipped = await client.post(
            f"/api/v1/admin/dead-letters/{k['consumer']}/{at['partition']}/{at['offset']}/skip"
        )
        assert skipped.json()["outcome"] == "applied", skipped.text

    async def archived() -> int | None:
        r = await client.get(f"/api/v1/datasets/{parked_one}/events")
        names = [e["event_type"] for e in r.json()["items"]] if r.status_code == 200 else []
        return len(names) if "datasets.DatasetQualityDegraded" in names else None

    assert await until(archived, 30, "the archive caught up") == 8  # registered, 6 checks, degraded

    # a dead letter with nothing held behind it: a skip lets its key go and applies nothing
    lone_key = str(uuid.uuid4())
    producer = kafka.producer(settings)
    await producer.start()
    try:
        topic = Topics(side.settings.topic_prefix).events("datasets")
        await producer.send_and_wait(topic, b"\x00alone", key=lone_key.encode())
    finally:
        await producer.stop()

    async def lone() -> dict[str, Any] | None:
        params = {"consumer": "job-quality-monitor", "key": lone_key}
        items = (await client.get("/api/v1/admin/dead-letters/parked", params=params)).json()["items"]
        return items[0] if items else None

    alone = await until(lone, 60, "the lone record's key parked")
    assert alone["held"] == 0
    at = alone["dead_letter"]
    r = await client.post(
        f"/api/v1/admin/dead-letters/job-quality-monitor/{at['partition']}/{at['offset']}/skip"
    )
    assert (r.json()["outcome"], r.json()["applied"]) == ("applied", 0), r.text
    assert await lone() is None
    monitor.stop()
