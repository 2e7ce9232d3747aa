"""A projection's supervisor: keeps a Faust worker running for the live version of NAME.

Before it starts a worker, a version far behind the head is first caught up by bulk
replays (see `catch_up`). A running worker that falls that far behind (a burst of
events beyond what the Faust path applies, a stalled worker, a slow database) is
stopped, the version caught up the same way, and a worker started again: the way a
catch-up subscription drops from live to catching up and back.

The worker of one version is a child process (`cqrs run projector NAME --version N`,
`ChildWorkers`), or a Faust app in the supervisor's own process when several
projections share one (`cqrs run projectors`, `streams.group`). When a rebuild swaps
another version in, the supervisor starts that version's worker first, then stops the
retired one, so the live version never lacks a worker for long. A worker that dies is
started again, with a growing pause.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import logging
import signal
import sys
import time
from pathlib import Path
from typing import Any, Protocol

import asyncpg

from projections import versions
from projections.db import create_pool
from projections.lag import LagProbe, version_lag
from projections.migrations import migrate
from projections.registry import PROJECTIONS
from shared_kernel.settings import Settings
from shared_kernel.topics import Topics

log = logging.getLogger(__name__)

POLL_S = 1.0
PR_SET_PDEATHSIG = 1
STOP_GRACE_S = 30


def worker_command(name: str, version: int) -> list[str]:
    return [sys.executable, "-m", "cli", "run", "projector", name, "--version", str(version)]


def _die_with_parent() -> None:
    """In the child: receive SIGTERM when the supervisor dies, even by SIGKILL (Linux)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass  # not Linux: a worker outlives a killed supervisor until it is stopped


def replay_command(name: str, version: int, lane: int, lanes: int) -> list[str]:
    return [
        sys.executable,
        *("-m", "cli", "run", "replay", name),
        *("--version", str(version), "--lane", str(lane), "--lanes", str(lanes)),
    ]


async def _spawn(command: list[str], log_to: Path | None) -> asyncio.subprocess.Process:
    """A child that dies with us; its output goes to ours, or appended to `log_to`."""
    out = log_to.open("ab") if log_to else None
    try:
        return await asyncio.create_subprocess_exec(
            *command, preexec_fn=_die_with_parent, stdout=out, stderr=out
        )
    finally:
        if out is not None:
            out.close()


async def start_worker(name: str, version: int, log_to: Path | None = None) -> asyncio.subprocess.Process:
    """Start the Faust worker of one version."""
    proc = await _spawn(worker_command(name, version), log_to)
    log.info("worker started", extra={"projection": name, "version": version, "pid": proc.pid})
    return proc


async def start_replay(
    name: str, version: int, lane: int, lanes: int, log_to: Path | None = None
) -> asyncio.subprocess.Process:
    """Start a bulk replay of one lane of a version being built (see streams.replay)."""
    proc = await _spawn(replay_command(name, version, lane, lanes), log_to)
    log.info("replay started", extra={"projection": name, "version": version, "lane": lane, "pid": proc.pid})
    return proc


async def stop_worker(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), STOP_GRACE_S)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()


class Worker(Protocol):
    """The worker of one version: a child process, or a Faust app in this process."""

    @property
    def returncode(self) -> int | None:
        """None while it runs; its exit status once it stopped."""


class Workers(Protocol):
    async def start(self, name: str, version: int) -> Worker: ...

    async def stop(self, worker: Worker) -> None: ...


class ChildWorkers:
    """Each version's worker in a child process of its own (`cqrs run projector NAME`)."""

    async def start(self, name: str, version: int) -> Worker:
        return await start_worker(name, version)

    async def stop(self, worker: Worker) -> None:
        assert isinstance(worker, asyncio.subprocess.Process)
        await stop_worker(worker)


async def supervise(
    settings: Settings, name: str, stop: asyncio.Event, workers: Workers | None = None, migrated: bool = False
) -> None:
    workers = workers or ChildWorkers()
    if not migrated:
        await migrate(settings)
    pool = await create_pool(settings, min_size=1, max_size=1)
    probe = LagProbe(settings)
    worker: Worker | None = None
    running = 0
    pause = 0.5
    next_check = time.monotonic() + settings.projection_lag_check_s
    try:
        await versions.register(pool, name)
        while not stop.is_set():
            try:
                live = await versions.live_version(pool, name)
            except (OSError, asyncpg.PostgresError) as exc:
                log.warning("PostgreSQL unreachable; keeping the worker", extra={"error": repr(exc)})
                live = running
            if worker is not None and worker.returncode is not None and running == live:
                log.warning(
                    "worker exited; starting it again",
                    extra={"projection": name, "version": running, "code": worker.returncode, "in_s": pause},
                )
                await workers.stop(worker)  # a crashed app in this process is stopped, not dropped
                await _sleep(stop, pause)
                pause = min(pause * 2, 30)
                worker = None
            if stop.is_set():
                break
            if worker is None or worker.returncode is not None or running != live:
                previous = worker
                if previous is None or previous.returncode is not None:
                    await catch_up(settings, pool, name, live, stop)  # no worker of ours follows it now
                if stop.is_set():
                    break
                worker, running = await workers.start(name, live), live
                if previous is not None:
                    await workers.stop(previous)  # the retired version's worker
            elif pause > 0.5:
                pause = 0.5
            if time.monotonic() >= next_check:
                next_check = time.monotonic() + settings.projection_lag_check_s
                if worker is not None and await _fell_behind(settings, pool, probe, name, running):
                    await workers.stop(worker)  # it commits what it applied: replays go on from there
                    worker = None  # caught up, then started again, on the next turn
                    continue
            await _sleep(stop, POLL_S)
    finally:
        if worker is not None:
            await workers.stop(worker)
        await probe.stop()
        await pool.close()


async def _behind(
    settings: Settings, pool: asyncpg.Pool, probe: LagProbe, name: str, version: int
) -> int | None:
    """Events the version has still to apply, or None when Kafka or PostgreSQL cannot say."""
    topics = [Topics(settings.topic_prefix).events(c) for c in PROJECTIONS[name].contexts]
    try:
        behind, _ = await version_lag(pool, probe, name, version, topics)
    except Exception as exc:  # Kafka away: the worker waits for it anyway
        log.warning("lag unknown", extra={"projection": name, "error": repr(exc)})
        return None
    return behind


async def _fell_behind(
    settings: Settings, pool: asyncpg.Pool, probe: LagProbe, name: str, version: int
) -> bool:
    if not settings.projection_catch_up_behind:
        return False
    behind = await _behind(settings, pool, probe, name, version)
    if behind is None or behind < settings.projection_catch_up_behind:
        return False
    log.warning(
        "worker fell far behind; handing over to the bulk path",
        extra={"projection": name, "version": version, "behind": behind},
    )
    return True


async def catch_up(
    settings: Settings, pool: asyncpg.Pool, name: str, version: int, stop: asyncio.Event
) -> None:
    """A version far behind (`projection_catch_up_behind` events: a new deployment on a
    long log, a long outage) is first brought close to the head by bulk replays, the
    way a rebuild loads, since a Faust worker applies history at a fraction of that
    speed. A failed catch-up is no failure: the Faust worker goes
    on from the group's offsets. Another supervisor catching up the same version (an
    advisory lock), or none configured, means nothing to do here."""
    if not settings.projection_catch_up_behind:
        return
    probe = LagProbe(settings)
    try:
        behind = await _behind(settings, pool, probe, name, version)
    finally:
        await probe.stop()
    if behind is None or behind < settings.projection_catch_up_behind:
        return
    async with pool.acquire() as conn:
        key = versions.lock_key(f"catch-up:{name}:{version}")
        if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", key):
            return
        try:
            lanes = settings.rebuild_lanes
            log.info(
                "far behind; catching up by the bulk path",
                extra={"projection": name, "version": version, "behind": behind, "lanes": lanes},
            )
            started = time.monotonic()
            replays = [await start_replay(name, version, lane, lanes) for lane in range(lanes)]
            waiting: asyncio.Future[Any] = asyncio.gather(*(p.wait() for p in replays))
            stopping: asyncio.Future[Any] = asyncio.ensure_future(stop.wait())
            try:
                await asyncio.wait([waiting, stopping], return_when=asyncio.FIRST_COMPLETED)
            finally:
                stopping.cancel()
                for proc in replays:
                    await stop_worker(proc)
            codes = [p.returncode for p in replays]
            if stop.is_set():
                return  # stopped midway: the next start resumes from the positions
            if any(codes):
                log.warning(
                    "catch-up failed; the Faust worker goes on from the group's offsets",
                    extra={"projection": name, "version": version, "codes": codes},
                )
                return
            log.info(
                "caught up by the bulk path",
                extra={
                    "projection": name,
                    "version": version,
                    "seconds": round(time.monotonic() - started, 2),
                },
            )
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", key)


async def _sleep(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)
