"""Webhooks end to end: the API, the projectors and the delivery job on the real stack,
POSTing to a real HTTP receiver in this process that verifies every signature with the
Standard Webhooks library and the secret the API showed."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import httpx
import orjson
import pytest
from aiohttp import web
from standardwebhooks import Webhook, WebhookVerificationError

from shared_kernel.settings import Settings
from tests.auth import api_client
from tests.integration.harness import WriteSide, free_port, until

pytestmark = pytest.mark.asyncio(loop_scope="session")

T = TypeVar("T")
RETRIES = 3  # so 4 attempts in all before a delivery is parked
TIMEOUT_S = 1.5


@dataclass
class Target:
    """What one path of the receiver does and what it got."""

    secrets: list[str] = field(default_factory=list)  # a delivery must verify with each of these
    fail_first: int = 0  # answer 500 to this many requests first
    answering: asyncio.Event = field(default_factory=asyncio.Event)  # clear: hang until set
    status: int = 200
    got: list[dict[str, Any]] = field(default_factory=list)  # every request: id, body, verified

    def delivered_ids(self) -> list[str]:
        return [g["id"] for g in self.got if g["answered"] == 200]


class Receiver:
    def __init__(self) -> None:
        self.targets: dict[str, Target] = {}
        self.port = free_port()
        self.runner: web.AppRunner | None = None

    def url(self, name: str) -> str:
        if name not in self.targets:
            self.targets[name] = Target()
            self.targets[name].answering.set()
        return f"http://127.0.0.1:{self.port}/{name}"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/{name}", self.receive)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()

    async def receive(self, request: web.Request) -> web.Response:
        target = self.targets[request.match_info["name"]]
        body = await request.text()
        verified = []
        for secret in target.secrets:
            try:
                Webhook(secret).verify(body, dict(request.headers))
                verified.append(True)
            except WebhookVerificationError:
                verified.append(False)
        seen = {"id": request.headers.get("webhook-id"), "body": orjson.loads(body), "verified": verified}
        target.got.append(seen)
        await target.answering.wait()
        if target.fail_first > 0:
            target.fail_first -= 1
            seen["answered"] = 500
            return web.Response(status=500, text="not now")
        seen["answered"] = target.status
        return web.Response(status=target.status, text="ok")


@pytest.fixture(scope="module")
async def receiver() -> AsyncIterator[Receiver]:
    r = Receiver()
    await r.start()
    yield r
    assert r.runner is not None
    await r.runner.cleanup()


@pytest.fixture(scope="module")
async def side(settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[WriteSide]:
    ws = WriteSide.create(settings, tmp_path_factory.mktemp("webhooks"))
    ws.env["APP_WEBHOOK_ALLOWED_NETWORKS"] = "127.0.0.0/8"
    ws.env["APP_WEBHOOK_RETRY_S"] = ",".join(["0.3"] * RETRIES)
    ws.env["APP_WEBHOOK_TIMEOUT_S"] = str(TIMEOUT_S)
    await ws.start_serving()
    ws.start_projectors("incidents", "events", "webhook_subscriptions")
    await ws.wait_until_projected()
    job = ws.start_job("webhook-delivery")
    await ws.wait_until_job_runs(job)
    yield ws
    ws.stop()


@pytest.fixture(scope="module")
async def client(side: WriteSide) -> AsyncIterator[httpx.AsyncClient]:
    async with api_client(base_url=side.api_url, timeout=30) as c:
        yield c


async def register(client: httpx.AsyncClient, receiver: Receiver, name: str, **body: Any) -> tuple[str, str]:
    """A webhook to the receiver's `name`, whose deliveries must verify with its secret."""
    r = await client.post("/api/v1/webhooks", json={"url": receiver.url(name), **body})
    assert r.status_code == 201, r.text
    answer = r.json()
    receiver.targets[name].secrets = [answer["secret"]]
    # the delivery job sees it once its read model has it
    got = await client.get(f"/api/v1/webhooks/{answer['id']}", params={"consistent_with": answer["position"]})
    assert got.status_code == 200, got.text
    assert answer["secret"] not in got.text
    assert "whsec_" not in got.text
    return answer["id"], answer["secret"]


def of(target: Target, incident: str) -> list[dict[str, Any]]:
    return [g for g in target.got if g["body"]["aggregate_id"] == incident]


async def eventually(check: Callable[[], T], seconds: float, what: str) -> T:
    """`until` over a check of this process's own state (the receiver's)."""

    async def probe() -> T:
        return check()

    return await until(probe, seconds, what)


async def open_incident(client: httpx.AsyncClient, title: str) -> str:
    r = await client.post("/api/v1/incidents", json={"title": title})
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


async def deliveries(client: httpx.AsyncClient, hook: str, **params: Any) -> dict[str, Any]:
    r = await client.get(f"/api/v1/webhooks/{hook}/deliveries", params=params)
    assert r.status_code == 200, r.text
    return dict(r.json())


async def test_registration_shows_the_secret_once_and_refuses_what_it_cannot_deliver(
    client: httpx.AsyncClient, receiver: Receiver
) -> None:
    key = str(uuid.uuid4())
    first = await client.post(
        "/api/v1/webhooks", json={"url": receiver.url("reg")}, headers={"Idempotency-Key": key}
    )
    again = await client.post(
        "/api/v1/webhooks", json={"url": receiver.url("reg")}, headers={"Idempotency-Key": key}
    )
    assert first.status_code == 201, first.text
    assert again.json()["secret"] == first.json()["secret"]  # a retry shows the same secret
    assert first.json()["secret"].startswith("whsec_")
    for body, named in (
        ({"url": "http://10.1.2.3/in"}, "url"),  # private, not allowed by the settings
        ({"url": "ftp://example.com/in"}, "url"),
        ({"url": receiver.url("reg"), "contexts": ["billing"]}, "contexts"),
        ({"url": receiver.url("reg"), "event_types": ["incidents.Nope"]}, "event_types"),
        ({"url": receiver.url("reg"), "surprise": 1}, "surprise"),
    ):
        r = await client.post("/api/v1/webhooks", json=body)
        assert r.status_code == 422, r.text
        assert named in r.text
    async with api_client("operator", base_url=str(client.base_url)) as operator:
        denied = await operator.post("/api/v1/webhooks", json={"url": receiver.url("reg")})
        assert denied.status_code == 403, denied.text
        assert (await operator.get("/api/v1/webhooks")).status_code == 403
    hook = first.json()["id"]
    async with api_client(tenant="globex", base_url=str(client.base_url)) as other:
        assert (await other.get(f"/api/v1/webhooks/{hook}/deliveries")).status_code == 404


async def test_a_failing_receiver_gets_the_event_once_after_four_attempts_with_one_webhook_id(
    client: httpx.AsyncClient, receiver: Receiver
) -> None:
    hook, _ = await register(client, receiver, "flaky", event_types=["incidents.IncidentOpened"])
    receiver.targets["flaky"].fail_first = 3
    incident = await open_incident(client, "flaky receiver")

    async def delivered() -> dict[str, Any] | None:
        log = await deliveries(client, hook, status="delivered")
        return log if log["counts"]["delivered"] == 1 else None

    log = await until(delivered, 60, "the delivery after three failures")
    got = receiver.targets["flaky"].got
    assert len(got) == 4
    assert len({g["id"] for g in got}) == 1  # the same webhook-id on every attempt
    assert all(g["verified"] == [True] for g in got)
    body = got[-1]["body"]
    assert (body["type"], body["event_type"], body["aggregate_id"]) == (
        "event",
        "incidents.IncidentOpened",
        incident,
    )
    assert body["payload"]["title"] == "flaky receiver"
    (item,) = log["items"]
    assert item["id"] == got[0]["id"]
    assert [a["status_code"] for a in item["attempt_log"]] == [500, 500, 500, 200]
    assert all(a["latency_ms"] >= 0 for a in item["attempt_log"])
    assert receiver.targets["flaky"].delivered_ids() == [got[0]["id"]]  # delivered once


async def test_a_dead_receiver_is_parked_while_another_keeps_receiving_then_redelivered_in_order(
    client: httpx.AsyncClient, receiver: Receiver
) -> None:
    dead, _ = await register(client, receiver, "dead", contexts=["incidents"])
    await register(client, receiver, "alive", contexts=["incidents"])
    receiver.targets["dead"].answering.clear()
    incident = await open_incident(client, "first")
    for body in ({"assignee": "alice"}, {"assignee": "bob"}):
        r = await client.post(f"/api/v1/incidents/{incident}/assign", json=body)
        assert r.status_code == 200, r.text

    async def parked() -> dict[str, Any] | None:
        log = await deliveries(client, dead)
        return log if log["counts"]["parked"] >= 1 else None

    await until(parked, 90, "the dead receiver's first delivery parked")
    # the later events of that incident wait behind the parked one; the other target has all three
    alive = receiver.targets["alive"]
    alive_got: list[dict[str, Any]] = await eventually(
        lambda: of(alive, incident) if len(of(alive, incident)) == 3 else [],
        30,
        "the live receiver's three events",
    )
    assert [g["body"]["aggregate_version"] for g in alive_got] == [1, 2, 3]
    hung = of(receiver.targets["dead"], incident)
    assert {g["body"]["aggregate_version"] for g in hung} == {1}  # never the later ones before it

    async def failing() -> bool:
        r = await client.get(f"/api/v1/webhooks/{dead}")
        return bool(r.json()["status"] == "failing")

    await until(failing, 30, "the subscription marked failing")

    # the receiver is mended; the parked delivery is asked again and the rest follows in order
    receiver.targets["dead"].answering.set()
    receiver.targets["dead"].got.clear()
    r = await client.post(f"/api/v1/webhooks/{dead}/redeliver", json={})
    assert r.status_code == 202, r.text
    assert r.json()["redelivered"] >= 1
    r = await client.post(f"/api/v1/webhooks/{dead}/resume")
    assert r.status_code == 200, r.text

    async def all_three() -> list[int] | None:
        versions = [
            g["body"]["aggregate_version"]
            for g in receiver.targets["dead"].got
            if g["body"]["aggregate_id"] == incident and g["answered"] == 200
        ]
        return versions if len(versions) >= 3 else None

    assert await until(all_three, 60, "the parked events redelivered") == [1, 2, 3]


async def test_during_a_rotation_deliveries_verify_with_either_secret(
    client: httpx.AsyncClient, receiver: Receiver
) -> None:
    hook, old = await register(client, receiver, "rotating", event_types=["incidents.IncidentOpened"])
    r = await client.post(f"/api/v1/webhooks/{hook}/rotate-secret", json={"overlap_s": 3600})
    assert r.status_code == 200, r.text
    new = r.json()["secret"]
    assert new != old
    await client.get(f"/api/v1/webhooks/{hook}", params={"consistent_with": r.json()["position"]})
    receiver.targets["rotating"].secrets = [old, new]
    await open_incident(client, "after the rotation")
    got = await eventually(lambda: list(receiver.targets["rotating"].got), 30, "a delivery")
    assert got[0]["verified"] == [True, True]
    # without an overlap only the new secret signs
    r = await client.post(f"/api/v1/webhooks/{hook}/rotate-secret", json={"overlap_s": 0})
    newest = r.json()["secret"]
    await client.get(f"/api/v1/webhooks/{hook}", params={"consistent_with": r.json()["position"]})
    receiver.targets["rotating"].secrets = [new, newest]
    receiver.targets["rotating"].got.clear()
    await open_incident(client, "after the second rotation")
    got = await eventually(lambda: list(receiver.targets["rotating"].got), 30, "a delivery")
    assert got[0]["verified"] == [False, True]


async def test_410_gone_disables_the_subscription(client: httpx.AsyncClient, receiver: Receiver) -> None:
    hook, _ = await register(client, receiver, "gone", event_types=["incidents.IncidentOpened"])
    receiver.targets["gone"].status = 410
    await open_incident(client, "to a target that left")

    async def disabled() -> bool:
        return bool((await client.get(f"/api/v1/webhooks/{hook}")).json()["status"] == "disabled")

    await until(disabled, 30, "the subscription disabled")
    assert len(receiver.targets["gone"].got) == 1  # no retries to a target that is gone


async def test_kill_9_of_the_delivery_job_mid_delivery_delivers_at_least_once_with_the_same_id(
    side: WriteSide, client: httpx.AsyncClient, receiver: Receiver
) -> None:
    hook, _ = await register(client, receiver, "crash", event_types=["incidents.IncidentOpened"])
    target = receiver.targets["crash"]
    target.answering.clear()
    incidents = [await open_incident(client, f"crash {i}") for i in range(5)]
    await eventually(lambda: len(target.got) >= 1, 30, "a delivery in flight")
    (job,) = side.jobs
    job.kill9()
    target.answering.set()
    side.restart(job)

    async def everything() -> bool:
        ids = {g["body"]["aggregate_id"] for g in target.got if g.get("answered") == 200}
        return ids >= set(incidents)

    await until(everything, 90, "every event delivered after the restart")
    by_incident: dict[str, set[str]] = {}
    for g in target.got:
        by_incident.setdefault(g["body"]["aggregate_id"], set()).add(g["id"])
    assert all(len(ids) == 1 for ids in by_incident.values())  # a repeat carries the same webhook-id
    assert all(all(g["verified"]) for g in target.got)
    log = await deliveries(client, hook)
    assert log["counts"]["delivered"] == 5
