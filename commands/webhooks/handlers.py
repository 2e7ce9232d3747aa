"""Command -> handler table of the webhooks context."""

from __future__ import annotations

from typing import Any

from commands.context import acts_on, creates
from commands.webhooks import commands as c
from commands.webhooks.aggregate import WebhookSubscription


def _register(cmd: c.RegisterWebhook) -> WebhookSubscription:
    from commands import CONTEXTS  # the contexts a webhook may name (this one among them)

    return WebhookSubscription.register(
        cmd.webhook_id,
        cmd.url,
        tuple(cmd.contexts),
        tuple(cmd.event_types),
        cmd.description,
        known_contexts=tuple(ctx.name for ctx in CONTEXTS),
        known_event_types=tuple(name for ctx in CONTEXTS for name in ctx.events),
    )


def _acts(method: str, *fields: str) -> Any:
    return lambda hook, cmd: getattr(hook, method)(*(getattr(cmd, f) for f in fields))


HANDLERS = (
    creates(c.RegisterWebhook, _register),
    acts_on(c.PauseWebhook, _acts("pause", "reason")),
    acts_on(c.ResumeWebhook, _acts("resume")),
    acts_on(c.RotateWebhookSecret, _acts("rotate_secret", "overlap_s")),
    acts_on(c.DeleteWebhook, _acts("delete")),
    acts_on(c.MarkWebhookFailing, _acts("mark_failing", "reason", "since")),
    acts_on(c.DisableWebhook, _acts("disable", "reason")),
)
