"""The audit sink: records of `<prefix>.audit` (api.auth.audit) into PostgreSQL's
`audit_log`, where `GET /api/v1/admin/audit` reads them.

Its own consumer group (`<prefix>.audit-sink`). Each batch is inserted, then its
offsets committed: a crash in between inserts the batch again, and `ON CONFLICT (id)
DO NOTHING` makes that a no-op, so each record is in the table once. A record that is
not an audit record goes to `<prefix>.dlq.audit-sink` and the rest flows; an outage
of PostgreSQL is waited out (nothing committed, the batch is retried).
`cqrs run projectors` runs it beside the projections; `cqrs run audit-sink` alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import datetime
from typing import Any
from uuid import UUID

import asyncpg
import orjson
from aiokafka import ConsumerRecord
from aiokafka.errors import KafkaError

from api.auth.audit import audit_topic
from commands.transaction import dead_letter
from projections.db import create_pool
from projections.migrations import migrate
from shared_kernel import kafka
from shared_kernel.settings import Settings
from shared_kernel.topics import Topics, dlq_topic, ensure_topics

log = logging.getLogger(__name__)

CONSUMER = "audit-sink"
COLUMNS = (
    "id",
    "at",
    "tenant",
    "actor",
    "credential",
    "method",
    "route",
    "aggregate_id",
    "command_id",
    "outcome",
    "status",
    "reason",
    "client_ip",
    "user_agent",
    "correlation_id",
)
INSERT = (
    f"INSERT INTO audit_log ({', '.join(COLUMNS)}) "
    f"VALUES ({', '.join(f'${i + 1}' for i in range(len(COLUMNS)))}) ON CONFLICT (id) DO NOTHING"
)


def row_of(value: bytes | None) -> tuple[Any, ...]:
    """The table row of one record; ValueError (or KeyError, TypeError) when it is none."""
    raw = orjson.loads(value or b"")
    if not isinstance(raw, dict):
        raise ValueError("not an object")
    row: list[Any] = [UUID(raw["id"]), datetime.fromisoformat(raw["at"])]
    for name in COLUMNS[2:]:
        v = raw.get(name, 0 if name == "status" else "")
        row.append(int(v) if name == "status" else str(v).replace("\x00", ""))
    if row[1].tzinfo is None:
        raise ValueError("`at` has no zone")
    if not 0 <= row[COLUMNS.index("status")] < 1000:
        raise ValueError("`status` is no HTTP status")
    return tuple(row)


class AuditSink:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.topic = audit_topic(settings)
        self.written = 0

    async def run(self, stop: asyncio.Event) -> None:
        await migrate(self.settings)
        await ensure_topics(self.settings, [dlq_topic(self.settings, CONSUMER)])
        pool = await create_pool(self.settings, "audit-sink", min_size=1, max_size=2)
        consumer = kafka.consumer(
            self.settings, self.topic, group_id=f"{self.settings.topic_prefix}.{CONSUMER}"
        )
        producer = kafka.producer(self.settings)
        await consumer.start()
        await producer.start()
        log.info("audit sink started", extra={"topic": self.topic})
        try:
            while not stop.is_set():
                batch = await consumer.getmany(timeout_ms=1000, max_records=1000)
                records = [r for rs in batch.values() for r in rs]
                if not records:
                    continue
                await self._write(pool, producer, records, stop)
                with contextlib.suppress(KafkaError):  # a failed commit re-inserts: a no-op
                    await consumer.commit()
        finally:
            await consumer.stop()
            await producer.stop()
            await pool.close()

    async def _write(
        self,
        pool: asyncpg.Pool,
        producer: Any,
        records: list[ConsumerRecord[bytes, bytes]],
        stop: asyncio.Event,
    ) -> None:
        rows, poison = [], []
        for record in records:
            try:
                rows.append(row_of(record.value))
            except (ValueError, KeyError, TypeError) as exc:
                poison.append((record, f"not an audit record: {exc!r}"))
        dlq = Topics(self.settings.topic_prefix).dlq(CONSUMER)
        for record, error in poison:
            value, headers = dead_letter(record, error, self.settings.kafka_max_message_bytes)
            await producer.send_and_wait(dlq, value, key=record.key, headers=headers)
            log.warning("audit record dead-lettered", extra={"error": error, "offset": record.offset})
        delay = 0.5
        while rows:
            try:
                await pool.executemany(INSERT, rows)
                self.written += len(rows)
                return
            except (OSError, asyncpg.PostgresConnectionError, asyncpg.CannotConnectNowError) as exc:
                if stop.is_set():
                    raise
                log.warning("audit records not written yet; retrying", extra={"error": repr(exc)})
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10)
