"""Change data capture on the real stack: the rows of a legacy catalogue's table (its own
database and role on the stack's PostgreSQL), captured by Debezium on the stack's Kafka
Connect worker, become datasets through the CDC job and the normal command path.

Each module run captures a table of its own (`<prefix>.datasets` in the database
`legacy`) with a connector, slot and publication of its own, removed at the end."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import orjson
import pytest

from projections.db import schema_name
from shared_kernel.settings import Settings
from shared_kernel.topics import Topics
from streams import cdc
from streams.datasets.legacy_catalog import dataset_of
from tests.auth import api_client
from tests.integration.harness import WriteSide, read_events, read_records, until

pytestmark = pytest.mark.asyncio(loop_scope="session")

SEEDED = {  # rows there before the connector first starts: its snapshot reads them
    "seed-1": ("Seeded orders", "orders of 2019", "active", "team-a", {"pii": True}),
    "seed-2": ("Seeded archive", None, "archived", "team-b", None),
}
REPO_ROOT = Path(__file__).resolve().parents[2]
CATALOG_SQL = REPO_ROOT / "infra" / "legacy" / "catalog.sql"


def stack_dir() -> Path:
    return Path(os.environ.get("STACK_DIR", str(REPO_ROOT / ".stack")))


async def legacy(settings: Settings) -> asyncpg.Connection:
    return await asyncpg.connect(settings.cdc_source_dsn)


@pytest.fixture(scope="module")
async def side(settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[WriteSide]:
    ws = WriteSide.create(settings, tmp_path_factory.mktemp("cdc"))
    schema = ws.settings.topic_prefix
    ws.settings = ws.settings.model_copy(update={"cdc_source_table": f"{schema}.datasets"})
    ws.env["APP_CDC_SOURCE_TABLE"] = f"{schema}.datasets"
    ddl = CATALOG_SQL.read_text().replace("catalog", schema)
    conn = await legacy(ws.settings)
    try:
        await conn.execute(ddl)
        for key, (name, description, status, owner, metadata) in SEEDED.items():
            await insert(conn, ws, key, name, description, status, owner, metadata)
    finally:
        await conn.close()
    await ws.start_serving()
    ws.start_projectors("datasets", "datasets_search", "events")
    await ws.wait_until_projected()
    await ws.wait_until_job_runs(ws.start_job("legacy-catalog"))
    yield ws
    ws.stop()
    await cdc.remove(ws.settings)
    conn = await legacy(ws.settings)
    try:
        await conn.execute(f'DROP SCHEMA "{schema}" CASCADE')
    finally:
        await conn.close()


@pytest.fixture(scope="module")
async def client(side: WriteSide) -> AsyncIterator[httpx.AsyncClient]:
    async with api_client(base_url=side.api_url, timeout=30) as c:
        yield c


def table(side: WriteSide) -> str:
    return f'"{side.settings.topic_prefix}".datasets'


async def insert(
    conn: asyncpg.Connection,
    side: WriteSide,
    key: str,
    name: str,
    description: str | None = None,
    status: str | None = "active",
    owner: str | None = None,
    metadata: Any = None,
) -> None:
    await conn.execute(
        f"INSERT INTO {table(side)} (id, name, description, status, owner_id, metadata) "
        "VALUES ($1, $2, $3, $4, $5, $6::jsonb)",
        key,
        name,
        description,
        status,
        owner,
        None if metadata is None else orjson.dumps(metadata).decode(),
    )


async def sql(side: WriteSide, statement: str, *args: Any) -> str:
    conn = await legacy(side.settings)
    try:
        return str(await conn.execute(statement.format(table=table(side)), *args))
    finally:
        await conn.close()


def dataset_id(side: WriteSide, key: str) -> str:
    return str(dataset_of(cdc.Source.of(side.settings), key))


async def dataset(client: httpx.AsyncClient, side: WriteSide, key: str, version: int = 1) -> Any:
    """The dataset of a source row once it reached `version`, else None."""
    r = await client.get(f"/api/v1/datasets/{dataset_id(side, key)}")
    if r.status_code == 404:
        return None
    assert r.status_code == 200, r.text
    body = r.json()
    return body if body["version"] >= version else None


async def events_of(side: WriteSide, keys: list[str]) -> dict[str, list[dict[str, Any]]]:
    """The datasets' events in the log, per source key, in version order."""
    ids = {dataset_id(side, k): k for k in keys}
    out: dict[str, list[dict[str, Any]]] = {k: [] for k in keys}
    for e in await read_events(side.settings, ["datasets"]):
        key = ids.get(e["meta"].aggregate_id)
        if key is not None:
            out[key].append(e)
    for found in out.values():
        found.sort(key=lambda e: e["meta"].aggregate_version)
    return out


async def test_rows_there_before_the_connector_first_started_are_registered_by_its_snapshot(
    side: WriteSide, client: httpx.AsyncClient
) -> None:
    one = await until(lambda: dataset(client, side, "seed-1"), 90, "the snapshot's first row")
    assert (one["name"], one["description"], one["owner"], one["metadata"], one["status"]) == (
        "Seeded orders",
        "orders of 2019",
        "team-a",
        {"pii": True},
        "active",
    )
    assert one["tenant"] == side.settings.cdc_tenant
    two = await until(lambda: dataset(client, side, "seed-2", version=2), 30, "the archived row")
    assert (two["status"], two["archived_reason"], two["description"]) == (
        "archived",
        "archived in the source",
        "",
    )


async def test_inserts_updates_archives_and_deletes_in_the_source_follow_into_the_read_models(
    side: WriteSide, client: httpx.AsyncClient
) -> None:
    name = f"Shipments {uuid.uuid4().hex[:6]}"
    conn = await legacy(side.settings)
    try:
        await insert(conn, side, "crud-1", name, "all shipments", owner="ops", metadata={"a": 1, "b": "x"})
        await insert(conn, side, "crud-2", "Returns")
    finally:
        await conn.close()
    created = await until(lambda: dataset(client, side, "crud-1"), 60, "the inserted row")
    assert (created["name"], created["description"], created["owner"], created["metadata"]) == (
        name,
        "all shipments",
        "ops",
        {"a": 1, "b": "x"},
    )
    found = await until(lambda: _search(client, name), 60, "the inserted row in search")
    assert found == [dataset_id(side, "crud-1")]

    # one change of three columns: described, two entries set, one removed
    await sql(
        side,
        "UPDATE {table} SET description = 'every shipment', metadata = '{{\"a\": 2, \"c\": true}}', "
        "updated_at = now() WHERE id = 'crud-1'",
    )
    changed = await until(lambda: dataset(client, side, "crud-1", version=5), 60, "the update")
    assert (changed["description"], changed["metadata"]) == ("every shipment", {"a": 2, "c": True})
    await sql(side, "UPDATE {table} SET name = $1 WHERE id = 'crud-1'", f"{name} (renamed)")
    renamed = await until(lambda: dataset(client, side, "crud-1", version=6), 60, "the rename")
    assert renamed["name"] == f"{name} (renamed)"
    await sql(side, "UPDATE {table} SET status = 'archived' WHERE id = 'crud-1'")
    archived = await until(lambda: dataset(client, side, "crud-1", version=7), 60, "the archiving")
    assert (archived["status"], archived["archived_reason"]) == ("archived", "archived in the source")

    await until(lambda: dataset(client, side, "crud-2"), 60, "the second row")
    assert await sql(side, "DELETE FROM {table} WHERE id = 'crud-2'") == "DELETE 1"
    deleted = await until(lambda: dataset(client, side, "crud-2", version=2), 60, "the delete")
    assert (deleted["status"], deleted["archived_reason"]) == ("archived", "deleted in the source")

    log = await events_of(side, ["crud-1", "crud-2"])
    assert [e["type"].rsplit(".", 1)[1] for e in log["crud-1"]] == [
        "DatasetRegistered",
        "DatasetDescribed",
        "MetadataSet",
        "MetadataSet",
        "MetadataRemoved",
        "DatasetDescribed",
        "DatasetArchived",
    ]
    assert [e["meta"].aggregate_version for e in log["crud-1"]] == list(range(1, 8))
    assert [e["meta"].aggregate_version for e in log["crud-2"]] == [1, 2]
    assert {e["meta"].actor for e in log["crud-1"]} == {"job:legacy-catalog"}


async def _search(client: httpx.AsyncClient, text: str) -> list[str] | None:
    r = await client.get("/api/v1/search/datasets", params={"q": text})
    assert r.status_code == 200, r.text
    return [hit["id"] for hit in r.json()["items"]] or None


async def test_a_row_that_cannot_be_mapped_is_dead_lettered_and_later_rows_still_flow(
    side: WriteSide, client: httpx.AsyncClient
) -> None:
    conn = await legacy(side.settings)
    try:
        await insert(conn, side, "bad-list", "Bad metadata", metadata=[1, 2])
        await insert(conn, side, "bad-name", "   ")
        await insert(conn, side, "good-after", "Fine")
    finally:
        await conn.close()
    await until(lambda: dataset(client, side, "good-after"), 60, "the row after the bad ones")
    dlq = Topics(side.settings.topic_prefix).dlq("job-legacy-catalog")

    async def dead() -> dict[str, str] | None:
        found = {
            orjson.loads(r.key)["id"]: dict(r.headers)["dlq-error"].decode()
            for r in await read_records(side.settings, [dlq])
        }
        return found if {"bad-list", "bad-name"} <= set(found) else None

    letters = await until(dead, 30, "both dead letters")
    assert "metadata is a JSON list, not an object" in letters["bad-list"]
    assert "the name is blank" in letters["bad-name"]
    for key in ("bad-list", "bad-name"):
        r = await client.get(f"/api/v1/datasets/{dataset_id(side, key)}")
        assert r.status_code == 404


async def read_model_versions(side: WriteSide, keys: list[str]) -> Counter[int]:
    """How many of the keys' datasets are at each version in the datasets read model."""
    pool = await asyncpg.connect(side.settings.postgres_dsn)
    try:
        rows = await pool.fetch(
            f'SELECT version FROM "{schema_name(side.settings)}".datasets WHERE id = ANY($1::uuid[])',
            [dataset_id(side, k) for k in keys],
        )
    finally:
        await pool.close()
    return Counter(r["version"] for r in rows)


async def test_ten_thousand_rows_inserted_then_updated_in_bulk_arrive_exactly_once_each(
    side: WriteSide,
) -> None:
    n = 10_000
    keys = [f"bulk-{i}" for i in range(1, n + 1)]
    inserted = await sql(
        side,
        "INSERT INTO {table} (id, name, owner_id, metadata) SELECT 'bulk-' || g, 'Bulk ' || g, "
        "'loader', jsonb_build_object('n', g) FROM generate_series(1, $1) g",
        n,
    )
    assert inserted == f"INSERT 0 {n}"
    assert await sql(side, "UPDATE {table} SET description = 'bulk row ' || id WHERE id LIKE 'bulk-%'") == (
        f"UPDATE {n}"
    )

    async def all_updated() -> Counter[int] | None:
        versions = await read_model_versions(side, keys)
        return versions if versions[2] == n else None

    versions = await until(all_updated, 600, "every bulk row registered and described")
    assert versions == Counter({2: n})
    log = await events_of(side, keys)
    kinds = Counter(tuple(e["type"].rsplit(".", 1)[1] for e in found) for found in log.values())
    assert kinds == Counter({("DatasetRegistered", "DatasetDescribed"): n})


def kill_connect() -> None:
    pid = int((stack_dir() / "connect" / "connect.pid").read_text().split()[0])
    os.kill(pid, signal.SIGKILL)


def start_connect() -> None:
    subprocess.run([sys.executable, str(REPO_ROOT / "infra" / "stack.py"), "up", "connect"], check=True)


async def insert_slowly(side: WriteSide, keys: list[str]) -> None:
    """One row per transaction, while a process is killed."""
    conn = await legacy(side.settings)
    try:
        for key in keys:
            await insert(conn, side, key, f"Row {key}")
            await asyncio.sleep(0.002)
    finally:
        await conn.close()


async def exactly_once(side: WriteSide, keys: list[str], seconds: float = 180) -> None:
    async def arrived() -> bool:
        return (await read_model_versions(side, keys))[1] == len(keys)

    await until(arrived, seconds, "every row after the kill")
    log = await events_of(side, keys)
    assert Counter(len(found) for found in log.values()) == Counter({1: len(keys)})


async def test_kill_9_of_the_connect_worker_mid_stream_loses_and_doubles_nothing(side: WriteSide) -> None:
    keys = [f"kc-{i}" for i in range(1500)]
    writer = asyncio.create_task(insert_slowly(side, keys))
    await asyncio.sleep(1.0)
    kill_connect()
    await writer
    start_connect()
    await exactly_once(side, keys)


async def test_kill_9_of_the_cdc_job_mid_stream_loses_and_doubles_nothing(side: WriteSide) -> None:
    keys = [f"kj-{i}" for i in range(1500)]
    writer = asyncio.create_task(insert_slowly(side, keys))
    await asyncio.sleep(1.0)
    job = side.jobs[0]
    job.kill9()
    await writer
    again = side.restart(job)
    await side.wait_until_job_runs(again)
    await exactly_once(side, keys)


async def cqrs_cdc(side: WriteSide, *args: str) -> bytes:
    """`cqrs cdc ARGS` of this side; its output (it must succeed)."""
    proc = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).parent / "cqrs"),
        "cdc",
        *args,
        env=side.env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    return out


async def test_the_admin_route_and_the_cli_show_the_connector_and_pause_and_resume_it(
    side: WriteSide, client: httpx.AsyncClient
) -> None:
    async def running() -> dict[str, Any] | None:
        r = await client.get("/api/v1/admin/cdc")
        assert r.status_code == 200, r.text
        body = r.json()
        return body if body["connector"]["state"] == "RUNNING" and body["job"]["events_behind"] == 0 else None

    state = await until(running, 60, "the connector running, the job caught up")
    assert state["connector"]["tasks"][0]["state"] == "RUNNING"
    assert state["source"]["table"] == f"{side.settings.topic_prefix}.datasets"
    assert state["slot"] == {"name": cdc.Source.of(side.settings).slot, "active": True}
    assert state["lag"]["bytes_behind"] is not None
    assert state["lag"]["committed_lsn"] > 0
    assert state["errors"] == []
    async with api_client(role="admin", base_url=side.api_url) as tenant_admin:
        assert (await tenant_admin.get("/api/v1/admin/cdc")).status_code == 403
    ready = (await client.get("/ready")).json()
    assert ready["cdc"] == "RUNNING"

    assert await cqrs_cdc(side, "pause")

    async def state_is(wanted: str) -> bool:
        """The connector and its task (the one that polls the source) are in `wanted`."""
        connector = (await client.get("/api/v1/admin/cdc")).json()["connector"]
        return {connector["state"], *(t["state"] for t in connector["tasks"])} == {wanted}

    try:
        await until(lambda: state_is("PAUSED"), 30, "paused")
        conn = await legacy(side.settings)
        try:
            await insert(conn, side, "while-paused", "Waited in the WAL")
        finally:
            await conn.close()
        await asyncio.sleep(3)  # a paused connector delivers nothing: the row must not arrive in this time
        assert await dataset(client, side, "while-paused") is None
        assert orjson.loads(await cqrs_cdc(side, "status", "--json"))["connector"]["state"] == "PAUSED"
    finally:  # the later tests need it running
        assert await cqrs_cdc(side, "resume")
    await until(lambda: state_is("RUNNING"), 30, "resumed")
    await until(lambda: dataset(client, side, "while-paused"), 60, "the row after resume")


async def test_a_new_column_is_ignored_and_a_renamed_mapped_one_halts_the_job_until_it_is_mapped(
    side: WriteSide, client: httpx.AsyncClient
) -> None:
    await sql(side, "ALTER TABLE {table} ADD COLUMN region text")
    await sql(side, "INSERT INTO {table} (id, name, region) VALUES ('new-col', 'With region', 'eu')")
    await until(lambda: dataset(client, side, "new-col"), 60, "a row with a new column")
    job = side.jobs[0]
    assert b"the source has a column the CDC job does not map" in job.output()

    await sql(side, "ALTER TABLE {table} RENAME COLUMN description TO summary")
    await sql(side, "UPDATE {table} SET summary = 'after the rename' WHERE id = 'new-col'")
    await sql(side, "INSERT INTO {table} (id, name) VALUES ('after-rename', 'Behind the halt')")

    async def halted() -> dict[str, Any] | None:
        body: dict[str, Any] = (await client.get("/api/v1/admin/cdc")).json()
        found: dict[str, Any] | None = body["job"]["halted"]
        return found

    halt = await until(halted, 60, "the job halted")
    assert "has no column description (description)" in halt["error"]
    assert "APP_CDC_SOURCE_COLUMNS" in halt["error"]
    assert b"job halted" in job.output()
    held = await dataset(client, side, "new-col")
    assert (held["description"], held["version"]) == ("", 1)  # no wrong command was sent
    assert await dataset(client, side, "after-rename") is None  # nothing after it either

    job.stop()
    job.env = {**side.env, "APP_CDC_SOURCE_COLUMNS": '{"description": "summary"}'}
    again = side.restart(job)
    await side.wait_until_job_runs(again)
    mended = await until(lambda: dataset(client, side, "new-col", version=2), 60, "the mapped column")
    assert mended["description"] == "after the rename"
    await until(lambda: dataset(client, side, "after-rename"), 60, "the rows after the halt")
    await until(lambda: halted_cleared(client), 30, "the halt cleared")


async def halted_cleared(client: httpx.AsyncClient) -> bool:
    return (await client.get("/api/v1/admin/cdc")).json()["job"]["halted"] is None
