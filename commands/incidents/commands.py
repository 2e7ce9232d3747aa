"""The incidents context's commands (imperative)."""

from __future__ import annotations

from dataclasses import dataclass
from uuid import UUID


@dataclass(frozen=True)
class OpenIncident:
    incident_id: UUID
    title: str
    description: str = ""
    priority: str = "medium"
    source: str = ""
    external_id: str = ""


@dataclass(frozen=True)
class AssignIncident:
    incident_id: UUID
    assignee: str


@dataclass(frozen=True)
class ChangeIncidentStatus:
    incident_id: UUID
    status: str
    reason: str = ""


@dataclass(frozen=True)
class ReopenIncident:
    """The only way out of `closed`."""

    incident_id: UUID
    reason: str = ""


@dataclass(frozen=True)
class CommentOnIncident:
    incident_id: UUID
    author: str
    body: str


@dataclass(frozen=True)
class EscalateIncident:
    """Sent by the deadlines job when a deadline of the incident's service level passed."""

    incident_id: UUID
    deadline: str  # assignment | resolution
    due_at: str  # ISO-8601
