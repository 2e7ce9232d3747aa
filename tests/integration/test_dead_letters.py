"""The dead letters of the consumers, as an operator of the platform reads them: the
newest first, by consumer and by key, and one decoded (a real projector dead-letters a
record that is not Avro and an Avro event whose headers do not match it)."""

from __future__ import annotations

import asyncio
import getpass
import subprocess
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import httpx
import pytest

from commands.routing import partition_for
from projections.db import create_pool
from shared_kernel import kafka
from shared_kernel.avro import AvroCodec
from shared_kernel.settings import Settings
from shared_kernel.topics import Topics
from tests.auth import api_client
from tests.integration.harness import CQRS, WriteSide, until
from tests.unit.test_avro import SAMPLES

pytestmark = pytest.mark.asyncio(loop_scope="session")


@pytest.fixture(scope="module")
async def side(settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[WriteSide]:
    ws = WriteSide.create(settings, tmp_path_factory.mktemp("dead-letters"))
    await ws.start_serving()
    ws.start_projectors("incidents")
    await ws.wait_until_projected()
    yield ws
    ws.stop()


async def test_an_operator_lists_the_dead_letters_by_consumer_and_key_and_reads_one_decoded(
    side: WriteSide, settings: Settings
) -> None:
    topic = Topics(side.settings.topic_prefix).events("incidents")
    mismatched = str(uuid.uuid4())
    value = AvroCodec.from_directory().encode("incidents.IncidentOpened", SAMPLES["incidents.IncidentOpened"])
    producer = kafka.producer(settings)
    await producer.start()
    try:
        await producer.send_and_wait(topic, b"\x00not avro", key=b"garbage")
        await producer.send_and_wait(
            topic, value, key=mismatched.encode(), headers=[("event-type", b"incidents.IncidentAssigned")]
        )
    finally:
        await producer.stop()

    async with api_client(base_url=side.api_url, timeout=30) as platform:

        async def both() -> list[dict[str, Any]] | None:
            r = await platform.get("/api/v1/admin/dead-letters", params={"consumer": "incidents"})
            assert r.status_code == 200, r.text
            items = [i for i in r.json()["items"] if i["key"] in ("garbage", mismatched)]
            return items if len(items) == 2 else None

        items = await until(both, 60, "the projector's two dead letters")
        assert [i["key"] for i in items] == [mismatched, "garbage"]  # newest first
        assert all(i["consumer"] == "incidents" and i["source"].startswith(f"{topic}:") for i in items)
        assert "cannot decode" in items[1]["error"]

        r = await platform.get("/api/v1/admin/dead-letters", params={"key": mismatched})
        assert r.status_code == 200, r.text
        assert [(i["consumer"], i["key"]) for i in r.json()["items"]] == [("incidents", mismatched)]

        first = items[0]
        r = await platform.get(f"/api/v1/admin/dead-letters/incidents/{first['partition']}/{first['offset']}")
        assert r.status_code == 200, r.text
        one = r.json()
        assert one["headers"]["event-type"] == "incidents.IncidentAssigned"
        assert "dlq-error" in one["headers"]
        assert one["value"]["kind"] == "avro"
        assert one["value"]["type"] == "incidents.IncidentOpened"
        assert one["value"]["payload"]["title"] == SAMPLES["incidents.IncidentOpened"]["title"]
        garbage = items[1]
        r = await platform.get(
            f"/api/v1/admin/dead-letters/incidents/{garbage['partition']}/{garbage['offset']}"
        )
        assert r.json()["value"]["kind"] == "bytes"

        assert (await platform.get("/api/v1/admin/dead-letters/nobody/0/0")).status_code == 404
        r = await platform.get(
            f"/api/v1/admin/dead-letters/incidents/{first['partition']}/{first['offset'] + 10**6}"
        )
        assert r.status_code == 404
        assert (
            await platform.get("/api/v1/admin/dead-letters", params={"consumer": "nobody"})
        ).status_code == 404

    async with api_client("admin", base_url=side.api_url, timeout=30) as tenant_admin:
        r = await tenant_admin.get("/api/v1/admin/dead-letters")
        assert r.status_code == 403  # they hold every tenant's records: the platform's
    async with httpx.AsyncClient(base_url=side.api_url, timeout=30) as anonymous:
        assert (await anonymous.get("/api/v1/admin/dead-letters")).status_code == 401


async def _open(client: httpx.AsyncClient, title: str) -> str:
    r = await client.post("/api/v1/incidents", json={"title": title})
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


async def _assign_and_comment(client: httpx.AsyncClient, incident: str, who: str) -> None:
    r = await client.post(f"/api/v1/incidents/{incident}/assign", json={"assignee": who})
    assert r.status_code == 200, r.text
    r = await client.post(f"/api/v1/incidents/{incident}/comments", json={"author": who, "body": "on it"})
    assert r.status_code == 200, r.text


async def _parked(client: httpx.AsyncClient, key: str) -> list[dict[str, Any]]:
    r = await client.get("/api/v1/admin/dead-letters/parked", params={"consumer": "incidents", "key": key})
    assert r.status_code == 200, r.text
    return list(r.json()["items"])


async def _incident(client: httpx.AsyncClient, incident: str) -> dict[str, Any] | None:
    r = await client.get(f"/api/v1/incidents/{incident}")
    assert r.status_code in (200, 404), r.text
    return dict(r.json()) if r.status_code == 200 else None


async def _checksum(pool: asyncpg.Pool, table: str) -> str:
    return str(await pool.fetchval(f"SELECT md5(string_agg(t::text, '|' ORDER BY id)) FROM {table} t"))


async def test_a_poison_event_parks_its_key_while_others_flow_until_retried_after_a_fix_or_skipped(
    side: WriteSide, settings: Settings
) -> None:
    pool = await create_pool(side.settings)
    # the "bug": the live read model refuses incidents whose title starts with "poison"
    await pool.execute("ALTER TABLE incidents_v1 ADD CONSTRAINT test_poison CHECK (title NOT LIKE 'poison%')")
    topic = Topics(side.settings.topic_prefix).events("incidents")
    try:
        async with api_client(base_url=side.api_url, timeout=30) as client:
            a = await _open(client, "poison pill")
            await _assign_and_comment(client, a, "alice")  # A's next two events
            b = await _open(client, "healthy")
            await _assign_and_comment(client, b, "bob")

            async def b_applied() -> dict[str, Any] | None:
                found = await _incident(client, b)
                return found if found and found["comments"] == 1 else None

            assert (await until(b_applied, 60, "B's events applied"))["assignee"] == "bob"

            async def a_parked() -> dict[str, Any] | None:
                parked = await _parked(client, a)
                return parked[0] if parked and parked[0]["held"] == 2 else None

            parked = await until(a_parked, 60, "A parked behind its dead letter, two events held")
            assert "test_poison" in parked["error"]
            assert await _incident(client, a) is None  # nothing of A applied
            dead = parked["dead_letter"]
            r = await client.get("/api/v1/admin/dead-letters", params={"key": a, "state": "unresolved"})
            assert [(d["state"], d["offset"]) for d in r.json()["items"]] == [("parked", dead["offset"])]
            r = await client.get(f"/api/v1/admin/dead-letters/incidents/{dead['partition']}/{dead['offset']}")
            assert r.json()["state"] == "parked"
            assert r.json()["parked"][0]["held"] == 2

            # retried before the fix: it fails again, and A stays parked with both held
            path = f"/api/v1/admin/dead-letters/incidents/{dead['partition']}/{dead['offset']}"
            r = await client.post(f"{path}/retry")
            assert r.status_code == 200, r.text
            assert r.json()["outcome"] == "failed"
            assert "test_poison" in r.json()["error"]
            assert (await _parked(client, a))[0]["held"] == 2
            assert await _incident(client, a) is None

            # the fix, then the retry (from the CLI, for every key it parks: here A's, with
            # a progress bar): the dead letter and the two held events, in order
            await pool.execute("ALTER TABLE incidents_v1 DROP CONSTRAINT test_poison")
            retried = await asyncio.to_thread(
                subprocess.run,
                [CQRS, "dlq", "retry", "incidents", "--all", "--key", a],
                env=side.env,
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )
            assert retried.returncode == 0, retried.stdout + retried.stderr
            assert f"retry {dead['partition']}:{dead['offset']} key {a}: applied, 3 applied" in retried.stderr
            found = await _incident(client, a)
            assert found is not None
            assert (found["title"], found["assignee"], found["comments"]) == ("poison pill", "alice", 1)
            assert await _parked(client, a) == []
            r = await client.get("/api/v1/admin/dead-letters", params={"key": a})
            assert [d["state"] for d in r.json()["items"]] == ["retried"]
            r = await client.post(f"{path}/retry")
            assert r.status_code == 409  # nothing is held behind it any more

            # C: a record that cannot be decoded between its creation and its next two events
            c = await _open(client, "skipped over")
            producer = kafka.producer(settings)
            await producer.start()
            try:
                await producer.send_and_wait(
                    topic,
                    b"\x00garbled",
                    key=c.encode(),
                    partition=partition_for(c, side.settings.partitions),
                )
            finally:
                await producer.stop()
            await _assign_and_comment(client, c, "carol")

            async def c_parked() -> dict[str, Any] | None:
                parked = await _parked(client, c)
                return parked[0] if parked and parked[0]["held"] == 2 else None

            skipped = (await until(c_parked, 60, "C parked behind the garbled record"))["dead_letter"]
            found = await _incident(client, c)
            assert found is not None
            assert (found["assignee"], found["comments"]) == (None, 0)
            r = await client.post(
                f"/api/v1/admin/dead-letters/incidents/{skipped['partition']}/{skipped['offset']}/skip"
            )
            assert r.status_code == 200, r.text
            assert (r.json()["outcome"], r.json()["applied"]) == ("applied", 2)
            found = await _incident(client, c)
            assert found is not None
            assert (found["assignee"], found["comments"]) == ("carol", 1)

            r = await client.get("/api/v1/admin/dead-letters/actions", params={"consumer": "incidents"})
            assert [(x["action"], x["key"], x["outcome"], x["actor"]) for x in r.json()["items"][:3]] == [
                ("skip", c, "applied", "tester"),
                ("retry", a, "applied", f"cli:{getpass.getuser()}"),
                ("retry", a, "failed", "tester"),
            ]
            r = await client.post(f"/api/v1/admin/dead-letters/audit-sink/{dead['partition']}/0/retry")
            assert r.status_code == 409
            assert r.json()["error"] == "does_not_park"  # the audit sink keeps every record it can
            r = await client.post(
                f"/api/v1/admin/dead-letters/job-incident-deadlines/{dead['partition']}/0/retry"
            )
            assert r.status_code == 409
            assert r.json()["error"] == "not_parked"  # a job parks, but nothing is parked there

            # the read model equals a fresh rebuild from the log
            started = await client.post("/api/v1/admin/projections/incidents/rebuild")
            assert started.status_code == 202, started.text

            async def rebuilt() -> dict[str, Any] | None:
                body = dict((await client.get(started.headers["location"])).json())
                return body if body["state"] != "building" else None

            assert (await until(rebuilt, 180, "the rebuild"))["state"] == "live"
            assert await _checksum(pool, "incidents_v1") == await _checksum(pool, "incidents_v2")
    finally:
        await pool.execute("ALTER TABLE incidents_v1 DROP CONSTRAINT IF EXISTS test_poison")
        await pool.close()
