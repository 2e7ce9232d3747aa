"""Commands reach the owner of their partition: several instances share the partitions,
a command sent to any of them is answered, a stale owner cannot commit, and the
asynchronous path queues on the commands topic."""

from __future__ import annotations

import asyncio
import signal
import uuid
from collections import Counter
from pathlib import Path
from uuid import UUID

import orjson
import pytest
from redis.asyncio import Redis

from commands.bus import INTERNAL_COMMANDS
from commands.context import command_payload
from commands.incidents.commands import CommentOnIncident
from commands.routing import directory_key, partition_for
from shared_kernel.credentials import CLUSTER_HEADER, cluster_secret
from shared_kernel.envelope import CommandEnvelope
from shared_kernel.settings import Settings
from tests.auth import TENANT, api_client
from tests.integration.harness import WriteSide, read_events, wait_until_up

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def _directory(ws: WriteSide) -> dict[int, str]:
    redis = Redis.from_url(ws.settings.redis_url)
    try:
        raw = await redis.hgetall(directory_key(ws.settings.topic_prefix))
    finally:
        await redis.aclose()
    return {int(p): orjson.loads(v)["url"] for p, v in raw.items()}


async def _until(check: object, seconds: float, what: str) -> None:
    deadline = asyncio.get_running_loop().time() + seconds
    while not await check():  # type: ignore[operator]
        assert asyncio.get_running_loop().time() < deadline, what
        await asyncio.sleep(0.1)


async def test_two_instances_each_own_part_of_the_partitions_and_either_answers_any_command(
    settings: Settings, tmp_path: Path
) -> None:
    ws = WriteSide.create(settings, tmp_path, partitions=4)
    try:
        first, second = await ws.start_api(), await ws.start_api()

        async def shared() -> bool:
            return set((await _directory(ws)).values()) == {first.url, second.url}

        await _until(shared, 60, "the two instances never shared the partitions")
        owners = await _directory(ws)
        assert sorted(owners) == [0, 1, 2, 3]
        async with api_client(timeout=30) as client:
            # Incidents of every partition, opened through each instance in turn...
            opened: dict[int, str] = {}
            while len(opened) < 4:
                via = (first, second)[len(opened) % 2]
                r = await client.post(f"{via.url}/api/v1/incidents", json={"title": "routed"})
                assert r.status_code == 201, r.text
                opened.setdefault(partition_for(r.json()["id"], 4), r.json()["id"])
            # ...then commented through both: the owner answers whichever took the request.
            for partition, incident in opened.items():
                for n, via in enumerate((first, second)):
                    r = await client.post(
                        f"{via.url}/api/v1/incidents/{incident}/comments",
                        json={"author": "ann", "body": f"via {via.name}"},
                    )
                    assert r.status_code == 200, r.text
                    assert r.json()["version"] == n + 2, (partition, r.json())
        # Every partition got its events, whichever instance took the request.
        events = await read_events(ws.settings, ["incidents"])
        assert {e["partition"] for e in events} == {0, 1, 2, 3}
        # ...in the partition Kafka's partitioner gives the id: the directory's routing agrees.
        assert all(e["partition"] == partition_for(e["meta"].aggregate_id, 4) for e in events)
    finally:
        ws.stop()


async def test_a_paused_owner_whose_partitions_moved_neither_commits_nor_accepts_its_in_flight_command(
    settings: Settings, tmp_path: Path
) -> None:
    """SIGSTOP the owner, hand it a command, let the group give its partitions to another
    processor (which commits to the same aggregate), resume it: the stale owner's command
    is not committed and not answered as accepted; the aggregate's versions stay one line."""
    ws = WriteSide.create(settings, tmp_path, partitions=2, command_timeout_s=3.0)
    try:
        stale = ws.start_processor()  # it creates the topics the API's /ready waits for
        await wait_until_up(stale)
        # A forwarder (owning nothing) in front of the processors, for the setup.
        await ws.start_api(env={**ws.env, "APP_API_OWNS_PARTITIONS": "false"})
        async with api_client(base_url=ws.api_url, timeout=30) as client:
            await ws.wait_until_commands_flow(client)
            r = await client.post("/api/v1/incidents", json={"title": "contended"})
            assert r.status_code == 201, r.text
            incident = r.json()["id"]

            stale.popen.send_signal(signal.SIGSTOP)
            cluster = {CLUSTER_HEADER: cluster_secret(ws.settings)}
            in_flight = CommandEnvelope(
                command_id=f"stale-{uuid.uuid4()}",
                command_type="incidents.CommentOnIncident",
                aggregate_id=incident,
                payload=command_payload(CommentOnIncident(UUID(incident), "stale", "decided on old state")),
                tenant=TENANT,  # the incident's: another tenant's command would not find it
            )
            # the request waits in the paused process's socket
            sent = asyncio.create_task(
                client.post(
                    f"{stale.url}{INTERNAL_COMMANDS}",
                    content=in_flight.to_bytes(),
                    headers=cluster,
                    timeout=60,
                )
            )
            successor = ws.start_processor()
            await wait_until_up(successor)
            fresh = CommandEnvelope(
                command_id=f"fresh-{uuid.uuid4()}",
                command_type="incidents.CommentOnIncident",
                aggregate_id=incident,
                payload=command_payload(
                    CommentOnIncident(UUID(incident), "fresh", "decided by the new owner")
                ),
                tenant=TENANT,
            )
            # the owners' endpoint is the cluster's: a user's token does not open it
            refused = await client.post(f"{successor.url}{INTERNAL_COMMANDS}", content=fresh.to_bytes())
            assert refused.status_code == 401, refused.text

            async def successor_accepts() -> bool:
                r = await client.post(
                    f"{successor.url}{INTERNAL_COMMANDS}", content=fresh.to_bytes(), headers=cluster
                )
                assert r.status_code in (200, 409, 503), r.text
                if r.status_code == 200:
                    assert r.json()["status"] == "accepted", r.text
                return r.status_code == 200

            await _until(successor_accepts, 60, "the successor never took the partition over")
            stale.popen.send_signal(signal.SIGCONT)
            answer = await sent

        assert answer.status_code in (409, 503), answer.text  # not_owner, or the fenced transaction
        events = [
            e for e in await read_events(ws.settings, ["incidents"]) if e["meta"].aggregate_id == incident
        ]
        causes = Counter(e["headers"]["causation-id"] for e in events)
        assert in_flight.command_id not in causes
        assert causes[fresh.command_id] == 1
        assert [e["meta"].aggregate_version for e in events] == list(range(1, len(events) + 1))
    finally:
        for proc in ws.processors:
            if proc.popen.poll() is None:
                proc.popen.send_signal(signal.SIGCONT)
        ws.stop()


async def test_an_asynchronous_command_is_answered_202_and_its_status_url_gives_the_outcome(
    settings: Settings, tmp_path: Path
) -> None:
    ws = WriteSide.create(settings, tmp_path)
    try:
        await ws.start_serving()
        async with api_client(base_url=ws.api_url, timeout=30) as client:
            key = f"bulk-{uuid.uuid4()}"
            r = await client.post(
                "/api/v1/incidents",
                json={"title": "queued"},
                headers={"Prefer": "respond-async", "Idempotency-Key": key},
            )
            assert r.status_code == 202, r.text
            assert r.headers["preference-applied"] == "respond-async"
            body = r.json()
            assert (body["command_id"], body["status"]) == (key, "pending")
            assert r.headers["location"] == body["status_url"] == f"/api/v1/commands/{key}"

            async def decided() -> bool:
                return (await client.get(body["status_url"])).status_code == 200

            await _until(decided, 30, "the queued command was never decided")
            status = (await client.get(body["status_url"])).json()
            assert (status["status"], status["id"], status["version"]) == ("accepted", body["id"], 1)

            # A rejected one has its reason in its status.
            r = await client.post(
                f"/api/v1/incidents/{body['id']}/status",
                json={"status": "closed"},
                headers={"Prefer": "respond-async"},
            )
            assert r.status_code == 202
            rejected_url = r.json()["status_url"]

            async def refused() -> bool:
                return (await client.get(rejected_url)).status_code == 200

            await _until(refused, 30, "the queued rejection was never decided")
            status = (await client.get(rejected_url)).json()
            assert (status["status"], status["error"], status["current_version"]) == (
                "rejected",
                "invariant_violation",
                1,
            )
            # An id never sent stays pending.
            unknown = await client.get(f"/api/v1/commands/{uuid.uuid4()}")
            assert (unknown.status_code, unknown.json()["status"]) == (202, "pending")
    finally:
        ws.stop()
