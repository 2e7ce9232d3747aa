"""Runs the real processes (`cqrs serve api`, which owns command partitions, `cqrs run
command-processor`, projectors) against the real services, each test group under its
own topic prefix, and reads back the log."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
from aiokafka import ConsumerRecord, TopicPartition

from projections.registry import PROJECTIONS
from shared_kernel import kafka
from shared_kernel.avro import AvroCodec
from shared_kernel.envelope import EventMetadata
from shared_kernel.position import PositionToken
from shared_kernel.settings import Settings
from shared_kernel.topics import Topics
from tests.auth import api_client

CQRS = str(Path(sys.executable).parent / "cqrs")
T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    args: tuple[str, ...] = ()
    env: dict[str, str] | None = None
    url: str = ""  # its HTTP base URL, if it serves one
    log_from: int = 0  # where its own lines start in the log (a restart appends to it)

    def output(self) -> bytes:
        """What this process (not an earlier one of the same name) logged so far."""
        return self.log.read_bytes()[self.log_from :]

    @property
    def pid(self) -> int:
        return self.popen.pid

    def kill9(self) -> None:
        self.popen.send_signal(signal.SIGKILL)
        self.popen.wait(10)

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(30)
            except subprocess.TimeoutExpired:
                self.kill9()


@dataclass
class WriteSide:
    """One isolated write side: its own topics, processors and API."""

    settings: Settings
    workdir: Path
    env: dict[str, str]
    processors: list[Proc] = field(default_factory=list)
    apis: list[Proc] = field(default_factory=list)
    projectors: list[Proc] = field(default_factory=list)
    jobs: list[Proc] = field(default_factory=list)
    projections: set[str] = field(default_factory=set)  # those the projectors keep
    api: Proc | None = None
    api_url: str = ""

    @classmethod
    def create(cls, base: Settings, workdir: Path, **overrides: Any) -> WriteSide:
        prefix = f"t{uuid.uuid4().hex[:8]}"
        settings = base.model_copy(update={"topic_prefix": prefix, "partitions": 3, **overrides})
        env = {
            **os.environ,
            "APP_ENVIRONMENT": "test",
            "APP_TOPIC_PREFIX": prefix,
            "APP_PARTITIONS": str(settings.partitions),
            "APP_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
            "APP_REDIS_URL": settings.redis_url,
            "APP_POSTGRES_DSN": settings.postgres_dsn,
            "APP_OPENSEARCH_URL": settings.opensearch_url,
            "APP_COMMAND_TIMEOUT_S": str(settings.command_timeout_s),
        }
        return cls(settings=settings, workdir=workdir, env=env)

    def _spawn(self, name: str, *args: str, env: dict[str, str] | None = None, url: str = "") -> Proc:
        log = self.workdir / f"{name}.log"
        start = log.stat().st_size if log.exists() else 0
        out = log.open("ab")
        popen = subprocess.Popen([CQRS, *args], stdout=out, stderr=subprocess.STDOUT, env=env or self.env)
        return Proc(name, popen, log, args, env, url, start)

    def restart(self, proc: Proc) -> Proc:
        """The same process again (same port, so the same group member id), after it ended."""
        proc.stop()
        again = self._spawn(proc.name, *proc.args, env=proc.env, url=proc.url)
        for group in (self.processors, self.apis, self.jobs):
            if proc in group:
                group[group.index(proc)] = again
        if self.api is proc:
            self.api = again
        return again

    def start_processor(self) -> Proc:
        """`cqrs run command-processor` on a free port: an owner of a share of the partitions."""
        port = free_port()
        proc = self._spawn(
            f"processor-{len(self.processors)}",
            "run",
            "command-processor",
            "--port",
            str(port),
            url=f"http://127.0.0.1:{port}",
        )
        self.processors.append(proc)
        return proc

    async def start_api(self, env: dict[str, str] | None = None, wait_ready: bool = True) -> Proc:
        """`cqrs serve api` on a free port (by default it owns a share of the partitions);
        the first one started is `api` / `api_url`."""
        port = free_port()
        name = "api" if not self.apis else f"api-{len(self.apis)}"
        url = f"http://127.0.0.1:{port}"
        proc = self._spawn(name, "serve", "api", "--port", str(port), env=env, url=url)
        self.apis.append(proc)
        if self.api is None:
            self.api, self.api_url = proc, url
        await wait_until_up(proc, "/ready" if wait_ready else "/health")
        return proc

    async def wait_until_commands_flow(self, client: httpx.AsyncClient) -> None:
        """Send a probe command until the processor answers it (partitions assigned)."""
        key = f"probe-{uuid.uuid4()}"
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            r = await client.post(
                "/api/v1/incidents", json={"title": "probe"}, headers={"Idempotency-Key": key}
            )
            if r.status_code == 201:
                return
            assert r.status_code == 503, r.text
        logs = "\n".join(p.log.read_text()[-3000:] for p in [*self.apis, *self.processors])
        raise AssertionError(f"commands do not flow; logs:\n{logs}")

    async def start_serving(self) -> None:
        """The API, owning every partition, answering commands (the layout of `make up`)."""
        await self.start_api()
        async with api_client(base_url=self.api_url, timeout=30) as client:
            await self.wait_until_commands_flow(client)

    def start_projector(self, name: str, env: dict[str, str] | None = None) -> Proc:
        """`cqrs run projector NAME`: one projection in a process of its own."""
        proc = self._spawn(f"projector-{name}", "run", "projector", name, env=env)
        self.projectors.append(proc)
        self.projections.add(name)
        return proc

    def start_projectors(self, *names: str, env: dict[str, str] | None = None) -> Proc:
        """`cqrs run projectors NAME...`: the projections in one process, as `make up` runs them."""
        proc = self._spawn(f"projectors-{len(self.projectors)}", "run", "projectors", *names, env=env)
        self.projectors.append(proc)
        self.projections.update(names)
        return proc

    def start_job(self, name: str, env: dict[str, str] | None = None) -> Proc:
        """`cqrs run job NAME`: one stream-processing job in a process of its own."""
        proc = self._spawn(f"job-{name}-{len(self.jobs)}", "run", "job", name, env=env)
        self.jobs.append(proc)
        return proc

    async def wait_until_job_runs(self, proc: Proc, seconds: float = 120) -> None:
        """Until the job's worker has its partitions and its tables restored."""
        deadline = time.monotonic() + seconds
        while b"Worker ready" not in proc.output():
            assert proc.popen.poll() is None, proc.log.read_text()[-3000:]
            assert time.monotonic() < deadline, proc.log.read_text()[-3000:]
            await asyncio.sleep(0.2)

    async def wait_until_projected(self) -> None:
        """Probe commands until every projection started has applied them (Faust workers
        take a while to join their groups on a cold broker)."""
        running = self.projections
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
                while True:
                    r = await client.get(path, params={"consistent_with": token})
                    if r.status_code == 200:
                        break
                    assert r.status_code in (404, 504), r.text  # 404: its dataset row is not there yet
                    if time.monotonic() > deadline:
                        logs = "\n".join(p.log.read_text()[-3000:] for p in self.projectors)
                        raise AssertionError(f"projections do not catch up; logs:\n{logs}")

    def stop(self) -> None:
        for p in [*self.jobs, *self.processors, *self.projectors, *self.apis]:
            p.stop()

    @classmethod
    async def everything(cls, base: Settings, workdir: Path, **overrides: Any) -> WriteSide:
        """The API (owning the partitions) and every projection in one projectors process
        (the layout of `make up`), each projection having applied a probe command."""
        side = cls.create(base, workdir, **overrides)
        await side.start_serving()
        side.start_projectors(*PROJECTIONS)
        await side.wait_until_projected()
        return side


async def until(probe: Callable[[], Awaitable[T | None]], seconds: float = 60, what: str = "") -> T:
    """Poll `probe` until it gives something (not a sleep: the first answer ends it)."""
    deadline = time.monotonic() + seconds
    while True:
        got = await probe()
        if got:
            return got
        assert time.monotonic() < deadline, f"not within {seconds}s: {what}"
        await asyncio.sleep(0.2)


def covers(token: str, position: str) -> bool:
    """Whether `token` is at or past every offset `position` names."""
    mine = PositionToken.decode(token).offsets
    return all(
        mine.get(topic, {}).get(p, 0) >= o
        for topic, ps in PositionToken.decode(position).offsets.items()
        for p, o in ps.items()
    )


async def wait_until_up(proc: Proc, path: str = "/health", seconds: float = 60) -> None:
    """Until the process answers 200 on `path`."""
    async with api_client(base_url=proc.url) as client:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and proc.popen.poll() is None:
            try:
                if (await client.get(path)).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.1)
    raise AssertionError(f"{proc.name} did not come up; log:\n{proc.log.read_text()[-3000:]}")


async def read_records(
    settings: Settings, topics: list[str], isolation_level: str = "read_committed"
) -> list[ConsumerRecord[bytes, bytes]]:
    """Every record of `topics` (those that exist), from the beginning to the end as it
    is now, partition by partition in offset order."""
    consumer = kafka.consumer(settings, isolation_level=isolation_level)
    await consumer.start()
    out: list[ConsumerRecord[bytes, bytes]] = []
    try:
        existing = await consumer.topics()
        tps = [TopicPartition(t, p) for t in topics if t in existing for p in range(settings.partitions)]
        if not tps:
            return out
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        pending = {tp for tp in tps if ends[tp] > 0}
        while pending:
            for records in (await consumer.getmany(*pending, timeout_ms=1000)).values():
                out += records
            pending = {tp for tp in pending if await consumer.position(tp) < ends[tp]}
    finally:
        await consumer.stop()
    return out


async def read_events(settings: Settings, contexts: list[str]) -> list[dict[str, Any]]:
    """Every committed event of the contexts' topics, decoded, with its headers."""
    topics = Topics(settings.topic_prefix)
    codec = AvroCodec.from_directory()
    events: list[dict[str, Any]] = []
    for r in await read_records(settings, [topics.events(c) for c in contexts]):
        type_name, payload = codec.decode(r.value)
        events.append(
            {
                "type": type_name,
                "payload": payload,
                "headers": {k: v.decode() for k, v in r.headers},
                "meta": EventMetadata.from_headers(r.headers),
                "partition": r.partition,
                "offset": r.offset,
            }
        )
    return events
