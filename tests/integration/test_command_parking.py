"""The command processor parks an aggregate behind a command whose handler fails: its
later queued commands are held in order, direct ones refused with 503 and Retry-After,
other aggregates flow; an operator retries the dead letter after the fix is deployed
(it and the held commands are decided in order) or skips it (the held ones are).

The "bug" is deployed for real: the API (which owns every partition) runs with a
`sitecustomize` that makes a comment starting with "poison" raise in the domain; the
fix is the same API restarted without it."""

from __future__ import annotations

import functools
import textwrap
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from shared_kernel.settings import Settings
from tests.auth import api_client
from tests.integration.harness import WriteSide, read_events, until

pytestmark = pytest.mark.asyncio(loop_scope="session")

BUG = """
from commands.incidents.aggregate import Incident

_comment = Incident.comment


def comment(self, author, body):
    if body.startswith("poison"):
        raise RuntimeError("the comment handler crashed")
    _comment(self, author, body)


Incident.comment = comment
"""

ADMIN = "/api/v1/admin/dead-letters"
IDEMPOTENCY = "Idempotency-Key"


@pytest.fixture(scope="module")
async def side(settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[WriteSide]:
    ws = WriteSide.create(settings, tmp_path_factory.mktemp("command-parking"))
    bug = tmp_path_factory.mktemp("bug")
    (bug / "sitecustomize.py").write_text(textwrap.dedent(BUG))
    await ws.start_api(env={**ws.env, "PYTHONPATH": str(bug)})
    async with api_client(base_url=ws.api_url, timeout=30) as client:
        await ws.wait_until_commands_flow(client)
    yield ws
    ws.stop()


async def _open(client: httpx.AsyncClient, title: str) -> str:
    r = await client.post("/api/v1/incidents", json={"title": title})
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


async def _queued(client: httpx.AsyncClient, path: str, body: dict[str, Any]) -> str:
    r = await client.post(path, json=body, headers={"Prefer": "respond-async"})
    assert r.status_code == 202, r.text
    return str(r.json()["status_url"])


async def _parked(client: httpx.AsyncClient, key: str) -> list[dict[str, Any]]:
    r = await client.get(f"{ADMIN}/parked", params={"consumer": "command-processor", "key": key})
    assert r.status_code == 200, r.text
    return list(r.json()["items"])


async def _status(client: httpx.AsyncClient, url: str) -> dict[str, Any]:
    r = await client.get(url)
    assert r.status_code in (200, 202), r.text
    return dict(r.json())


async def _history(side: WriteSide, incident: str) -> list[tuple[int, str, Any]]:
    """(version, event type, comment body or assignee) of the incident's committed events."""
    events = [
        e for e in await read_events(side.settings, ["incidents"]) if e["meta"].aggregate_id == incident
    ]
    return [
        (
            e["meta"].aggregate_version,
            e["type"].rsplit(".", 1)[-1],
            e["payload"].get("body") or e["payload"].get("assignee"),
        )
        for e in events
    ]


async def test_a_failing_command_parks_its_aggregate_until_retried_after_the_fix_or_skipped(
    side: WriteSide,
) -> None:
    async with api_client(base_url=side.api_url, timeout=30, sub="operator-ann") as client:
        a, b, c = await _open(client, "A"), await _open(client, "B"), await _open(client, "C")

        # the poison: a 500 for its caller, and A is parked behind it
        key = f"poison-{uuid.uuid4()}"
        poison = {"author": "ann", "body": "poison pill"}
        r = await client.post(
            f"/api/v1/incidents/{a}/comments", json=poison, headers={"Idempotency-Key": key}
        )
        assert r.status_code == 500, r.text
        assert r.json()["error"] == "internal_error"

        # A's later commands: queued ones held in order (pending), a direct one refused
        assign_url = await _queued(client, f"/api/v1/incidents/{a}/assign", {"assignee": "alice"})
        comment_url = await _queued(
            client, f"/api/v1/incidents/{a}/comments", {"author": "ann", "body": "next"}
        )
        r = await client.post(f"/api/v1/incidents/{a}/assign", json={"assignee": "bob"})
        assert r.status_code == 503, r.text
        assert r.headers["retry-after"] == "30"
        assert (r.json()["error"], r.json()["current_version"]) == ("aggregate_parked", 1)
        # other aggregates flow, on every path
        r = await client.post(f"/api/v1/incidents/{b}/assign", json={"assignee": "bob"})
        assert r.status_code == 200, r.text
        b_url = await _queued(client, f"/api/v1/incidents/{b}/comments", {"author": "bob", "body": "fine"})

        async def b_decided() -> dict[str, Any] | None:
            status = await _status(client, b_url)
            return status if status["status"] != "pending" else None

        assert (await until(b_decided, 30, "B's queued comment decided"))["status"] == "accepted"

        async def a_parked() -> dict[str, Any] | None:
            parked = await _parked(client, a)
            return parked[0] if parked and parked[0]["held"] == 2 else None

        parked = await until(a_parked, 30, "A parked behind its dead letter, two commands held")
        assert "the comment handler crashed" in parked["error"]
        dead = parked["dead_letter"]
        path = f"{ADMIN}/command-processor/{dead['partition']}/{dead['offset']}"
        one = (await client.get(path)).json()
        assert (one["state"], one["key"], one["value"]["document"]["command_id"]) == ("parked", a, key)
        for url in (assign_url, comment_url):
            assert (await _status(client, url))["status"] == "pending"
        assert await _history(side, a) == [(1, "IncidentOpened", None)]

        # retried before the fix: it fails again; A stays parked with both held
        r = await client.post(f"{path}/retry")
        assert r.status_code == 200, r.text
        assert (r.json()["outcome"], r.json()["actor"]) == ("failed", "operator-ann")
        assert "the comment handler crashed" in r.json()["error"]
        assert (await _parked(client, a))[0]["held"] == 2

        # C: a poison and one queued command behind it, to be skipped
        r = await client.post(f"/api/v1/incidents/{c}/comments", json=poison)
        assert r.status_code == 500, r.text
        c_url = await _queued(client, f"/api/v1/incidents/{c}/assign", {"assignee": "carol"})

        async def c_parked() -> dict[str, Any] | None:
            parked = await _parked(client, c)
            return parked[0] if parked and parked[0]["held"] == 1 else None

        c_dead = (await until(c_parked, 30, "C parked with one held"))["dead_letter"]

    # the fix is deployed: the same API without the bug
    assert side.api is not None
    side.api.stop()
    side.api = None
    await side.start_api()
    async with api_client(base_url=side.api_url, timeout=30, sub="operator-ann") as client:
        await side.wait_until_commands_flow(client)
        # still parked across the restart: the direct command is refused again
        r = await client.post(f"/api/v1/incidents/{a}/assign", json={"assignee": "bob"})
        assert (r.status_code, r.json()["error"]) == (503, "aggregate_parked")

        r = await client.post(f"{path}/retry")
        assert r.status_code == 200, r.text
        assert (r.json()["outcome"], r.json()["applied"]) == ("applied", 3)
        assert await _history(side, a) == [
            (1, "IncidentOpened", None),
            (2, "IncidentCommented", "poison pill"),
            (3, "IncidentAssigned", "alice"),
            (4, "IncidentCommented", "next"),
        ]
        assert await _parked(client, a) == []
        for url, version in ((assign_url, 3), (comment_url, 4)):
            status = await until(functools.partial(_decided, client, url), 30, "the held command's outcome")
            assert (status["status"], status["version"]) == ("accepted", version)
        # the poison's caller, retrying with its Idempotency-Key, now gets the outcome
        r = await client.post(
            f"/api/v1/incidents/{a}/comments", json=poison, headers={"Idempotency-Key": key}
        )
        assert (r.status_code, r.json()["version"]) == (200, 2)
        r = await client.post(f"/api/v1/incidents/{a}/assign", json={"assignee": "bob"})
        assert (r.status_code, r.json()["version"]) == (200, 5)
        r = await client.post(f"{path}/retry")
        assert r.status_code == 409, r.text  # nothing is parked behind it any more

        # C's dead letter skipped: the held command is decided, the poison never is
        r = await client.post(f"{ADMIN}/command-processor/{c_dead['partition']}/{c_dead['offset']}/skip")
        assert r.status_code == 200, r.text
        assert (r.json()["outcome"], r.json()["applied"]) == ("applied", 1)
        assert await _history(side, c) == [(1, "IncidentOpened", None), (2, "IncidentAssigned", "carol")]
        status = await until(functools.partial(_decided, client, c_url), 30, "C's held command's outcome")
        assert (status["status"], status["version"]) == ("accepted", 2)

        # every action is kept with its actor; the dead letters' states say what became of them
        r = await client.get(f"{ADMIN}/actions", params={"consumer": "command-processor"})
        actions = [(x["action"], x["outcome"], x["actor"], x["key"]) for x in r.json()["items"]]
        assert actions == [
            ("skip", "applied", "operator-ann", c),
            ("retry", "applied", "operator-ann", a),
            ("retry", "failed", "operator-ann", a),
        ]
        r = await client.get(ADMIN, params={"consumer": "command-processor"})
        states = {d["key"]: d["state"] for d in r.json()["items"]}
        assert (states[a], states[c]) == ("retried", "skipped")


async def _decided(client: httpx.AsyncClient, url: str) -> dict[str, Any] | None:
    status = await _status(client, url)
    return status if status["status"] != "pending" else None
