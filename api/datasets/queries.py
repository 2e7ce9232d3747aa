"""Query routes of the datasets context: the catalogue (filters, cursors), one dataset
now or in the past, its quality checks and its history."""

from __future__ import annotations

from typing import Annotated, Any, Literal
from uuid import UUID

from fastapi import APIRouter, Depends, Query, Request, Response

from api.auth import permissions as p
from api.auth.access import PrincipalDep, requires
from api.readmodels import PoolDep, TokenDep, consistent
from api.reads import (
    READ_RESPONSES,
    AsOf,
    AsOfVersion,
    Cursor,
    Equals,
    IfNoneMatch,
    Limit,
    Order,
    current_or_past,
    history,
    one,
    page,
)

router = APIRouter(prefix="/api/v1/datasets", tags=["queries"], responses=READ_RESPONSES)


@router.get(
    "",
    operation_id="listDatasets",
    dependencies=[requires(p.DATASETS_READ), Depends(consistent("datasets"))],
)
async def list_datasets(
    pool: PoolDep,
    principal: PrincipalDep,
    status: Annotated[Literal["active", "archived"] | None, Query()] = None,
    owner: Equals = None,
    tag: Equals = None,
    limit: Limit = 50,
    cursor: Cursor = None,
    order: Order = "asc",
) -> dict[str, Any]:
    filters: list[tuple[str, Any]] = []
    if status:
        filters.append(("status = ?", status))
    if owner:
        filters.append(("owner = ?", owner))
    if tag:
        filters.append(("tags @> ARRAY[?]::text[]", tag.strip().lower()))
    return await page(pool, principal.tenant, "datasets", "created_at", filters, limit, cursor, order)


@router.get("/{dataset_id}", operation_id="getDataset", dependencies=[requires(p.DATASETS_READ)])
async def get_dataset(
    dataset_id: UUID,
    request: Request,
    pool: PoolDep,
    token: TokenDep,
    response: Response,
    as_of_version: AsOfVersion = None,
    as_of: AsOf = None,
    if_none_match: IfNoneMatch = None,
) -> dict[str, Any]:
    """The dataset now (its read model), or as it was at a version or an instant."""
    return await current_or_past(
        request,
        pool,
        token,
        response,
        "datasets",
        "datasets",
        dataset_id,
        "dataset",
        as_of_version,
        as_of,
        if_none_match,
    )


@router.get(
    "/{dataset_id}/quality",
    operation_id="getDatasetQuality",
    dependencies=[requires(p.DATASETS_READ), Depends(consistent("datasets", "quality_metrics"))],
)
async def get_dataset_quality(
    dataset_id: UUID, pool: PoolDep, principal: PrincipalDep, response: Response
) -> dict[str, Any]:
    dataset = await one(pool, principal.tenant, "datasets", dataset_id, "dataset", response)
    checks = await pool.fetch(
        "SELECT metric, value, threshold, comparator, passed, recorded_at, version "
        "FROM quality_metrics WHERE dataset_id = $1 AND tenant = $2 ORDER BY version",
        dataset_id,
        principal.tenant,
    )
    return {"summary": dataset["quality"], "checks": [dict(c) for c in checks]}


@router.get(
    "/{dataset_id}/quality/windows",
    operation_id="getDatasetQualityWindows",
    dependencies=[requires(p.DATASETS_READ), Depends(consistent("datasets", "quality_windows"))],
)
async def get_dataset_quality_windows(
    dataset_id: UUID,
    pool: PoolDep,
    principal: PrincipalDep,
    response: Response,
    kind: Annotated[Literal["tumbling", "hopping"], Query(description="which windows")] = "tumbling",
    metric: Equals = None,
    limit: Annotated[int, Query(ge=1, le=1000, description="the latest windows, at most")] = 200,
) -> dict[str, Any]:
    """Pass rates of the dataset's quality checks per event-time window (a check counts at
    the time it measured), oldest first; `late_dropped`: checks that came after their
    windows had closed (allowed lateness passed)."""
    await one(pool, principal.tenant, "datasets", dataset_id, "dataset", response)
    rows = await pool.fetch(
        "SELECT * FROM (SELECT metric, window_start, window_end, checks, passed, checks - passed AS failed, "
        "passed::float8 / checks AS pass_rate, first_check_at, last_check_at FROM quality_windows "
        "WHERE dataset_id = $1 AND tenant = $2 AND kind = $3 AND ($4::text IS NULL OR metric = $4) "
        "ORDER BY window_start DESC, metric LIMIT $5) w ORDER BY window_start, metric",
        dataset_id,
        principal.tenant,
        kind,
        metric,
        limit,
    )
    clock = await pool.fetchrow(
        "SELECT stream_time, dropped FROM quality_windows_clock WHERE dataset_id = $1 AND tenant = $2",
        dataset_id,
        principal.tenant,
    )
    return {
        "kind": kind,
        "stream_time": clock["stream_time"] if clock else None,
        "late_dropped": clock["dropped"] if clock else 0,
        "windows": [dict(r) for r in rows],
    }


@router.get(
    "/{dataset_id}/events",
    operation_id="getDatasetHistory",
    dependencies=[requires(p.DATASETS_READ), Depends(consistent("events"))],
)
async def get_dataset_events(dataset_id: UUID, pool: PoolDep, principal: PrincipalDep) -> dict[str, Any]:
    return await history(pool, principal.tenant, "datasets", dataset_id, "dataset")
