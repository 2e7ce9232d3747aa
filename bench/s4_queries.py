"""S4, queries: `GET /api/v1/datasets/{id}` requests/s and latency of the real API,
beside a bare Starlette app answering constant JSON of the same size.

- **ours**: the real `cqrs serve api` process on a free port, under an isolated topic
  prefix; its read models live in the PostgreSQL schema named after the prefix
  (`projections.db.migrate`). `BENCH_S4_DATASETS` datasets are seeded straight into
  `datasets_v1` by the real `DatasetsProjection` from realistic events made by the real
  aggregate (`bench.generator`), so no Kafka processor or projector runs. The prefix's
  topics exist (as in a deployment), so the API's live feed follows them as it would.
  It keeps rendered answers in memory (`api.readcache`, on by default) and serves
  repeated reads from there until a projector's change notification drops them.
- **ours while datasets change**: the same API while `BENCH_S4_CHANGES_PER_S` (500)
  seeded datasets a second, picked at random, are notified as changed exactly as a
  projector's batch does (`projections.changes`): their next reads go to PostgreSQL
  again. Their rows stay the same, so every answer is still the same bytes.
- **ours without the read cache**: a second API process with
  `APP_QUERY_CACHE_ENTRIES=0`: every read is FastAPI's route and a PostgreSQL query.
- **limit**: a Starlette app with one route of the same path that answers the bytes the
  real API gave for a dataset of median size (with an ETag, like ours), served by
  uvicorn with the options `cqrs serve api` uses (one worker, uvloop and httptools as
  uvicorn picks them, no access log), in a process of its own.

Each level runs closed-loop aiohttp clients from this process (`BENCH_S4_CLIENTS`,
default 16 and 64) for `BENCH_S4_SECONDS` after an untimed warm-up; client `c` walks
the seeded ids from its own starting point. Every answer must be a 200 (anything else,
or a transport error, is counted as a failure). Besides rps and latency each level
reports the CPU seconds per 1,000 requests of the server process (and, for ours, of
its PostgreSQL backends) read from /proc, which does not depend on how much CPU the
load generator left to the server on this small machine.

`BENCH_PROFILE=1` adds one profiled level at 16 clients: py-spy samples the API
process (`bench/results/s4-api.speedscope.json`) and the result gets a breakdown of
where its time goes (share of samples per owner, inclusive time of some calls, top
functions by own time); the result's `notes` say it in sentences.

Findings of two runs on 2026-11-22 (2 vCPUs shared with another user, CPU steal up
to 30%; BENCH_PROFILE=1): at 16 clients ours 737 and 863 req/s (p50 20 and 16 ms, p99
72 and 132 ms), the bare app 3,655 and 6,220 req/s (p50 3.4 and 2.6 ms): ratio 0.20
and 0.14, goal 0.5 missed (0.10-0.14 at 64 clients; the load generator used 84-96% of
a CPU against the bare app, so its rate is a floor). No failures. The API process
spends 1.02-1.06 ms of CPU per request (plus 0.25 ms in its PostgreSQL backend), the
bare app 0.115-0.133 ms: 8-9x, so a CPU-bound API cannot pass about 0.11-0.13 of the
bare app. Of the API's samples (py-spy, ~1,060 per run): FastAPI 31-34%
(solve_dependencies 14-21% inclusive: the pool, the position token from a query
parameter and a header, as_of/as_of_version, Request, Response), asyncpg 24-27% (the
query 12-13%, and 7-9% for the pool's release `Connection.reset`, a second statement
per request: `SELECT pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL`),
uvicorn + httptools 8-10%, Starlette 8%, aiokafka 7.6-7.8% (a Kafka client of the
API decoding metadata of every topic of the 500-topic cluster), FastAPI's
per-request OpenTelemetry check ~3% (`get_tracer_provider` reading os.environ),
pydantic 2.5-3.6%, our own api/ code 1.5-2.5%, uvloop 6-12%.

Run of 2026-12-01, after the API's pool stopped sending asyncpg's reset statement on
every release (`projections.db.keep_session`): ratio 0.19-0.23 at 16 clients; the API
0.547-0.69 ms of CPU per request, its PostgreSQL backend 0.08-0.12 ms (was 0.14-0.25).
py-spy (1,047 samples): FastAPI 50.2% (`solve_dependencies` 27.7% inclusive, response
serialisation only 2.5%: answering pre-serialised orjson bytes did not change the CPU
per request, so it was not kept), asyncpg 15.8%, uvicorn + httptools 8.9%, Starlette
7.9%, our api/ code 2.3%. Goal 0.5 missed: the API would need about a third of its
CPU per request.

Runs of 2026-12-01 with the read cache (`api.readcache`; steal 0.2-13%), three runs:
at 16 clients ours 6,055-7,373 req/s against the bare app's 6,281-7,730: ratio 0.93,
1.02 and 1.15 (goal 0.5 met); at 64 clients 1.04-1.07. Every timed read came from
memory; the API spent 0.097-0.122 ms of CPU per request, the bare app 0.085-0.117, and
the load generator used 83-97% of a CPU against both, so both rates are floors and
the ratio is about 1. py-spy on the cached API (916-932 samples): uvloop 39-40% and
uvicorn + httptools 31-33% (the HTTP work the bare app does too), the cache's own code
11%, FastAPI's and Starlette's outer middleware 8%, the Kafka client's metadata 3-5%.
While 500 datasets a second are notified as changed, 80-82% of reads come from memory
and the ratio is 0.45-0.48 at 16 clients, 0.60-0.69 at 64: a miss costs what an
uncached read costs. Without the cache (the second API process) ratio 0.16-0.18 at 16
clients: 0.76-0.83 ms of API CPU plus 0.13-0.15 ms of PostgreSQL per request; its
profile (1,020 samples) is FastAPI 37.7% (`solve_dependencies` 19.7% inclusive),
asyncpg 20%, uvicorn + httptools 10%, Starlette 7.9%, pydantic 3%, our code 5%.
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import orjson

from bench.generator import dataset_events
from bench.results import RESULTS, show, summary_ms, write
from projections.changes import channel, notify_applied
from projections.db import create_pool, migrate, schema_name
from projections.events import Record, decode
from projections.postgres import DatasetsProjection
from projections.search import alias_name, search_client
from shared_kernel import kafka
from shared_kernel.avro import AvroCodec
from shared_kernel.settings import Settings
from shared_kernel.topics import Topics, contract_topics, ensure_topics

LEVELS = [int(x) for x in os.environ.get("BENCH_S4_CLIENTS", "16,64").split(",")]
SECONDS = float(os.environ.get("BENCH_S4_SECONDS", "5"))
WARMUP_S = float(os.environ.get("BENCH_S4_WARMUP", "1"))
DATASETS = int(os.environ.get("BENCH_S4_DATASETS", "1000"))
EVENTS_PER_DATASET = 20
PROFILE = os.environ.get("BENCH_PROFILE", "") not in ("", "0")
GOAL_LEVEL = 16
GOAL_VS_LIMIT = 0.5
CHANGES_PER_S = int(os.environ.get("BENCH_S4_CHANGES_PER_S", "500"))
BARE_BODY_ENV = "BENCH_S4_BARE_BODY"
BARE_ETAG = '"20"'

ROOT = str(Path(__file__).resolve().parents[1])

# Who owns the API's time: each sample goes to the innermost frame that matches
# (file marker, function-name prefix or ""), standard-library frames being skipped.
API_OWNERS: list[tuple[str, str, str]] = [
    ("our code (api/)", f"{ROOT}/api/", ""),
    ("our code (projections/, shared_kernel/)", f"{ROOT}/projections/", ""),
    ("our code (projections/, shared_kernel/)", f"{ROOT}/shared_kernel/", ""),
    ("asyncpg (pool, protocol, record decoding)", "/asyncpg/", ""),
    ("fastapi (dependencies, validation, serialization)", "/fastapi/", ""),
    ("pydantic", "/pydantic", ""),
    ("starlette (routing, middleware, responses)", "/starlette/", ""),
    ("uvicorn + httptools (HTTP, ASGI glue)", "/uvicorn/", ""),
    ("uvicorn + httptools (HTTP, ASGI glue)", "/httptools/", ""),
    ("anyio", "/anyio/", ""),
]
# Inclusive time of some calls (a sample counts when any frame of it matches).
API_SPANS: list[tuple[str, str, str]] = [
    (
        "read cache (CachedReads: all of a hit, or a miss with the route in it)",
        f"{ROOT}/api/readcache.py",
        "CachedReads.__call__",
    ),
    ("route get_dataset (all of it)", f"{ROOT}/api/queries.py", "get_dataset"),
    ("pool.fetchrow (acquire, query, release)", "/asyncpg/", "Pool.fetchrow"),
    ("pool release: Connection.reset (a 2nd query per request)", "/asyncpg/", "Connection.reset"),
    ("fastapi solve_dependencies", "/fastapi/", "solve_dependencies"),
    ("fastapi serialize_response (validate + jsonable_encoder)", "/fastapi/", "serialize_response"),
    ("fastapi jsonable_encoder", "/fastapi/", "jsonable_encoder"),
    ("response render (JSONResponse.render)", "/starlette/", "JSONResponse.render"),
    ("httptools protocol data_received", "/uvicorn/", "HttpToolsProtocol.data_received"),
    ("starlette middleware stack", "/starlette/", "ServerErrorMiddleware.__call__"),
]


# ---- helpers shared with S2: CPU from /proc, py-spy profiles ------------------------


def cpu_seconds(pids: Sequence[int]) -> float:
    """User + system CPU seconds used so far by these processes (gone ones count 0)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        fields = stat.rpartition(")")[2].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / tick


def process_tree(pid: int) -> list[int]:
    """`pid` and its descendants (Linux /proc)."""
    pids, i = [pid], 0
    while i < len(pids):
        try:
            kids = Path(f"/proc/{pids[i]}/task/{pids[i]}/children").read_text().split()
        except OSError:
            kids = []
        pids += [int(k) for k in kids]
        i += 1
    return pids


async def backends(settings: Settings, app_name_like: str) -> list[int]:
    """The PostgreSQL backends whose application_name is LIKE the pattern (their pids)."""
    conn = await asyncpg.connect(settings.postgres_dsn)
    try:
        rows = await conn.fetch(
            "SELECT pid FROM pg_stat_activity WHERE application_name LIKE $1", app_name_like
        )
    finally:
        await conn.close()
    return [int(r["pid"]) for r in rows]


def host_cpu() -> tuple[int, int]:
    """(all, stolen) jiffies of this machine so far (/proc/stat)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return sum(fields[:8]), fields[7]


def steal_pct(before: tuple[int, int], after: tuple[int, int]) -> float:
    """How much of the CPU time in between the hypervisor gave to others (steal), in %:
    high values mean this machine's figures are depressed and noisy."""
    spent = after[0] - before[0]
    return round(100 * (after[1] - before[1]) / spent, 1) if spent else 0.0


def py_spy() -> str:
    return shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")


def start_profiler(pid: int, target: Path, subprocesses: bool = False) -> subprocess.Popen[bytes]:
    """py-spy sampling `pid` until it exits or is sent SIGINT (then it writes `target`)."""
    cmd = [py_spy(), "record", "--pid", str(pid), "--format", "speedscope", "--output", str(target)]
    cmd += ["--nonblocking", "--rate", "200"]
    if subprocesses:
        cmd.append("--subprocesses")
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def stop_profiler(spy: subprocess.Popen[bytes]) -> None:
    if spy.poll() is None:
        spy.send_signal(signal.SIGINT)
    try:
        spy.wait(60)
    except subprocess.TimeoutExpired:
        spy.kill()
        spy.wait(10)


def _stdlib(file: str) -> bool:
    return ("/lib/python3" in file and "-packages/" not in file) or file.startswith("<")


# The event loop's dispatch: a sample reaching one of these before any owner is the
# loop's own. With uvloop the loop is C code, so its time shows as `Runner.run`.
LOOP_FRAMES = ("Handle._run", "BaseEventLoop._run_once", "Runner.run", "BaseEventLoop.run_until_complete")


def profile_summary(
    path: Path,
    owners: list[tuple[str, str, str]],
    spans: list[tuple[str, str, str]],
    top: int = 12,
) -> dict[str, Any]:
    """Where a py-spy speedscope profile's samples went.

    - `owned_pct`: each sample goes to the innermost frame matching an owner (a file
      marker and a function-name prefix, "" for any), skipping standard-library frames
      (so `uuid.UUID()` called by our code counts as our code's). A sample that reaches
      the event loop's dispatch (`Handle._run`, `_run_once`, uvloop's `Runner.run`)
      before any owner is the loop's own, whoever started the loop;
      another library is `other: <package>`. These add up to 100.
    - `spans_pct`: inclusive time of some calls; they nest.
    - `top_own_pct`: the functions where samples landed (leaf frames).
    - `threads_pct`: samples per thread.
    """
    data = orjson.loads(path.read_bytes())
    frames: list[dict[str, Any]] = data["shared"]["frames"]

    def matches(f: dict[str, Any], marker: str, prefix: str) -> bool:
        return marker in f.get("file", "") and str(f["name"]).startswith(prefix)

    owner_of: list[str | None] = []
    for f in frames:
        file = str(f.get("file", ""))
        owner = next((label for label, m, n in owners if matches(f, m, n)), None)
        if owner is None and not _stdlib(file):
            package = file.split("-packages/", 1)[1].split("/", 1)[0] if "-packages/" in file else file
            owner = f"other: {package}"
        owner_of.append(owner)
    span_of = [{label for label, m, n in spans if matches(f, m, n)} for f in frames]
    leaf_name = [f"{f['name']} ({Path(str(f.get('file', '?'))).name}:{f.get('line', '?')})" for f in frames]
    owned: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    total = 0
    for profile in data["profiles"]:
        for stack in profile["samples"]:
            total += 1
            threads[profile.get("name", "?")] += 1
            if not stack:
                continue
            owner = None
            for i in reversed(stack):
                if owner_of[i] is not None or str(frames[i]["name"]) in LOOP_FRAMES:
                    owner = owner_of[i]
                    break
            if owner is None:
                leaf = str(frames[stack[-1]]["name"])
                if leaf.endswith(("select", "poll")):
                    owner = "event loop: idle in select"
                elif leaf in LOOP_FRAMES[2:]:
                    owner = "event loop: uvloop's C code (poll, I/O, scheduling)"
                else:
                    owner = "event loop and standard library"
            owned[owner] += 1
            hit: set[str] = set()
            for i in stack:
                hit |= span_of[i]
            inclusive.update(hit)
            own[leaf_name[stack[-1]]] += 1

    def pct(n: int) -> float:
        return round(100 * n / total, 1) if total else 0.0

    return {
        "samples": total,
        "owned_pct": {label: pct(n) for label, n in owned.most_common()},
        "spans_pct": {label: pct(inclusive[label]) for label, *_ in spans},
        "top_own_pct": {name: pct(n) for name, n in own.most_common(top)},
        "threads_pct": {name: pct(n) for name, n in threads.most_common(6)},
    }


# ---- the bare app (run in its own process by `python -m bench.s4_queries PORT`) ---------


def bare_app() -> Any:
    """A Starlette app answering the body in the file `$BENCH_S4_BARE_BODY` on the path of
    a single dataset, as the API does (JSON, ETag)."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    body = Path(os.environ[BARE_BODY_ENV]).read_bytes()

    async def one(request: Request) -> Response:
        return Response(body, media_type="application/json", headers={"etag": BARE_ETAG})

    return Starlette(routes=[Route("/api/v1/datasets/{dataset_id}", one)])


def serve_bare(port: int) -> None:
    """Serve `bare_app` with the options of `cqrs serve api` (cli.main.serve_api)."""
    import uvicorn

    uvicorn.run(
        "bench.s4_queries:bare_app",
        factory=True,
        host="127.0.0.1",
        port=port,
        workers=1,
        log_config=None,
        access_log=False,
        lifespan="on",
    )


# ---- the servers ----------------------------------------------------------------------


@dataclass
class Server:
    name: str
    popen: subprocess.Popen[bytes]
    url: str
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    async def wait_until(self, path: str, seconds: float = 90) -> None:
        deadline = time.monotonic() + seconds
        async with aiohttp.ClientSession(self.url) as http:
            while time.monotonic() < deadline:
                if self.popen.poll() is not None:
                    break
                try:
                    async with http.get(path) as r:
                        if r.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.2)
        raise RuntimeError(f"{self.name} did not start; log:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(30)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(10)


def _spawn(name: str, cmd: list[str], env: dict[str, str], workdir: Path) -> Server:
    from tests.integration.harness import free_port

    port = free_port()
    log = workdir / f"{name}.log"
    with log.open("ab") as out:
        popen = subprocess.Popen([*cmd, "--port", str(port)], env=env, stdout=out, stderr=subprocess.STDOUT)
    return Server(name, popen, f"http://127.0.0.1:{port}", log)


# ---- the read model -------------------------------------------------------------------


async def seed(settings: Settings, datasets: int) -> list[str]:
    """Migrate the prefix's schema and fill `datasets_v1` through the real projection from
    `datasets` x EVENTS_PER_DATASET realistic events; returns the dataset ids."""
    await migrate(settings)
    codec = AvroCodec.from_directory()
    topic = Topics(settings.topic_prefix).events("datasets")
    projection = DatasetsProjection()
    pool = await create_pool(settings, "bench-s4-seed", min_size=1, max_size=1)
    ids: list[str] = []
    try:
        batch = []
        for offset, rec in enumerate(dataset_events(datasets, EVENTS_PER_DATASET)):
            event = decode(codec, Record(topic, 0, offset, rec.key, rec.value, rec.headers, 0))
            if event.name == "DatasetRegistered":
                ids.append(event.meta.aggregate_id)
            batch.append(event)
            if len(batch) >= 2000:
                await _apply(pool, projection, batch)
                batch = []
        await _apply(pool, projection, batch)
        count = await pool.fetchval("SELECT count(*) FROM datasets")
    finally:
        await pool.close()
    if count != len(ids):
        raise RuntimeError(f"seeded {count} rows for {len(ids)} datasets")
    return ids


async def _apply(pool: asyncpg.Pool, projection: DatasetsProjection, events: list[Any]) -> None:
    async with pool.acquire() as conn, conn.transaction():
        await projection.apply(conn, events)
    projection.committed()


async def median_body(url: str, ids: list[str]) -> tuple[bytes, int]:
    """Read every seeded dataset once through the API (each must answer 200); return the
    body of median size and how many answers were not 200."""
    bodies: list[bytes] = []
    bad = 0
    async with aiohttp.ClientSession(url) as http:
        for ident in ids:
            async with http.get(f"/api/v1/datasets/{ident}") as r:
                body = await r.read()
                if r.status != 200:
                    bad += 1
                    continue
                bodies.append(body)
    if not bodies:
        raise RuntimeError("the API answered no seeded dataset")
    bodies.sort(key=len)
    return bodies[len(bodies) // 2], bad


# ---- the load -------------------------------------------------------------------------


@dataclass
class Level:
    clients: int
    latencies: list[float] = field(default_factory=list)
    failures: int = 0
    first_failure: str = ""
    elapsed: float = 0.0
    server_cpu_s: float = 0.0
    db_cpu_s: float | None = None
    client_cpu_s: float = 0.0
    body_bytes: int = 0
    host_steal_pct: float = 0.0
    cache_hits: int = 0
    changes: int = 0  # notifications that dropped cached answers during the level

    def failed(self, what: str) -> None:
        self.failures += 1
        self.first_failure = self.first_failure or what[:300]

    @property
    def rps(self) -> float:
        return len(self.latencies) / self.elapsed if self.elapsed else 0.0

    def figures(self) -> dict[str, Any]:
        done = len(self.latencies)
        per_k = 1000 / max(done, 1)
        return {
            "clients": self.clients,
            "requests": done,
            "rps": round(self.rps, 1),
            **{k: v for k, v in summary_ms(self.latencies).items() if k != "n"},
            "failures": self.failures,
            **({"first_failure": self.first_failure} if self.first_failure else {}),
            "body_bytes": self.body_bytes,
            "server_cpu_s_per_1k": round(self.server_cpu_s * per_k, 3),
            **({"db_cpu_s_per_1k": round(self.db_cpu_s * per_k, 3)} if self.db_cpu_s is not None else {}),
            "client_cpu_pct": round(100 * self.client_cpu_s / self.elapsed, 1) if self.elapsed else 0.0,
            "host_steal_pct": self.host_steal_pct,
            "read_cache_hit_pct": round(100 * self.cache_hits / max(done, 1), 1),
            **({"changes_per_s": round(self.changes / self.elapsed, 1)} if self.changes else {}),
        }


async def load(
    server: Server,
    ids: list[str],
    clients: int,
    seconds: float,
    settings: Settings,
    db_app_name: str | None = None,
    changes_per_s: int = 0,
) -> Level:
    """`clients` closed-loop clients for `seconds` (after an untimed warm-up); with
    `changes_per_s`, datasets picked at random are notified as changed meanwhile."""
    level = Level(clients)
    paths = [f"/api/v1/datasets/{i}" for i in ids]
    connector = aiohttp.TCPConnector(limit=clients)
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(server.url, connector=connector, timeout=timeout) as http:

        async def client(c: int, until: float, timed: bool) -> None:
            i = c * len(paths) // clients
            while time.perf_counter() < until:
                path = paths[i % len(paths)]
                i += 1
                t0 = time.perf_counter()
                try:
                    async with http.get(path) as r:
                        body = await r.read()
                        status = r.status
                except Exception as exc:
                    if timed:
                        level.failed(repr(exc))
                    continue
                if not timed:
                    continue
                if status != 200:
                    level.failed(f"{status}: {body[:200]!r}")
                else:
                    level.latencies.append(time.perf_counter() - t0)
                    level.body_bytes = len(body)
                    level.cache_hits += r.headers.get("x-read-cache") == "hit"

        warm_until = time.perf_counter() + WARMUP_S
        await asyncio.gather(*(client(c, warm_until, False) for c in range(clients)))
        db_pids = await backends(settings, db_app_name) if db_app_name else []
        cpu0, db0, me0 = cpu_seconds([server.pid]), cpu_seconds(db_pids), time.process_time()
        host0 = host_cpu()
        t0 = time.perf_counter()
        changing = asyncio.create_task(change(settings, ids, changes_per_s, t0 + seconds, level))
        await asyncio.gather(*(client(c, t0 + seconds, True) for c in range(clients)))
        level.elapsed = time.perf_counter() - t0
        await changing
        level.server_cpu_s = cpu_seconds([server.pid]) - cpu0
        level.client_cpu_s = time.process_time() - me0
        level.host_steal_pct = steal_pct(host0, host_cpu())
        if db_app_name:
            # the pool grows on demand: backends that appeared during the level count whole
            later = [p for p in await backends(settings, db_app_name) if p not in db_pids]
            level.db_cpu_s = cpu_seconds(db_pids) - db0 + cpu_seconds(later)
    return level


async def change(settings: Settings, ids: list[str], per_s: int, until: float, level: Level) -> None:
    """Notify `per_s` datasets a second as changed, as projectors do after a batch
    (`projections.changes`), in batches of 10 ms: the API drops their cached answers,
    so their next reads go to PostgreSQL again. Their rows stay as they are, so every
    answer is still checked against the same bytes."""
    if per_s <= 0:
        return
    conn = await asyncpg.connect(settings.postgres_dsn)
    rng = random.Random(per_s)
    chan = channel(schema_name(settings))
    try:
        tick = 0.01
        next_at = time.perf_counter()
        while time.perf_counter() < until:
            picked = rng.sample(ids, max(1, round(per_s * tick)))
            await notify_applied(conn, chan, "datasets", 1, {}, picked)
            level.changes += len(picked)
            next_at += tick
            await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
    finally:
        await conn.close()


# ---- the run --------------------------------------------------------------------------


async def _cleanup(settings: Settings) -> None:
    admin = kafka.admin(settings)
    await admin.start()
    try:
        prefix = settings.topic_prefix + "."
        mine = [t for t in await admin.list_topics() if t.startswith(prefix)]
        if mine:
            await admin.delete_topics(mine)
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


async def _profile(ours: Server, ids: list[str], settings: Settings, name: str = "api") -> dict[str, Any]:
    target = RESULTS.parent / f"s4-{name}.speedscope.json"
    spy = start_profiler(ours.pid, target)
    try:
        level = await load(ours, ids, GOAL_LEVEL, SECONDS, settings)
    finally:
        await asyncio.to_thread(stop_profiler, spy)
    return {
        "file": str(target.relative_to(RESULTS.parent.parent.parent)),
        "rps_while_profiled": round(level.rps, 1),
        **profile_summary(target, API_OWNERS, API_SPANS),
    }


def profile_notes(profile: dict[str, Any], of: str = "") -> list[str]:
    """The profile's breakdown as two sentences (owners, then inclusive spans)."""
    if not profile:
        return []
    owned = "; ".join(f"{k} {v}%" for k, v in profile["owned_pct"].items() if v >= 0.5)
    spans = "; ".join(f"{k} {v}%" for k, v in profile["spans_pct"].items() if v >= 0.5)
    return [
        f"py-spy{of}, {profile['samples']} samples, share by owner (innermost matching frame): {owned}",
        f"inclusive time of some calls{of}: {spans}",
    ]


def _notes(
    ours: dict[str, Any],
    uncached: dict[str, Any],
    bare: dict[str, Any],
    ratio: float,
    profile: dict[str, Any],
    uncached_profile: dict[str, Any],
) -> list[str]:
    limit = bare["server_cpu_s_per_1k"]
    notes = [
        f"at {ours['clients']} clients the API process spends {ours['server_cpu_s_per_1k']} ms of CPU per "
        f"request ({ours['read_cache_hit_pct']}% answered from memory, plus "
        f"{ours.get('db_cpu_s_per_1k', 0.0)} ms in its PostgreSQL backends), the bare app {limit} ms",
        f"without the read cache every request goes through FastAPI and PostgreSQL: "
        f"{uncached['server_cpu_s_per_1k']} ms of API CPU plus {uncached.get('db_cpu_s_per_1k', 0.0)} ms "
        f"in PostgreSQL per request, {uncached['server_cpu_s_per_1k'] / max(limit, 1e-9):.1f}x the bare app",
        f"host CPU steal during the levels: ours {ours['host_steal_pct']}%, bare {bare['host_steal_pct']}% "
        f"(rates on this machine are noisy; CPU per request is not affected by steal)",
    ]
    if bare["client_cpu_pct"] >= 80:
        notes.append(
            f"the load generator used {bare['client_cpu_pct']}% of a CPU against the bare app: "
            "its rate is a floor, the true ratio lower"
        )
    if ratio < GOAL_VS_LIMIT:
        notes.append(f"goal missed: {ratio:.2f} < {GOAL_VS_LIMIT}")
    return notes + profile_notes(profile) + profile_notes(uncached_profile, " (without the read cache)")


async def run(base: Settings) -> dict[str, Any]:
    prefix = f"bench{uuid.uuid4().hex[:6]}"
    settings = base.model_copy(update={"topic_prefix": prefix})
    db_app_name = f"bench-s4-{prefix}"
    env = {
        **os.environ,
        "APP_TOPIC_PREFIX": prefix,
        "APP_SERVICE_NAME": db_app_name,
        "APP_LOG_LEVEL": "warning",
        "APP_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
        "APP_POSTGRES_DSN": settings.postgres_dsn,
        "APP_OPENSEARCH_URL": settings.opensearch_url,
        "APP_REDIS_URL": settings.redis_url,
    }
    workdir = Path(tempfile.mkdtemp(prefix="bench-s4-"))
    servers: list[Server] = []
    ours_rows: list[dict[str, Any]] = []
    bare_rows: list[dict[str, Any]] = []
    changing_rows: list[dict[str, Any]] = []
    uncached_rows: list[dict[str, Any]] = []
    profile: dict[str, Any] = {}
    uncached_profile: dict[str, Any] = {}
    try:
        print(f"S4: seeding {DATASETS:,} datasets into schema {schema_name(settings)}", flush=True)
        ids = await seed(settings, DATASETS)
        # the prefix's topics exist, as in a deployment: the API's live feed is assigned
        # to them (while they are missing it asks Kafka for the whole cluster's metadata
        # every second, which is not what a deployment's API does)
        await ensure_topics(settings, contract_topics(settings, ["datasets", "incidents"]))
        cqrs = str(Path(sys.executable).parent / "cqrs")
        ours = _spawn("api", [cqrs, "serve", "api"], env, workdir)
        servers.append(ours)
        uncached_env = {**env, "APP_QUERY_CACHE_ENTRIES": "0", "APP_SERVICE_NAME": f"{db_app_name}-pg"}
        uncached = _spawn("api-uncached", [cqrs, "serve", "api"], uncached_env, workdir)
        servers.append(uncached)
        await ours.wait_until("/ready")
        await uncached.wait_until("/ready")
        body, bad = await median_body(ours.url, ids)
        if bad:
            raise RuntimeError(f"{bad} of {len(ids)} seeded datasets did not answer 200")
        (workdir / "body.json").write_bytes(body)
        bare_env = {**env, BARE_BODY_ENV: str(workdir / "body.json")}
        bare = _spawn("bare", [sys.executable, "-m", "bench.s4_queries"], bare_env, workdir)
        servers.append(bare)
        await bare.wait_until(f"/api/v1/datasets/{ids[0]}")
        print(f"S4: every seeded dataset answers 200; median body {len(body)} bytes", flush=True)
        for n in LEVELS:
            print(f"S4: {n} clients, {SECONDS:g} s each: limit (bare Starlette), then ours", flush=True)
            bare_rows.append((await load(bare, ids, n, SECONDS, settings)).figures())
            ours_rows.append((await load(ours, ids, n, SECONDS, settings, db_app_name)).figures())
            changing_rows.append(
                (await load(ours, ids, n, SECONDS, settings, db_app_name, CHANGES_PER_S)).figures()
            )
            uncached_rows.append(
                (await load(uncached, ids, n, SECONDS, settings, f"{db_app_name}-pg")).figures()
            )
        if PROFILE:
            print("S4: one more level under py-spy", flush=True)
            profile = await _profile(ours, ids, settings)
            uncached_profile = await _profile(uncached, ids, settings, "api-uncached")
    finally:
        for s in servers:
            s.stop()
        await _cleanup(settings)
        shutil.rmtree(workdir, ignore_errors=True)

    def at(rows: list[dict[str, Any]], n: int) -> dict[str, Any]:
        return next((r for r in rows if r["clients"] == n), rows[-1])

    goal_n = GOAL_LEVEL if GOAL_LEVEL in LEVELS else LEVELS[-1]

    def ratios_of(rows: list[dict[str, Any]]) -> dict[str, float]:
        return {str(n): round(at(rows, n)["rps"] / max(at(bare_rows, n)["rps"], 1e-9), 3) for n in LEVELS}

    ratios, changing_ratios, uncached_ratios = (
        ratios_of(ours_rows),
        ratios_of(changing_rows),
        ratios_of(uncached_rows),
    )
    ratio = ratios[str(goal_n)]
    cpu_ratio = at(bare_rows, goal_n)["server_cpu_s_per_1k"] / max(
        at(ours_rows, goal_n)["server_cpu_s_per_1k"], 1e-9
    )
    failures = sum(r["failures"] for r in ours_rows + bare_rows + changing_rows + uncached_rows)
    result: dict[str, Any] = {
        "what": "GET /api/v1/datasets/{id}: the real API vs a bare Starlette app answering the same bytes",
        "datasets": DATASETS,
        "seconds_per_level": SECONDS,
        "server": "uvicorn, 1 worker, uvloop + httptools (as `cqrs serve api`)",
        "clients": "aiohttp, closed loop, in the benchmark process",
        "ours": ours_rows,
        "ours_while_changing": changing_rows,
        "ours_without_read_cache": uncached_rows,
        "limit_bare_starlette": bare_rows,
        "goal_level_clients": goal_n,
        "ratio_vs_limit": ratio,
        "ratio_vs_limit_by_clients": ratios,
        "ratio_vs_limit_while_changing": changing_ratios,
        "ratio_vs_limit_without_read_cache": uncached_ratios,
        "changes_per_s": CHANGES_PER_S,
        "ratio_vs_limit_goal": GOAL_VS_LIMIT,
        "goal_met": ratio >= GOAL_VS_LIMIT,
        "server_cpu_ratio_vs_limit": round(cpu_ratio, 3),
        "failures": failures,
        "notes": _notes(
            at(ours_rows, goal_n),
            at(uncached_rows, goal_n),
            at(bare_rows, goal_n),
            ratio,
            profile,
            uncached_profile,
        ),
        **({"profile": profile, "profile_without_read_cache": uncached_profile} if profile else {}),
    }
    write("S4", result)
    rows: list[tuple[str, str, str]] = []
    for n in LEVELS:
        o, b = at(ours_rows, n), at(bare_rows, n)
        rows.append(
            (
                f"{n} clients: ours",
                f"{o['rps']:,} req/s  p50 {o['p50_ms']} p99 {o['p99_ms']} ms",
                f"limit {b['rps']:,} req/s (p50 {b['p50_ms']} p99 {b['p99_ms']} ms); "
                f"ratio {ratios[str(n)]:.2f}",
            )
        )
        rows.append(
            (
                f"{n} clients: CPU s / 1k req",
                f"api {o['server_cpu_s_per_1k']} + postgres {o.get('db_cpu_s_per_1k', '?')}",
                f"bare {b['server_cpu_s_per_1k']}; load generator {o['client_cpu_pct']}% / "
                f"{b['client_cpu_pct']}% of a CPU; steal {o['host_steal_pct']}% / {b['host_steal_pct']}%",
            )
        )
        for label, row, by in (
            (f"while {CHANGES_PER_S:,} datasets/s change", at(changing_rows, n), changing_ratios),
            ("without the read cache", at(uncached_rows, n), uncached_ratios),
        ):
            rows.append(
                (
                    f"{n} clients: ours {label}",
                    f"{row['rps']:,} req/s  p50 {row['p50_ms']} p99 {row['p99_ms']} ms",
                    f"ratio {by[str(n)]:.2f}; {row['read_cache_hit_pct']}% from memory; CPU s / 1k req "
                    f"api {row['server_cpu_s_per_1k']} + postgres {row.get('db_cpu_s_per_1k', '?')}",
                )
            )
    rows.append(("ratio_vs_limit", f"{ratio:.2f}", f"goal >= {GOAL_VS_LIMIT} at {goal_n} clients"))
    rows.append(("failures", str(failures), "every answer must be 200"))
    show("S4", "single dataset reads over HTTP", rows)
    return result


if __name__ == "__main__":
    serve_bare(int(sys.argv[sys.argv.index("--port") + 1]))
