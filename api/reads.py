"""What every context's query routes share: pages with cursors, one row with its ETag,
an aggregate's history, and the present or the past of an aggregate.

Lists are ordered by creation time (then id) and paged with an opaque cursor. A
single resource answers with `ETag` = its version (304 for `If-None-Match`). Every
route accepts a position token for read-your-writes (see `api.readmodels`).
"""

from __future__ import annotations

import base64
from datetime import datetime
from typing import Annotated, Any, Literal
from uuid import UUID

import orjson
from fastapi import Header, Query, Request, Response

from api.auth.access import principal_of
from api.bodies import ErrorBody, InternalErrorBody
from api.deps import etag_named
from api.errors import NotModified, RequestProblem
from api.inputs import AggregateVersion, CursorText, ETags, Filter, Instant, utc
from api.readmodels import wait_for
from api.temporal import state_at
from shared_kernel.position import PositionToken

Limit = Annotated[int, Query(ge=1, le=500, description="page size")]
Cursor = Annotated[CursorText | None, Query(description="`next_cursor` of the previous page")]
Order = Annotated[Literal["asc", "desc"], Query(description="by creation time")]
Equals = Annotated[Filter | None, Query(description="only the rows with this value")]
IfNoneMatch = Annotated[
    ETags | None, Header(description="ETags the caller has: 304 when the version is one of them.")
]


def cursor_of(row: dict[str, Any], time_column: str) -> str:
    raw = orjson.dumps([row[time_column].isoformat(), str(row["id"])])
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _after(cursor: str) -> tuple[datetime, UUID]:
    """The (instant, id) a cursor of `cursor_of` holds: an instant PostgreSQL can hold."""
    try:
        at, ident = orjson.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        return utc(datetime.fromisoformat(at)), UUID(ident)
    except Exception as exc:
        raise RequestProblem(
            422, "invalid_cursor", "not a cursor of this list", field="cursor", location="query"
        ) from exc


async def page(
    pool: Any,
    tenant: str,
    view: str,
    time_column: str,
    filters: list[tuple[str, Any]],
    limit: int,
    cursor: str | None,
    order: str,
) -> dict[str, Any]:
    where: list[str] = ["tenant = $1"]  # the caller's tenant only
    args: list[Any] = [tenant]
    for clause, value in filters:
        args.append(value)
        where.append(clause.replace("?", f"${len(args)}"))
    if cursor:
        at, ident = _after(cursor)
        args += [at, ident]
        cmp = ">" if order == "asc" else "<"
        where.append(f"({time_column}, id) {cmp} (${len(args) - 1}, ${len(args)})")
    sql_where = f"WHERE {' AND '.join(where)}" if where else ""
    direction = "ASC" if order == "asc" else "DESC"
    args.append(limit + 1)
    rows = [
        dict(r)
        for r in await pool.fetch(
            f"SELECT * FROM {view} {sql_where} ORDER BY {time_column} {direction}, id {direction} "
            f"LIMIT ${len(args)}",
            *args,
        )
    ]
    more = len(rows) > limit
    rows = rows[:limit]
    return {"items": rows, "next_cursor": cursor_of(rows[-1], time_column) if more and rows else None}


async def one(
    pool: Any,
    tenant: str,
    view: str,
    ident: UUID,
    what: str,
    response: Response,
    if_none_match: str | None = None,
) -> dict[str, Any]:
    """The row `ident` of the caller's tenant: another tenant's is as unknown as no row (404)."""
    row = await pool.fetchrow(f"SELECT * FROM {view} WHERE id = $1 AND tenant = $2", ident, tenant)
    if row is None:
        raise RequestProblem(404, "not_found", f"no {what} {ident}")
    etag(response, row["version"], if_none_match)
    return dict(row)


def etag(response: Response, version: int, if_none_match: str | None) -> None:
    """`ETag` = the version; 304 when the caller's `If-None-Match` names it already."""
    etag = f'"{version}"'
    if if_none_match is not None and etag_named(if_none_match, etag):
        raise NotModified(etag)
    response.headers["ETag"] = etag


async def history(pool: Any, tenant: str, context: str, ident: UUID, what: str) -> dict[str, Any]:
    """The events of the `context` aggregate `ident`: the archive holds every context, and an
    id of another context's aggregate is no aggregate of this one (404)."""
    rows = await pool.fetch(
        'SELECT event_id, event_type, version, occurred_at, headers, payload, topic, partition, "offset" '
        "FROM events WHERE aggregate_id = $1 AND context = $2 AND tenant = $3 ORDER BY version",
        str(ident),
        context,
        tenant,
    )
    if not rows:
        raise RequestProblem(404, "not_found", f"no {what} {ident}")
    return {"items": [dict(r) for r in rows]}


AsOfVersion = Annotated[
    AggregateVersion | None, Query(description="the state right after this version (rebuilt from the events)")
]
AsOf = Annotated[
    Instant | None,
    Query(description="the state at this instant, ISO 8601 with a zone (rebuilt from the events)"),
]


async def current_or_past(
    request: Request,
    pool: Any,
    token: PositionToken | None,
    response: Response,
    projection: str,
    context: str,
    ident: UUID,
    what: str,
    version: int | None,
    at: datetime | None,
    if_none_match: str | None = None,
) -> dict[str, Any]:
    """The row of `projection` (the present), or the aggregate of `context` rebuilt
    from the events archive at a version or an instant (the past: `at` is an `Instant`,
    with a zone, which the route's parameter checked)."""
    settings, committed = request.app.state.settings, request.app.state.positions
    tenant = principal_of(request).tenant
    if version is None and at is None:
        if token is not None:
            await wait_for(pool, settings, token, (projection,), committed)
        return await one(pool, tenant, projection, ident, what, response, if_none_match)
    if token is not None:
        await wait_for(pool, settings, token, ("events",), committed)
    state = await state_at(pool, context, str(ident), version, at, tenant=tenant)
    if state is None:
        raise RequestProblem(404, "not_found", f"no {what} {ident}" + (f" at {at.isoformat()}" if at else ""))
    if version is not None and state["version"] < version:
        raise RequestProblem(
            404, "not_found", f"{what} {ident} has no version {version}", current_version=state["version"]
        )
    etag(response, state["version"], if_none_match)
    return state


READ_RESPONSES: dict[int | str, dict[str, Any]] = {
    404: {"model": ErrorBody, "description": "Unknown resource."},
    422: {"description": "Invalid filter, cursor, instant, header or position token; names the field."},
    500: {"model": InternalErrorBody, "description": "Unexpected; logged with its correlation_id."},
    503: {"model": ErrorBody, "description": "The read models are unreachable; retry after Retry-After."},
    504: {"model": ErrorBody, "description": "The read model did not reach the given position in time."},
}
