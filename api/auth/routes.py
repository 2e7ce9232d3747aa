"""Identity routes: a tenant's API keys (issue, list, rotate, revoke), stream tickets
for browsers, and the audit trail. An admin is an admin of its own tenant: each route
reads and changes that tenant's records only."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import asyncpg
import orjson
from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import JSONResponse
from pydantic import Field
from redis.exceptions import RedisError

from api.auth import permissions as p
from api.auth.access import PrincipalDep, requires
from api.auth.edge import Identity
from api.auth.keys import ApiKeys
from api.auth.permissions import ROLES
from api.bodies import ERROR_RESPONSES, RequestBody
from api.errors import ReadModelsUnavailable, RequestProblem
from api.inputs import CursorText, Filter, HeaderText, Instant
from api.readmodels import PoolDep
from api.reads import page

router = APIRouter(tags=["identity"], responses=ERROR_RESPONSES)
KEYS = "/api/v1/admin/api-keys"
KeyId = Annotated[str, Path(pattern=r"^[0-9a-f]{16}$", description="the key's id (`id` of its listing)")]
OUTCOMES = ("accepted", "rejected", "queued", "failed", "unauthenticated", "forbidden", "rate_limited")


class IssueKeyRequest(RequestBody):
    name: Annotated[HeaderText, Field(description="What the key is for (a service's name).")]
    role: Literal["admin", "operator", "viewer"] = Field(
        default="viewer", description="a role of this tenant (a key never has the platform role)"
    )
    ttl_days: int | None = Field(default=None, ge=1, le=3650, description="90 days unless given")


class RotateKeyRequest(RequestBody):
    overlap_s: int = Field(
        default=86_400, ge=0, le=30 * 86_400, description="how long the old key keeps working"
    )


def _keys(request: Request) -> tuple[ApiKeys, asyncpg.Pool]:
    """The API keys and the pool they are stored in (503 until PostgreSQL is reached)."""
    identity: Identity = request.app.state.identity
    if identity.pool is None:
        raise ReadModelsUnavailable("the key store is not reachable yet")
    return identity.keys, identity.pool


@router.post(KEYS, status_code=201, operation_id="issueApiKey", dependencies=[requires(p.ADMIN_KEYS)])
async def issue_key(body: IssueKeyRequest, request: Request, principal: PrincipalDep) -> JSONResponse:
    """Issue a key of the caller's tenant. `key` is in this answer only: it is stored hashed."""
    keys, pool = _keys(request)
    record, key = await keys.issue(
        pool,
        tenant=principal.tenant,
        role=body.role,
        name=body.name,
        created_by=principal.subject,
        ttl_days=body.ttl_days,
    )
    location = f"{KEYS}/{record['id']}"
    return JSONResponse(_json({**record, "key": key}), 201, {"Location": location})


@router.get(KEYS, operation_id="listApiKeys", dependencies=[requires(p.ADMIN_KEYS)])
async def list_keys(request: Request, principal: PrincipalDep) -> dict[str, Any]:
    """The tenant's keys (active, expired, revoked), without their secrets."""
    keys, pool = _keys(request)
    return {"items": await keys.list(pool, principal.tenant)}


@router.get(f"{KEYS}/{{key_id}}", operation_id="getApiKey", dependencies=[requires(p.ADMIN_KEYS)])
async def get_key(key_id: KeyId, request: Request, principal: PrincipalDep) -> dict[str, Any]:
    keys, pool = _keys(request)
    found = await keys.get(pool, principal.tenant, key_id)
    if found is None:
        raise RequestProblem(404, "not_found", f"no API key {key_id}")
    return found


@router.post(
    f"{KEYS}/{{key_id}}/rotate",
    status_code=201,
    operation_id="rotateApiKey",
    dependencies=[requires(p.ADMIN_KEYS)],
)
async def rotate_key(
    key_id: KeyId, body: RotateKeyRequest, request: Request, principal: PrincipalDep
) -> JSONResponse:
    """A new key with the same name and role; the old one works `overlap_s` more."""
    keys, pool = _keys(request)
    rotated = await keys.rotate(pool, principal.tenant, key_id, body.overlap_s, principal.subject)
    if rotated is None:
        raise RequestProblem(404, "not_found", f"no active API key {key_id}")
    new, key, old = rotated
    return JSONResponse(_json({**new, "key": key, "previous": old}), 201, {"Location": f"{KEYS}/{new['id']}"})


@router.delete(f"{KEYS}/{{key_id}}", operation_id="revokeApiKey", dependencies=[requires(p.ADMIN_KEYS)])
async def revoke_key(key_id: KeyId, request: Request, principal: PrincipalDep) -> dict[str, Any]:
    """Revoke a key: refused at once by this process, within `APP_AUTH_KEY_CACHE_S` by every other."""
    keys, pool = _keys(request)
    found = await keys.revoke(pool, principal.tenant, key_id)
    if found is None:
        raise RequestProblem(404, "not_found", f"no API key {key_id}")
    return found


@router.post(
    "/api/v1/stream-tickets",
    status_code=201,
    operation_id="issueStreamTicket",
    dependencies=[requires(p.EVENTS_SUBSCRIBE)],
)
async def stream_ticket(request: Request, principal: PrincipalDep) -> dict[str, Any]:
    """A single-use ticket for one stream request (`?ticket=`), for clients that cannot
    set headers (EventSource): it expires unused after `expires_in` seconds, and the
    stream it opens ends when the credential it stands for expires."""
    identity: Identity = request.app.state.identity
    try:
        ticket = await identity.issue_ticket(principal)
    except (RedisError, OSError) as exc:
        raise ReadModelsUnavailable(f"tickets cannot be issued now: {exc!r}") from exc
    return {"ticket": ticket, "expires_in": identity.settings.auth_ticket_ttl_s}


@router.get("/api/v1/admin/audit", operation_id="queryAudit", dependencies=[requires(p.ADMIN_AUDIT)])
async def query_audit(
    pool: PoolDep,
    principal: PrincipalDep,
    actor: Annotated[Filter | None, Query(description="only this actor's records")] = None,
    outcome: Annotated[Literal[OUTCOMES] | None, Query(description="only this outcome")] = None,  # type: ignore[valid-type]
    since: Annotated[Instant | None, Query(description="from this instant on (ISO 8601 with a zone)")] = None,
    until: Annotated[Instant | None, Query(description="before this instant")] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
    cursor: Annotated[CursorText | None, Query(description="`next_cursor` of the previous page")] = None,
) -> dict[str, Any]:
    """The tenant's audit records, newest first: who did what, with which outcome, from where."""
    filters: list[tuple[str, Any]] = []
    if actor:
        filters.append(("actor = ?", actor))
    if outcome:
        filters.append(("outcome = ?", outcome))
    if since:
        filters.append(("at >= ?", since))
    if until:
        filters.append(("at < ?", until))
    return await page(pool, principal.tenant, "audit_log", "at", filters, limit, cursor, "desc")


def _json(body: dict[str, Any]) -> Any:
    return orjson.loads(orjson.dumps(body, default=str))


assert set(ROLES) == {"admin", "operator", "viewer", "platform"}  # IssueKeyRequest.role lists the tenant's
