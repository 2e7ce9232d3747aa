"""Applies batches of event records to one projection: one PostgreSQL transaction each,
with the projection's positions, its counters and nothing else.

Records that cannot be decoded, or whose batch the projection rejects, go to
`<prefix>.dlq.<projection>` with the error in headers; the rest of the batch is applied.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import asyncpg
import opensearchpy
from aiokafka import AIOKafkaProducer

from projections.changes import channel, notify_applied, queue_full
from projections.db import schema_of
from projections.events import Record, StoredEvent, decode
from projections.projection import Projection
from projections.search import BulkItemFailed
from shared_kernel import metrics, tracing
from shared_kernel.avro import AvroCodec
from shared_kernel.topics import Topics

log = logging.getLogger(__name__)


@dataclass
class Decoded:
    events: list[StoredEvent] = field(default_factory=list)
    dead: list[tuple[Record, str]] = field(default_factory=list)


@dataclass
class BatchOutcome:
    applied: int = 0
    dead: list[tuple[Record, str]] = field(default_factory=list)
    sent: int = 0  # how many of `dead` are on the dead-letter topic already


class Projector:
    def __init__(
        self,
        projection: Projection,
        pool: asyncpg.Pool,
        producer: AIOKafkaProducer,
        codec: AvroCodec,
        topics: Topics,
    ) -> None:
        self.projection = projection
        self.pool = pool
        self.producer = producer
        self.codec = codec
        self.dlq_topic = topics.dlq(projection.name)
        metrics.known_consumers([projection.name])
        self.channel = channel(schema_of(topics.prefix))
        # A version being rebuilt replays events the live one has handled: it has no
        # side effects (no dead letters are produced again; they are still counted).
        self.silent = False
        # A replay far behind the head loads its batches by the projection's bulk path.
        self.bulk = False

    def decode(self, records: Sequence[Record]) -> Decoded:
        """The events of `records`, and the records that are no events (with why)."""
        decoded = Decoded()
        for r in records:
            try:
                decoded.events.append(decode(self.codec, r))
            except Exception as exc:
                decoded.dead.append((r, f"cannot decode: {type(exc).__name__}: {exc}"))
        return decoded

    async def handle(self, records: Sequence[Record], decoded: Decoded | None = None) -> BatchOutcome:
        """Apply `records` (decoded already when `decoded` is given) in one transaction:
        a span linked to the traces of its events, and one in each of them (a replay of a
        rebuild, silent or in bulk, is not traced)."""
        if decoded is None:
            decoded = self.decode(records)
        traceparents = [e.meta.traceparent for e in decoded.events if e.meta.traceparent]
        if self.silent or self.bulk or not traceparents:
            return await self._handle(records, decoded)
        name = self.projection.name
        with tracing.batch(f"projection {name}", traceparents, **{"cqrs.projection": name}):
            started = time.time_ns()
            outcome = await self._handle(records, decoded)
            tracing.in_each_trace(
                f"projection {name} applied",
                traceparents,
                started,
                time.time_ns(),
                **{"cqrs.projection": name},
            )
        return outcome

    async def _handle(self, records: Sequence[Record], decoded: Decoded) -> BatchOutcome:
        t0 = time.perf_counter()
        events = decoded.events
        outcome = BatchOutcome(dead=list(decoded.dead))
        try:
            try:
                await self._apply(events, records, outcome, bulk=self.bulk)
            except Exception as exc:
                if not self.bulk or unavailable(exc):
                    raise
                # e.g. a COPY that met a row already there: the batch again, row by row
                log.warning(
                    "bulk load failed; applying the batch the usual way",
                    extra={"projection": self.projection.name, "error": repr(exc)},
                )
                outcome.applied = 0
                await self._apply(events, records, outcome)
        except Exception as exc:
            if unavailable(exc):
                raise  # the database is away: nothing applied, the batch comes again
            # One bad event must not stop the projection: find it by applying one by one.
            log.warning(
                "batch failed; applying its events one by one",
                extra={"projection": self.projection.name, "error": repr(exc)},
            )
            outcome = BatchOutcome(dead=outcome.dead, sent=outcome.sent)
            for e in events:
                try:
                    await self._apply([e], [], outcome)
                except Exception as one_exc:
                    if unavailable(one_exc):
                        raise
                    outcome.dead.append((_record_of(records, e), f"{type(one_exc).__name__}: {one_exc}"))
            await self._apply([], records, outcome)  # positions and counters of the whole batch
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "batch applied",
                extra={
                    "projection": self.projection.name,
                    "records": len(records),
                    "dead": len(outcome.dead),
                    "ms": round((time.perf_counter() - t0) * 1000, 2),
                },
            )
        metrics.PROJECTION_APPLIED.labels(self.projection.name).inc(outcome.applied)
        return outcome

    async def _apply(
        self, events: list[StoredEvent], records: Sequence[Record], outcome: BatchOutcome, bulk: bool = False
    ) -> None:
        # Dead letters are produced before the database commits: a crash in between
        # repeats a dead letter, it never loses one.
        if records:
            for record, error in outcome.dead[outcome.sent :]:
                if self.silent:
                    log.warning(
                        "event not applied (rebuild: no dead letter produced)",
                        extra={
                            "projection": self.projection.name,
                            "version": self.projection.version,
                            "source": f"{record.topic}:{record.partition}:{record.offset}",
                            "error": error,
                        },
                    )
                    outcome.sent += 1
                    continue
                await self.producer.send_and_wait(
                    self.dlq_topic,
                    record.value,
                    key=record.key,
                    headers=[
                        *record.headers,
                        ("dlq-error", error.encode()[:4000]),
                        ("dlq-source", f"{record.topic}:{record.partition}:{record.offset}".encode()),
                        ("dlq-projection", self.projection.name.encode()),
                        ("dlq-projection-version", str(self.projection.version).encode()),
                    ],
                )
                metrics.DEAD_LETTERS.labels(self.projection.name).inc()
                log.error(
                    "event dead-lettered",
                    extra={
                        "projection": self.projection.name,
                        "source": f"{record.topic}:{record.partition}:{record.offset}",
                        "error": error,
                    },
                )
                outcome.sent += 1
        async with self.pool.acquire() as conn:
            try:
                async with conn.transaction():
                    if events:
                        if bulk:
                            await self.projection.load(conn, events)
                        else:
                            await self.projection.apply(conn, events)
                        outcome.applied += len(events)
                    ends = _ends(records)
                    if records:
                        await self._record_positions(conn, ends, outcome)
                    if events or records:
                        await notify_applied(
                            conn,
                            self.channel,
                            self.projection.name,
                            self.projection.version,
                            {k: end for k, (end, _) in ends.items()},
                            self.projection.touched(events),
                        )
            except BaseException:
                self.projection.rolled_back()
                raise
            self.projection.committed()

    async def _record_positions(
        self, conn: asyncpg.Connection, ends: dict[tuple[str, int], tuple[int, int]], outcome: BatchOutcome
    ) -> None:
        await conn.executemany(
            "INSERT INTO projection_positions "
            "(projection, version, topic, partition, next_offset, event_time, updated_at) "
            "VALUES ($1, $2, $3, $4, $5, to_timestamp($6::double precision / 1000), now()) "
            "ON CONFLICT (projection, version, topic, partition) DO UPDATE SET "
            "next_offset = GREATEST(projection_positions.next_offset, EXCLUDED.next_offset), "
            "event_time = EXCLUDED.event_time, updated_at = now()",
            [
                (self.projection.name, self.projection.version, t, p, end, ts)
                for (t, p), (end, ts) in ends.items()
            ],
        )
        last_error = outcome.dead[-1][1][:1000] if outcome.dead else None
        await conn.execute(
            "INSERT INTO projection_stats (projection, version, applied, dead_lettered, last_error) "
            "VALUES ($1, $2, $3, $4, $5) ON CONFLICT (projection, version) DO UPDATE SET "
            "applied = projection_stats.applied + EXCLUDED.applied, "
            "dead_lettered = projection_stats.dead_lettered + EXCLUDED.dead_lettered, "
            "last_error = COALESCE(EXCLUDED.last_error, projection_stats.last_error)",
            self.projection.name,
            self.projection.version,
            outcome.applied,
            len(outcome.dead),
            last_error,
        )


# PostgreSQL refusing any work for now, whatever the events: shutting down, restarting,
# a cancelled or timed-out statement, a lock not granted (class 57, 55P03), out of
# connections or resources (class 53), a transaction to retry (class 40: deadlock,
# serialization), a read-only server after a failover (25006), a table or a right
# missing (42P01, 42501: the store, not the event, is wrong). OpenSearch away, or
# answering "too busy", "not ready", "not allowed" or "no such index".
_PG_TRANSIENT = (
    asyncpg.PostgresConnectionError,
    asyncpg.OperatorInterventionError,
    asyncpg.LockNotAvailableError,
    asyncpg.InsufficientResourcesError,
    asyncpg.TransactionRollbackError,
    asyncpg.ReadOnlySQLTransactionError,
    asyncpg.UndefinedTableError,
    asyncpg.InsufficientPrivilegeError,
)
_SEARCH_BUSY = {401, 403, 404, 429, 502, 503, 504}


def unavailable(exc: BaseException) -> bool:
    """A store cannot take any batch now (away, restarting, overloaded, PostgreSQL's
    notification queue full): the batch is retried as it is, never taken apart into
    dead letters. Only an event the store refuses for what it is becomes one."""
    if isinstance(exc, (*_PG_TRANSIENT, OSError, opensearchpy.ConnectionError)):
        return True
    if isinstance(exc, opensearchpy.TransportError):
        return exc.status_code in _SEARCH_BUSY
    if isinstance(exc, BulkItemFailed):
        return exc.busy
    return queue_full(exc)


def _ends(records: Sequence[Record]) -> dict[tuple[str, int], tuple[int, int]]:
    """(topic, partition) -> (next offset, timestamp of the last record) of `records`."""
    ends: dict[tuple[str, int], tuple[int, int]] = {}
    for r in records:
        key = (r.topic, r.partition)
        if key not in ends or r.offset + 1 > ends[key][0]:
            ends[key] = (r.offset + 1, r.timestamp_ms)
    return ends


def _record_of(records: Sequence[Record], e: StoredEvent) -> Record:
    return next(
        r for r in records if r.topic == e.topic and r.partition == e.partition and r.offset == e.offset
    )
