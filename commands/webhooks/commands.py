"""The webhooks context's commands (imperative)."""

from __future__ import annotations

from dataclasses import dataclass, field
from uuid import UUID


@dataclass(frozen=True)
class RegisterWebhook:
    """A target that wants events pushed: those of `contexts` (all when empty) and of
    `event_types` (full names, e.g. `incidents.IncidentOpened`; all when empty)."""

    webhook_id: UUID
    url: str
    contexts: list[str] = field(default_factory=list)
    event_types: list[str] = field(default_factory=list)
    description: str = ""


@dataclass(frozen=True)
class PauseWebhook:
    webhook_id: UUID
    reason: str = ""


@dataclass(frozen=True)
class ResumeWebhook:
    """Deliver again (also out of `failing` and `disabled`)."""

    webhook_id: UUID


@dataclass(frozen=True)
class RotateWebhookSecret:
    """A new signing secret; the previous one still signs for `overlap_s` seconds."""

    webhook_id: UUID
    overlap_s: int = 86_400


@dataclass(frozen=True)
class DeleteWebhook:
    webhook_id: UUID


@dataclass(frozen=True)
class MarkWebhookFailing:
    """Sent by the delivery job when a delivery was parked after its last attempt."""

    webhook_id: UUID
    reason: str
    since: str  # ISO-8601: when the parked delivery was first attempted


@dataclass(frozen=True)
class DisableWebhook:
    """Sent by the delivery job when the target answered 410 Gone."""

    webhook_id: UUID
    reason: str
