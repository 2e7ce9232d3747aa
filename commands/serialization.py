"""Domain events <-> Kafka records (Avro value + metadata headers)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from uuid import UUID, uuid5

from eventsourcing.utils import get_topic

from commands.context import BoundedContext
from shared_kernel.avro import AvroCodec
from shared_kernel.domain import event_payload
from shared_kernel.envelope import CommandEnvelope, EventMetadata, Headers

# Event ids are derived from (command id, version): a re-decided command after a
# crash yields the very same ids, which makes duplicates detectable downstream.
EVENT_ID_NAMESPACE = UUID("6f1c8a3e-2b7d-4c1e-9a55-0d3b8e7f4a21")


@dataclass(frozen=True, slots=True)
class EventRecord:
    key: bytes
    value: bytes
    headers: Headers
    metadata: EventMetadata


def to_record(context: BoundedContext, codec: AvroCodec, event: Any, command: CommandEnvelope) -> EventRecord:
    type_name = context.event_type(event)
    aggregate_id = str(event.originator_id)
    metadata = EventMetadata(
        event_id=uuid5(EVENT_ID_NAMESPACE, f"{command.command_id}/{aggregate_id}/{event.originator_version}"),
        event_type=type_name,
        aggregate_type=context.aggregate_type,
        aggregate_id=aggregate_id,
        aggregate_version=event.originator_version,
        occurred_at=event.timestamp,
        correlation_id=command.correlation_id or command.command_id,
        causation_id=command.command_id,
        actor=command.actor,
        tenant=command.tenant,
        traceparent=command.traceparent,
    )
    value = codec.encode(type_name, event_payload(event))
    return EventRecord(aggregate_id.encode(), value, metadata.to_headers(), metadata)


def to_domain_event(context: BoundedContext, metadata: EventMetadata, payload: dict[str, Any]) -> Any:
    """Rebuild the domain event (for replaying state with the aggregate's own code)."""
    cls = context.events[metadata.event_type]
    fields = {
        "originator_id": UUID(metadata.aggregate_id),
        "originator_version": metadata.aggregate_version,
        "timestamp": metadata.occurred_at,
        **payload,
    }
    if "originator_topic" in getattr(cls, "__dataclass_fields__", {}):
        fields["originator_topic"] = get_topic(context.aggregate)
    return cls(**fields)
