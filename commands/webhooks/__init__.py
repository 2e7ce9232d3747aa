"""The webhooks bounded context: subscriptions of other systems to the events, pushed to
them signed (Standard Webhooks), retried, parked and redelivered by the delivery job."""

from __future__ import annotations

from commands.context import BoundedContext
from commands.webhooks.aggregate import WebhookSubscription
from commands.webhooks.handlers import HANDLERS

CONTEXT = BoundedContext(
    name="webhooks",
    aggregate=WebhookSubscription,
    handlers=HANDLERS,
    event_names=(
        "WebhookRegistered",
        "WebhookPaused",
        "WebhookResumed",
        "WebhookSecretRotated",
        "WebhookDeleted",
        "WebhookFailing",
        "WebhookDisabled",
    ),
)
