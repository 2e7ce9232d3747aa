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
    )
