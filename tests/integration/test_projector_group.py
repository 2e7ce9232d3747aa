"""Several projections in one process (`cqrs run projectors`, what `make up` runs): each
is still a projection of its own, rebuilt, swapped and failing on its own.

The real write side and the real projectors process, under a prefix of their own; the
failure test runs the same group code (`streams.group.supervise_group`) in this
process, so that one projection's store can be made to fail while the other's works.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from projections import versions
from projections.db import create_pool
from projections.incidents.rows import IncidentsProjection
from shared_kernel.settings import Settings
from streams.app import RETRY_S
from streams.group import supervise_group
from tests.auth import api_client
from tests.integration.harness import WriteSide

pytestmark = pytest.mark.asyncio(loop_scope="session")


@pytest.fixture(scope="module")
async def side(settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[WriteSide]:
    ws = WriteSide.create(settings, tmp_path_factory.mktemp("projector-group"))
    ws.env["APP_REBUILD_BULK_UNTIL_BEHIND"] = "20"
    await ws.start_serving()
    yield ws
    ws.stop()


@pytest.fixture
async def client(side: WriteSide) -> AsyncIterator[httpx.AsyncClient]:
    async with api_client(base_url=side.api_url, timeout=30) as c:
        yield c


def _children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


async def _dataset(client: httpx.AsyncClient, name: str) -> dict[str, Any]:
    r = await client.post("/api/v1/datasets", json={"name": name})
    assert r.status_code == 201, r.text
    return dict(r.json())


async def _incident(client: httpx.AsyncClient, title: str) -> dict[str, Any]:
    r = await client.post("/api/v1/incidents", json={"title": title})
    assert r.status_code == 201, r.text
    return dict(r.json())


async def _read(client: httpx.AsyncClient, path: str, token: str) -> httpx.Response:
    """A read with the token (the API waits up to 5 s, then 504)."""
    return await client.get(path, params={"consistent_with": token})


async def test_a_rebuild_swaps_one_projection_of_the_process_while_the_other_keeps_following(
    side: WriteSide, client: httpx.AsyncClient
) -> None:
    group = side.start_projectors("datasets", "incidents")
    await side.wait_until_projected()
    for i in range(30):
        await _dataset(client, f"Before {i}")

    following = True
    reads: list[int] = []

    async def incidents_follow() -> None:
        while following:
            made = await _incident(client, "during the rebuild")
            r = await _read(client, f"/api/v1/incidents/{made['id']}", made["position"])
            reads.append(r.status_code)

    follower = asyncio.create_task(incidents_follow())
    started = await client.post("/api/v1/admin/projections/datasets/rebuild")
    assert started.status_code == 202, started.text
    href = started.headers["location"]
    deadline = time.monotonic() + 180
    while (done := (await client.get(href)).json())["state"] == "building":
        assert time.monotonic() < deadline, done
        await asyncio.sleep(0.2)
    following = False
    await follower

    assert done["state"] == "live", done
    new = done["version"]
    assert reads
    assert all(status == 200 for status in reads), reads  # incidents never waited 5 s
    # the process took the new version over: it answers reads with tokens from it
    after = await _dataset(client, "After the swap")
    r = await _read(client, f"/api/v1/datasets/{after['id']}", after["position"])
    assert r.status_code == 200, r.text
    listed = (await client.get("/api/v1/admin/projections")).json()["projections"]
    assert listed["datasets"]["live_version"] == new
    assert listed["datasets"]["dead_lettered"] == listed["incidents"]["dead_lettered"] == 0
    pool = await create_pool(side.settings)
    try:
        me = f":{group.popen.pid}"
        deadline = time.monotonic() + 30
        while True:  # the new version's worker beats from this process; the old one stopped
            new_workers = await versions.workers(pool, "datasets", new)
            old_workers = await versions.workers(pool, "datasets", new - 1, within_s=3)
            if any(w.endswith(me) for w in new_workers) and not any(w.endswith(me) for w in old_workers):
                break
            assert time.monotonic() < deadline, (new_workers, old_workers)
            await asyncio.sleep(0.5)
        assert any(w.endswith(me) for w in await versions.workers(pool, "incidents", 1))
    finally:
        await pool.close()
    assert group.popen.poll() is None
    assert _children(group.popen.pid) == []  # the workers are in the process, not children of it
    group.stop()
    side.projectors.remove(group)
    side.projections.clear()


async def test_one_projection_failing_in_the_process_stops_and_restarts_alone_and_loses_nothing(
    side: WriteSide, client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The incidents store fails for longer than a batch's retries: that worker stops
    (its batch not committed) and starts again; the datasets worker of the same process
    applies events throughout; in the end every incident is there and nothing was
    dead-lettered."""
    failing = {"on": False, "calls": 0}
    apply = IncidentsProjection.apply

    async def flaky(self: IncidentsProjection, conn: Any, events: list[Any]) -> None:
        if failing["on"]:
            failing["calls"] += 1
            raise OSError("the incidents store is away")  # what `projector.unavailable` retries
        await apply(self, conn, events)

    monkeypatch.setattr(IncidentsProjection, "apply", flaky)
    settings = side.settings.model_copy(update={"service_name": f"group-test-{uuid.uuid4().hex[:6]}"})
    stop = asyncio.Event()
    group = asyncio.create_task(supervise_group(settings, ["datasets", "incidents"], stop))
    try:
        probes = {
            "datasets": await _dataset(client, "Probe"),
            "incidents": await _incident(client, "Probe"),
        }
        deadline = time.monotonic() + 120
        for name, made in probes.items():  # both workers run
            while (await _read(client, f"/api/v1/{name}/{made['id']}", made["position"])).status_code != 200:
                assert time.monotonic() < deadline, f"the {name} worker did not start"
                assert not group.done()

        failing["on"] = True
        made_away = [await _incident(client, f"While away {i}") for i in range(5)]
        # every attempt of the batch fails: the worker gives up after its retries, and
        # again after each restart, while the datasets worker goes on
        deadline = time.monotonic() + sum(RETRY_S) + 60
        while failing["calls"] < len(RETRY_S) + 2:
            assert time.monotonic() < deadline, failing
            made = await _dataset(client, "During the outage")
            r = await _read(client, f"/api/v1/datasets/{made['id']}", made["position"])
            assert r.status_code == 200, r.text
            await asyncio.sleep(0.2)
        failing["on"] = False

        deadline = time.monotonic() + 60
        for i, made in enumerate(made_away):
            path = f"/api/v1/incidents/{made['id']}"
            while (r := await _read(client, path, made["position"])).status_code != 200:
                assert r.status_code == 504, r.text
                assert time.monotonic() < deadline
            assert r.json()["title"] == f"While away {i}"
        listed = (await client.get("/api/v1/admin/projections")).json()["projections"]
        assert listed["incidents"]["dead_lettered"] == 0
        assert not group.done()
    finally:
        stop.set()
        await asyncio.wait_for(group, 60)
