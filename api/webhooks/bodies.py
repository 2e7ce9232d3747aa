"""Request and answer bodies of the webhooks routes, on the input rules of `api.inputs`."""

from __future__ import annotations

from typing import Annotated
from uuid import UUID

from pydantic import BaseModel, Field, StringConstraints

from api.bodies import CommandAccepted
from api.bodies import RequestBody as Body
from api.inputs import Chars, Instant, Label, Name, Text

Url = Annotated[str, StringConstraints(min_length=1, max_length=2048), Chars(line=True)]
MAX_FILTERS = 50


class RegisterWebhookRequest(Body):
    id: UUID | None = Field(
        default=None, description="Optional; derived from the Idempotency-Key when absent."
    )
    url: Url = Field(description="An http(s) URL; private and loopback addresses are refused (422).")
    contexts: list[Name] = Field(
        default_factory=list, max_length=MAX_FILTERS, description="Contexts whose events it wants; none: all."
    )
    event_types: list[Name] = Field(
        default_factory=list,
        max_length=MAX_FILTERS,
        description="Event types (e.g. `incidents.IncidentOpened`) it wants; none: all.",
    )
    description: Text = ""


class PauseWebhookRequest(Body):
    reason: Label = ""


class RotateSecretRequest(Body):
    overlap_s: int = Field(
        default=86_400, ge=0, le=30 * 86_400, description="How long the previous secret still signs."
    )


class RedeliverRequest(Body):
    delivery_id: Annotated[str, StringConstraints(min_length=1, max_length=64), Chars(line=True)] | None = (
        Field(default=None, description="One delivery (its `webhook-id`).")
    )
    since: Instant | None = Field(
        default=None, description="Every delivery owed since then, delivered ones too."
    )


class WebhookSecret(CommandAccepted):
    """The command was applied; the subscription's signing secret, shown this once."""

    secret: str = Field(
        description="`whsec_` and base64: verify each delivery's `webhook-signature` with it "
        "(Standard Webhooks). A retry of the same request shows the same secret."
    )


class Redelivered(BaseModel):
    """How many deliveries are owed again."""

    redelivered: int
