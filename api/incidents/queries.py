"""Query routes of the incidents context: the list (filters, cursors), one incident now
or in the past, and its history."""

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
    page,
)

router = APIRouter(prefix="/api/v1/incidents", tags=["queries"], responses=READ_RESPONSES)


@router.get(
    "",
    operation_id="listIncidents",
    dependencies=[requires(p.INCIDENTS_VIEW), Depends(consistent("incidents"))],
)
async def list_incidents(
    pool: PoolDep,
    principal: PrincipalDep,
    status: Annotated[Literal["open", "in_progress", "resolved", "closed"] | None, Query()] = None,
    priority: Annotated[Literal["low", "medium", "high", "critical"] | None, Query()] = None,
    assignee: Equals = None,
    source: Equals = None,
    external_id: Equals = None,
    limit: Limit = 50,
    cursor: Cursor = None,
    order: Order = "asc",
) -> dict[str, Any]:
    filters: list[tuple[str, Any]] = []
    if status:
        filters.append(("status = ?", status))
    if priority:
        filters.append(("priority = ?", priority))
    if assignee:
        filters.append(("assignee = ?", assignee))
    if source:
        filters.append(("source = ?", source))
    if external_id:
        filters.append(("external_id = ?", external_id))
    return await page(pool, principal.tenant, "incidents", "opened_at", filters, limit, cursor, order)


@router.get("/{incident_id}", operation_id="getIncident", dependencies=[requires(p.INCIDENTS_VIEW)])
async def get_incident(
    incident_id: UUID,
    request: Request,
    pool: PoolDep,
    token: TokenDep,
    response: Response,
    as_of_version: AsOfVersion = None,
    as_of: AsOf = None,
    if_none_match: IfNoneMatch = None,
) -> dict[str, Any]:
    """The incident now (its read model), or as it was at a version or an instant."""
    return await current_or_past(
        request,
        pool,
        token,
        response,
        "incidents",
        "incidents",
        incident_id,
        "incident",
        as_of_version,
        as_of,
        if_none_match,
    )


@router.get(
    "/{incident_id}/events",
    operation_id="getIncidentHistory",
    dependencies=[requires(p.INCIDENTS_VIEW), Depends(consistent("events"))],
)
async def get_incident_events(incident_id: UUID, pool: PoolDep, principal: PrincipalDep) -> dict[str, Any]:
    return await history(pool, principal.tenant, "incidents", incident_id, "incident")
