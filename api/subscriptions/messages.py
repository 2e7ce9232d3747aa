"""The wire format of subscriptions, and the positions their ids encode.

Every message is one JSON object with `type` (`subscribed`, `event`, `heartbeat`,
`error`) and `id`: a position token (`shared_kernel.position`) over every partition
of the stream's topics, giving for each the offset of the next record the client has
not been offered. Resuming from an id, or waiting for it as a read-your-writes token,
is exact. An event also carries its type, aggregate id and version, context,
metadata (the Kafka headers), payload (the Avro record) and where it sits in the log:

    {"type": "event", "id": "eyJ...", "event_type": "incidents.IncidentOpened",
     "aggregate_id": "...", "aggregate_version": 1, "context": "incidents",
     "metadata": {"event_id": "...", "occurred_at": "...", "actor": "...", ...},
     "payload": {...},
     "record": {"topic": "...", "partition": 2, "offset": 17, "timestamp": 1795000000000}}

Over SSE the same object is the `data:` of a frame whose `id:` is the message id;
events have no `event:` line (EventSource's default `message`), the others name their
type. Over WebSocket it is one text frame.

An event's JSON is built once per record and shared by every subscriber whose
position it agrees with; only the id differs between subscribers that resumed from
different places, and it is spliced in front of the shared body.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import orjson
from aiokafka.partitioner import murmur2
from aiokafka.structs import ConsumerRecord

from projections.events import event_document
from shared_kernel.avro import AvroCodec, SchemaError
from shared_kernel.envelope import (
    H_AGGREGATE_ID,
    H_EVENT_TYPE,
    H_TENANT,
    H_TRACEPARENT,
    EventMetadata,
    MalformedRecord,
)
from shared_kernel.position import PositionToken

log = logging.getLogger(__name__)


class Layout:
    """The partitions of the events topics in a fixed order: a position is a list over it."""

    def __init__(self, partitions: Mapping[str, Iterable[int]]) -> None:
        self.tps: list[tuple[str, int]] = [(t, p) for t in sorted(partitions) for p in sorted(partitions[t])]
        self.index: dict[tuple[str, int], int] = {tp: i for i, tp in enumerate(self.tps)}
        self._count = {t: len(list(ps)) for t, ps in partitions.items()}

    def __len__(self) -> int:
        return len(self.tps)

    def indices(self, topics: Iterable[str]) -> tuple[int, ...]:
        wanted = set(topics)
        return tuple(i for i, (t, _) in enumerate(self.tps) if t in wanted)

    def vector(self, token: PositionToken) -> list[int]:
        """The token's offsets over this layout; 0 (the beginning) where it names nothing."""
        return [token.offsets.get(t, {}).get(p, 0) for t, p in self.tps]

    def token(self, values: Sequence[int], indices: Iterable[int]) -> str:
        offsets: dict[str, dict[int, int]] = {}
        for i in indices:
            topic, partition = self.tps[i]
            offsets.setdefault(topic, {})[partition] = values[i]
        return PositionToken(offsets).encode()

    def partition_of(self, topic: str, aggregate_id: str) -> int:
        """Where the write side puts an aggregate's events: the producer's default
        partitioner on the aggregate id (same key, same partition)."""
        return int(murmur2(aggregate_id.encode()) & 0x7FFFFFFF) % self._count[topic]


class Message:
    """One message to a subscriber, encoded once for both transports."""

    __slots__ = ("_sse", "_text", "id", "json", "kind", "traceparent")

    def __init__(self, kind: str, id: str, json: bytes, traceparent: str = "") -> None:
        self.kind, self.id, self.json = kind, id, json
        self.traceparent = traceparent  # the event's trace (its delivery is a span in it)
        self._sse: bytes | None = None
        self._text: str | None = None

    @classmethod
    def event(cls, id: str, rest: bytes, traceparent: str = "") -> Message:
        return cls("event", id, b'{"type":"event","id":"' + id.encode() + b'",' + rest, traceparent)

    @classmethod
    def control(cls, kind: str, id: str, **fields: Any) -> Message:
        return cls(kind, id, orjson.dumps({"type": kind, "id": id, **fields}))

    @property
    def sse(self) -> bytes:
        if self._sse is None:
            head = b"" if self.kind == "event" else b"event: " + self.kind.encode() + b"\n"
            self._sse = head + b"id: " + self.id.encode() + b"\ndata: " + self.json + b"\n\n"
        return self._sse

    @property
    def text(self) -> str:
        if self._text is None:
            self._text = self.json.decode()
        return self._text


class LogEvent:
    """One record of an events topic, decoded only as far as someone needs it."""

    __slots__ = (
        "_rest",
        "_shared",
        "aggregate_id",
        "event_type",
        "index",
        "offset",
        "record",
        "snap",
        "tenant",
        "topic",
        "traceparent",
    )

    def __init__(self, record: ConsumerRecord[bytes, bytes], index: int) -> None:
        self.record, self.index = record, index
        self.topic: str = record.topic
        self.offset: int = record.offset
        self.event_type = self.aggregate_id = self.tenant = self.traceparent = ""
        for key, value in record.headers:
            if key == H_EVENT_TYPE:
                self.event_type = value.decode(errors="replace")
            elif key == H_AGGREGATE_ID:
                self.aggregate_id = value.decode(errors="replace")
            elif key == H_TENANT:
                self.tenant = value.decode(errors="replace")
            elif key == H_TRACEPARENT:
                self.traceparent = value.decode(errors="replace")
        self.snap: tuple[int, ...] = ()  # the live feed's position just after this record
        self._rest: bytes | None = None
        self._shared: dict[tuple[int, ...], Message] = {}

    def rest(self, codec: AvroCodec) -> bytes | None:
        """The event's JSON after `"id"`, or None when the record cannot be read."""
        if self._rest is None:
            r = self.record
            try:
                meta = EventMetadata.from_headers(r.headers)
                _, payload = codec.decode(r.value or b"")
            except (MalformedRecord, SchemaError) as exc:
                log.warning(
                    "an events record cannot be read; subscribers skip it",
                    extra={"topic": r.topic, "partition": r.partition, "offset": r.offset, "error": str(exc)},
                )
                self._rest = b""
                return None
            doc = event_document(meta, payload, r.topic, r.partition, r.offset, r.timestamp)
            self._rest = orjson.dumps(doc, default=str)[1:]
        return self._rest or None

    def shared(self, layout: Layout, indices: tuple[int, ...], codec: AvroCodec) -> Message | None:
        """The message every subscriber over `indices` whose position is the feed's gets."""
        message = self._shared.get(indices)
        if message is None:
            rest = self.rest(codec)
            if rest is None:
                return None
            message = self._shared[indices] = Message.event(
                layout.token(self.snap, indices), rest, self.traceparent
            )
        return message
