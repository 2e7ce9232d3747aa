"""`cqrs run projectors [NAME...]`: several projections in one process.

Each projection keeps what makes it a projection of its own: its consumer group per
version, its positions, its rebuilds and swaps, its supervisor (`streams.supervisor.
supervise`, one task each here). What they share is the process: one Python, one
event loop, and each version's worker a Faust app started in that loop (`InProcessWorkers`)
instead of a child process. One process per projection (`cqrs run projector NAME`)
stays the way to spread projections over machines.

A worker's failure stays its own: a batch that fails after its retries stops that app
(no later event is applied before it, and its offsets are not committed) and its
supervisor starts it again with a growing pause, while the other projections go on.
Only bulk replays (a version far behind) still run as child processes, for as long as
they load.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence

from projections.migrations import migrate
from projections.registry import PROJECTIONS
from shared_kernel.settings import Settings
from streams.app import EXIT_UNACKED, ProjectionApp
from streams.supervisor import Worker, Workers, supervise

log = logging.getLogger(__name__)


class HostedApp:
    """A version's Faust app running in this process, seen as a `Worker`."""

    def __init__(self, settings: Settings, name: str, version: int) -> None:
        self.name, self.version = name, version
        self.app = ProjectionApp(
            settings,
            PROJECTIONS[name].at(version),
            on_failure=self._failed,
            on_retired=self._retired,
            in_group=True,
        )
        self._code: int | None = None
        self._stopping: asyncio.Task[None] | None = None

    @property
    def returncode(self) -> int | None:
        if self._code is None and self.app.app.crashed:
            self._code = 1
        return self._code

    async def start(self) -> None:
        await self.app.start()

    async def stop(self, code: int = 0) -> None:
        await asyncio.shield(self._stop_soon(code))

    def _stop_soon(self, code: int) -> asyncio.Task[None]:
        if self._stopping is None:
            self._stopping = asyncio.ensure_future(self._stop(code))
        return self._stopping

    async def _stop(self, code: int) -> None:
        try:
            await self.app.stop()
        except Exception:
            log.exception("stopping a projection's worker failed", extra={"projection": self.name})
        if self._code is None:
            self._code = code

    def _failed(self, why: str) -> None:
        log.error(
            f"{why}; stopping this projection's worker (offsets of the batch not committed)",
            extra={"projection": self.name, "version": self.version},
        )
        self._stop_soon(EXIT_UNACKED)

    def _retired(self) -> None:
        self._stop_soon(0)


class InProcessWorkers:
    """Each version's worker a Faust app in this process's event loop."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    async def start(self, name: str, version: int) -> Worker:
        """The app started, or stopped again and seen as exited when it failed to start
        (Kafka away, ...): its supervisor tries again after a pause."""
        hosted = HostedApp(self.settings, name, version)
        try:
            await hosted.start()
        except Exception:
            log.exception("a worker failed to start", extra={"projection": name, "version": version})
            await hosted.stop(1)
            return hosted
        log.info("worker started in this process", extra={"projection": name, "version": version})
        return hosted

    async def stop(self, worker: Worker) -> None:
        assert isinstance(worker, HostedApp)
        await worker.stop()


async def supervise_group(settings: Settings, names: Sequence[str], stop: asyncio.Event) -> None:
    """Supervise each of `names` in this process until `stop` is set."""
    await migrate(settings)
    workers = InProcessWorkers(settings)
    log.info("projections in this process", extra={"projections": list(names)})
    await asyncio.gather(*(_keep_supervising(settings, n, stop, workers) for n in names))


async def _keep_supervising(settings: Settings, name: str, stop: asyncio.Event, workers: Workers) -> None:
    """One projection's supervisor; a fault of it (its database away at a bad moment)
    restarts it after a growing pause, and never ends the other projections'."""
    pause = 1.0
    while not stop.is_set():
        try:
            await supervise(settings, name, stop, workers, migrated=True)
        except Exception:
            log.exception("a projection's supervisor failed; starting it again", extra={"projection": name})
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), pause)
            pause = min(pause * 2, 30)
