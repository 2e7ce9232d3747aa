"""Projection workers under crashes, rebuilds from offset 0 and rollbacks, on real
Kafka, PostgreSQL, OpenSearch and Faust workers."""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import orjson
import pytest

from projections.db import create_pool
from projections.search import index_name, search_client
from shared_kernel.position import PositionToken
from shared_kernel.settings import Settings
from streams.rebuild import log_path as rebuild_log
from tests.integration.harness import CQRS, Proc, WriteSide, read_events

pytestmark = pytest.mark.asyncio(loop_scope="session")

INCIDENTS = 300
WATCHED = ("incidents", "incidents_search")


@pytest.fixture(scope="module")
async def side(settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[WriteSide]:
    ws = WriteSide.create(settings, tmp_path_factory.mktemp("rebuild"))
    ws.env["APP_PROJECTION_BATCH_MAX"] = "40"  # many small batches: a kill lands inside one
    ws.env["APP_REBUILD_BATCH_MAX"] = "40"  # the same for the bulk replays of a rebuild
    ws.env["APP_REBUILD_BULK_UNTIL_BEHIND"] = "20"  # replays do nearly all, the Faust worker the rest
    await ws.start_serving()
    yield ws
    ws.stop()


@pytest.fixture(scope="module")
def state() -> dict[str, Any]:
    """What the tests of this module build on, in order."""
    return {}


def _merge(tokens: list[str]) -> str:
    merged = PositionToken.decode(tokens[0])
    for t in tokens[1:]:
        merged = merged.merge(PositionToken.decode(t))
    return merged.encode()


def _children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


async def _kill_mid_batch(pool: asyncpg.Pool, settings: Settings, supervisor: Proc, name: str) -> None:
    """SIGKILL the worker while its PostgreSQL transaction of a batch is open."""
    app = f"{settings.service_name}:projection:{name}:v1"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        busy = await pool.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1 AND xact_start IS NOT NULL "
            "AND (state = 'idle in transaction' OR query NOT LIKE '%projection_workers%')",
            app,
        )
        if busy:
            (worker,) = _children(supervisor.popen.pid)
            os.kill(worker, signal.SIGKILL)
            return
        await asyncio.sleep(0.002)
    raise AssertionError(f"{name} never had a batch in flight")


async def _until_consistent(
    client: httpx.AsyncClient, path: str, token: str, **params: str | int
) -> httpx.Response:
    deadline = time.monotonic() + 120
    while True:
        r = await client.get(path, params={"consistent_with": token, **params})
        if r.status_code == 200 or time.monotonic() > deadline:
            return r
        assert r.status_code == 504, r.text


async def _all_ids(client: httpx.AsyncClient, path: str, token: str, **params: str) -> set[str]:
    """The ids of every page of a list once it is consistent with `token`."""
    ids: set[str] = set()
    page = await _until_consistent(client, path, token, **params, limit=500)
    while True:
        assert page.status_code == 200, page.text
        ids |= {item["id"] for item in page.json()["items"]}
        cursor = page.json()["next_cursor"]
        if cursor is None:
            return ids
        page = await client.get(path, params={**params, "limit": 500, "cursor": cursor})


async def test_a_worker_killed_mid_batch_restarts_and_misses_nothing(
    side: WriteSide, client: httpx.AsyncClient, state: dict[str, Any]
) -> None:
    assignee, word = f"crew-{uuid.uuid4().hex[:6]}", f"kw{uuid.uuid4().hex[:8]}"
    gate = asyncio.Semaphore(32)
    tokens: list[str] = []

    async def one(i: int) -> None:
        async with gate:
            r = await client.post(
                "/api/v1/incidents", json={"title": f"{word} outage {i}", "priority": "high"}
            )
            assert r.status_code == 201, r.text
            ident = r.json()["id"]
            r = await client.post(f"/api/v1/incidents/{ident}/assign", json={"assignee": assignee})
            assert r.status_code == 200, r.text
            r = await client.post(
                f"/api/v1/incidents/{ident}/comments", json={"author": "ops", "body": f"note {i}"}
            )
            assert r.status_code == 200, r.text
            tokens.append(r.json()["position"])

    await asyncio.gather(*(one(i) for i in range(INCIDENTS)))  # a backlog before any worker runs
    token = _merge(tokens)
    state.update(assignee=assignee, word=word, token=token)

    pool = await create_pool(side.settings)
    try:
        supervisors = {name: side.start_projector(name) for name in WATCHED}
        for name, supervisor in supervisors.items():
            await _kill_mid_batch(pool, side.settings, supervisor, name)
    finally:
        await pool.close()

    # the supervisors start their workers again; they resume from their committed offsets
    listed = await _until_consistent(client, "/api/v1/incidents", token, assignee=assignee, limit=500)
    assert listed.status_code == 200, listed.text
    items = listed.json()["items"]
    assert len(items) == INCIDENTS
    assert all(i["comments"] == 1 and i["version"] == 3 for i in items)
    found = await _until_consistent(client, "/api/v1/search/incidents", token, q=word, limit=1)
    assert found.json()["total"] == INCIDENTS
    assert all(s.popen.poll() is None for s in supervisors.values())


async def _table_checksum(pool: asyncpg.Pool, table: str) -> str:
    return str(await pool.fetchval(f"SELECT md5(string_agg(t::text, '|' ORDER BY id)) FROM {table} t"))


async def _index_checksum(settings: Settings, version: int) -> str:
    async with search_client(settings) as client:
        found = await client.search(
            index=index_name(settings, "incidents", version),
            body={"query": {"match_all": {}}, "sort": [{"id": "asc"}], "size": 10_000, "version": True},
        )
    hits = [(h["_id"], h["_version"], h["_source"]) for h in found["hits"]["hits"]]
    assert len(hits) > INCIDENTS
    return hashlib.md5(orjson.dumps(hits, option=orjson.OPT_SORT_KEYS)).hexdigest()


async def test_a_fresh_rebuild_equals_the_crashed_read_models_and_readers_never_see_half_of_it(
    side: WriteSide, client: httpx.AsyncClient, state: dict[str, Any]
) -> None:
    assignee, word = state["assignee"], state["word"]
    seen: list[tuple[int, int]] = []

    async def read_while(rebuild: asyncio.subprocess.Process) -> None:
        while rebuild.returncode is None:
            r = await client.get("/api/v1/incidents", params={"assignee": assignee, "limit": 500})
            s = await client.get("/api/v1/search/incidents", params={"q": word, "limit": 1})
            seen.append((r.status_code, len(r.json()["items"])))
            seen.append((s.status_code, s.json()["total"]))
            await asyncio.sleep(0.05)

    for name in WATCHED:
        rebuild = await asyncio.create_subprocess_exec(
            CQRS,
            "projections",
            "rebuild",
            name,
            env=side.env,
            stdout=asyncio.subprocess.PIPE,
            stderr=sys.stderr,
        )
        reader = asyncio.create_task(read_while(rebuild))
        out, _ = await asyncio.wait_for(rebuild.communicate(), 180)
        await reader
        assert rebuild.returncode == 0, out.decode()
        assert f"{name} v2 is live".encode() in out
        # loaded by the bulk path (replays, COPY / _bulk), never falling back to row by row
        log = rebuild_log(side.settings, name, 2).read_text()
        caught_up = [orjson.loads(line) for line in log.splitlines() if '"replay caught up"' in line]
        assert len(caught_up) == side.settings.rebuild_lanes
        assert sum(c["applied"] for c in caught_up) > 0
        assert "bulk load failed" not in log

    assert len(seen) > 10
    assert set(seen) == {(200, INCIDENTS)}  # the old version, then the new one: never a part

    admin = (await client.get("/api/v1/admin/projections")).json()["projections"]
    assert admin["incidents"]["live_version"] == 2
    assert admin["incidents_search"]["live_version"] == 2
    pool = await create_pool(side.settings)
    try:
        assert await _table_checksum(pool, "incidents_v1") == await _table_checksum(pool, "incidents_v2")
    finally:
        await pool.close()
    assert await _index_checksum(side.settings, 1) == await _index_checksum(side.settings, 2)

    # the supervised workers took the new version over: new events reach it
    r = await client.post("/api/v1/incidents", json={"title": f"{word} after the swap"})
    after = await _until_consistent(client, "/api/v1/search/incidents", r.json()["position"], q=word, limit=1)
    assert after.json()["total"] == INCIDENTS + 1
    listed = await client.get(
        f"/api/v1/incidents/{r.json()['id']}", params={"consistent_with": r.json()["position"]}
    )
    assert listed.status_code == 200


async def test_admin_shows_versions_and_lag_and_rolls_back(
    side: WriteSide, client: httpx.AsyncClient, state: dict[str, Any]
) -> None:
    r = await client.get("/api/v1/admin/projections/incidents")
    assert r.status_code == 200
    assert [(v["version"], v["state"]) for v in r.json()["versions"]] == [(1, "retired"), (2, "live")]
    assert (await client.get("/api/v1/admin/projections/nope")).status_code == 404
    assert (await client.post("/api/v1/admin/projections/nope/rebuild")).status_code == 404

    admin = (await client.get("/api/v1/admin/projections")).json()["projections"]
    assert admin["incidents"]["events_behind"] == 0
    assert admin["incidents"]["seconds_behind"] == 0
    assert admin["events"]["events_behind"] >= 3 * INCIDENTS  # no worker runs the archive here
    assert admin["events"]["seconds_behind"] > 0

    r = await client.post("/api/v1/admin/projections/incidents/rollback")
    assert r.status_code == 200, r.text
    assert (r.json()["live_version"], r.json()["retired_version"]) == (1, 2)
    # the returned version catches up from where it stopped (its worker is started again)
    created = await client.post("/api/v1/incidents", json={"title": "after the rollback"})
    r = await _until_consistent(
        client, f"/api/v1/incidents/{created.json()['id']}", created.json()["position"]
    )
    assert r.status_code == 200, r.text
    r = await client.get("/api/v1/incidents", params={"assignee": state["assignee"], "limit": 500})
    assert len(r.json()["items"]) == INCIDENTS
    r = await client.post("/api/v1/admin/projections/incidents/rollback")
    assert r.status_code == 200  # and forth again: v2 was kept
    assert r.json()["live_version"] == 2


async def _rebuild_done(client: httpx.AsyncClient, href: str) -> dict[str, Any]:
    """The rebuild's last state; what it reported on the way is under "phases"."""
    deadline = time.monotonic() + 180
    phases: list[str | None] = []
    while time.monotonic() < deadline:
        body = (await client.get(href)).json()
        if body["state"] != "building":
            return {**body, "phases": phases}
        if not phases or phases[-1] != body["phase"]:
            phases.append(body["phase"])
        await asyncio.sleep(0.2)
    raise AssertionError(f"the rebuild did not finish: {body}")


async def test_a_rebuild_under_live_commands_and_reads_loses_nothing(
    side: WriteSide, client: httpx.AsyncClient
) -> None:
    assignee = f"live-{uuid.uuid4().hex[:6]}"
    tokens: list[str] = []

    async def open_one() -> None:
        r = await client.post("/api/v1/incidents", json={"title": "under load", "priority": "low"})
        assert r.status_code == 201, r.text
        ident = r.json()["id"]
        r = await client.post(f"/api/v1/incidents/{ident}/assign", json={"assignee": assignee})
        assert r.status_code == 200, r.text
        tokens.append(r.json()["position"])
        opened.add(ident)

    opened: set[str] = set()
    for _ in range(20):
        await open_one()
    before = await _until_consistent(
        client, "/api/v1/incidents", _merge(tokens), assignee=assignee, limit=500
    )
    assert before.status_code == 200, before.text
    floor = len(before.json()["items"])
    assert floor == 20

    writing = True
    reads: list[tuple[int, int]] = []

    async def writer() -> None:
        while writing:
            await open_one()

    async def reader() -> None:
        while writing:
            r = await client.get("/api/v1/incidents", params={"assignee": assignee, "limit": 500})
            reads.append((r.status_code, len(r.json()["items"]) if r.status_code == 200 else -1))
            await asyncio.sleep(0.02)

    tasks = [asyncio.create_task(writer()), asyncio.create_task(reader())]
    started = await client.post("/api/v1/admin/projections/incidents/rebuild")
    assert started.status_code == 202, started.text
    href = started.headers["location"]
    assert href.endswith(f"/rebuilds/{started.json()['rebuild_id']}")
    again = await client.post("/api/v1/admin/projections/incidents/rebuild")
    assert again.status_code == 409
    listed = (await client.get("/api/v1/admin/projections")).json()["projections"]["incidents"]
    assert listed["status"] == "rebuilding"
    done = await _rebuild_done(client, href)
    writing = False
    await asyncio.gather(*tasks)

    assert done["state"] == "live", done
    assert done["phase"] is None
    assert set(done["phases"]) <= {None, "loading", "replaying", "swapping"}, done["phases"]
    assert "replaying" in done["phases"] or "swapping" in done["phases"], done["phases"]
    assert done["total"] > 0
    assert done["total"] - done["done"] <= side.settings.rebuild_swap_max_behind  # swapped once caught up
    assert reads
    assert all(status == 200 for status, _ in reads), reads
    assert min(n for _, n in reads) >= floor
    counts = [n for _, n in reads]
    assert counts == sorted(counts)  # the old version, then the new: no step back

    # live events keep being applied after the swap, by the supervised worker
    final = _merge(tokens)
    assert await _all_ids(client, "/api/v1/incidents", final, assignee=assignee) == opened

    # the version built under load equals the previous one once that has caught up too
    new = done["version"]
    r = await client.post("/api/v1/admin/projections/incidents/rollback")
    assert r.status_code == 200, r.text
    old = r.json()["live_version"]
    assert await _all_ids(client, "/api/v1/incidents", final, assignee=assignee) == opened
    pool = await create_pool(side.settings)
    try:
        assert await _table_checksum(pool, f"incidents_v{old}") == await _table_checksum(
            pool, f"incidents_v{new}"
        )
    finally:
        await pool.close()


async def test_a_rebuild_killed_midway_resumes_from_its_own_positions(
    side: WriteSide, client: httpx.AsyncClient
) -> None:
    first = await asyncio.create_subprocess_exec(
        CQRS,
        "projections",
        "rebuild",
        "incidents",
        env=side.env,
        stdout=asyncio.subprocess.PIPE,
        stderr=sys.stderr,
    )
    pool = await create_pool(side.settings)
    try:
        deadline = time.monotonic() + 120
        building = None
        while time.monotonic() < deadline:
            building = await pool.fetchrow(
                "SELECT v.version, coalesce(sum(p.next_offset), 0) AS applied FROM projection_versions v "
                "LEFT JOIN projection_positions p ON p.projection = v.projection AND p.version = v.version "
                "WHERE v.projection = 'incidents' AND v.state = 'building' GROUP BY v.version"
            )
            if building and building["applied"] > 0:
                break
            await asyncio.sleep(0.01)
        assert building is not None
        assert building["applied"] > 0
        first.kill()  # SIGKILL: the rebuild's worker goes with it
        await first.wait()
        version = building["version"]

        second = await asyncio.create_subprocess_exec(
            CQRS,
            "projections",
            "rebuild",
            "incidents",
            env=side.env,
            stdout=asyncio.subprocess.PIPE,
            stderr=sys.stderr,
        )
        out, _ = await asyncio.wait_for(second.communicate(), 180)
        assert second.returncode == 0, out.decode()
        assert f"incidents v{version} is live".encode() in out  # the same version, resumed
        retired = await pool.fetchval(
            "SELECT version FROM projection_versions WHERE projection = 'incidents' AND state = 'retired'"
        )
        # nothing was written meanwhile: the resumed version equals the one it replaced
        assert await _table_checksum(pool, f"incidents_v{version}") == await _table_checksum(
            pool, f"incidents_v{retired}"
        )
    finally:
        await pool.close()
    r = await client.get("/api/v1/incidents", params={"limit": 1})
    assert r.status_code == 200


CHANGED = """
from projections.events import StoredEvent
from projections.incidents.rows import IncidentsProjection
from projections.projection import Row
from projections.registry import register


def _opened(row: Row | None, e: StoredEvent) -> Row | None:
    new = IncidentsProjection.evolvers["IncidentOpened"](row, e)
    if new is not None:
        new["title_length"] = len(e.payload["title"])
    return new


class IncidentsWithTitleLength(IncidentsProjection):
    columns = (*IncidentsProjection.columns, "title_length")
    ddl = IncidentsProjection.ddl.replace(
        "closed_at    timestamptz", "closed_at timestamptz, title_length int"
    )
    evolvers = {**IncidentsProjection.evolvers, "IncidentOpened": _opened}


register(IncidentsWithTitleLength())
"""


async def test_a_rebuild_after_a_code_change_serves_the_new_field(
    side: WriteSide, client: httpx.AsyncClient, tmp_path: Path
) -> None:
    (tmp_path / "changed_incidents.py").write_text(CHANGED)
    env = {
        **side.env,
        "APP_PROJECTION_MODULES": "changed_incidents",
        "PYTHONPATH": os.pathsep.join([str(tmp_path), side.env.get("PYTHONPATH", "")]),
    }
    r = await client.post("/api/v1/incidents", json={"title": "twelve chars"})
    ident = r.json()["id"]
    before = await _until_consistent(client, f"/api/v1/incidents/{ident}", r.json()["position"])
    assert "title_length" not in before.json()

    rebuild = await asyncio.create_subprocess_exec(
        CQRS,
        "projections",
        "rebuild",
        "incidents",
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=sys.stderr,
    )
    out, _ = await asyncio.wait_for(rebuild.communicate(), 180)
    assert rebuild.returncode == 0, out.decode()
    after = await client.get(f"/api/v1/incidents/{ident}")
    assert after.status_code == 200
    assert after.json()["title_length"] == len("twelve chars")


async def test_a_projector_far_behind_catches_up_in_bulk_then_follows_live_events_and_again_after_a_stall(
    side: WriteSide, client: httpx.AsyncClient
) -> None:
    # the events archive has had no worker in this module: all history is its backlog
    env = {**side.env, "APP_PROJECTION_CATCH_UP_BEHIND": "100", "APP_PROJECTION_LAG_CHECK_S": "0.5"}
    supervisor = side.start_projector("events", env=env)
    history = await read_events(side.settings, ["incidents"])
    assert len(history) > 1000
    pool = await create_pool(side.settings)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            archived = await pool.fetchval("SELECT count(*) FROM events")
            if archived >= len(history) and "caught up by the bulk path" in supervisor.log.read_text():
                break
            assert supervisor.popen.poll() is None, supervisor.log.read_text()[-3000:]
            await asyncio.sleep(0.1)
        ids = {str(r["event_id"]) for r in await pool.fetch("SELECT event_id FROM events")}
        assert ids == {str(e["meta"].event_id) for e in history}
    finally:
        await pool.close()
    log = supervisor.log.read_text()
    assert "far behind; catching up by the bulk path" in log
    assert "caught up by the bulk path" in log
    assert "bulk load failed" not in log

    # then its Faust worker follows live events, from where the replays stopped
    r = await client.post("/api/v1/incidents", json={"title": "after the catch-up"})
    assert r.status_code == 201, r.text
    events = await _until_consistent(
        client, f"/api/v1/incidents/{r.json()['id']}/events", r.json()["position"]
    )
    assert events.status_code == 200, events.text
    assert [e["event_type"] for e in events.json()["items"]] == ["incidents.IncidentOpened"]

    # its worker stalls while a burst arrives: the supervisor sees it fall far behind,
    # stops it, catches up in bulk again and starts a worker that follows live events
    (worker,) = _children(supervisor.popen.pid)
    os.kill(worker, signal.SIGSTOP)
    try:
        burst = await asyncio.gather(
            *(client.post("/api/v1/incidents", json={"title": f"burst {i}"}) for i in range(150))
        )
        assert [r.status_code for r in burst] == [201] * 150
        await _until_logged(supervisor, "worker fell far behind; handing over to the bulk path")
    finally:
        os.kill(worker, signal.SIGCONT)  # it gets the supervisor's SIGTERM, and stops
    await _until_logged(supervisor, "caught up by the bulk path", times=2)
    r = await client.post("/api/v1/incidents", json={"title": "after the stall"})
    events = await _until_consistent(
        client, f"/api/v1/incidents/{r.json()['id']}/events", r.json()["position"]
    )
    assert [e["event_type"] for e in events.json()["items"]] == ["incidents.IncidentOpened"]
    assert worker not in _children(supervisor.popen.pid)  # a new worker follows them
    history = await read_events(side.settings, ["incidents"])
    pool = await create_pool(side.settings)
    try:
        ids = {str(r["event_id"]) for r in await pool.fetch("SELECT event_id FROM events")}
    finally:
        await pool.close()
    assert ids == {str(e["meta"].event_id) for e in history}
    assert "bulk load failed" not in supervisor.log.read_text()


async def _until_logged(proc: Proc, line: str, times: int = 1, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while proc.log.read_text().count(line) < times:
        assert proc.popen.poll() is None, proc.log.read_text()[-3000:]
        assert time.monotonic() < deadline, (
            f"never logged {line!r} {times} time(s):\n{proc.log.read_text()[-3000:]}"
        )
        await asyncio.sleep(0.05)
