"""Events as the read side sees them: decoded from the topic, with their position."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from shared_kernel.avro import AvroCodec
from shared_kernel.envelope import EventMetadata


@dataclass(frozen=True, slots=True)
class Record:
    """A Kafka record as the read side needs it (made from aiokafka's or Faust's)."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: Sequence[tuple[str, bytes]]
    timestamp_ms: int


@dataclass(frozen=True)
class StoredEvent:
    topic: str
    partition: int
    offset: int
    context: str
    type_name: str  # the Avro full name, e.g. datasets.DatasetRegistered
    payload: dict[str, Any]
    meta: EventMetadata
    headers: Sequence[tuple[str, bytes]] = ()  # as the record carried them
    timestamp_ms: int = 0  # the record's

    @property
    def name(self) -> str:
        return self.type_name.rpartition(".")[2]

    @property
    def version(self) -> int:
        return self.meta.aggregate_version


def decode(codec: AvroCodec, record: Record) -> StoredEvent:
    """Raises on anything that is not a well-formed event: the caller dead-letters it."""
    if record.value is None:
        raise ValueError("a record without a value")
    type_name, payload = codec.decode(record.value)
    meta = EventMetadata.from_headers(record.headers)
    if meta.event_type != type_name:
        raise ValueError(f"header event-type {meta.event_type!r} but the record is a {type_name}")
    return StoredEvent(
        topic=record.topic,
        partition=record.partition,
        offset=record.offset,
        context=type_name.partition(".")[0],
        type_name=type_name,
        payload=payload,
        meta=meta,
        headers=record.headers,
        timestamp_ms=record.timestamp_ms,
    )


def event_document(
    meta: EventMetadata, payload: dict[str, Any], topic: str, partition: int, offset: int, timestamp_ms: int
) -> dict[str, Any]:
    """An event as the subscriptions and the webhooks show it (without `type` and `id`,
    which each of them sets): type, aggregate, context, metadata, payload, position."""
    return {
        "event_type": meta.event_type,
        "aggregate_id": meta.aggregate_id,
        "aggregate_version": meta.aggregate_version,
        "context": meta.event_type.partition(".")[0],
        "metadata": {
            "event_id": meta.event_id,
            "aggregate_type": meta.aggregate_type,
            "occurred_at": meta.occurred_at,
            "correlation_id": meta.correlation_id,
            "causation_id": meta.causation_id,
            "actor": meta.actor,
            "tenant": meta.tenant,
            "traceparent": meta.traceparent,
        },
        "payload": payload,
        "record": {"topic": topic, "partition": partition, "offset": offset, "timestamp": timestamp_ms},
    }
