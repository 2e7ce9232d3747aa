"""Domain building blocks shared by every bounded context.

Aggregates are `eventsourcing` aggregates whose events are stamped by our clock.
Domain errors form one hierarchy; each carries a stable `code` that the edges map to
HTTP statuses (api) or rejection reasons (command processor) in one place.
"""

from __future__ import annotations

from typing import Any, ClassVar

from eventsourcing.domain import Aggregate

from shared_kernel.clock import now


class DomainError(Exception):
    """A command was refused by the domain."""

    code: ClassVar[str] = "domain_error"

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details = details


class InvariantViolation(DomainError):
    """The command would break a rule of the aggregate (archived, invalid transition, ...)."""

    code = "invariant_violation"


class InvalidCommand(DomainError):
    """The command's own values are invalid, whatever the aggregate's state."""

    code = "invalid_command"


class NotFound(DomainError):
    """Something the command names does not exist."""

    code = "not_found"


class AggregateNotFound(NotFound):
    pass


class AggregateAlreadyExists(DomainError):
    code = "already_exists"


class VersionConflict(DomainError):
    """The caller expected another version than the current one."""

    code = "version_conflict"


class AggregateRoot(Aggregate):
    """Base of every aggregate: events take their time from the clock in force."""

    class Event(Aggregate.Event):
        create_timestamp = staticmethod(now)

    class Created(Event, Aggregate.Created):
        pass

    def state(self) -> dict[str, Any]:
        """The aggregate as a client may see it: identity, version, times, public fields."""
        public = {k: v for k, v in vars(self).items() if not k.startswith("_")}
        return {
            "id": self.id,
            "version": self.version,
            "created_at": self.created_on,
            "updated_at": self.modified_on,
            **public,
        }


def required_text(value: str, field: str) -> str:
    """The stripped text, or an InvalidCommand naming the field when it is blank."""
    text = value.strip()
    if not text:
        raise InvalidCommand(f"{field} must not be blank", field=field)
    return text


EVENT_ENVELOPE_FIELDS = frozenset({"originator_id", "originator_version", "timestamp", "originator_topic"})


def event_payload(event: Any) -> dict[str, Any]:
    """The business fields of an event (everything but id, version, time and topic)."""
    return {k: v for k, v in vars(event).items() if k not in EVENT_ENVELOPE_FIELDS}
