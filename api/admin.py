"""Admin routes: the state of every projection (versions, lag, dead letters), rebuilds
and rollbacks; the change data capture's state.

A rebuild started here runs in this API process (it starts the new version's worker
as a child process) and is visible from any API instance: its progress is stored with
the version. Readers keep the live version until the swap.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiokafka.errors import KafkaError
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from api.auth import permissions as p
from api.auth.access import requires
from api.errors import ReadModelsUnavailable, RequestProblem
from api.readmodels import PoolDep
from api.reads import READ_RESPONSES
from projections import versions
from projections.registry import PROJECTIONS
from projections.status import describe, overview
from streams import cdc
from streams.rebuild import Rebuild

router = APIRouter(prefix="/api/v1/admin", tags=["admin"])
log = logging.getLogger(__name__)

LAG_TIMEOUT_S = 5
CDC_TIMEOUT_S = 10


def _known(name: str) -> None:
    if name not in PROJECTIONS:
        raise RequestProblem(404, "not_found", f"no projection {name!r}; known: {', '.join(PROJECTIONS)}")


@router.get(
    "/projections",
    operation_id="listProjections",
    dependencies=[requires(p.ADMIN_PROJECTIONS)],
    responses=READ_RESPONSES,
)
async def list_projections(request: Request, pool: PoolDep) -> dict[str, Any]:
    """Every projection: its live version, how far it is behind (events and seconds,
    per partition too), events applied and dead-lettered, the last error, a rebuild."""
    try:
        found = await asyncio.wait_for(
            overview(request.app.state.settings, pool, request.app.state.lag), LAG_TIMEOUT_S
        )
    except (KafkaError, TimeoutError) as exc:
        raise ReadModelsUnavailable(f"Kafka does not answer, so lag is unknown: {exc!r}") from exc
    return {"projections": found}


@router.get(
    "/cdc",
    operation_id="getCdc",
    dependencies=[requires(p.ADMIN_CDC)],
    responses={503: {"description": "The status could not be read in time."}},
)
async def get_cdc(request: Request) -> dict[str, Any]:
    """The change data capture: the Debezium connector's and its task's state (with a failed
    task's error), its lag behind the source (the source's LSN, the one the replication slot
    confirmed, the offset Connect committed), the CDC job's lag and whether it halted, and
    every error found. A part that cannot be read says why in `errors`."""
    try:
        return await asyncio.wait_for(
            cdc.status(request.app.state.settings, request.app.state.bus.redis), CDC_TIMEOUT_S
        )
    except TimeoutError as exc:
        raise ReadModelsUnavailable(f"the capture's state was not read in {CDC_TIMEOUT_S} s") from exc


@router.get("/read-cache", operation_id="getReadCache", dependencies=[requires(p.ADMIN_PROJECTIONS)])
async def read_cache(request: Request) -> dict[str, Any]:
    """The single reads this API process keeps in memory (`api.readcache`): whether it
    follows the projectors' change notifications (else every read goes to PostgreSQL),
    its size and its hits, misses and answers kept since the process started."""
    reads, follower = request.app.state.reads, request.app.state.changes
    return {
        "enabled": reads is not None,
        "following_changes": follower.connected,
        **(reads.stats() if reads is not None else {}),
    }


@router.get(
    "/projections/{name}",
    operation_id="getProjection",
    dependencies=[requires(p.ADMIN_PROJECTIONS)],
    responses=READ_RESPONSES,
)
async def get_projection(name: str, request: Request, pool: PoolDep) -> dict[str, Any]:
    """One projection's versions: state, rebuild progress (done/total, rate, ETA), workers."""
    _known(name)
    return await describe(request.app.state.settings, name, pool)


@router.post(
    "/projections/{name}/rebuild",
    operation_id="rebuildProjection",
    dependencies=[requires(p.ADMIN_PROJECTIONS)],
    status_code=202,
    responses={**READ_RESPONSES, 409: {"description": "A rebuild of this projection is running."}},
)
async def rebuild_projection(name: str, request: Request) -> JSONResponse:
    """Start replaying the projection from offset 0 into its next version (or resume an
    interrupted rebuild); it is swapped in when caught up. Follow it at `Location`."""
    _known(name)
    rebuild = Rebuild(request.app.state.settings, PROJECTIONS[name])
    try:
        version = await rebuild.prepare()
    except versions.VersionError as exc:
        raise RequestProblem(409, "rebuild_running", str(exc)) from exc
    tasks: set[asyncio.Task[Any]] = request.app.state.rebuilds
    task = asyncio.create_task(rebuild.run(), name=f"rebuild-{name}-v{version}")
    tasks.add(task)
    task.add_done_callback(_finished(tasks))
    location = f"/api/v1/admin/projections/{name}/rebuilds/{version}"
    return JSONResponse(
        {
            "projection": name,
            "rebuild_id": version,
            "version": version,
            "status": "started",
            "href": location,
        },
        status_code=202,
        headers={"Location": location},
    )


@router.get(
    "/projections/{name}/rebuilds/{rebuild_id}",
    operation_id="getRebuild",
    dependencies=[requires(p.ADMIN_PROJECTIONS)],
    responses=READ_RESPONSES,
)
async def get_rebuild(name: str, rebuild_id: int, pool: PoolDep) -> dict[str, Any]:
    """A rebuild (the version it builds): state, events done of total, rate, ETA."""
    _known(name)
    found = next((v for v in await versions.versions(pool, name) if v.version == rebuild_id), None)
    if found is None:
        raise RequestProblem(404, "not_found", f"{name} has no rebuild {rebuild_id}")
    body = found.as_dict()
    body["rebuild_id"] = found.version
    body["status"] = {
        "building": "running",
        "live": "swapped in",
        "retired": "swapped in, since retired",
    }.get(found.state, found.state)
    remaining = (found.total or 0) - (found.done or 0)
    body["eta_s"] = round(remaining / found.rate, 1) if found.state == "building" and found.rate else None
    if found.state != "building":
        body["phase"] = None  # loading, replaying or swapping: while it runs
    body["workers"] = await versions.workers(pool, name, found.version)
    return body


def _finished(tasks: set[asyncio.Task[Any]]) -> Any:
    def done(task: asyncio.Task[Any]) -> None:
        tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("rebuild failed", extra={"task": task.get_name(), "error": repr(task.exception())})

    return done


@router.post(
    "/projections/{name}/rollback",
    operation_id="rollbackProjection",
    dependencies=[requires(p.ADMIN_PROJECTIONS)],
    responses={**READ_RESPONSES, 409: {"description": "There is no retired version to return to."}},
)
async def rollback_projection(name: str, request: Request, pool: PoolDep) -> dict[str, Any]:
    """Swap the previous (retired) version back in; it catches up from where it stopped."""
    _known(name)
    try:
        target = await versions.previous(pool, name)
        retired = await versions.swap(pool, request.app.state.settings, PROJECTIONS[name], target)
    except versions.VersionError as exc:
        raise RequestProblem(409, "no_rollback", str(exc)) from exc
    return {"projection": name, "live_version": target, "retired_version": retired}
