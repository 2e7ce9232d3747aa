"""Rebuild a projection from offset 0 into its next version, then swap it in.

1. The next version is registered as `building`; its table (or index) is created
   beside the live one, which readers keep using.
2. Replays (`streams.replay`, `rebuild_lanes` processes, each on a share of the
   partitions) load the new version from offset 0 by the bulk path (`COPY`, `_bulk`)
   until it is close to the head; then a Faust worker of the new version (its own
   consumer group, at the offsets the replays committed) follows the live events.
   Progress (offsets done / total, rate, ETA) is reported on every tick and stored with
   the version, so any API instance can show it.
3. Once the new version is at most `rebuild_swap_max_behind` events behind the head and
   has applied at least what the live version has on every partition, it is swapped
   in: readers see the old version until that transaction, the new one after, never a
   step back.
4. The worker is handed over: once a supervised worker (`cqrs run projector NAME`)
   of the new version reports alive, the rebuild's own worker stops.

A failure marks the version `failed` and drops nothing the live version needs. An
interrupted rebuild (Ctrl-C, a kill, a stopped API) leaves its version `building`; the
next rebuild of the projection resumes it from its own positions.
"""

from __future__ import annotations

import asyncio
import logging
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import asyncpg

from projections import versions
from projections.db import create_pool
from projections.lag import LagProbe, version_lag
from projections.migrations import migrate
from projections.projection import Projection
from shared_kernel.settings import Settings
from shared_kernel.topics import Topics
from streams.supervisor import start_replay, start_worker, stop_worker

log = logging.getLogger(__name__)

TICK_S = 1.0


def log_path(settings: Settings, name: str, version: int) -> Path:
    """Where the replays and the worker of a rebuild write their logs."""
    return Path(tempfile.gettempdir()) / f"cqrs-rebuild-{settings.topic_prefix}-{name}-v{version}.log"


@dataclass
class Progress:
    projection: str
    version: int
    phase: str  # loading (bulk replay), replaying (Faust worker), swapping, handing over, done
    done: int
    total: int
    behind: int
    rate: float  # offsets/s over the last tick
    eta_s: float | None
    elapsed_s: float


Report = Callable[[Progress], Awaitable[None] | None]


class Rebuild:
    def __init__(self, settings: Settings, projection: Projection, report: Report | None = None) -> None:
        self.settings = settings
        self.projection = projection
        self.report = report
        self.topics = [Topics(settings.topic_prefix).events(c) for c in projection.contexts]
        self.pool: asyncpg.Pool
        self.new: Projection

    async def prepare(self, wait: bool = False) -> int:
        """Register the version to build (the next one, or a building one whose builder
        is gone: it resumes from its own positions) and create its storage. With `wait`,
        a builder that just went quiet (killed a moment ago) is waited out, not refused."""
        await migrate(self.settings)
        self.pool = await create_pool(self.settings, "rebuild", min_size=1, max_size=2)
        deadline = time.monotonic() + versions.STALE_BUILD_S + 2
        try:
            while True:
                try:
                    self.new = await versions.begin(self.pool, self.settings, self.projection)
                    break
                except versions.BuildRunning as running:
                    if not wait or time.monotonic() > deadline:
                        raise  # its builder is alive: it keeps reporting progress
                    log.info(
                        "another builder was active a moment ago; waiting", extra={"wait_s": running.wait_s}
                    )
                    await asyncio.sleep(max(running.wait_s, 0.2))
        except BaseException:
            await self.pool.close()
            raise
        return self.new.version

    async def run(self, swap: bool = True) -> Progress:
        """Build the version; swap it in unless `swap` is false. Returns the last progress.
        Interrupted (Ctrl-C, a cancelled task, a kill), the version stays `building` and
        the next rebuild resumes it; a failure marks it `failed`."""
        if not hasattr(self, "new"):
            await self.prepare(wait=True)
        pool, new = self.pool, self.new
        probe = LagProbe(self.settings)
        try:
            return await self._build(pool, probe, new, swap)
        except Exception as exc:
            await versions.fail(pool, new.name, new.version, repr(exc)[:1000])
            log.error("rebuild failed", extra={"projection": new.name, "version": new.version}, exc_info=True)
            raise
        finally:
            await probe.stop()
            await pool.close()

    async def _build(self, pool: asyncpg.Pool, probe: LagProbe, new: Projection, swap: bool) -> Progress:
        name, version = new.name, new.version
        started = time.monotonic()
        total = sum(end for end in (await probe.ends(self.topics)).values())
        log_to = log_path(self.settings, name, version)
        lanes = self.settings.rebuild_lanes
        replays = [await start_replay(name, version, lane, lanes, log_to) for lane in range(lanes)]
        worker: asyncio.subprocess.Process | None = None
        log.info(
            "rebuild started",
            extra={
                "projection": name,
                "version": version,
                "total": total,
                "lanes": lanes,
                "log": str(log_to),
            },
        )
        last_done, last_t = 0, started
        try:
            while True:
                if replays:
                    failed = [p.returncode for p in replays if p.returncode not in (None, 0)]
                    if failed:
                        raise RuntimeError(
                            f"a replay of the rebuild exited with code {failed[0]}; see {log_to}"
                        )
                    if all(p.returncode == 0 for p in replays):
                        # close to the head: the Faust worker takes over from the group's offsets
                        replays = []
                        worker = await start_worker(name, version, log_to)
                elif worker is not None and worker.returncode is not None:
                    raise RuntimeError(
                        f"the rebuild's worker exited with code {worker.returncode}; see {log_to}"
                    )
                behind, done = await version_lag(pool, probe, name, version, self.topics)
                now = time.monotonic()
                rate = (done - last_done) / max(now - last_t, 1e-6)
                last_done, last_t = done, now
                total = max(total, done + behind)
                progress = Progress(
                    name,
                    version,
                    "loading" if replays else "replaying",
                    done,
                    total,
                    behind,
                    rate,
                    behind / rate if rate > 0 else None,
                    now - started,
                )
                await versions.progress(pool, name, version, total, done, rate, progress.phase)
                await self._tell(progress)
                if (
                    worker is not None
                    and behind <= self.settings.rebuild_swap_max_behind
                    and await self._worker_running(pool, name, version)
                ):
                    if not swap:
                        break
                    progress.phase = "swapping"
                    await self._tell(progress)
                    try:
                        retired = await versions.swap(
                            pool, self.settings, self.projection, version, caught_up=True
                        )
                        break
                    except versions.NotCaughtUp as exc:
                        log.info("not swapped yet", extra={"projection": name, "why": str(exc)})
                await asyncio.sleep(TICK_S)
            if not swap:
                progress.phase = "done"
                await self._tell(progress)
                return progress
            log.info("rebuild swapped in", extra={"projection": name, "live": version, "retired": retired})
            assert worker is not None
            progress.phase = "handing over"
            await self._tell(progress)
            await self._hand_over(pool, name, version, worker.pid)
            progress.phase = "done"
            progress.elapsed_s = time.monotonic() - started
            await self._tell(progress)
            return progress
        finally:
            for proc in [*replays, *([worker] if worker else [])]:
                await stop_worker(proc)

    async def _worker_running(self, pool: asyncpg.Pool, name: str, version: int) -> bool:
        return bool(await versions.workers(pool, name, version))

    async def _hand_over(self, pool: asyncpg.Pool, name: str, version: int, own_pid: int) -> None:
        deadline = time.monotonic() + self.settings.rebuild_handover_s
        while time.monotonic() < deadline:
            others = [w for w in await versions.workers(pool, name, version) if not w.endswith(f":{own_pid}")]
            if others:
                log.info("rebuild handed over", extra={"projection": name, "version": version, "to": others})
                return
            await asyncio.sleep(TICK_S)
        log.warning(
            "no projector worker took the new version over; it follows new events again once "
            f"`cqrs run projectors` (or `cqrs run projector {name}`) runs",
            extra={"projection": name, "version": version},
        )

    async def _tell(self, progress: Progress) -> None:
        if self.report is not None:
            result = self.report(progress)
            if result is not None:
                await result
