"""`python -m bench [SCENARIO...]`: run the benchmarks (all by default)."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable, Coroutine
from typing import Any

import uvloop

from bench import (
    s0_calibration,
    s1_commands,
    s2_projections,
    s3_search,
    s4_queries,
    s5_subscriptions,
    s6_rebuild,
    s7_footprint,
    s8_cdc,
    s9_webhooks,
    s10_jobs,
    s11_telemetry,
)
from shared_kernel.settings import Settings

SCENARIOS: dict[str, Callable[[Settings], Coroutine[Any, Any, dict[str, Any]]]] = {
    "S0": s0_calibration.run,
    "S1": s1_commands.run,
    "S2": s2_projections.run,
    "S3": s3_search.run,
    "S4": s4_queries.run,
    "S5": s5_subscriptions.run,
    "S6": s6_rebuild.run,
    "S7": s7_footprint.run,
    "S8": s8_cdc.run,
    "S9": s9_webhooks.run,
    "S10": s10_jobs.run,
    "S11": s11_telemetry.run,
}


def main(argv: list[str]) -> int:
    chosen = [a.upper() for a in argv] or list(SCENARIOS)
    unknown = [c for c in chosen if c not in SCENARIOS]
    if unknown:
        print(f"unknown scenario(s) {unknown}; known: {list(SCENARIOS)}", file=sys.stderr)
        return 2
    settings = Settings()
    for scenario in chosen:
        # the same event loop as the services (uvicorn and the processor run on uvloop),
        # so the raw-client limits measured here are not handicapped
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(SCENARIOS[scenario](settings))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
