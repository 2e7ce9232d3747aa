"""Full-text search over the OpenSearch indexes: ranked hits, highlights, counts by status.

The query text is read with OpenSearch's `simple_query_string` (words, "phrases",
+must, -must-not, prefix*), which never fails on syntax: any text is a valid query.
Filters narrow the hits without changing their score; `counts.status` counts the
matches of the text and the other filters by status, so a client can show facets.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from opensearchpy import AsyncOpenSearch

from api.errors import ReadModelsUnavailable, RequestProblem
from api.queries import NOT_FOUND
from api.readmodels import consistent
from projections.search import alias_name

router = APIRouter(prefix="/api/v1/search", tags=["search"])

MAX_WINDOW = 10_000  # OpenSearch's index.max_result_window


async def get_search(request: Request) -> AsyncOpenSearch:
    client: AsyncOpenSearch | None = getattr(request.app.state, "search", None)
    if client is None or not getattr(request.app.state, "search_ready", False):
        raise ReadModelsUnavailable("the search indexes are not reachable yet")
    return client


SearchDep = Annotated[AsyncOpenSearch, Depends(get_search)]
Text = Annotated[str, Query(max_length=1000, description="words to find; empty finds everything")]
Size = Annotated[int, Query(ge=1, le=100, description="page size")]
Offset = Annotated[int, Query(ge=0, le=MAX_WINDOW, description="hits to skip")]


async def _search(
    request: Request,
    client: AsyncOpenSearch,
    index: str,
    q: str,
    fields: list[str],
    highlight: list[str],
    filters: dict[str, str | None],
    limit: int,
    offset: int,
) -> dict[str, Any]:
    if offset + limit > MAX_WINDOW:
        raise RequestProblem(
            422,
            "window_too_large",
            f"offset + limit must be at most {MAX_WINDOW}",
            field="offset",
            location="query",
        )
    text: dict[str, Any] = (
        {"simple_query_string": {"query": q, "fields": fields, "default_operator": "and"}}
        if q.strip()
        else {"match_all": {}}
    )
    status = filters.pop("status", None)
    others = [{"term": {k: v}} for k, v in filters.items() if v is not None]
    body: dict[str, Any] = {
        "query": {"bool": {"must": [text], "filter": others}},
        # The status filter applies to the hits but not to the counts by status.
        "post_filter": {"term": {"status": status}} if status else {"match_all": {}},
        "aggs": {"status": {"terms": {"field": "status", "size": 20}}},
        "highlight": {
            "fields": {f: {} for f in highlight},
            "pre_tags": ["<em>"],
            "post_tags": ["</em>"],
            "number_of_fragments": 3,
        },
        "from": offset,
        "size": limit,
        "track_total_hits": True,
    }
    alias = alias_name(request.app.state.settings, index)
    found = await client.search(index=alias, body=body)
    hits = found["hits"]
    return {
        "total": hits["total"]["value"],
        "items": [
            {**h["_source"], "score": h["_score"], "highlights": h.get("highlight", {})} for h in hits["hits"]
        ],
        "counts": {"status": {b["key"]: b["doc_count"] for b in found["aggregations"]["status"]["buckets"]}},
        "next_offset": offset + limit if offset + limit < hits["total"]["value"] else None,
    }


@router.get(
    "/datasets",
    operation_id="searchDatasets",
    responses=NOT_FOUND,
    dependencies=[Depends(consistent("datasets_search"))],
)
async def search_datasets(
    request: Request,
    client: SearchDep,
    q: Text = "",
    status: Annotated[Literal["active", "archived"] | None, Query()] = None,
    owner: Annotated[str | None, Query()] = None,
    tag: Annotated[str | None, Query()] = None,
    limit: Size = 20,
    offset: Offset = 0,
) -> dict[str, Any]:
    """Datasets whose name, description, tags or archive reason match `q`, best first."""
    return await _search(
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


@router.get(
    "/incidents",
    operation_id="searchIncidents",
    responses=NOT_FOUND,
    dependencies=[Depends(consistent("incidents_search"))],
)
async def search_incidents(
    request: Request,
    client: SearchDep,
    q: Text = "",
    status: Annotated[Literal["open", "in_progress", "resolved", "closed"] | None, Query()] = None,
    priority: Annotated[Literal["low", "medium", "high", "critical"] | None, Query()] = None,
    assignee: Annotated[str | None, Query()] = None,
    limit: Size = 20,
    offset: Offset = 0,
) -> dict[str, Any]:
    """Incidents whose title, description or comments match `q`, best first."""
    return await _search(
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
