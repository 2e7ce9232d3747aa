"""S9, webhooks: deliveries/s from the webhook-delivery job to a local receiver and an
event's latency from its occurrence to its delivery, beside a plain aiohttp loop POSTing
the same payloads, signed the same way, to the same receiver in the same run.

Under an isolated prefix (6 partitions): the API, the `webhook_subscriptions` projector,
`BENCH_S9_SUBSCRIPTIONS` (4) subscriptions of one tenant to `incidents.IncidentOpened`,
each its own path of a receiver in this process (aiohttp, 200 to everything). Then:

- **throughput**: `BENCH_S9_EVENTS` (2,000) `IncidentOpened` made by the real aggregate
  are produced to the events topic, then `cqrs run job webhook-delivery` starts; the clock
  runs from its worker's readiness to the last of events x subscriptions deliveries. At
  most `APP_WEBHOOK_PER_TARGET` (4) are in flight per subscription, as in production.
- **limit**: the same bodies POSTed by an aiohttp loop with as many in flight in all
  (subscriptions x 4), each signed with the Standard Webhooks headers.
- **latency**: `BENCH_S9_LATENCY_EVENTS` (200) incidents opened through the API one
  after the other, each delivered to every subscription: from `occurred_at` (the
  processor's clock) to its arrival (this machine's clock, the same).
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from bench.common import (
    WriteSide,
    api_client,
    drop_prefix,
    free_port,
    produce_events,
    profile_notes,
    profile_summary,
    start_profiler,
    stop_profiler,
)
from bench.results import RESULTS, percentile, show, write
from commands.incidents import CONTEXT as INCIDENTS
from commands.incidents.aggregate import Incident
from commands.serialization import to_record
from commands.webhooks import signing
from projections.db import schema_name
from shared_kernel.avro import AvroCodec
from shared_kernel.envelope import CommandEnvelope
from shared_kernel.settings import Settings
from shared_kernel.topics import contract_topics, ensure_topics

EVENTS = int(os.environ.get("BENCH_S9_EVENTS", "2000"))
SUBSCRIPTIONS = int(os.environ.get("BENCH_S9_SUBSCRIPTIONS", "4"))
LATENCY_EVENTS = int(os.environ.get("BENCH_S9_LATENCY_EVENTS", "200"))
PARTITIONS = 6
PER_TARGET = 4
TENANT = "bench"
PROFILE = os.environ.get("BENCH_PROFILE") == "1"
REPO = str(Path(__file__).resolve().parent.parent)
OWNERS = [
    ("delivery job (streams/webhooks/)", f"{REPO}/streams/webhooks/", ""),
    ("deliveries store (projections/webhooks/)", f"{REPO}/projections/webhooks/", ""),
    ("signing (commands/webhooks/)", f"{REPO}/commands/webhooks/", ""),
    ("asyncpg", "/asyncpg/", ""),
    ("aiohttp (client)", "/aiohttp/", ""),
    ("faust + mode", "/faust/", ""),
    ("faust + mode", "/mode/", ""),
    ("aiokafka", "/aiokafka/", ""),
]
SPANS = [
    ("claim (the heads query)", f"{REPO}/projections/webhooks/deliveries.py", "claim"),
    ("attempted (record the attempt)", f"{REPO}/projections/webhooks/deliveries.py", "attempted"),
    ("owe (record what is owed)", f"{REPO}/projections/webhooks/deliveries.py", "owe"),
    ("the POST (aiohttp)", "/aiohttp/client.py", ""),
    ("subscriptions read", f"{REPO}/streams/webhooks/delivery.py", "WebhookDelivery._read_subscriptions"),
]


class Receiver:
    """Counts what arrives, and when, by `webhook-id`."""

    def __init__(self) -> None:
        self.port = free_port()
        self.arrived: dict[str, float] = {}  # webhook-id -> wall time of its first arrival
        self.bodies: dict[str, tuple[str, str]] = {}  # webhook-id -> (path, body)
        self.occurred: dict[str, str] = {}
        self.runner: web.AppRunner | None = None
        self.done = asyncio.Event()
        self.expect = 0

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/{name}", self.receive)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()

    async def receive(self, request: web.Request) -> web.Response:
        body = await request.text()
        ident = request.headers.get("webhook-id", "")
        if ident and ident not in self.arrived:
            self.arrived[ident] = time.time()
            self.bodies[ident] = (request.match_info["name"], body)
            self.occurred[ident] = orjson.loads(body)["metadata"]["occurred_at"]
            if self.expect and len(self.arrived) >= self.expect:
                self.done.set()
        return web.Response(text="ok")

    def reset(self, expect: int) -> None:
        self.arrived.clear()
        self.bodies.clear()
        self.occurred.clear()
        self.expect = expect
        self.done.clear()

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


def _records(n: int) -> list[Any]:
    codec = AvroCodec.from_directory()
    out = []
    for i in range(n):
        incident = Incident.open(uuid.uuid4(), f"bench {i}", "", "medium", "bench", "")
        envelope = CommandEnvelope(
            str(uuid.uuid4()), "bench", str(incident.id), {}, actor="bench", tenant=TENANT
        )
        out += [to_record(INCIDENTS, codec, e, envelope) for e in incident.collect_events()]
    return out


async def _limit(receiver: Receiver, bodies: list[tuple[str, str, str]], secrets: dict[str, str]) -> float:
    """The same deliveries by a plain aiohttp loop: as many in flight, signed alike."""
    receiver.reset(len(bodies))
    queue: asyncio.Queue[tuple[str, str, str]] = asyncio.Queue()
    for item in bodies:
        queue.put_nowait(item)
    async with aiohttp.ClientSession() as session:

        async def worker() -> None:
            while not queue.empty():
                ident, path, body = queue.get_nowait()
                headers = signing.headers(ident, body, [secrets[path]])
                url = f"http://127.0.0.1:{receiver.port}/{path}"
                async with session.post(url, data=body.encode(), headers=headers) as response:
                    await response.read()

        started = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(SUBSCRIPTIONS * PER_TARGET)))
        return len(bodies) / (time.monotonic() - started)


async def run(base: Settings) -> dict[str, Any]:
    from datetime import datetime

    workdir = Path(tempfile.mkdtemp(prefix="bench-s9-"))
    side = WriteSide.create(base, workdir, "S9", PARTITIONS, log_level="info")  # readiness is logged
    side.env["APP_WEBHOOK_ALLOWED_NETWORKS"] = "127.0.0.0/8"
    side.env["APP_WEBHOOK_PER_TARGET"] = str(PER_TARGET)
    settings = side.settings
    receiver = Receiver()
    await receiver.start()
    job = None
    try:
        await ensure_topics(settings, contract_topics(settings, ["incidents", "webhooks", "datasets"]))
        await side.start_serving()
        side.start_projector("webhook_subscriptions")
        secrets: dict[str, str] = {}
        async with api_client("admin", TENANT, base_url=side.api_url, timeout=60) as client:
            for i in range(SUBSCRIPTIONS):
                body = {
                    "url": f"http://127.0.0.1:{receiver.port}/s{i}",
                    "event_types": ["incidents.IncidentOpened"],
                }
                r = await client.post("/api/v1/webhooks", json=body)
                assert r.status_code == 201, r.text
                secrets[f"s{i}"] = r.json()["secret"]
                for _ in range(30):  # the read waits for the projector (504 after a while): again
                    params = {"consistent_with": r.json()["position"]}
                    got = await client.get(f"/api/v1/webhooks/{r.json()['id']}", params=params)
                    if got.status_code == 200:
                        break
            await produce_events(settings, "incidents", _records(EVENTS))
            print(f"  {EVENTS:,} incidents produced, {SUBSCRIPTIONS} subscriptions", flush=True)
            receiver.reset(EVENTS * SUBSCRIPTIONS)
            job = side._spawn("job-webhook-delivery", "run", "job", "webhook-delivery")
            while b"Worker ready" not in job.log.read_bytes():
                assert job.popen.poll() is None, job.tail()
                await asyncio.sleep(0.05)
            started = time.monotonic()
            target = RESULTS.parent / "s9-job.speedscope.json"
            spy = start_profiler(job.pid, target) if PROFILE else None
            await asyncio.wait_for(receiver.done.wait(), 600)
            if spy is not None:
                await asyncio.to_thread(stop_profiler, spy)
            ours = EVENTS * SUBSCRIPTIONS / (time.monotonic() - started)
            bodies = [(ident, path, body) for ident, (path, body) in receiver.bodies.items()]
            print(f"  ours {ours:,.0f} deliveries/s", flush=True)

            receiver.reset(LATENCY_EVENTS * SUBSCRIPTIONS)
            for i in range(LATENCY_EVENTS):
                r = await client.post("/api/v1/incidents", json={"title": f"latency {i}"})
                assert r.status_code == 201, r.text
            await asyncio.wait_for(receiver.done.wait(), 300)
            latencies = [
                1000 * (receiver.arrived[i] - datetime.fromisoformat(receiver.occurred[i]).timestamp())
                for i in receiver.arrived
            ]
        limit = await _limit(receiver, bodies, secrets)
        ratio = ours / limit if limit else 0.0
        latency = {
            "events": LATENCY_EVENTS,
            "p50": round(percentile(latencies, 50), 1),
            "p99": round(percentile(latencies, 99), 1),
        }
        result: dict[str, Any] = {
            "events": EVENTS,
            "subscriptions": SUBSCRIPTIONS,
            "in_flight_per_subscription": PER_TARGET,
            "ours_deliveries_per_s": round(ours, 1),
            "limit_aiohttp_loop_per_s": round(limit, 1),
            "ratio_vs_limit": round(ratio, 2),
            "latency_ms": latency,
        }
        if PROFILE:
            result["profile"] = profile_summary(RESULTS.parent / "s9-job.speedscope.json", OWNERS, SPANS)
            for line in profile_notes(result["profile"]):
                print(line)
        write("S9", result)
        show(
            "S9",
            "webhooks",
            [
                ("deliveries (webhook-delivery job)", f"{ours:,.0f}/s", f"aiohttp loop {limit:,.0f}/s"),
                ("ratio vs the loop", f"{ratio:.2f}", "same bodies, signatures and concurrency"),
                (
                    "event occurred -> delivered",
                    f"p50 {latency['p50']:.0f} ms, p99 {latency['p99']:.0f} ms",
                    f"{LATENCY_EVENTS} events x {SUBSCRIPTIONS} subscriptions",
                ),
            ],
        )
        return result
    finally:
        if job is not None:
            job.stop()
        side.stop()
        await receiver.stop()
        await drop_prefix(settings, schema_name(settings), [f"{settings.topic_prefix}.job.webhook-delivery"])
