"""The Incident aggregate and its status life cycle.

    open -> in_progress -> resolved -> closed
                 ^             |
                 +-------------+        closed -> open only by an explicit reopen

A closed incident accepts nothing but a reopen.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any
from uuid import UUID

from eventsourcing.domain import event

from shared_kernel.domain import AggregateRoot, InvalidCommand, InvariantViolation, required_text

PRIORITIES = ("low", "medium", "high", "critical")
STATUSES = ("open", "in_progress", "resolved", "closed")
TRANSITIONS: dict[str, tuple[str, ...]] = {
    "open": ("in_progress",),
    "in_progress": ("resolved",),
    "resolved": ("closed", "in_progress"),
    "closed": (),
}
MAX_COMMENT = 10_000
DEADLINES = ("assignment", "resolution")  # of a service level: assigned by, resolved by


class Incident(AggregateRoot):
    """An incident: opened, assigned, moved through its statuses, commented on, escalated
    when a deadline of its service level passes unmet."""

    class_version = 2  # v2: `escalations`

    @staticmethod
    def upcast_v1_v2(state: dict[str, Any]) -> None:
        state["escalations"] = {}

    # ---- decide -------------------------------------------------------------

    @classmethod
    def open(
        cls, incident_id: UUID, title: str, description: str, priority: str, source: str, external_id: str
    ) -> Incident:
        if priority not in PRIORITIES:
            raise InvalidCommand(f"priority must be one of {', '.join(PRIORITIES)}", field="priority")
        return cls(
            id=incident_id,
            title=required_text(title, "title"),
            description=description.strip(),
            priority=priority,
            source=source.strip(),
            external_id=external_id.strip(),
        )

    def assign(self, assignee: str) -> None:
        self._check_not_closed()
        self._assigned(assignee=required_text(assignee, "assignee"))

    def change_status(self, status: str, reason: str) -> None:
        if status not in STATUSES:
            raise InvalidCommand(f"status must be one of {', '.join(STATUSES)}", field="status")
        self._check_not_closed()
        allowed = TRANSITIONS[self.status]
        if status not in allowed:
            raise InvariantViolation(
                f"cannot go from {self.status} to {status}; allowed: {', '.join(allowed) or 'none'}",
                status=self.status,
                allowed=list(allowed),
            )
        self._status_changed(from_status=self.status, to_status=status, reason=reason.strip())

    def reopen(self, reason: str) -> None:
        if self.status != "closed":
            raise InvariantViolation(
                f"only a closed incident can be reopened; it is {self.status}",
                status=self.status,
                allowed=list(TRANSITIONS[self.status]),
            )
        self._status_changed(from_status="closed", to_status="open", reason=reason.strip())

    def comment(self, author: str, body: str) -> None:
        self._check_not_closed()
        text = required_text(body, "body")
        if len(text) > MAX_COMMENT:
            raise InvalidCommand(f"a comment has at most {MAX_COMMENT} characters", field="body")
        self._commented(author=required_text(author, "author"), body=text)

    def escalate(self, deadline: str, due_at: str) -> None:
        """A deadline passed: escalate once per deadline, and only while it is unmet (an
        incident assigned by then is not escalated for assignment, nor a resolved one)."""
        if deadline not in DEADLINES:
            raise InvalidCommand(f"deadline must be one of {', '.join(DEADLINES)}", field="deadline")
        try:
            due = datetime.fromisoformat(due_at)
        except (TypeError, ValueError):
            raise InvalidCommand("due_at is not an ISO-8601 instant", field="due_at") from None
        if due.tzinfo is None:
            raise InvalidCommand("due_at must name its time zone", field="due_at")
        if deadline in self.escalations:
            raise InvariantViolation(
                f"the {deadline} deadline was already escalated", deadline=deadline, status=self.status
            )
        met = self.assignee is not None if deadline == "assignment" else self.status in ("resolved", "closed")
        if met:
            raise InvariantViolation(f"the {deadline} deadline is met", deadline=deadline, status=self.status)
        self._escalated(
            level=len(self.escalations) + 1, deadline=deadline, due_at=due.astimezone(UTC).isoformat()
        )

    def _check_not_closed(self) -> None:
        if self.status == "closed":
            raise InvariantViolation(
                "the incident is closed; it can only be reopened", status="closed", allowed=["reopen"]
            )

    # ---- evolve -------------------------------------------------------------

    @event("IncidentOpened")
    def __init__(
        self,
        id: UUID,
        title: str,
        description: str,
        priority: str,
        source: str,
        external_id: str,
    ) -> None:
        self.title = title
        self.description = description
        self.priority = priority
        self.source = source
        self.external_id = external_id
        self.status = "open"
        self.assignee: str | None = None
        self.comments = 0
        self.escalations: dict[str, int] = {}  # deadline -> level

    @event("IncidentAssigned")
    def _assigned(self, assignee: str) -> None:
        self.assignee = assignee

    @event("IncidentStatusChanged")
    def _status_changed(self, from_status: str, to_status: str, reason: str) -> None:
        self.status = to_status

    @event("IncidentCommented")
    def _commented(self, author: str, body: str) -> None:
        self.comments += 1

    @event("IncidentEscalated")
    def _escalated(self, level: int, deadline: str, due_at: str) -> None:
        self.escalations[deadline] = level
