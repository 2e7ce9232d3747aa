"""Command routes of the webhooks context: register (the secret shown once), pause,
resume, rotate the secret (the new one shown once), delete."""

from __future__ import annotations

from uuid import UUID

from fastapi import APIRouter, Request, Response

from api.auth import permissions as p
from api.auth.access import requires
from api.bodies import ERROR_RESPONSES, CommandAccepted
from api.deps import BusDep, CommandMetaDep
from api.dispatch import dispatch, new_aggregate_id
from api.errors import RequestProblem
from api.webhooks import bodies as s
from commands.webhooks import CONTEXT
from commands.webhooks import commands as c
from commands.webhooks import signing as w

router = APIRouter(prefix="/api/v1/webhooks", tags=["webhooks"], responses=ERROR_RESPONSES)
MANAGE = [requires(p.WEBHOOKS_MANAGE)]


def _with_secret(request: Request, tenant: str, accepted: CommandAccepted) -> s.WebhookSecret:
    """The answer with the secret of the generation this command issued (its version)."""
    assert accepted.version is not None
    key = w.webhook_key(request.app.state.settings)
    secret = w.secret_of(key, tenant, accepted.id, accepted.version)
    return s.WebhookSecret(**accepted.model_dump(), secret=secret)


@router.post("", status_code=201, operation_id="registerWebhook", dependencies=MANAGE)
async def register_webhook(
    body: s.RegisterWebhookRequest, request: Request, meta: CommandMetaDep, bus: BusDep, response: Response
) -> s.WebhookSecret:
    """Subscribe a URL to events; the answer shows its signing secret once (a retry with the
    same Idempotency-Key shows the same one)."""
    why = w.refusal(body.url, request.app.state.settings.webhook_allowed_networks)
    if why is not None:
        raise RequestProblem(422, "invalid_command", f"url: {why}", field="url", location="body")
    command = c.RegisterWebhook(
        webhook_id=body.id or new_aggregate_id(meta),
        url=body.url,
        contexts=list(body.contexts),
        event_types=list(body.event_types),
        description=body.description,
    )
    return _with_secret(request, meta.tenant, await dispatch(bus, CONTEXT, command, meta, response))


@router.post("/{webhook_id}/pause", operation_id="pauseWebhook", dependencies=MANAGE)
async def pause_webhook(
    webhook_id: UUID, body: s.PauseWebhookRequest, meta: CommandMetaDep, bus: BusDep, response: Response
) -> CommandAccepted:
    """Stop deliveries; events meanwhile are not delivered (owed ones wait)."""
    return await dispatch(bus, CONTEXT, c.PauseWebhook(webhook_id, body.reason), meta, response)


@router.post("/{webhook_id}/resume", operation_id="resumeWebhook", dependencies=MANAGE)
async def resume_webhook(
    webhook_id: UUID, meta: CommandMetaDep, bus: BusDep, response: Response
) -> CommandAccepted:
    """Deliver again, out of `paused`, `failing` or `disabled`."""
    return await dispatch(bus, CONTEXT, c.ResumeWebhook(webhook_id), meta, response)


@router.post("/{webhook_id}/rotate-secret", operation_id="rotateWebhookSecret", dependencies=MANAGE)
async def rotate_secret(
    webhook_id: UUID,
    body: s.RotateSecretRequest,
    request: Request,
    meta: CommandMetaDep,
    bus: BusDep,
    response: Response,
) -> s.WebhookSecret:
    """A new signing secret, shown once; deliveries carry a signature by each secret until
    the overlap ends."""
    accepted = await dispatch(bus, CONTEXT, c.RotateWebhookSecret(webhook_id, body.overlap_s), meta, response)
    return _with_secret(request, meta.tenant, accepted)


@router.delete("/{webhook_id}", operation_id="deleteWebhook", dependencies=MANAGE)
async def delete_webhook(
    webhook_id: UUID, meta: CommandMetaDep, bus: BusDep, response: Response
) -> CommandAccepted:
    return await dispatch(bus, CONTEXT, c.DeleteWebhook(webhook_id), meta, response)
