"""The dead letters of the consumers, as an operator of the platform reads them: the
newest first, by consumer and by key, and one decoded (a real projector dead-letters a
record that is not Avro and an Avro event whose headers do not match it)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from shared_kernel import kafka
from shared_kernel.avro import AvroCodec
from shared_kernel.settings import Settings
from shared_kernel.topics import Topics
from tests.auth import api_client
from tests.integration.harness import WriteSide, until
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
