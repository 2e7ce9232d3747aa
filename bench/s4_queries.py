"""S4, queries: `GET /api/v1/datasets/{id}` requests/s and latency of the real API,
beside a bare Starlette app answering constant JSON of the same size.

- **ours**: the real `cqrs serve api` process on a free port, under an isolated topic
  prefix; its read models live in the PostgreSQL schema named after the prefix
  (`projections.migrations.migrate`). `BENCH_S4_DATASETS` datasets are seeded straight into
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
default 16 and 64) for `BENCH_S4_SECONDS` after an untimed warm-up (`BENCH_S4_WARMUP`);
client `c` walks the seeded ids from its own starting point. Every answer must be a 200
(anything else, or a transport error, is counted as a failure). Besides rps and latency
each level reports the CPU seconds per 1,000 requests of the server process (and, for
ours, of its PostgreSQL backends) read from /proc, which does not depend on how much
CPU the load generator left to the server on this small machine.

`ratio_vs_limit` is ours over the bare app in requests/s at 16 clients (goal >= 0.5);
the ratios while datasets change and without the read cache are reported beside it.

`BENCH_PROFILE=1` adds one profiled level at 16 clients per API process: py-spy samples
it (`bench/results/s4-api.speedscope.json`, `s4-api-uncached.speedscope.json`) and the
result gets a breakdown of where its time goes (share of samples per owner, inclusive
time of some calls, top functions by own time); the result's `notes` say it in sentences.
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg

from bench.common import (
    Proc,
    backends,
    bearer,
    cpu_seconds,
    free_port,
    host_cpu,
    profile_notes,
    profile_summary,
    start_profiler,
    steal_pct,
    stop_profiler,
)
from bench.generator import dataset_events
from bench.results import RESULTS, show, summary_ms, write
from commands import CONTEXTS
from projections.changes import channel, notify_applied
from projections.datasets.rows import DatasetsProjection
from projections.db import create_pool, schema_name
from projections.events import Record, decode
from projections.migrations import migrate
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
    ("route get_dataset (all of it)", f"{ROOT}/api/datasets/queries.py", "get_dataset"),
    ("pool.fetchrow (acquire, query, release)", "/asyncpg/", "Pool.fetchrow"),
    ("pool release: Connection.reset (a 2nd query per request)", "/asyncpg/", "Connection.reset"),
    ("fastapi solve_dependencies", "/fastapi/", "solve_dependencies"),
    ("fastapi serialize_response (validate + jsonable_encoder)", "/fastapi/", "serialize_response"),
    ("fastapi jsonable_encoder", "/fastapi/", "jsonable_encoder"),
    ("response render (JSONResponse.render)", "/starlette/", "JSONResponse.render"),
    ("httptools protocol data_received", "/uvicorn/", "HttpToolsProtocol.data_received"),
    ("starlette middleware stack", "/starlette/", "ServerErrorMiddleware.__call__"),
]


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
class Server(Proc):
    """A server this benchmark started (ours or the bare app), reached at `url`."""

    url: str = ""

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
        raise RuntimeError(f"{self.name} did not start; log:\n{self.tail()}")


def _spawn(name: str, cmd: list[str], env: dict[str, str], workdir: Path) -> Server:
    port = free_port()
    log = workdir / f"{name}.log"
    with log.open("ab") as out:
        popen = subprocess.Popen([*cmd, "--port", str(port)], env=env, stdout=out, stderr=subprocess.STDOUT)
    return Server(name, popen, log, url=f"http://127.0.0.1:{port}")


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
    async with aiohttp.ClientSession(url, headers=bearer("viewer")) as http:
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
    # every client a viewer with a token of its own (the bare app ignores it)
    credentials = [bearer("viewer", sub=f"bench-reader-{c}") for c in range(clients)]
    async with aiohttp.ClientSession(server.url, connector=connector, timeout=timeout) as http:

        async def client(c: int, until: float, timed: bool) -> None:
            i = c * len(paths) // clients
            mine = credentials[c]
            while time.perf_counter() < until:
                path = paths[i % len(paths)]
                i += 1
                t0 = time.perf_counter()
                try:
                    async with http.get(path, headers=mine) as r:
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
        # each reader is counted against its rate limit, as in production, under a limit
        # no run reaches (the count is what costs)
        "APP_RATE_LIMITS": "admin=0,operator=1000000000,viewer=1000000000",
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
        await ensure_topics(settings, contract_topics(settings, [c.name for c in CONTEXTS]))
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
