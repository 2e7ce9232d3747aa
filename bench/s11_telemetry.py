"""S11, what observability costs: S1's commands and S4's cached reads at 16 clients with
telemetry off (`OTEL_SDK_DISABLED=true`), with traces sampled at the stack's default
ratio (parent-based, 10 %), and with every trace sampled, all exported by OTLP to the
stack's Jaeger, and at the default ratio with the spans sent nowhere (the process's own
cost); metrics are on in all (they cannot be turned off). One run, the variants one after
the other, each with its own API process. Beside the API's CPU per 1k requests, the CPU
the trace backend (Jaeger, Zipkin) and the broker spent meanwhile: they share the cores.

`BENCH_S11_SECONDS` per variant and scenario (default 8); `BENCH_S11_CLIENTS` (16).
`BENCH_PROFILE=1` adds one py-spy profiled level of cached reads per variant
(`bench/results/s11-api-<variant>.speedscope.json`), its breakdown in the result.
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench import s1_commands, s4_queries
from bench.common import (
    WriteSide,
    cpu_seconds,
    drop_prefix,
    isolated,
    process_tree,
    profile_summary,
    service_pids,
    start_profiler,
    stop_profiler,
)
from bench.results import RESULTS, show, write
from commands import CONTEXTS
from projections.db import schema_name
from shared_kernel.settings import Settings
from shared_kernel.topics import contract_topics, ensure_topics

SECONDS = float(os.environ.get("BENCH_S11_SECONDS", "8"))
CLIENTS = int(os.environ.get("BENCH_S11_CLIENTS", "16"))
OTLP = os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318")
VARIANTS: dict[str, dict[str, str]] = {
    "off": {"OTEL_SDK_DISABLED": "true"},
    "default_ratio": {
        "OTEL_EXPORTER_OTLP_ENDPOINT": OTLP,
        "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
        "OTEL_TRACES_SAMPLER_ARG": "0.1",
    },
    "all_sampled": {"OTEL_EXPORTER_OTLP_ENDPOINT": OTLP, "OTEL_TRACES_SAMPLER": "parentbased_always_on"},
    # the default ratio's spans recorded but sent nowhere: the API's own cost, apart from
    # the trace backend's, which runs on the same two cores here
    "default_ratio_unexported": {
        "OTEL_TRACES_EXPORTER": "none",
        "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
        "OTEL_TRACES_SAMPLER_ARG": "0.1",
    },
}
# The processes that take the exported spans (and the broker, which carries them on to
# Zipkin): their CPU per 1k requests is reported beside the API's.
BACKEND = ("jaeger", "zipkin", "kafka")


class BackendCpu:
    """CPU seconds the trace backend and the broker spent while a load ran."""

    def __init__(self) -> None:
        self.pids = [p for pid in service_pids(*BACKEND).values() for p in process_tree(pid)]
        self.start = cpu_seconds(self.pids)

    def per_1k(self, requests: float) -> float:
        return round(1000 * (cpu_seconds(self.pids) - self.start) / requests, 3) if requests else 0.0


PROFILE = os.environ.get("BENCH_PROFILE") == "1"
# Where a cached read's time goes, telemetry's own packages apart.
OWNERS = [("opentelemetry (API, SDK, instrumentations)", "/opentelemetry/", ""), *s4_queries.API_OWNERS]
SPANS = [
    ("tracing.server_span (all of it)", "/shared_kernel/tracing.py", "server_span"),
    ("span start (Tracer.start_span)", "/opentelemetry/sdk/trace/", "Tracer.start_span"),
    ("span end (Span.end, the span processors)", "/opentelemetry/sdk/trace/", "Span.end"),
    ("context attach and detach", "/opentelemetry/context/", ""),
    ("W3C traceparent extract", "/opentelemetry/trace/propagation/", ""),
    ("BatchSpanProcessor (export thread included)", "/opentelemetry/sdk/trace/export/", ""),
    *s4_queries.API_SPANS,
]


async def _profile(server: Any, ids: list[str], settings: Settings, variant: str) -> dict[str, Any]:
    target = RESULTS.parent / f"s11-api-{variant}.speedscope.json"
    spy = start_profiler(server.pid, target)
    try:
        level = await s4_queries.load(server, ids, CLIENTS, SECONDS, settings)
    finally:
        await asyncio.to_thread(stop_profiler, spy)
    return {"rps_while_profiled": round(level.rps, 1), **profile_summary(target, OWNERS, SPANS)}


def _clean(env: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if not k.startswith("OTEL_")}


async def _commands(base: Settings, workdir: Path) -> dict[str, Any]:
    s1_commands.SECONDS = SECONDS
    out: dict[str, Any] = {}
    for name, extra in VARIANTS.items():
        side = WriteSide.create(base, workdir / f"s1-{name}", "s11", base.partitions)
        (workdir / f"s1-{name}").mkdir(parents=True, exist_ok=True)
        side.env = {**_clean(side.env), **extra}
        try:
            await side.start_serving()
            print(f"S11: commands, telemetry {name}, {CLIENTS} clients, {SECONDS:g} s", flush=True)
            backend = BackendCpu()
            out[name] = (await s1_commands.run_ours(side.api_url, CLIENTS)).figures()
            done = out[name]["commands_per_s"] * SECONDS
            out[name]["backend_cpu_s_per_1k"] = backend.per_1k(done)
        finally:
            side.stop()
            await drop_prefix(side.settings, schema_name(side.settings))
    return out


async def _reads(base: Settings, workdir: Path) -> dict[str, Any]:
    settings, env = isolated(base, "S11", base.partitions)
    env = _clean(env)
    out: dict[str, Any] = {}
    try:
        ids = await s4_queries.seed(settings, 500)
        await ensure_topics(settings, contract_topics(settings, [c.name for c in CONTEXTS]))
        cqrs = str(Path(sys.executable).parent / "cqrs")
        for name, extra in VARIANTS.items():
            server = s4_queries._spawn(
                f"api-{name}",
                [cqrs, "serve", "api"],
                {**env, **extra, "APP_SERVICE_NAME": f"bench-s11-{name}"},
                workdir,
            )
            try:
                await server.wait_until("/ready")
                await s4_queries.median_body(server.url, ids)  # warm: every read kept
                print(f"S11: cached reads, telemetry {name}, {CLIENTS} clients, {SECONDS:g} s", flush=True)
                backend = BackendCpu()
                level = await s4_queries.load(server, ids, CLIENTS, SECONDS, settings)
                figures = level.figures()
                out[name] = {
                    k: figures[k] for k in ("rps", "p50_ms", "p99_ms", "failures", "server_cpu_s_per_1k")
                }
                out[name]["backend_cpu_s_per_1k"] = backend.per_1k(level.rps * SECONDS)
                if PROFILE:
                    out[name]["profile"] = await _profile(server, ids, settings, name)
            finally:
                server.stop()
    finally:
        await s4_queries._cleanup(settings)
    return out


async def run(base: Settings) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="bench-s11-"))
    commands = await _commands(base, workdir)
    reads = await _reads(base, workdir)

    def ratio(part: dict[str, Any], key: str, variant: str) -> float:
        return round(part[variant][key] / part["off"][key], 2) if part["off"][key] else 0.0

    commands_vs_off = {v: ratio(commands, "commands_per_s", v) for v in VARIANTS}
    reads_vs_off = {v: ratio(reads, "rps", v) for v in VARIANTS}
    result: dict[str, Any] = {
        "clients": CLIENTS,
        "seconds": SECONDS,
        "commands": commands,
        "reads": reads,
        "commands_vs_off": commands_vs_off,
        "reads_vs_off": reads_vs_off,
    }
    write("S11", result)
    rows = []
    for v in VARIANTS:
        rows.append(
            (
                f"commands, telemetry {v}",
                f"{commands[v]['commands_per_s']:,.0f}/s, p99 {commands[v]['p99_ms']:.0f} ms; trace backend"
                f" + broker CPU s per 1k {commands[v]['backend_cpu_s_per_1k']:.3f}",
                f"{commands_vs_off[v]:.2f} of off",
            )
        )
    for v in VARIANTS:
        rows.append(
            (
                f"cached reads, telemetry {v}",
                f"{reads[v]['rps']:,.0f}/s, p99 {reads[v]['p99_ms']:.1f} ms; CPU s per 1k: API"
                f" {reads[v]['server_cpu_s_per_1k']:.3f}, trace backend + broker"
                f" {reads[v]['backend_cpu_s_per_1k']:.3f}",
                f"{reads_vs_off[v]:.2f} of off",
            )
        )
    show("S11", "what telemetry costs (16 clients)", rows)
    return result
