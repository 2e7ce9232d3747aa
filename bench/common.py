"""What the scenarios share: their isolation (a topic prefix and schema of their own,
and its clean-up), the real write-side processes, free ports, progress lines, CPU
read from /proc and py-spy profiles.

Scenarios import from here and never from each other (nor from `tests/`). This module
depends on `shared_kernel` only, not on the product's other packages: a scenario that
needs a read model's schema or index names asks `projections` itself and passes them in.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import asyncpg
import httpx
import orjson
from aiokafka import TopicPartition

from api.auth.local import issue_token
from shared_kernel import kafka
from shared_kernel.settings import Settings
from shared_kernel.topics import Topics

CQRS = str(Path(sys.executable).parent / "cqrs")
PROGRESS_S = 5.0


# ---- isolation: a prefix of one's own, and its clean-up ----------------------------------


def isolated(
    base: Settings, scenario: str, partitions: int, log_level: str = "warning"
) -> tuple[Settings, dict[str, str]]:
    """Settings under a prefix of their own (topics, schema, indexes, groups), and the
    environment that gives the same to the processes a scenario starts."""
    prefix = f"bench{uuid.uuid4().hex[:6]}"
    settings = base.model_copy(update={"topic_prefix": prefix, "partitions": partitions})
    env = {
        **os.environ,
        "APP_TOPIC_PREFIX": prefix,
        "APP_PARTITIONS": str(partitions),
        "APP_LOG_LEVEL": log_level,
        "APP_SERVICE_NAME": f"bench-{scenario}-{prefix}",  # names its PostgreSQL backends (CPU)
        "APP_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
        "APP_POSTGRES_DSN": settings.postgres_dsn,
        "APP_OPENSEARCH_URL": settings.opensearch_url,
        "APP_REDIS_URL": settings.redis_url,
        # every client is an operator, counted against its rate limit as in production,
        # with a limit no benchmark reaches (the count is what costs, not the refusal)
        "APP_RATE_LIMITS": "admin=0,operator=1000000000,viewer=1000000000",
    }
    return settings, env


@functools.cache
def _token(role: str, tenant: str, sub: str) -> str:
    return issue_token(Settings(), sub, [role], tenant, 6 * 3600)


def bearer(role: str = "operator", tenant: str = "bench", sub: str = "bench-client") -> dict[str, str]:
    """A token of the local issuer, as `cqrs auth token --sub bench-client --role operator` prints."""
    return {"Authorization": f"Bearer {_token(role, tenant, sub)}"}


def api_client(role: str = "operator", tenant: str = "bench", **options: Any) -> httpx.AsyncClient:
    """An HTTP client of the API with a token of `role` (an operator unless told)."""
    return httpx.AsyncClient(headers={**bearer(role, tenant), **options.pop("headers", {})}, **options)


async def end_offsets(settings: Settings, context: str = "datasets") -> dict[int, int]:
    """The end offset of each partition of the context's events topic, by partition."""
    topic = Topics(settings.topic_prefix).events(context)
    consumer = kafka.consumer(settings)
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(settings.partitions)]
        return {tp.partition: end for tp, end in (await consumer.end_offsets(tps)).items()}
    finally:
        await consumer.stop()


async def drop_prefix(settings: Settings, schema: str, groups: Sequence[str] = ()) -> None:
    """Delete the prefix's topics, the given consumer groups and their Faust data
    directories, and drop the PostgreSQL schema `schema` (`projections.db.schema_name`)."""
    from aiokafka.protocol.admin import DeleteGroupsRequest

    admin = kafka.admin(settings)
    await admin.start()
    try:
        prefix = settings.topic_prefix + "."
        mine = [t for t in await admin.list_topics() if t.startswith(prefix)]
        if mine:
            await admin.delete_topics(mine)
        for group in groups:  # the workers' consumer groups (aiokafka's admin has no call for it)
            try:
                node = await admin.find_coordinator(group)
                await admin._send_request(DeleteGroupsRequest([group]), node)
            except Exception as exc:
                print(f"  could not delete consumer group {group}: {exc!r}", flush=True)
    finally:
        await admin.close()
    conn = await asyncpg.connect(settings.postgres_dsn)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()
    for group in groups:  # Faust's data directories (streams.app.ProjectionApp)
        shutil.rmtree(Path(tempfile.gettempdir()) / "cqrs-faust" / group, ignore_errors=True)


# ---- the peer's database, progress lines ------------------------------------------------


def peer_environment(settings: Settings, pool: int) -> dict[str, str]:
    """The environment of the `eventsourcing` library's PostgreSQL persistence (the peer
    of S1 and S6) on our database, with a connection pool of `pool`."""
    dsn = urlparse(settings.postgres_dsn)
    return {
        "PERSISTENCE_MODULE": "eventsourcing.postgres",
        "POSTGRES_DBNAME": dsn.path.lstrip("/"),
        "POSTGRES_HOST": dsn.hostname or "127.0.0.1",
        "POSTGRES_PORT": str(dsn.port or 5432),
        "POSTGRES_USER": dsn.username or "",
        "POSTGRES_PASSWORD": dsn.password or "",
        "POSTGRES_POOL_SIZE": str(pool),
        "POSTGRES_MAX_OVERFLOW": "4",
        "CREATE_TABLE": "y",
        # its recommended speed-up for a single writer process: cached aggregates,
        # fast-forwarded from the database on every get (safe)
        "AGGREGATE_CACHE_MAXSIZE": "100000",
    }


class Progress:
    """Prints how far a long step got, every PROGRESS_S seconds."""

    def __init__(self, what: str, total: int) -> None:
        self.what, self.total = what, total
        self.started = self.last = time.monotonic()

    def tick(self, done: int) -> None:
        now = time.monotonic()
        if now - self.last >= PROGRESS_S:
            self.last = now
            rate = done / (now - self.started)
            print(f"  {self.what}: {done:,}/{self.total:,} ({rate:,.0f}/s since start)", flush=True)


# ---- the real processes: the write side, and projectors --------------------------------


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on (now)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Proc:
    """A `cqrs` process this benchmark started, and its log file."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(30)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(10)


@dataclass
class WriteSide:
    """The real `cqrs serve api` (owning the command partitions, as `make up` runs it), any
    `cqrs run command-processor` and projector, under a prefix of their own (`isolated`),
    logging into `workdir`. `stop` ends the processes; the prefix's topics, schema and
    indexes are the scenario's to drop."""

    settings: Settings
    env: dict[str, str]
    workdir: Path
    processors: list[Proc] = field(default_factory=list)
    projectors: list[Proc] = field(default_factory=list)
    api: Proc | None = None
    api_url: str = ""

    @classmethod
    def create(
        cls, base: Settings, workdir: Path, scenario: str, partitions: int, log_level: str = "warning"
    ) -> WriteSide:
        settings, env = isolated(base, scenario, partitions, log_level)
        env["APP_COMMAND_TIMEOUT_S"] = str(settings.command_timeout_s)
        return cls(settings=settings, env=env, workdir=workdir)

    def _spawn(self, name: str, *args: str) -> Proc:
        log = self.workdir / f"{name}.log"
        with log.open("ab") as out:
            popen = subprocess.Popen([CQRS, *args], stdout=out, stderr=subprocess.STDOUT, env=self.env)
        return Proc(name, popen, log)

    def start_processor(self, port: int | None = None) -> Proc:
        """`cqrs run command-processor` (an owner of a share of the partitions) on `port`."""
        port = port or free_port()
        proc = self._spawn(
            f"processor-{len(self.processors)}", "run", "command-processor", "--port", str(port)
        )
        self.processors.append(proc)
        return proc

    def start_projector(self, name: str) -> Proc:
        proc = self._spawn(f"projector-{name}", "run", "projector", name)
        self.projectors.append(proc)
        return proc

    async def start_api(self, port: int | None = None) -> Proc:
        """Start the API (owning the partitions) on `port` and wait until it is ready."""
        port = port or free_port()
        api = self.api = self._spawn("api", "serve", "api", "--port", str(port))
        self.api_url = f"http://127.0.0.1:{port}"
        async with api_client(base_url=self.api_url) as client:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and api.popen.poll() is None:
                try:
                    if (await client.get("/ready")).status_code == 200:
                        return api
                except httpx.TransportError:
                    pass
                await asyncio.sleep(0.2)
        raise RuntimeError(f"the API did not start; log:\n{api.tail()}")

    async def start_serving(self) -> None:
        """The API, owning every partition, answering commands."""
        await self.start_api()
        async with api_client(base_url=self.api_url, timeout=30) as client:
            key = f"probe-{uuid.uuid4()}"
            deadline = time.monotonic() + 90
            while time.monotonic() < deadline:
                r = await client.post(
                    "/api/v1/incidents", json={"title": "probe"}, headers={"Idempotency-Key": key}
                )
                if r.status_code == 201:
                    return
                if r.status_code != 503:  # 503: no processor answered yet
                    raise RuntimeError(f"the probe command answered {r.status_code}: {r.text}")
        logs = "\n".join(p.tail() for p in [*self.processors, *([self.api] if self.api else [])])
        raise RuntimeError(f"commands do not flow; logs:\n{logs}")

    async def wait_until_projected(self, projections: Iterable[str] | None = None) -> None:
        """Probe commands until the given projections (by default: those of the projectors
        started by `start_projector`) have applied them (Faust workers take a while to
        join their groups on a cold broker)."""
        running = (
            {p.name.removeprefix("projector-") for p in self.projectors}
            if projections is None
            else set(projections)
        )
        async with api_client(base_url=self.api_url, timeout=30) as client:
            d = (await client.post("/api/v1/datasets", json={"name": "probe"})).json()
            i = (await client.post("/api/v1/incidents", json={"title": "probe"})).json()
            probes = {
                "datasets": (f"/api/v1/datasets/{d['id']}", d["position"]),
                "quality_metrics": (f"/api/v1/datasets/{d['id']}/quality", d["position"]),
                "events": (f"/api/v1/datasets/{d['id']}/events", d["position"]),
                "incidents": (f"/api/v1/incidents/{i['id']}", i["position"]),
                "datasets_search": ("/api/v1/search/datasets", d["position"]),
                "incidents_search": ("/api/v1/search/incidents", i["position"]),
            }
            deadline = time.monotonic() + 120
            for name, (path, token) in probes.items():
                if name not in running:
                    continue
                while (r := await client.get(path, params={"consistent_with": token})).status_code != 200:
                    if r.status_code not in (404, 504):  # 404: its row is not there yet
                        raise RuntimeError(f"{path} answered {r.status_code}: {r.text}")
                    if time.monotonic() > deadline:
                        logs = "\n".join(p.tail() for p in self.projectors)
                        raise RuntimeError(f"projections do not catch up; logs:\n{logs}")
                    await asyncio.sleep(0.1)

    def stop(self) -> None:
        for p in [*self.processors, *self.projectors, *([self.api] if self.api else [])]:
            p.stop()


# ---- CPU from /proc ----------------------------------------------------------------------


def service_pids(*services: str) -> dict[str, int]:
    """The stack's services, from `infra/stack.py status --json`."""
    out = subprocess.run(
        [
            sys.executable,
            str(Path(__file__).resolve().parent.parent / "infra" / "stack.py"),
            "status",
            "--json",
            *services,
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return {row["service"]: int(row["pid"]) for row in json.loads(out) if row["pid"]}


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


# ---- py-spy profiles ---------------------------------------------------------------------


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


async def produce_events(settings: Settings, context: str, records: list[Any]) -> int:
    """Event records (made by the real aggregates, `commands.serialization.to_record`)
    straight onto the context's events topic, as fast as the producer batches them."""
    producer = kafka.producer(settings, linger_ms=20, max_batch_size=1 << 20)
    await producer.start()
    topic = Topics(settings.topic_prefix).events(context)
    try:
        futures = [await producer.send(topic, r.value, key=r.key, headers=list(r.headers)) for r in records]
        for f in futures:
            await f
    finally:
        await producer.stop()
    return len(records)
