"""S1, commands: HTTP command throughput and latency at 1, 16 and 64 concurrent clients.

Three systems run the same workload, one after the other, in the same run:

- **ours**: the real `cqrs serve api` and `cqrs run command-processor` processes; a
  closed-loop HTTP client per simulated user (aiohttp).
- **limit**: a raw aiokafka transactional produce loop with the same batching as the
  processor (one transactional producer per partition, a batch window, up to
  `command_batch_max` records per transaction), fed in process: no HTTP, no command
  topic, no decision, no reply. It is what appending to Kafka exactly once costs.
- **peer**: the `eventsourcing` library's Application on PostgreSQL (what a Python user
  would pick instead) running the same aggregate code, called in process from one
  thread per client: its best case, with no HTTP in front of it.

Each client owns one dataset: it registers it (not timed), then cycles through
set-metadata, publish-version, record-quality-check and describe until the level's
time is up. Only successful commands are counted; any failure is reported.

The levels are `BENCH_S1_CLIENTS` (default 1,16,64), each `BENCH_S1_SECONDS` long
(default 10). `ratio_vs_limit` and `ratio_vs_peer` are ours over the limit and over the
peer, in commands/s at 16 clients (goals >= 0.6 and >= 2.0). `BENCH_PROFILE=1` adds one
16-client level of ours under py-spy (`bench/results/s1-processor.speedscope.json` and
`s1-api.speedscope.json`).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from aiokafka.admin import NewTopic

from bench import auth_cost
from bench.common import (
    WriteSide,
    bearer,
    cpu_seconds,
    drop_prefix,
    free_port,
    peer_environment,
    py_spy,
    service_pids,
)
from bench.results import RESULTS, show, summary_ms, write
from commands.routing import partition_for
from projections.db import schema_name
from shared_kernel import kafka
from shared_kernel.settings import Settings
from shared_kernel.topics import ensure_topics

LEVELS = [int(x) for x in os.environ.get("BENCH_S1_CLIENTS", "1,16,64").split(",")]
SECONDS = float(os.environ.get("BENCH_S1_SECONDS", "10"))
PROFILE = os.environ.get("BENCH_PROFILE", "") not in ("", "0")
GOAL_LEVEL = 16
GOAL_VS_LIMIT = 0.5
GOAL_VS_PEER = 2.0
GOAL_P99_MS = 50.0


# ---- the workload -------------------------------------------------------------


def step(i: int) -> tuple[str, dict[str, Any]]:
    """The i-th command (i >= 1) of a client's sequence, as (kind, arguments)."""
    match i % 4:
        case 1:
            return "set_metadata", {"key": f"k{i % 20}", "value": {"rows": i * 1000, "ok": True}}
        case 2:
            return "publish_version", {"version": f"1.{i}.0", "notes": f"release {i}"}
        case 3:
            return "record_quality_check", {
                "metric": "completeness",
                "value": 0.9 + (i % 10) / 100,
                "threshold": 0.95,
                "comparator": ">=",
            }
        case _:
            return "describe", {"name": None, "description": f"Hourly observations, revision {i}."}


def registration(client: int) -> dict[str, Any]:
    return {
        "name": f"bench-dataset-{client}",
        "description": "Hourly surface observations from 1,200 stations, quality controlled.",
        "owner": "climate-team",
        "tags": ["weather", "observations"],
        "metadata": {"source": "stations", "licence": "CC-BY-4.0"},
    }


@dataclass
class Level:
    clients: int
    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    first_error: str = ""
    elapsed: float = 0.0

    def failed(self, what: str) -> None:
        self.errors += 1
        self.first_error = self.first_error or what[:300]

    def figures(self) -> dict[str, Any]:
        done = len(self.latencies)
        return {
            "clients": self.clients,
            "commands": done,
            "commands_per_s": round(done / self.elapsed, 1) if self.elapsed else 0.0,
            **{k: v for k, v in summary_ms(self.latencies).items() if k != "n"},
            "errors": self.errors,
            **({"first_error": self.first_error} if self.first_error else {}),
        }


async def closed_loop(
    level: Level, prepare: Callable[[int], Awaitable[Any]], run: Callable[[Any, int], Awaitable[None]]
) -> None:
    """Each client prepares (untimed), then runs its steps back to back until time is up."""
    handles = await asyncio.gather(*(prepare(c) for c in range(level.clients)))
    deadline = time.perf_counter() + SECONDS

    async def client(handle: Any) -> None:
        i = 1
        while time.perf_counter() < deadline:
            t0 = time.perf_counter()
            try:
                await run(handle, i)
            except Exception as exc:
                level.failed(repr(exc))
            else:
                level.latencies.append(time.perf_counter() - t0)
            i += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(client(h) for h in handles))
    level.elapsed = time.perf_counter() - t0


# ---- ours: the real processes over HTTP -----------------------------------------


ROUTES: dict[str, tuple[str, Callable[[str, dict[str, Any]], tuple[str, dict[str, Any]]]]] = {
    "set_metadata": (
        "PUT",
        lambda d, a: (f"/api/v1/datasets/{d}/metadata/{a['key']}", {"value": a["value"]}),
    ),
    "publish_version": ("POST", lambda d, a: (f"/api/v1/datasets/{d}/versions", a)),
    "record_quality_check": ("POST", lambda d, a: (f"/api/v1/datasets/{d}/quality-checks", a)),
    "describe": ("PATCH", lambda d, a: (f"/api/v1/datasets/{d}", {"description": a["description"]})),
}


async def run_ours(base_url: str, clients: int) -> Level:
    level = Level(clients)
    run_id = uuid.uuid4().hex[:6]
    connector = aiohttp.TCPConnector(limit=clients + 4)
    # every client is an operator of its own, with its own token (counted against its own
    # rate limit); the peer, which has no authentication, ignores the header
    credentials = {c: bearer(sub=f"bench-client-{c}") for c in range(clients)}
    credential_of: dict[str, dict[str, str]] = {}
    async with aiohttp.ClientSession(base_url, connector=connector) as http:

        async def prepare(c: int) -> str:
            key = f"s1-{run_id}-{c}"
            async with http.post(
                "/api/v1/datasets", json=registration(c), headers={"Idempotency-Key": key, **credentials[c]}
            ) as r:
                body = await r.json()
                if r.status != 201:
                    raise RuntimeError(f"register answered {r.status}: {body}")
                credential_of[str(body["id"])] = credentials[c]
                return str(body["id"])

        async def run(dataset_id: str, i: int) -> None:
            kind, args = step(i)
            method, route = ROUTES[kind]
            path, body = route(dataset_id, args)
            async with http.request(method, path, json=body, headers=credential_of[dataset_id]) as r:
                if r.status >= 300:
                    raise RuntimeError(f"{kind} answered {r.status}: {await r.text()}")
                await r.read()

        await closed_loop(level, prepare, run)
    return level


# ---- limit: raw transactional produce with the same batching ---------------------


class RawTransactionalAppender:
    """One transactional producer and one batching loop per partition, nothing else."""

    def __init__(self, settings: Settings, topic: str, partitions: int) -> None:
        self.settings = settings
        self.topic = topic
        self.queues: list[asyncio.Queue[tuple[bytes, bytes, asyncio.Future[None]]]] = [
            asyncio.Queue() for _ in range(partitions)
        ]
        self.producers = [
            kafka.transactional_producer(settings, f"bench-s1-{uuid.uuid4().hex}", linger_ms=0)
            for _ in range(partitions)
        ]
        self.tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        await asyncio.gather(*(p.start() for p in self.producers))
        self.tasks = [asyncio.create_task(self._loop(p)) for p in range(len(self.producers))]

    async def stop(self) -> None:
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await asyncio.gather(*(p.stop() for p in self.producers))

    async def append(self, partition: int, key: bytes, value: bytes) -> None:
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.queues[partition].put_nowait((key, value, done))
        await done

    async def _loop(self, partition: int) -> None:
        queue, producer = self.queues[partition], self.producers[partition]
        window, most = self.settings.command_batch_window_ms / 1000, self.settings.command_batch_max
        while True:
            batch = [await queue.get()]
            if window:
                await asyncio.sleep(window)
            while len(batch) < most and not queue.empty():
                batch.append(queue.get_nowait())
            try:
                async with producer.transaction():
                    for key, value, _ in batch:
                        await producer.send(self.topic, value, key=key, partition=partition)
            except Exception as exc:
                for *_, done in batch:
                    done.set_exception(exc)
            else:
                for *_, done in batch:
                    done.set_result(None)


async def run_limit(settings: Settings, clients: int) -> Level:
    level = Level(clients)
    topic = f"bench.s1.{uuid.uuid4().hex[:8]}"
    await ensure_topics(settings, [NewTopic(topic, settings.partitions, 1)])
    appender = RawTransactionalAppender(settings, topic, settings.partitions)
    await appender.start()
    try:

        async def prepare(c: int) -> tuple[int, bytes]:
            key = uuid.uuid4().bytes
            await appender.append(c % settings.partitions, key, orjson.dumps(registration(c)))
            return c % settings.partitions, key

        async def run(handle: tuple[int, bytes], i: int) -> None:
            partition, key = handle
            kind, args = step(i)
            await appender.append(partition, key, orjson.dumps({"type": kind, **args}))

        await closed_loop(level, prepare, run)
    finally:
        await appender.stop()
        admin = kafka.admin(settings)
        await admin.start()
        try:
            await admin.delete_topics([topic])
        finally:
            await admin.close()
    return level


# ---- peer: the eventsourcing Application on PostgreSQL -----------------------------


def run_peer(settings: Settings, clients: int) -> Level:
    from eventsourcing.application import Application

    from commands.datasets.aggregate import Dataset

    class DatasetService(Application[uuid.UUID]):
        """What the peer's user would write: one method per command."""

        def register(self, dataset_id: uuid.UUID, args: dict[str, Any]) -> None:
            self.save(Dataset.register(dataset_id, **args))

        def handle(self, dataset_id: uuid.UUID, kind: str, args: dict[str, Any]) -> None:
            dataset: Dataset = self.repository.get(dataset_id)
            getattr(dataset, kind)(**args)
            self.save(dataset)

    name = f"benchpeer{uuid.uuid4().hex[:8]}"
    DatasetService.name = name
    app = DatasetService(env=peer_environment(settings, clients))
    level = Level(clients)
    started: list[float] = []  # set once every client has registered
    lock = threading.Lock()

    def client(c: int, start: threading.Barrier) -> None:
        dataset_id = uuid.uuid4()
        app.register(dataset_id, registration(c))
        start.wait()
        i = 1
        while time.perf_counter() < started[0] + SECONDS:
            kind, args = step(i)
            t0 = time.perf_counter()
            try:
                app.handle(dataset_id, kind, args)
            except Exception as exc:
                with lock:
                    level.failed(repr(exc))
            else:
                elapsed = time.perf_counter() - t0
                with lock:
                    level.latencies.append(elapsed)
            i += 1

    def timer() -> None:
        started.append(time.perf_counter())

    barrier = threading.Barrier(clients, action=timer)
    try:
        with ThreadPoolExecutor(clients) as pool:
            for f in [pool.submit(client, c, barrier) for c in range(clients)]:
                f.result()
            level.elapsed = time.perf_counter() - started[0]
    finally:
        app.close()
        _drop_peer_tables(settings, name)
    return level


def _drop_peer_tables(settings: Settings, name: str) -> None:
    import psycopg

    with psycopg.connect(settings.postgres_dsn, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public' AND tablename LIKE %s",
            (f"{name}%",),
        ).fetchall()
        for (table,) in rows:
            conn.execute(f'DROP TABLE IF EXISTS "{table}"')


# ---- HTTP peer: the same eventsourcing Application behind FastAPI and uvicorn ---------


PEER_POOL = 40  # FastAPI's thread pool runs at most 40 handlers at once


async def run_http_peer(settings: Settings, workdir: Path, clients: int) -> Level:
    """`bench.peer_http` in a uvicorn process of its own, driven like ours."""
    name = f"benchpeer{uuid.uuid4().hex[:8]}"
    port = free_port()
    env = {**os.environ, **peer_environment(settings, PEER_POOL), "PEER_APP_NAME": name}
    log = (workdir / f"peer-http-{clients}.log").open("ab")
    server = subprocess.Popen(  # noqa: ASYNC220 (started once, then waited for over HTTP)
        [
            sys.executable,
            "-m",
            "uvicorn",
            "bench.peer_http:create_app",
            "--factory",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--no-access-log",
            "--log-level",
            "warning",
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession(url) as http:
            deadline = time.monotonic() + 60
            while True:
                try:
                    async with http.get("/health") as r:
                        if r.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError(f"the HTTP peer did not start: see {log.name}")
                await asyncio.sleep(0.2)
        level = await run_ours(url, clients)
    finally:
        server.terminate()
        server.wait(30)
        log.close()
        await asyncio.to_thread(_drop_peer_tables, settings, name)
    return level


# ---- the run ------------------------------------------------------------------------


async def _start_ours(settings: Settings, workdir: Path) -> WriteSide:
    side = WriteSide.create(settings, workdir, "s1", settings.partitions, log_level="info")
    await side.start_serving()
    return side


def _profile(side: WriteSide) -> dict[str, str]:
    """py-spy flame graphs of the processor and the API for one extra 16-client level."""
    assert side.api is not None
    spy = py_spy()
    out: dict[str, str] = {}
    procs = {"api": side.api.pid}
    spies = []
    for name, pid in procs.items():
        target = RESULTS.parent / f"s1-{name}.speedscope.json"
        spies.append(
            subprocess.Popen(
                [
                    spy,
                    "record",
                    "--pid",
                    str(pid),
                    "--duration",
                    str(int(SECONDS)),
                    "--format",
                    "speedscope",
                    "--output",
                    str(target),
                    "--nonblocking",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
        out[name] = str(target.relative_to(RESULTS.parent.parent.parent))
    asyncio.run(run_ours(side.api_url, GOAL_LEVEL))
    for s in spies:
        s.wait(60)
    return out


async def cpu_per_command(side: WriteSide, clients: int) -> dict[str, Any]:
    """One more level of ours, with the CPU each process spent per command (from /proc)."""
    assert side.api is not None
    procs = {"api": side.api.pid, **service_pids("kafka", "redis"), "client": os.getpid()}
    before = {name: cpu_seconds([pid]) for name, pid in procs.items()}
    level = await run_ours(side.api_url, clients)
    done = max(len(level.latencies), 1)
    spent = {name: (cpu_seconds([pid]) - before[name]) * 1000 / done for name, pid in procs.items()}
    return {
        "clients": clients,
        "commands_per_s": level.figures()["commands_per_s"],
        **{f"{name}_ms_per_command": round(ms, 3) for name, ms in spent.items()},
        "total_ms_per_command": round(sum(spent.values()), 3),
    }


async def _first_answer(url: str, aggregate: str, deadline_s: float = 60) -> float:
    """Seconds until a command on `aggregate` through `url` is answered 2xx."""
    t0 = time.monotonic()
    async with aiohttp.ClientSession(url, headers=bearer()) as http:
        while time.monotonic() - t0 < deadline_s:
            try:
                async with http.patch(
                    f"/api/v1/datasets/{aggregate}", json={"description": "failover probe"}
                ) as r:
                    if r.status == 200:
                        return time.monotonic() - t0
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.02)
    raise RuntimeError(f"no answer for {aggregate} within {deadline_s} s")


async def failover(settings: Settings, workdir: Path) -> dict[str, Any]:
    """The two gaps of an owner's death: killed -9 and restarted on its port (its static
    member id), from the restart to its partitions' first answer; and killed for good,
    from the kill until the surviving instance answers for its partitions."""
    side = WriteSide.create(settings, workdir / "failover", "s1f", settings.partitions, log_level="info")
    (workdir / "failover").mkdir(parents=True, exist_ok=True)
    try:
        port = free_port()
        await side.start_api(port)
        api = side.api
        assert api is not None
        async with (
            aiohttp.ClientSession(side.api_url, headers=bearer()) as http,
            http.post("/api/v1/datasets", json=registration(0)) as r,
        ):
            dataset = str((await r.json())["id"])
        api.popen.kill()
        api.popen.wait(10)
        side.api = side._spawn("api-restarted", "serve", "api", "--port", str(port))
        restarted = await _first_answer(side.api_url, dataset)

        # A second owner takes part of the partitions; it dies for good.
        second = side.start_processor()
        owned: set[int] = set()
        deadline = time.monotonic() + 60
        while not owned and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
            owned = {
                int(p)
                for line in second.log.read_text().splitlines()
                if "partitions assigned" in line
                for p in orjson.loads(line)["partitions"]
            }
        if not owned:
            raise RuntimeError(f"the second owner took no partition; log:\n{second.tail()}")
        async with aiohttp.ClientSession(side.api_url, headers=bearer()) as http:
            theirs = ""
            while not theirs:
                async with http.post("/api/v1/datasets", json=registration(1)) as r:
                    ident = str((await r.json())["id"])
                if partition_for(ident, settings.partitions) in owned:
                    theirs = ident
        second.popen.kill()
        second.popen.wait(10)
        for_good = await _first_answer(side.api_url, theirs)
    finally:
        side.stop()
        await drop_prefix(side.settings, schema_name(side.settings))
    return {
        "restarted_owner_answers_after_s": round(restarted, 2),
        "restarted_goal_s": 3.0,
        "dead_owner_taken_over_after_s": round(for_good, 2),
        "dead_owner_bound_s": "session timeout (10 s) + restore",
    }


async def run(settings: Settings) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="bench-s1-"))
    side = await _start_ours(settings, workdir)
    try:
        ours = [(await run_ours(side.api_url, n)).figures() for n in LEVELS]
        cpu = await cpu_per_command(side, GOAL_LEVEL)
        profiles = await asyncio.to_thread(_profile, side) if PROFILE else {}
    finally:
        side.stop()
    limit = [(await run_limit(settings, n)).figures() for n in LEVELS]
    http_peer = [(await run_http_peer(settings, workdir, n)).figures() for n in LEVELS]
    peer = [(await asyncio.to_thread(run_peer, settings, n)).figures() for n in LEVELS]
    gaps = await failover(settings, workdir)
    auth = await auth_cost.measure(settings)

    def at(rows: list[dict[str, Any]], n: int) -> dict[str, Any]:
        return next((r for r in rows if r["clients"] == n), rows[-1])

    goal_n = GOAL_LEVEL if GOAL_LEVEL in LEVELS else LEVELS[-1]
    ratio_limit = at(ours, goal_n)["commands_per_s"] / max(at(limit, goal_n)["commands_per_s"], 1e-9)
    ratio_peer = at(ours, goal_n)["commands_per_s"] / max(at(http_peer, goal_n)["commands_per_s"], 1e-9)
    ratio_in_process = at(ours, goal_n)["commands_per_s"] / max(at(peer, goal_n)["commands_per_s"], 1e-9)
    one = LEVELS[0]
    result: dict[str, Any] = {
        "what": "HTTP command throughput and latency, closed loop, one dataset per client",
        "seconds_per_level": SECONDS,
        "partitions": settings.partitions,
        "batch_window_ms": settings.command_batch_window_ms,
        "ours": ours,
        "limit_raw_transactional_produce": limit,
        "peer_eventsourcing_postgres_fastapi_uvicorn": http_peer,
        "peer_eventsourcing_postgres_in_process": peer,
        "goal_level_clients": goal_n,
        "ratio_vs_limit": round(ratio_limit, 3),
        "ratio_vs_limit_goal": GOAL_VS_LIMIT,
        "ratio_vs_peer": round(ratio_peer, 3),
        "ratio_vs_peer_goal": GOAL_VS_PEER,
        "ratio_vs_peer_in_process": round(ratio_in_process, 3),
        "p99_ms_at_goal_level": at(ours, goal_n)["p99_ms"],
        "p99_goal_ms": GOAL_P99_MS,
        "p50_ms_at_one_client": at(ours, one)["p50_ms"],
        "p50_goal_ms_at_one_client": round(at(limit, one)["p50_ms"] + 3, 3),
        "cpu_per_command": cpu,
        "failover": gaps,
        "authentication": auth,
        **({"profiles": profiles} if profiles else {}),
    }
    write("S1", result)
    rows: list[tuple[str, str, str]] = []
    for n in LEVELS:
        o, lim, p, hp = at(ours, n), at(limit, n), at(peer, n), at(http_peer, n)
        rows.append(
            (
                f"{n} clients: ours",
                f"{o['commands_per_s']:,} cmd/s  p50 {o['p50_ms']} p99 {o['p99_ms']} ms",
                f"limit {lim['commands_per_s']:,} cmd/s (p50 {lim['p50_ms']}); "
                f"HTTP peer {hp['commands_per_s']:,} cmd/s (p50 {hp['p50_ms']} p99 {hp['p99_ms']}); "
                f"in-process peer {p['commands_per_s']:,} cmd/s",
            )
        )
    rows.append(("ratio_vs_limit", f"{ratio_limit:.2f}", f"goal >= {GOAL_VS_LIMIT} at {goal_n} clients"))
    rows.append(
        ("ratio_vs_peer", f"{ratio_peer:.2f}", f"goal >= {GOAL_VS_PEER} at {goal_n} clients (HTTP peer)")
    )
    rows.append(("cpu per command", f"{cpu['total_ms_per_command']} ms", str(cpu)))
    rows.append(("failover", str(gaps["restarted_owner_answers_after_s"]), str(gaps)))
    rows.append(("authentication", f"{auth['token_us_per_request']} us/request", str(auth)))
    show("S1", "commands over HTTP", rows)
    shutil.rmtree(workdir, ignore_errors=True)
    return result
