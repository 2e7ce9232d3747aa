"""S5, subscriptions: end-to-end latency and fan-out throughput of the event streams.

**Latency**: the real `cqrs serve api` and `cqrs run command-processor` processes under
an isolated topic prefix; one SSE and one WebSocket subscriber (context `datasets`)
in this process; commands posted one after the other (`BENCH_S5_COMMANDS`, after an
untimed warm-up), each waited for on both streams before the next. The headline is
**accepted -> delivered**: from the event's `occurred_at` (the instant the aggregate
decided the command, on the processor's wall clock) to the instant the client parsed
the event (this machine's wall clock). It covers the processor's transaction commit,
the live feed's fetch, the fan-out and the socket. Beside it: **sent -> delivered**
(from the HTTP request's start: what a user sees), **answer -> delivered** (against the
command's own 201: what the subscription path adds once the write side has answered;
negative when the event came first), and the split of accepted -> delivered at the
event record's Kafka timestamp (the processor's produce call, ms resolution).

**Read your writes**, in the same loop: the `datasets` projector runs too, and right
after each command's answer a second client GETs the dataset with the command's
position token (`X-Consistency-Token`); the time it answers, from the decision
(**accepted -> readable**, beside accepted -> delivered) and from the answer. It covers
the projector's fetch, its batch wait (`projection_batch_wait_ms`), the PostgreSQL
commit, the commit's `NOTIFY` and the API's wake-up (`api.readmodels.wait_for`).

**Limits for latency**: Kafka's own end-to-end latency tool
(`org.apache.kafka.tools.EndToEndLatency`, run with the system Java on the jars of the
local stack): `BENCH_S5_KAFKA_MESSAGES` records, one at a time produced (acks=all) and
consumed, the size of our event records. Goal: our p99 within Kafka's p99 + 20 ms. For
the record, also one record per transaction to a read_committed consumer (aiokafka):
what exactly-once visibility costs before any subscriber can see an event.

**Fan-out**: `N` WebSocket clients (100 and 1,000; `BENCH_S5_CLIENTS`) subscribe to
the context; a burst of `BENCH_S5_BURST` realistic dataset events (made by the real
aggregate, `bench.generator`) is produced in one transaction; the time runs from the
commit to the last client having every event. `BENCH_S5_ROUNDS` bursts per level; the
median round is reported, and every round's rate. The clients are minimal frame
counters on raw sockets (no JSON parsing) in this process, so the load generator costs
as little as it can; both systems get the same ones.

**Limit for fan-out**: a raw `websockets` server in a process of its own (uvloop) that
broadcasts the very payloads our clients received (`websockets.broadcast`, yielding to
the loop every 64 messages) to the same number of the same clients, timed from the
"go" to the last client done, as many rounds. `ratio_vs_limit` is ours over the
broadcast at the worse of the two levels; goal >= 0.5. Both servers' CPU time per
1,000 deliveries is read from /proc: it does not depend on how much CPU the clients
left them on this small machine.
"""

from __future__ import annotations

import asyncio
import importlib
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, cast

import asyncpg
import httpx
import orjson
from aiokafka import TopicPartition
from aiokafka.admin import NewTopic

from bench.common import WriteSide, api_client, cpu_seconds, free_port
from bench.generator import dataset_events
from bench.results import show, summary_ms, write
from commands import CONTEXTS
from projections.db import schema_name
from projections.search import alias_name, search_client
from shared_kernel import kafka
from shared_kernel.settings import Settings
from shared_kernel.topics import Topics, contract_topics, ensure_topics

COMMANDS = int(os.environ.get("BENCH_S5_COMMANDS", "600"))
WARMUP = 20
LEVELS = [int(x) for x in os.environ.get("BENCH_S5_CLIENTS", "100,1000").split(",")]
BURST = int(os.environ.get("BENCH_S5_BURST", "500"))
ROUNDS = int(os.environ.get("BENCH_S5_ROUNDS", "3"))
E2E_MESSAGES = int(os.environ.get("BENCH_S5_KAFKA_MESSAGES", "1000"))
GOAL_VS_LIMIT = 0.5
GOAL_P99_MARGIN_MS = 20.0
EVENT_PREFIX = b'{"type":"event"'
DEADLINE_S = 300.0
REPO = Path(__file__).resolve().parent.parent


# ---- a minimal WebSocket client: counts event frames ---------------------------------------


class FrameCounter(asyncio.Protocol):
    """A WebSocket client that parses frame headers only: counts text frames that are
    events, answers pings, keeps the payloads if asked."""

    def __init__(self, host: str, port: int, path: str, keep: bool = False) -> None:
        self.request = (
            f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
        self.keep = keep
        self.kept: list[bytes] = []
        self.buffer = bytearray()
        self.upgraded = False
        self.frames = 0
        self.events = 0
        self.want = 0
        self.done_at = 0.0
        self.first_frame: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.done: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None
        self.closing = False

    def expect(self, events: int) -> None:
        self.events, self.want = 0, events
        self.done = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        self.transport.write(self.request)

    def connection_lost(self, exc: Exception | None) -> None:
        for f in (self.first_frame, self.done):
            if not f.done() and not self.closing:
                f.set_exception(ConnectionError(f"closed after {self.events} events: {exc}"))

    def data_received(self, data: bytes) -> None:
        buf = self.buffer
        buf += data
        if not self.upgraded:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            if not buf.startswith(b"HTTP/1.1 101"):
                raise ConnectionError(bytes(buf[:200]).decode(errors="replace"))
            self.upgraded = True
            del buf[: end + 4]
        pos, size = 0, len(buf)
        while size - pos >= 2:
            b0, b1 = buf[pos], buf[pos + 1]
            length, head = b1 & 0x7F, 2
            if length == 126:
                if size - pos < 4:
                    break
                (length,) = struct.unpack_from("!H", buf, pos + 2)
                head = 4
            elif length == 127:
                if size - pos < 10:
                    break
                (length,) = struct.unpack_from("!Q", buf, pos + 2)
                head = 10
            if size - pos < head + length:
                break
            start = pos + head
            pos = start + length
            opcode = b0 & 0x0F
            if opcode == 1:
                self._text(buf, start, length)
            elif opcode == 9 and self.transport is not None:  # ping: pong, masked with a zero key
                self.transport.write(bytes([0x8A, 0x80 | length]) + b"\0\0\0\0" + bytes(buf[start:pos]))
        del buf[:pos]

    def _text(self, buf: bytearray, start: int, length: int) -> None:
        self.frames += 1
        if not self.first_frame.done():
            self.first_frame.set_result(None)
        if buf.startswith(EVENT_PREFIX, start):
            self.events += 1
            if self.keep:
                self.kept.append(bytes(buf[start : start + length]))
            if self.events == self.want and not self.done.done():
                self.done.set_result(time.perf_counter())

    def close(self) -> None:
        self.closing = True
        if self.transport is not None:
            self.transport.close()


async def connect_counters(host: str, port: int, path: str, n: int) -> list[FrameCounter]:
    """`n` connected counters; if any connection fails, the others are closed (none is
    left subscribed to receive, and slow down, later rounds) and its error raised."""
    loop = asyncio.get_running_loop()
    gate = asyncio.Semaphore(100)

    async def one(i: int) -> FrameCounter:
        async with gate:
            _, proto = await loop.create_connection(
                lambda: FrameCounter(host, port, path, keep=i == 0), host, port
            )
            return proto

    results = await asyncio.gather(*(one(i) for i in range(n)), return_exceptions=True)
    counters = [r for r in results if isinstance(r, FrameCounter)]
    failed = [r for r in results if not isinstance(r, FrameCounter)]
    if failed:
        for c in counters:
            c.close()
        raise failed[0]
    return counters


# ---- latency ------------------------------------------------------------------------------


@dataclass
class Watch:
    """One subscriber's receive times, by aggregate version."""

    # version -> (received, occurred, appended): this machine's clock when the client parsed
    # the event, the aggregate's decision, the processor's produce call (the record's
    # Kafka timestamp, in ms)
    got: dict[int, tuple[float, float, float]] = field(default_factory=dict)
    waiters: dict[int, asyncio.Future[None]] = field(default_factory=dict)

    def seen(self, data: dict[str, Any]) -> None:
        received = time.time()
        v = int(data["aggregate_version"])
        occurred = datetime.fromisoformat(data["metadata"]["occurred_at"]).timestamp()
        self.got[v] = (received, occurred, data["record"]["timestamp"] / 1000)
        waiter = self.waiters.pop(v, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def wait(self, version: int) -> None:
        if version not in self.got:
            self.waiters[version] = asyncio.get_running_loop().create_future()
            await self.waiters[version]


async def _sse_reader(
    client: httpx.AsyncClient, params: dict[str, str], watch: Watch, ready: asyncio.Event
) -> None:
    async with client.stream("GET", "/api/v1/events/stream", params=params) as r:
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            if line.startswith("data: "):
                data = orjson.loads(line[6:])
                if data["type"] == "subscribed":
                    ready.set()
                elif data["type"] == "event":
                    watch.seen(data)
                elif data["type"] == "error":
                    raise RuntimeError(data)


async def _ws_reader(url: str, watch: Watch, ready: asyncio.Event) -> None:
    from websockets.asyncio.client import connect

    async with connect(url, compression=None) as ws:
        async for raw in ws:
            data = orjson.loads(raw)
            if data["type"] == "subscribed":
                ready.set()
            elif data["type"] == "event":
                watch.seen(data)
            elif data["type"] == "error":
                raise RuntimeError(data)


async def measure_latency(api_url: str) -> dict[str, Any]:
    params = {"context": "datasets"}
    sse, ws = Watch(), Watch()
    ready = [asyncio.Event(), asyncio.Event()]
    async with (
        api_client(base_url=api_url, timeout=30) as client,
        api_client(base_url=api_url, timeout=30) as reader,
    ):
        readers = [
            asyncio.create_task(_sse_reader(client, params, sse, ready[0])),
            asyncio.create_task(
                _ws_reader(api_url.replace("http", "ws", 1) + "/ws/v1/events?context=datasets", ws, ready[1])
            ),
        ]
        try:
            await asyncio.wait_for(asyncio.gather(*(r.wait() for r in ready)), 30)
            r = await client.post("/api/v1/datasets", json={"name": "latency", "description": "S5"})
            assert r.status_code == 201, r.text
            dataset = r.json()["id"]
            sent: dict[int, tuple[float, float]] = {}  # version -> (request sent, answer received)
            readable: dict[int, float] = {}  # version -> its read with the command's token answered
            for i in range(WARMUP + COMMANDS):
                t0 = time.time()
                r = await client.put(
                    f"/api/v1/datasets/{dataset}/metadata/k{i % 16}", json={"value": {"rows": i, "ok": True}}
                )
                t1 = time.time()
                assert r.status_code == 200, r.text
                version, token = int(r.json()["version"]), r.json()["position"]
                read = asyncio.create_task(
                    _read_own_write(reader, f"/api/v1/datasets/{dataset}", token, version)
                )
                await asyncio.wait_for(asyncio.gather(sse.wait(version), ws.wait(version), read), 30)
                if i >= WARMUP:
                    sent[version] = (t0, t1)
                    readable[version] = read.result()
        finally:
            for task in readers:
                task.cancel()
            await asyncio.gather(*readers, return_exceptions=True)

    def figures(watch: Watch) -> dict[str, Any]:
        return {
            "accepted_to_delivered": summary_ms([watch.got[v][0] - watch.got[v][1] for v in sent]),
            "sent_to_delivered": summary_ms([watch.got[v][0] - t0 for v, (t0, _) in sent.items()]),
            # the event against the command's own answer (negative: the event came first)
            "answer_to_delivered": summary_ms([watch.got[v][0] - t1 for v, (_, t1) in sent.items()]),
            # where accepted -> delivered goes: the processor's work up to producing the
            # event, then its transaction's commit plus the subscription path
            "accepted_to_appended": summary_ms([watch.got[v][2] - watch.got[v][1] for v in sent]),
            "appended_to_delivered": summary_ms([watch.got[v][0] - watch.got[v][2] for v in sent]),
        }

    read_your_writes = {
        # from the decision (as accepted -> delivered) and from the command's answer
        "accepted_to_readable": summary_ms([readable[v] - sse.got[v][1] for v in sent]),
        "answer_to_readable": summary_ms([readable[v] - t1 for v, (_, t1) in sent.items()]),
    }
    return {
        "commands": len(sent),
        "sse": figures(sse),
        "websocket": figures(ws),
        "read_your_writes": read_your_writes,
    }


async def _read_own_write(client: httpx.AsyncClient, path: str, token: str, version: int) -> float:
    """GET the dataset with the command's token, right after its answer: when it came."""
    r = await client.get(path, headers={"X-Consistency-Token": token})
    done = time.time()
    assert r.status_code == 200, r.text
    assert r.json()["version"] >= version, r.text
    return done


# ---- Kafka's end-to-end latency tool --------------------------------------------------------


def kafka_libs() -> Path | None:
    """The jars the local stack runs Kafka from (infra/stack.py resolves them)."""
    try:
        # imported by name: infra/stack.py is a script, which mypy checks as one
        stack = importlib.import_module("infra.stack")
        libs = Path(stack.Kafka(stack.Config()).libs)
    except Exception:  # no local stack here (Docker users): no Kafka tool either
        return None
    return libs if (libs / ".complete").exists() else None


def kafka_end_to_end(settings: Settings, topic: str, size: int) -> dict[str, Any]:
    libs, java = kafka_libs(), shutil.which("java")
    if libs is None or java is None:
        return {"skipped": "no Kafka jars of the local stack, or no java"}
    started = time.perf_counter()
    out = subprocess.run(
        [
            java,
            "-Xmx256m",
            "-Dlog4j.configuration=file:/dev/null",
            "-cp",
            f"{libs}/*",
            "org.apache.kafka.tools.EndToEndLatency",
            settings.kafka_bootstrap,
            topic,
            str(E2E_MESSAGES),
            "all",
            str(size),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    ).stdout
    avg = re.search(r"Avg latency: ([\d.]+) ms", out)
    pct = re.search(r"50th = (\d+), 99th = (\d+), 99.9th = (\d+)", out)
    if avg is None or pct is None:
        raise RuntimeError(f"unexpected EndToEndLatency output: {out[-500:]}")
    return {
        "tool": "org.apache.kafka.tools.EndToEndLatency",
        "messages": E2E_MESSAGES,
        "message_bytes": size,
        "acks": "all",
        "p50_ms": float(pct.group(1)),
        "p99_ms": float(pct.group(2)),
        "p999_ms": float(pct.group(3)),
        "mean_ms": float(avg.group(1)),
        "seconds": round(time.perf_counter() - started, 1),
    }


async def transactional_end_to_end(settings: Settings, topic: str, size: int) -> dict[str, Any]:
    """What exactly-once costs before anyone can read: one record per transaction
    (begin, send, commit) to a read_committed consumer, one at a time (aiokafka)."""
    producer = kafka.transactional_producer(settings, f"bench-s5-e2e-{uuid.uuid4().hex}", linger_ms=0)
    consumer = kafka.consumer(settings)
    await producer.start()
    await consumer.start()
    samples: list[float] = []
    try:
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        await consumer.seek_to_end(tp)
        for i in range(WARMUP + E2E_MESSAGES):
            t0 = time.perf_counter()
            async with producer.transaction():
                await producer.send(topic, b"x" * size, partition=0)
            while not await consumer.getmany(tp, timeout_ms=1000):
                pass
            if i >= WARMUP:
                samples.append(time.perf_counter() - t0)
    finally:
        await producer.stop()
        await consumer.stop()
    return {"messages": len(samples), "message_bytes": size, **summary_ms(samples)}


# ---- fan-out ------------------------------------------------------------------------------


@dataclass
class FanOut:
    """Rounds of one burst to every client: (seconds to the last delivery, server CPU s)."""

    clients: int
    events: int
    rounds: list[tuple[float, float]] = field(default_factory=list)
    incomplete: int = 0
    first_error: str = ""

    def figures(self) -> dict[str, Any]:
        deliveries = self.clients * self.events
        seconds, cpu = sorted(self.rounds)[len(self.rounds) // 2] if self.rounds else (float("nan"), 0.0)
        return {
            "clients": self.clients,
            "events_per_burst": self.events,
            "deliveries_per_burst": deliveries,
            "rounds": len(self.rounds),
            "seconds_median_round": round(seconds, 3),
            "deliveries_per_s": round(deliveries / seconds) if seconds else 0,
            "deliveries_per_s_by_round": [round(deliveries / s) for s, _ in self.rounds],
            "server_cpu_ms_per_1000_deliveries": round(cpu * 1e6 / deliveries, 2),
            "incomplete_clients": self.incomplete,
            **({"first_error": self.first_error} if self.first_error else {}),
        }

    def round_done(self, seconds: float, cpu: float, incomplete: int, error: str) -> bool:
        """Record a round; False once a client failed (the level stops there)."""
        self.rounds.append((seconds, cpu))
        self.incomplete, self.first_error = incomplete, error
        return not incomplete


async def _finish(counters: list[FrameCounter], t0: float) -> tuple[float, int, str]:
    results = await asyncio.wait_for(
        asyncio.gather(*(c.done for c in counters), return_exceptions=True), DEADLINE_S
    )
    ends = [r for r in results if isinstance(r, float)]
    errors = [repr(r) for r in results if not isinstance(r, float)]
    return (max(ends) - t0 if ends else float("nan")), len(errors), errors[0] if errors else ""


async def fan_out_ours(
    settings: Settings, api_url: str, api_pid: int, clients: int
) -> tuple[FanOut, list[bytes]]:
    url = httpx.URL(api_url)
    counters = await connect_counters(url.host, url.port or 80, "/ws/v1/events?context=datasets", clients)
    result = FanOut(clients, BURST)
    topic = Topics(settings.topic_prefix).events("datasets")
    producer = kafka.transactional_producer(settings, f"bench-s5-{uuid.uuid4().hex}", linger_ms=5)
    await producer.start()
    try:
        await asyncio.wait_for(asyncio.gather(*(c.first_frame for c in counters)), 60)  # subscribed
        for _ in range(ROUNDS):
            for c in counters:
                c.expect(BURST)
            records = list(dataset_events(max(1, BURST // 20), 20))[:BURST]
            await producer.begin_transaction()
            for r in records:
                await producer.send(topic, r.value, key=r.key, headers=list(r.headers))
            cpu0 = cpu_seconds([api_pid])
            t0 = time.perf_counter()
            await producer.commit_transaction()
            seconds, incomplete, error = await _finish(counters, t0)
            if not result.round_done(seconds, cpu_seconds([api_pid]) - cpu0, incomplete, error):
                break
        return result, counters[0].kept[:BURST]
    finally:
        await producer.stop()
        for c in counters:
            c.close()


async def fan_out_broadcast(payloads: list[bytes], clients: int, workdir: Path) -> FanOut:
    file = workdir / "payloads.json"
    file.write_bytes(orjson.dumps([p.decode() for p in payloads]))
    port = free_port()
    server = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.s5_subscriptions", "broadcast", str(port), str(file), cwd=REPO
    )
    try:
        counters = await _connect_when_listening(port, clients)
        result = FanOut(clients, len(payloads))
        try:
            from websockets.asyncio.client import connect

            async with connect(f"ws://127.0.0.1:{port}/control", compression=None) as control:
                await control.recv()  # "ready": every client is registered
                for _ in range(ROUNDS):
                    for c in counters:
                        c.expect(len(payloads))
                    cpu0 = cpu_seconds([server.pid])
                    t0 = time.perf_counter()
                    await control.send("go")
                    seconds, incomplete, error = await _finish(counters, t0)
                    if not result.round_done(seconds, cpu_seconds([server.pid]) - cpu0, incomplete, error):
                        break
            return result
        finally:
            for c in counters:
                c.close()
    finally:
        server.terminate()
        await asyncio.wait_for(server.wait(), 30)


async def _connect_when_listening(port: int, clients: int) -> list[FrameCounter]:
    deadline = time.monotonic() + 30
    while True:
        try:
            return await connect_counters("127.0.0.1", port, "/", clients)
        except OSError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


def serve_broadcast(port: int, payload_file: Path) -> None:
    """The limit: a bare `websockets` server that broadcasts the payloads on "go"."""
    import uvloop
    from websockets.asyncio.server import ServerConnection, broadcast, serve

    payloads = [str(p) for p in orjson.loads(payload_file.read_bytes())]

    async def main() -> None:
        clients: set[ServerConnection] = set()

        async def handler(conn: ServerConnection) -> None:
            if conn.request is not None and conn.request.path == "/control":
                await conn.send("ready")
                async for _ in conn:  # "go": one round
                    for i, p in enumerate(payloads):
                        broadcast(clients, p)
                        if i % 64 == 63:
                            await asyncio.sleep(0)
                return
            clients.add(conn)
            try:
                await conn.wait_closed()
            finally:
                clients.discard(conn)

        async with serve(handler, "127.0.0.1", port, compression=None, max_queue=None, ping_interval=None):
            await asyncio.Future()

    uvloop.run(main())


# ---- the run --------------------------------------------------------------------------------


async def run(base: Settings) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="bench-s5-"))
    side = WriteSide.create(base, workdir, "s5", partitions=6, log_level="warning")
    settings = side.settings
    e2e_topic = f"{settings.topic_prefix}.kafka-e2e"
    try:
        await ensure_topics(
            settings, [*contract_topics(settings, [c.name for c in CONTEXTS]), NewTopic(e2e_topic, 1, 1)]
        )
        await side.start_serving()
        assert side.api is not None
        side.start_projector("datasets")  # for reads of one's own writes
        await side.wait_until_projected()
        print("S5: latency (commands -> SSE and WebSocket subscribers)", flush=True)
        latency = await measure_latency(side.api_url)
        ours: list[dict[str, Any]] = []
        limit: list[dict[str, Any]] = []
        for n in LEVELS:
            print(f"S5: fan-out to {n} clients: ours", flush=True)
            mine, payloads = await fan_out_ours(settings, side.api_url, side.api.pid, n)
            ours.append(mine.figures())
            print(f"S5: fan-out to {n} clients: raw websockets broadcast", flush=True)
            limit.append((await fan_out_broadcast(payloads, n, workdir)).figures())
        side.stop()
        print("S5: Kafka's EndToEndLatency", flush=True)
        size = round(
            sum(len(r.value) + sum(len(k) + len(v) for k, v in r.headers) for r in dataset_events(5, 20))
            / 100
        )
        kafka_e2e = await asyncio.to_thread(kafka_end_to_end, settings, e2e_topic, size)
        print("S5: a transactional produce to a read_committed consumer (aiokafka)", flush=True)
        transactional = await transactional_end_to_end(settings, e2e_topic, size)
    finally:
        side.stop()
        await _cleanup(settings)
        shutil.rmtree(workdir, ignore_errors=True)

    ratios = [
        o["deliveries_per_s"] / max(lim["deliveries_per_s"], 1) for o, lim in zip(ours, limit, strict=True)
    ]
    ratio = min(ratios)
    p99 = max(
        latency["sse"]["accepted_to_delivered"]["p99_ms"],
        latency["websocket"]["accepted_to_delivered"]["p99_ms"],
    )
    budget = kafka_e2e["p99_ms"] + GOAL_P99_MARGIN_MS if "p99_ms" in kafka_e2e else None
    result: dict[str, Any] = {
        "what": "subscriptions: command accepted -> event delivered latency; fan-out deliveries/s",
        "partitions": settings.partitions,
        "latency": {
            **latency,
            "kafka_end_to_end": kafka_e2e,
            "kafka_transactional_end_to_end_aiokafka": transactional,
        },
        "fan_out_burst_events": BURST,
        "fan_out_ours_websocket": ours,
        "fan_out_limit_raw_websockets_broadcast": limit,
        "ratio_vs_limit_by_level": [round(r, 3) for r in ratios],
        "ratio_vs_limit": round(ratio, 3),
        "ratio_vs_limit_goal": GOAL_VS_LIMIT,
        "p99_accepted_to_delivered_ms": p99,
        "p99_goal_ms": budget,
        "goal_met": ratio >= GOAL_VS_LIMIT and budget is not None and p99 <= budget,
    }
    write("S5", result)
    rows: list[tuple[str, str, str]] = []
    for name in ("sse", "websocket"):
        kinds = ("accepted_to_delivered", "sent_to_delivered", "answer_to_delivered")
        a, s, w = (latency[name][k] for k in kinds)
        rows.append(
            (
                f"accepted -> delivered ({name})",
                f"p50 {a['p50_ms']} p99 {a['p99_ms']} ms",
                f"sent -> delivered p50 {s['p50_ms']} p99 {s['p99_ms']} ms; "
                f"after the command's answer p50 {w['p50_ms']} p99 {w['p99_ms']} ms",
            )
        )
    ryw = latency["read_your_writes"]
    rows.append(
        (
            "accepted -> readable (GET with the token)",
            f"p50 {ryw['accepted_to_readable']['p50_ms']} p99 {ryw['accepted_to_readable']['p99_ms']} ms",
            f"after the command's answer p50 {ryw['answer_to_readable']['p50_ms']} "
            f"p99 {ryw['answer_to_readable']['p99_ms']} ms (the datasets projector, its commit's NOTIFY)",
        )
    )
    rows.append(
        (
            "transactional produce -> read_committed",
            f"p50 {transactional['p50_ms']} p99 {transactional['p99_ms']} ms",
            "one record per transaction (aiokafka): the floor under read_committed delivery",
        )
    )
    if budget is not None:
        rows.append(
            (
                "Kafka EndToEndLatency",
                f"p50 {kafka_e2e['p50_ms']} p99 {kafka_e2e['p99_ms']} ms",
                f"goal: p99 <= {budget} ms",
            )
        )
    for o, lim, r in zip(ours, limit, ratios, strict=True):
        rows.append(
            (
                f"fan-out to {o['clients']} clients",
                f"{o['deliveries_per_s']:,}/s ({o['server_cpu_ms_per_1000_deliveries']} ms CPU/1k)",
                f"broadcast {lim['deliveries_per_s']:,}/s "
                f"({lim['server_cpu_ms_per_1000_deliveries']} ms CPU/1k); ratio {r:.2f}",
            )
        )
    rows.append(("ratio_vs_limit", f"{ratio:.2f}", f"goal >= {GOAL_VS_LIMIT}"))
    show("S5", "subscriptions", rows)
    return result


async def _cleanup(settings: Settings) -> None:
    """The prefix's topics, and the read-model schema and indexes the API created at start."""
    admin = kafka.admin(settings)
    await admin.start()
    try:
        prefix = settings.topic_prefix + "."
        await admin.delete_topics([t for t in await admin.list_topics() if t.startswith(prefix)])
    finally:
        await admin.close()
    async with search_client(settings) as client:
        for name in ("datasets", "incidents"):
            await client.indices.delete(index=f"{alias_name(settings, name)}-*", ignore_unavailable=True)
    conn = await asyncpg.connect(settings.postgres_dsn)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema_name(settings)}" CASCADE')
    finally:
        await conn.close()


def _main(argv: list[str]) -> int:
    if len(argv) == 3 and argv[0] == "broadcast":
        serve_broadcast(int(argv[1]), Path(argv[2]))
        return 0
    print("usage: python -m bench.s5_subscriptions broadcast PORT PAYLOAD_FILE", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
