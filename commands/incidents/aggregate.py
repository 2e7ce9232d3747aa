"""The Incident aggregate and its status life cycle.

    open -> in_progress -> resolved -> closed
                 ^             |
                 +-------------+        closed -> open only by an explicit reopen

A closed incident accepts nothing but a reopen.
"""

from __future__ import annotations

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


class Incident(AggregateRoot):
    """An incident: opened, assigned, moved through its statuses, commented on."""

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

    @event("IncidentAssigned")
    def _assigned(self, assignee: str) -> None:
        self.assignee = assignee

    @event("IncidentStatusChanged")
    def _status_changed(self, from_status: str, to_status: str, reason: str) -> None:
        self.status = to_status

    @event("IncidentCommented")
    def _commented(self, author: str, body: str) -> None:
        self.comments += 1
