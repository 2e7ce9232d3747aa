"""S7, footprint: what the product costs at rest and under a steady load, beside the
broker, PostgreSQL, OpenSearch and Redis of the same stack (the "idle/footprint"
figures; S0 stays the raw clients' calibration and runs no product code).

Each **layout** is the real application processes under a topic prefix of their own:
the command processor, the API and the projectors,

- **grouped**, as `make up` runs them (`infra/apps.toml`: the projectors' entries, each a
  `cqrs run projectors ...` process that runs several projections);
- **one per projection**, the scale-out layout (`cqrs run projector NAME` for each): the
  reference the memory goal is measured against, in the same run.

For each layout, once every projection has applied a probe command and
`BENCH_S7_SETTLE_S` (10 s) have passed:

- **at rest**: the CPU time of each application process and its children, and of the
  broker, PostgreSQL (every backend), OpenSearch and Redis, over `BENCH_S7_IDLE_S` (60 s),
  read from /proc, as % of one core; the resident memory of each process tree after it.
  Goals: application processes together at most 5 % of one core, the broker at most
  3 %; the grouped layout's memory at most half of the one-per-projection layout's.
- **steady load**: `BENCH_S7_RATE` (100) commands a second for `BENCH_S7_STEADY_S` (30 s),
  paced (open loop: each command has its start time; registrations of datasets and
  openings of incidents in turn, so every projection works), from 64 connections. The
  application CPU per command, and the broker's, PostgreSQL's and OpenSearch's.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import time
import tomllib
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

from bench.common import (
    WriteSide,
    api_client,
    cpu_seconds,
    drop_prefix,
    host_cpu,
    process_tree,
    service_pids,
    steal_pct,
)
from bench.results import show, summary_ms, write
from commands import CONTEXTS
from projections.db import schema_name
from projections.registry import PROJECTIONS
from shared_kernel.settings import Settings
from shared_kernel.topics import contract_topics, ensure_topics

IDLE_S = float(os.environ.get("BENCH_S7_IDLE_S", "60"))
SETTLE_S = float(os.environ.get("BENCH_S7_SETTLE_S", "10"))
STEADY_S = float(os.environ.get("BENCH_S7_STEADY_S", "30"))
RATE = float(os.environ.get("BENCH_S7_RATE", "100"))
CONNECTIONS = 64  # enough that the offered rate is not bounded by the latency
PARTITIONS = 6
GOAL_APPS_PCT = 5.0
GOAL_BROKER_PCT = 3.0
GOAL_MEMORY_RATIO = 0.5
REPO = Path(__file__).resolve().parent.parent
SERVICES = ("kafka", "postgres", "opensearch", "redis")


def grouped_projectors() -> list[list[str]]:
    """The projector commands of `infra/apps.toml` (what `make up` runs), without `cqrs`."""
    spec = tomllib.loads((REPO / "infra" / "apps.toml").read_text())
    return [
        [str(c) for c in entry["command"][1:]]
        for entry in spec.values()
        if entry["command"][1:3] in (["run", "projector"], ["run", "projectors"])
    ]


def rss_mb(pids: Sequence[int]) -> float:
    total_kb = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total_kb += int(line.split()[1])
        except OSError:
            continue
    return round(total_kb / 1024, 1)


class Meter:
    """CPU seconds of named process trees (re-read at each sample: children come and go)."""

    def __init__(self, roots: dict[str, int]) -> None:
        self.roots = roots

    def trees(self) -> dict[str, list[int]]:
        return {name: process_tree(pid) for name, pid in self.roots.items()}

    def cpu(self) -> dict[str, float]:
        return {name: cpu_seconds(tree) for name, tree in self.trees().items()}


async def _steady(api_url: str, rate: float, seconds: float) -> dict[str, Any]:
    """`rate` commands a second for `seconds`, each at its own start time."""
    total = int(rate * seconds)
    start = time.monotonic() + 0.5
    latencies: list[float] = []
    late: list[float] = []
    errors = 0
    slots = iter(range(total))

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal errors
        for i in slots:
            due = start + i / rate
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            else:
                late.append(-delay)
            t0 = time.monotonic()
            try:
                if i % 2:
                    r = await client.post("/api/v1/incidents", json={"title": f"Load {i}"})
                else:
                    r = await client.post("/api/v1/datasets", json={"name": f"Load {i}", "tags": ["s7"]})
            except httpx.TransportError:
                errors += 1
                continue
            latencies.append(time.monotonic() - t0)
            if r.status_code != 201:
                errors += 1

    limits = httpx.Limits(  # idle connections dropped before uvicorn's 5 s keep-alive ends them
        max_connections=CONNECTIONS, max_keepalive_connections=CONNECTIONS, keepalive_expiry=2.0
    )
    async with api_client(base_url=api_url, timeout=30, limits=limits) as client:
        await asyncio.gather(*(worker(client) for _ in range(CONNECTIONS)))
    elapsed = time.monotonic() - start
    return {
        "commands": total,
        "errors": errors,
        "achieved_per_s": round(total / elapsed, 1),
        "started_late": len([x for x in late if x > 0.05]),
        "latency": summary_ms(latencies),
    }


async def _layout(base: Settings, name: str, projectors: list[list[str]], workdir: Path) -> dict[str, Any]:
    side = WriteSide.create(base, workdir / name, "s7", PARTITIONS)
    (workdir / name).mkdir(parents=True, exist_ok=True)
    settings = side.settings
    groups = [f"{settings.topic_prefix}.projection.{p}.v1" for p in PROJECTIONS]
    try:
        await ensure_topics(settings, contract_topics(settings, [c.name for c in CONTEXTS]))
        await side.start_serving()
        for i, args in enumerate(projectors):
            side.projectors.append(side._spawn(f"projector-{i}", *args))
        await side.wait_until_projected(PROJECTIONS)
        await asyncio.sleep(SETTLE_S)
        apps = {
            "api": side.api.pid if side.api else 0,
            **{" ".join(args[1:]): p.pid for args, p in zip(projectors, side.projectors, strict=True)},
        }
        services = service_pids(*SERVICES)
        meter = Meter({**apps, **services})

        print(f"S7 {name}: at rest for {IDLE_S:.0f} s", flush=True)
        host0, before = host_cpu(), meter.cpu()
        await asyncio.sleep(IDLE_S)
        after, host1 = meter.cpu(), host_cpu()
        trees = meter.trees()
        idle = {
            n: {
                "cpu_pct_of_one_core": round(100 * (after[n] - before[n]) / IDLE_S, 2),
                "rss_mb": rss_mb(trees[n]),
                "processes": len(trees[n]),
            }
            for n in meter.roots
        }
        apps_pct = round(sum(idle[n]["cpu_pct_of_one_core"] for n in apps), 2)
        apps_mb = round(sum(idle[n]["rss_mb"] for n in apps), 1)

        print(f"S7 {name}: {RATE:.0f} commands/s for {STEADY_S:.0f} s", flush=True)
        before = meter.cpu()
        load = await _steady(side.api_url, RATE, STEADY_S)
        after = meter.cpu()
        spent = {n: after[n] - before[n] for n in meter.roots}
        per_command = {
            "applications_ms": round(1000 * sum(spent[n] for n in apps) / load["commands"], 3),
            **{f"{n}_ms": round(1000 * spent[n] / load["commands"], 3) for n in services},
            **{f"{n}_ms": round(1000 * spent[n] / load["commands"], 3) for n in apps},
        }
        return {
            "projector_processes": [" ".join(["cqrs", *a]) for a in projectors],
            "idle": {
                "seconds": IDLE_S,
                "applications_cpu_pct_of_one_core": apps_pct,
                "applications_rss_mb": apps_mb,
                "broker_cpu_pct_of_one_core": idle.get("kafka", {}).get("cpu_pct_of_one_core"),
                "host_steal_pct": steal_pct(host0, host1),
                "processes": idle,
            },
            "steady": {**load, "cpu_per_command": per_command},
        }
    finally:
        side.stop()
        await drop_prefix(settings, schema_name(settings), groups)


async def run(base: Settings) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="bench-s7-"))
    grouped = grouped_projectors()
    alone = [["run", "projector", p] for p in PROJECTIONS]
    try:
        print(f"S7: grouped projectors, as make up runs them: {grouped}", flush=True)
        ours = await _layout(base, "grouped", grouped, workdir)
        print("S7: one process per projection", flush=True)
        each = await _layout(base, "one-per-projection", alone, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    memory_ratio = round(ours["idle"]["applications_rss_mb"] / max(each["idle"]["applications_rss_mb"], 1), 3)
    goals = {
        "idle_applications_pct_max": GOAL_APPS_PCT,
        "idle_broker_pct_max": GOAL_BROKER_PCT,
        "memory_vs_one_per_projection_max": GOAL_MEMORY_RATIO,
    }
    met = {
        "idle_applications": ours["idle"]["applications_cpu_pct_of_one_core"] <= GOAL_APPS_PCT,
        "idle_broker": (ours["idle"]["broker_cpu_pct_of_one_core"] or 0) <= GOAL_BROKER_PCT,
        "memory": memory_ratio <= GOAL_MEMORY_RATIO,
    }
    result = {
        "what": "CPU and memory of the application processes at rest and at a steady command rate",
        "run": uuid.uuid4().hex[:8],
        "partitions": PARTITIONS,
        "rate_per_s": RATE,
        "grouped": ours,
        "one_per_projection": each,
        "memory_ratio_grouped_vs_one_per_projection": memory_ratio,
        "goals": goals,
        "met": met,
    }
    write("S7", result)
    rows = []
    for label, layout in (("grouped", ours), ("one per projection", each)):
        idle, steady = layout["idle"], layout["steady"]
        rows += [
            (
                f"{label}: applications at rest",
                f"{idle['applications_cpu_pct_of_one_core']} % of a core, {idle['applications_rss_mb']} MB",
                f"goal <= {GOAL_APPS_PCT} %",
            ),
            (
                f"{label}: broker at rest",
                f"{idle['broker_cpu_pct_of_one_core']} % of a core",
                f"goal <= {GOAL_BROKER_PCT} %",
            ),
            (
                f"{label}: CPU per command at {RATE:.0f}/s",
                f"{steady['cpu_per_command']['applications_ms']} ms apps, "
                f"{steady['cpu_per_command'].get('kafka_ms')} ms broker",
                f"p50 {steady['latency']['p50_ms']} ms p99 {steady['latency']['p99_ms']} ms",
            ),
        ]
    rows.append(("memory, grouped / one per projection", f"{memory_ratio}", f"goal <= {GOAL_MEMORY_RATIO}"))
    show("S7", "footprint", rows)
    return result
