"""Query routes of the webhooks context: the subscriptions (list, one now or in the past,
its history), each one's delivery log, and redelivery."""

from __future__ import annotations

from typing import Annotated, Any, Literal
from uuid import UUID

from fastapi import APIRouter, Depends, Query, Request, Response

from api.auth import permissions as p
from api.auth.access import PrincipalDep, requires
from api.errors import RequestProblem
from api.inputs import CursorText
from api.readmodels import PoolDep, TokenDep, consistent
from api.reads import (
    READ_RESPONSES,
    AsOf,
    AsOfVersion,
    Cursor,
    IfNoneMatch,
    Limit,
    Order,
    current_or_past,
    history,
    page,
)
from api.webhooks import bodies as s
from projections.webhooks import deliveries

router = APIRouter(prefix="/api/v1/webhooks", tags=["webhooks"], responses=READ_RESPONSES)
VIEW = [requires(p.WEBHOOKS_VIEW)]
Status = Literal["active", "paused", "failing", "disabled", "deleted"]


@router.get(
    "", operation_id="listWebhooks", dependencies=[*VIEW, Depends(consistent("webhook_subscriptions"))]
)
async def list_webhooks(
    pool: PoolDep,
    principal: PrincipalDep,
    status: Annotated[Status | None, Query()] = None,
    limit: Limit = 50,
    cursor: Cursor = None,
    order: Order = "asc",
) -> dict[str, Any]:
    filters: list[tuple[str, Any]] = [("status = ?", status)] if status else []
    return await page(
        pool, principal.tenant, "webhook_subscriptions", "created_at", filters, limit, cursor, order
    )


@router.get("/{webhook_id}", operation_id="getWebhook", dependencies=VIEW)
async def get_webhook(
    webhook_id: UUID,
    request: Request,
    pool: PoolDep,
    token: TokenDep,
    response: Response,
    as_of_version: AsOfVersion = None,
    as_of: AsOf = None,
    if_none_match: IfNoneMatch = None,
) -> dict[str, Any]:
    """The subscription now (its read model; never its secret), or at a version or an instant."""
    return await current_or_past(
        request,
        pool,
        token,
        response,
        "webhook_subscriptions",
        "webhooks",
        webhook_id,
        "webhook",
        as_of_version,
        as_of,
        if_none_match,
    )


@router.get(
    "/{webhook_id}/events",
    operation_id="getWebhookHistory",
    dependencies=[*VIEW, Depends(consistent("events"))],
)
async def get_webhook_events(webhook_id: UUID, pool: PoolDep, principal: PrincipalDep) -> dict[str, Any]:
    return await history(pool, principal.tenant, "webhooks", webhook_id, "webhook")


async def _known(pool: Any, tenant: str, webhook_id: UUID) -> None:
    found = await pool.fetchval(
        "SELECT 1 FROM webhook_subscriptions WHERE id = $1 AND tenant = $2", webhook_id, tenant
    )
    if not found:
        raise RequestProblem(404, "not_found", f"no webhook {webhook_id}")


@router.get(
    "/{webhook_id}/deliveries", operation_id="listWebhookDeliveries", tags=["deliveries"], dependencies=VIEW
)
async def list_deliveries(
    webhook_id: UUID,
    pool: PoolDep,
    principal: PrincipalDep,
    status: Annotated[Literal["pending", "delivered", "parked"] | None, Query()] = None,
    limit: Limit = 50,
    before: Annotated[CursorText | None, Query(description="`next` of the previous page")] = None,
) -> dict[str, Any]:
    """The delivery log, newest first: each delivery's state and every attempt (time,
    status code, latency, error), with the counts per state."""
    await _known(pool, principal.tenant, webhook_id)
    await deliveries.ensure(pool)
    return await deliveries.log(pool, principal.tenant, webhook_id, status, limit, before)


@router.post(
    "/{webhook_id}/redeliver",
    status_code=202,
    operation_id="redeliverWebhook",
    tags=["deliveries"],
    dependencies=[requires(p.WEBHOOKS_MANAGE)],
)
async def redeliver(
    webhook_id: UUID, body: s.RedeliverRequest, pool: PoolDep, principal: PrincipalDep
) -> s.Redelivered:
    """Owe deliveries again, their attempts from the first: one (`delivery_id`), every
    one since an instant (`since`, delivered ones too), or, with neither, every parked
    one. They go out in order per aggregate, behind any earlier one still owed."""
    if body.delivery_id is not None and body.since is not None:
        raise RequestProblem(422, "invalid_body", "give delivery_id or since, not both", field="since")
    await _known(pool, principal.tenant, webhook_id)
    await deliveries.ensure(pool)
    n = await deliveries.redeliver(pool, principal.tenant, webhook_id, body.delivery_id, body.since)
    if body.delivery_id is not None and n == 0:
        raise RequestProblem(404, "not_found", f"no delivery {body.delivery_id} of webhook {webhook_id}")
    return s.Redelivered(redelivered=n)
