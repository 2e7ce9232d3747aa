"""The three records that cross process boundaries on the write path.

- `EventMetadata`: what travels in Kafka headers beside every Avro event.
- `CommandEnvelope`: a command on `<prefix>.commands` (JSON), keyed by aggregate id.
- `CommandResult`: the outcome the processor returns to the waiting API and caches.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal
from uuid import UUID

import orjson

Headers = list[tuple[str, bytes]]

H_EVENT_ID = "event-id"
H_EVENT_TYPE = "event-type"
H_AGGREGATE_TYPE = "aggregate-type"
H_AGGREGATE_ID = "aggregate-id"
H_AGGREGATE_VERSION = "aggregate-version"
H_OCCURRED_AT = "occurred-at"
H_CORRELATION_ID = "correlation-id"
H_CAUSATION_ID = "causation-id"
H_ACTOR = "actor"
H_TENANT = "tenant"
H_TRACEPARENT = "traceparent"
H_CONTENT_TYPE = "content-type"
AVRO_CONTENT_TYPE = b"application/vnd.apache.avro+binary; encoding=single-object"


class MalformedRecord(ValueError):
    """A record's headers or body cannot be read as this envelope."""


@dataclass(frozen=True, slots=True)
class EventMetadata:
    """Identity and provenance of one event (Kafka headers)."""

    event_id: UUID
    event_type: str
    aggregate_type: str
    aggregate_id: str
    aggregate_version: int
    occurred_at: datetime
    correlation_id: str
    causation_id: str
    actor: str = ""
    tenant: str = ""
    traceparent: str = ""

    def to_headers(self) -> Headers:
        return [
            (H_EVENT_ID, str(self.event_id).encode()),
            (H_EVENT_TYPE, self.event_type.encode()),
            (H_AGGREGATE_TYPE, self.aggregate_type.encode()),
            (H_AGGREGATE_ID, self.aggregate_id.encode()),
            (H_AGGREGATE_VERSION, str(self.aggregate_version).encode()),
            (H_OCCURRED_AT, self.occurred_at.isoformat().encode()),
            (H_CORRELATION_ID, self.correlation_id.encode()),
            (H_CAUSATION_ID, self.causation_id.encode()),
            (H_ACTOR, self.actor.encode()),
            (H_TENANT, self.tenant.encode()),
            (H_TRACEPARENT, self.traceparent.encode()),
            (H_CONTENT_TYPE, AVRO_CONTENT_TYPE),
        ]

    @classmethod
    def from_headers(cls, headers: Iterable[tuple[str, bytes]]) -> EventMetadata:
        h = {k: v.decode() for k, v in headers}
        try:
            return cls(
                event_id=UUID(h[H_EVENT_ID]),
                event_type=h[H_EVENT_TYPE],
                aggregate_type=h[H_AGGREGATE_TYPE],
                aggregate_id=h[H_AGGREGATE_ID],
                aggregate_version=int(h[H_AGGREGATE_VERSION]),
                occurred_at=datetime.fromisoformat(h[H_OCCURRED_AT]),
                correlation_id=h.get(H_CORRELATION_ID, ""),
                causation_id=h.get(H_CAUSATION_ID, ""),
                actor=h.get(H_ACTOR, ""),
                tenant=h.get(H_TENANT, ""),
                traceparent=h.get(H_TRACEPARENT, ""),
            )
        except (KeyError, ValueError) as exc:
            raise MalformedRecord(f"event headers incomplete or invalid: {exc}") from exc


@dataclass(frozen=True, slots=True)
class CommandEnvelope:
    """A command addressed to one aggregate, as produced to `<prefix>.commands`."""

    command_id: str
    command_type: str
    aggregate_id: str
    payload: Mapping[str, Any]
    expected_version: int | None = None
    actor: str = ""
    tenant: str = ""
    correlation_id: str = ""
    traceparent: str = ""
    reply_to: str = ""
    fingerprint: str = ""
    issued_at: str = ""
    # The client can send it again under this id (it chose the id: an Idempotency-Key, or
    # it was given a status URL): its result is cached. A command sent without a key is
    # answered once, on its connection, and never looked up.
    retriable: bool = True

    def to_bytes(self) -> bytes:
        # orjson writes a dataclass itself, fields in order: as asdict would give them,
        # without its deep copy of every value (most of the cost, measured in S1)
        return orjson.dumps(self)

    @classmethod
    def from_bytes(cls, data: bytes) -> CommandEnvelope:
        try:
            raw = orjson.loads(data)
            return cls(**raw)
        except (orjson.JSONDecodeError, TypeError) as exc:
            raise MalformedRecord(f"not a command envelope: {exc}") from exc


@dataclass(frozen=True, slots=True)
class CommandResult:
    """The outcome of one command, identical for every retry of the same command id."""

    command_id: str
    status: Literal["accepted", "rejected"]
    aggregate_id: str
    version: int | None = None
    position: str = ""
    events: int = 0
    code: str = ""
    reason: str = ""
    current_version: int | None = None
    fingerprint: str = ""
    details: Mapping[str, Any] = field(default_factory=dict)
    tenant: str = ""  # of the caller: results are kept per tenant (an Idempotency-Key is the tenant's)

    @property
    def accepted(self) -> bool:
        return self.status == "accepted"

    def to_bytes(self) -> bytes:
        return orjson.dumps(self, default=str)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> CommandResult:
        return cls(**raw)

    @classmethod
    def from_bytes(cls, data: bytes | str) -> CommandResult:
        return cls.from_dict(orjson.loads(data))
