"""Full-text search over incidents and their comments (OpenSearch), with the same
read-your-writes token."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request

from api.auth import permissions as p
from api.auth.access import requires
from api.fulltext import Equals, Offset, SearchDep, Size, Text, search
from api.readmodels import consistent
from api.reads import READ_RESPONSES

router = APIRouter(prefix="/api/v1/search/incidents", tags=["search"], responses=READ_RESPONSES)


@router.get(
    "",
    operation_id="searchIncidents",
    dependencies=[requires(p.SEARCH_READ), Depends(consistent("incidents_search"))],
)
async def search_incidents(
    request: Request,
    client: SearchDep,
    q: Text = "",
    status: Annotated[Literal["open", "in_progress", "resolved", "closed"] | None, Query()] = None,
    priority: Annotated[Literal["low", "medium", "high", "critical"] | None, Query()] = None,
    assignee: Equals = None,
    limit: Size = 20,
    offset: Offset = 0,
) -> dict[str, Any]:
    """Incidents whose title, description or comments match `q`, best first."""
    return await search(
        request,
        client,
        "incidents",
        q,
        ["title^3", "description", "comment_texts"],
        ["title", "description", "comment_texts"],
        {"status": status, "priority": priority, "assignee": assignee},
        limit,
        offset,
    )
