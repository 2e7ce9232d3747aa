"""What the consumers dead-lettered: every consumer that dead-letters writes to
`<prefix>.dlq.<consumer>` (the command processor, each projection, each stream job, the
audit sink), the record's key and value as they were, with the reason (`dlq-error`) and
where it came from (`dlq-source`, `topic:partition:offset`) in its headers.

`listing` reads the newest of them (per consumer, every partition, newest first; with a
key, only that key's, looking back at most `SCAN` records per partition); `one` reads one
and decodes what it can: an event's Avro payload and headers, a command's JSON.
"""

from __future__ import annotations

import base64
import contextlib
import functools
from datetime import UTC, datetime
from typing import Any

import orjson
from aiokafka.structs import ConsumerRecord, TopicPartition

from shared_kernel import kafka
from shared_kernel.avro import AvroCodec
from shared_kernel.settings import Settings
from shared_kernel.topics import Topics

SCAN = 10_000  # records per partition looked at for a key
PREVIEW_BYTES = 256


@functools.cache
def _codec() -> AvroCodec:
    """The schemas, parsed once per process (not per dead letter read)."""
    return AvroCodec.from_directory()


def consumers() -> list[str]:
    """Every consumer that dead-letters, each to `<prefix>.dlq.<consumer>`."""
    from commands.processor import CONSUMER_NAME
    from projections.registry import PROJECTIONS
    from streams.audit import CONSUMER as AUDIT_SINK
    from streams.registry import JOBS

    return [CONSUMER_NAME, *sorted(PROJECTIONS), *(f"job-{name}" for name in sorted(JOBS)), AUDIT_SINK]


def _headers(record: ConsumerRecord[bytes, bytes]) -> dict[str, str]:
    return {k: v.decode(errors="replace") for k, v in (record.headers or [])}


def summary(consumer: str, record: ConsumerRecord[bytes, bytes]) -> dict[str, Any]:
    h = _headers(record)
    return {
        "consumer": consumer,
        "partition": record.partition,
        "offset": record.offset,
        "at": datetime.fromtimestamp(record.timestamp / 1000, UTC).isoformat(),
        "key": record.key.decode(errors="replace") if record.key is not None else None,
        "error": h.get("dlq-error", ""),
        "source": h.get("dlq-source", ""),
        "event_type": h.get("event-type"),
        "aggregate_id": h.get("aggregate-id"),
        "tenant": h.get("tenant"),
    }


def decoded(codec: AvroCodec, record: ConsumerRecord[bytes, bytes]) -> dict[str, Any]:
    """The record's value as far as it can be read: an Avro event, a JSON document, or
    the first bytes (base64)."""
    value = record.value
    if value is None:
        return {"kind": "none", "size": 0}
    with contextlib.suppress(Exception):
        type_name, payload = codec.decode(value)
        return {"kind": "avro", "type": type_name, "payload": payload, "size": len(value)}
    with contextlib.suppress(orjson.JSONDecodeError):
        return {"kind": "json", "document": orjson.loads(value), "size": len(value)}
    return {"kind": "bytes", "base64": base64.b64encode(value[:PREVIEW_BYTES]).decode(), "size": len(value)}


async def _read(settings: Settings, topic: str, back: int) -> list[ConsumerRecord[bytes, bytes]]:
    """The last `back` records of each partition of `topic` (none if it does not exist)."""
    consumer = kafka.consumer(settings)
    await consumer.start()
    try:
        parts = await kafka.partitions_of(consumer, topic)
        if not parts:
            return []
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        begins = await consumer.beginning_offsets(tps)
        ends = await consumer.end_offsets(tps)
        consumer.assign(tps)
        out: list[ConsumerRecord[bytes, bytes]] = []
        for tp in tps:
            if ends[tp] <= begins[tp]:
                continue
            consumer.seek(tp, max(begins[tp], ends[tp] - back))
            while await consumer.position(tp) < ends[tp]:
                batch = await consumer.getmany(tp, timeout_ms=1000)
                out.extend(r for r in batch.get(tp, []) if r.offset < ends[tp])
        return out
    finally:
        await consumer.stop()


async def listing(
    settings: Settings,
    consumer: str | None = None,
    key: str | None = None,
    limit: int = 50,
    scan: bool = False,
) -> dict[str, Any]:
    """The newest dead letters (of one consumer, or of all), newest first; looking back
    `SCAN` records per partition when `key` is given or `scan` asked for (the caller
    filters them further), else `limit`."""
    topics = Topics(settings.topic_prefix)
    names = [consumer] if consumer else consumers()
    items: list[dict[str, Any]] = []
    for name in names:
        records = await _read(settings, topics.dlq(name), SCAN if key or scan else limit)
        for r in records:
            if key is None or (r.key is not None and r.key.decode(errors="replace") == key):
                items.append(summary(name, r))
    items.sort(key=lambda d: (d["at"], d["offset"]), reverse=True)
    return {"items": items if scan else items[:limit], "consumers": names}


async def one(settings: Settings, consumer: str, partition: int, offset: int) -> dict[str, Any] | None:
    """One dead letter, decoded as far as it can be, or None."""
    topic = Topics(settings.topic_prefix).dlq(consumer)
    reader = kafka.consumer(settings)
    await reader.start()
    try:
        tp = TopicPartition(topic, partition)
        if partition not in await kafka.partitions_of(reader, topic):
            return None
        begin = (await reader.beginning_offsets([tp]))[tp]
        end = (await reader.end_offsets([tp]))[tp]
        if not begin <= offset < end:
            return None
        reader.assign([tp])
        reader.seek(tp, offset)
        while await reader.position(tp) < end:
            batch = await reader.getmany(tp, timeout_ms=1000)
            for r in batch.get(tp, []):
                if r.offset == offset:
                    return {
                        **summary(consumer, r),
                        "headers": _headers(r),
                        "value": decoded(_codec(), r),
                    }
                if r.offset > offset:
                    return None  # a transaction marker or an aborted record
        return None
    finally:
        await reader.stop()
