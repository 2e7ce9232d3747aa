"""Events as a projection receives them, made by the real write side: commands decided by
the aggregate (`decide`), encoded as the processor encodes them (`to_record`: Avro and
headers), and decoded as the projector decodes them (`projections.events.decode`)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson

from commands.context import BoundedContext, command_payload
from commands.decide import decide
from commands.serialization import to_record
from projections.events import Record, StoredEvent, decode
from shared_kernel.avro import AvroCodec
from shared_kernel.clock import fixed_clock, using_clock
from shared_kernel.domain import AggregateRoot
from shared_kernel.envelope import CommandEnvelope

T0 = datetime(2026, 3, 4, 5, 6, 7, tzinfo=UTC)
CODEC = AvroCodec.from_directory()


class History:
    """One aggregate's life: each `then` decides a command a minute after the last and
    keeps its events, at the next offsets of partition 0 of `<prefix>.events.<context>`."""

    def __init__(self, context: BoundedContext, prefix: str = "unit") -> None:
        self.context = context
        self.topic = f"{prefix}.events.{context.name}"
        self.aggregate: AggregateRoot | None = None
        self.events: list[StoredEvent] = []
        self.at = T0

    def then(self, *commands: Any) -> History:
        for command in commands:
            payload = orjson.loads(orjson.dumps(command_payload(command)))
            with using_clock(fixed_clock(self.at)):
                self.aggregate, events = decide(
                    self.context, self.aggregate, self.context.command_type(command), payload
                )
            envelope = CommandEnvelope(
                command_id=str(uuid.uuid4()),
                command_type=self.context.command_type(command),
                aggregate_id=str(self.aggregate.id),
                payload=payload,
                actor="alice",
                tenant="acme",
            )
            for event in events:
                record = to_record(self.context, CODEC, event, envelope)
                self.events.append(
                    decode(
                        CODEC,
                        Record(
                            topic=self.topic,
                            partition=0,
                            offset=len(self.events),
                            key=record.key,
                            value=record.value,
                            headers=record.headers,
                            timestamp_ms=int(self.at.timestamp() * 1000),
                        ),
                    )
                )
            self.at += timedelta(minutes=1)
        return self

    def time(self, n: int) -> datetime:
        """When the n-th command (from 0) was decided."""
        return T0 + timedelta(minutes=n)
