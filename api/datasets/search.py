"""Full-text search over datasets (OpenSearch), with the same read-your-writes token."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request

from api.auth import permissions as p
from api.auth.access import requires
from api.fulltext import Equals, Offset, SearchDep, Size, Text, search
from api.readmodels import consistent
from api.reads import READ_RESPONSES

router = APIRouter(prefix="/api/v1/search/datasets", tags=["search"], responses=READ_RESPONSES)


@router.get(
    "",
    operation_id="searchDatasets",
    dependencies=[requires(p.SEARCH_READ), Depends(consistent("datasets_search"))],
)
async def search_datasets(
    request: Request,
    client: SearchDep,
    q: Text = "",
    status: Annotated[Literal["active", "archived"] | None, Query()] = None,
    owner: Equals = None,
    tag: Equals = None,
    limit: Size = 20,
    offset: Offset = 0,
) -> dict[str, Any]:
    """Datasets whose name, description, tags or archive reason match `q`, best first."""
    return await search(
        request,
        client,
        "datasets",
        q,
        ["name^3", "description", "tags^2", "archived_reason"],
        ["name", "description"],
        {"status": status, "owner": owner, "tags": tag.strip().lower() if tag else None},
        limit,
        offset,
    )
