"""The webhooks context's read model: its subscriptions (the deliveries are the delivery
job's own tables, `streams.webhooks.store`)."""

from __future__ import annotations

from projections.context import ReadContext
from projections.webhooks.rows import WebhookSubscriptionsProjection

CONTEXT = ReadContext("webhooks", (WebhookSubscriptionsProjection(),))
