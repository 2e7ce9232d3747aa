"""What every context's search routes share: ranked hits, highlights, counts by status.

The query text is read with OpenSearch's `simple_query_string` (words, "phrases",
+must, -must-not, prefix*), which never fails on syntax: any text is a valid query.
Filters narrow the hits without changing their score; `counts.status` counts the
matches of the text and the other filters by status, so a client can show facets.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, Query, Request
from opensearchpy import AsyncOpenSearch

from api.auth.access import principal_of
from api.errors import ReadModelsUnavailable, RequestProblem
from api.inputs import Filter, Words
from projections.search import alias_name

MAX_WINDOW = 10_000  # OpenSearch's index.max_result_window


async def get_search(request: Request) -> AsyncOpenSearch:
    client: AsyncOpenSearch | None = getattr(request.app.state, "search", None)
    if client is None or not getattr(request.app.state, "search_ready", False):
        raise ReadModelsUnavailable("the search indexes are not reachable yet")
    return client


SearchDep = Annotated[AsyncOpenSearch, Depends(get_search)]
Text = Annotated[Words, Query(description="words to find; empty finds everything")]
Equals = Annotated[Filter | None, Query(description="only the hits with this value")]
Size = Annotated[int, Query(ge=1, le=100, description="page size")]
Offset = Annotated[int, Query(ge=0, le=MAX_WINDOW, description="hits to skip")]


async def search(
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
    others.append({"term": {"tenant": principal_of(request).tenant}})  # hits and counts: the caller's
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
