"""The WebhookSubscription aggregate: a target URL, what it wants, its signing secret's
generation, and its life cycle.

    active <-> paused          active -> failing (a delivery parked)  -> active (resume)
    active -> disabled (410)   -> active (resume)       any -> deleted (accepts nothing)

The signing secret itself is never in an event: it is derived from the server's key,
the tenant, the subscription and the secret's generation (the version of the event that
issued it: 1 at registration, a rotation's own version; `commands.webhooks.signing`), so
the log holds nothing a reader could sign with, and a retried register or rotate answers
the same secret. A rotation keeps the previous generation valid until `previous_until`.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from uuid import UUID

from eventsourcing.domain import event

from commands.webhooks.signing import check_target_shape
from shared_kernel.clock import now
from shared_kernel.domain import AggregateRoot, InvalidCommand, InvariantViolation, required_text

STATUSES = ("active", "paused", "failing", "disabled", "deleted")
MAX_FILTERS = 50
MAX_OVERLAP_S = 30 * 86_400


class WebhookSubscription(AggregateRoot):
    """A webhook subscription of one tenant."""

    # ---- decide -------------------------------------------------------------

    @classmethod
    def register(
        cls,
        webhook_id: UUID,
        url: str,
        contexts: tuple[str, ...],
        event_types: tuple[str, ...],
        description: str,
        known_contexts: tuple[str, ...],
        known_event_types: tuple[str, ...],
    ) -> WebhookSubscription:
        target = check_target_shape(url)
        for name, values, known in (
            ("contexts", contexts, known_contexts),
            ("event_types", event_types, known_event_types),
        ):
            if len(values) > MAX_FILTERS:
                raise InvalidCommand(f"{name} has at most {MAX_FILTERS} entries", field=name)
            unknown = sorted(set(values) - set(known))
            if unknown:
                raise InvalidCommand(
                    f"{name}: unknown {', '.join(unknown)}; known: {', '.join(known)}", field=name
                )
        return cls(
            id=webhook_id,
            url=target,
            contexts=sorted(set(contexts)),
            event_types=sorted(set(event_types)),
            description=description.strip(),
        )

    def pause(self, reason: str) -> None:
        self._check_not_deleted()
        if self.status == "paused":
            raise InvariantViolation("the webhook is paused already", status=self.status)
        self._paused(reason=reason.strip())

    def resume(self) -> None:
        self._check_not_deleted()
        if self.status == "active":
            raise InvariantViolation("the webhook is active already", status=self.status)
        self._resumed(from_status=self.status)

    def rotate_secret(self, overlap_s: int, at: datetime | None = None) -> None:
        self._check_not_deleted()
        if not 0 <= overlap_s <= MAX_OVERLAP_S:
            raise InvalidCommand(f"overlap_s must be between 0 and {MAX_OVERLAP_S}", field="overlap_s")
        until = (at or now()) + timedelta(seconds=overlap_s)
        # the generation is the version of this event: the rotate command's answer names it
        self._secret_rotated(
            generation=self.version + 1,
            previous_generation=self.secret_generation,
            previous_until=until.isoformat(),
        )

    def delete(self) -> None:
        self._check_not_deleted()
        self._deleted()

    def mark_failing(self, reason: str, since: str) -> None:
        self._check_not_deleted()
        if self.status != "active":
            raise InvariantViolation(
                f"only an active webhook can fail; it is {self.status}", status=self.status
            )
        self._failing(reason=required_text(reason, "reason")[:2000], since=since)

    def disable(self, reason: str) -> None:
        self._check_not_deleted()
        if self.status == "disabled":
            raise InvariantViolation("the webhook is disabled already", status=self.status)
        self._disabled(reason=required_text(reason, "reason")[:2000])

    def _check_not_deleted(self) -> None:
        if self.status == "deleted":
            raise InvariantViolation("the webhook is deleted", status="deleted", allowed=[])

    # ---- evolve -------------------------------------------------------------

    @event("WebhookRegistered")
    def __init__(
        self, id: UUID, url: str, contexts: list[str], event_types: list[str], description: str
    ) -> None:
        self.url = url
        self.contexts = contexts
        self.event_types = event_types
        self.description = description
        self.status = "active"
        self.secret_generation = 1
        self.previous_until: str | None = None

    @event("WebhookPaused")
    def _paused(self, reason: str) -> None:
        self.status = "paused"

    @event("WebhookResumed")
    def _resumed(self, from_status: str) -> None:
        self.status = "active"

    @event("WebhookSecretRotated")
    def _secret_rotated(self, generation: int, previous_generation: int, previous_until: str) -> None:
        self.secret_generation = generation
        self.previous_until = previous_until

    @event("WebhookDeleted")
    def _deleted(self) -> None:
        self.status = "deleted"

    @event("WebhookFailing")
    def _failing(self, reason: str, since: str) -> None:
        self.status = "failing"

    @event("WebhookDisabled")
    def _disabled(self, reason: str) -> None:
        self.status = "disabled"
