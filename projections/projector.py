"""Applies batches of event records to one projection: one PostgreSQL transaction each,
with the projection's positions, its counters and nothing else.

Records that cannot be decoded, or that the projection rejects, go to
`<prefix>.dlq.<projection>` with the error in headers, and their key is parked: the
projection's later records of that key are held, not applied, until an operator retries
or skips the dead letter (`projections.parking`); the rest of the batch is applied.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import asyncpg
import opensearchpy
from aiokafka import AIOKafkaProducer

from projections import parking
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
    at: list[tuple[int, int] | None] = field(default_factory=list)  # where each sent one is there
    held: list[Record] = field(default_factory=list)  # records of parked keys, not applied
    was_parked: set[str] = field(default_factory=set)  # keys of `held` parked before the batch


class ParkingChanged(Exception):
    """A key this worker held records for was let go meanwhile (by another worker, after
    a rebalance): the batch is planned again with the keys parked now."""


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
        # The keys parked behind a dead letter (loaded when first needed), and one batch
        # or release at a time.
        self.parked: set[str] | None = None
        self.lock = asyncio.Lock()

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
        async with self.lock:
            for _ in range(3):
                try:
                    return await self._traced(records, decoded)
                except ParkingChanged:
                    self.parked = None
            return await self._traced(records, decoded)

    @property
    def parks(self) -> bool:
        """A version being rebuilt parks nothing (the live one does)."""
        return not self.silent

    async def _traced(self, records: Sequence[Record], decoded: Decoded) -> BatchOutcome:
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

    def _plan(self, records: Sequence[Record], decoded: Decoded) -> tuple[list[StoredEvent], BatchOutcome]:
        """The events to apply, and the records to hold (of parked keys, or behind a
        record of their key that cannot be decoded), in the batch's order."""
        outcome = BatchOutcome()
        if not self.parks or (not self.parked and not decoded.dead):
            outcome.dead = list(decoded.dead)
            return decoded.events, outcome
        assert self.parked is not None
        dead = {(r.topic, r.partition, r.offset): error for r, error in decoded.dead}
        events = {(e.topic, e.partition, e.offset): e for e in decoded.events}
        blocked = set(self.parked)
        apply: list[StoredEvent] = []
        for r in records:
            key, at = parking.key_of(r), (r.topic, r.partition, r.offset)
            if key is not None and key in blocked:
                outcome.held.append(r)
                if key in self.parked:
                    outcome.was_parked.add(key)
            elif at in dead:
                outcome.dead.append((r, dead[at]))
                if key is not None:
                    blocked.add(key)
            else:
                apply.append(events[at])
        return apply, outcome

    async def _handle(self, records: Sequence[Record], decoded: Decoded) -> BatchOutcome:
        t0 = time.perf_counter()
        if self.parks and self.parked is None:
            self.parked = await parking.parked(self.pool, self.projection.name, self.projection.version)
        events, outcome = self._plan(records, decoded)
        try:
            try:
                await self._apply(events, records, outcome, bulk=self.bulk)
            except Exception as exc:
                if not self.bulk or unavailable(exc) or isinstance(exc, ParkingChanged):
                    raise
                # e.g. a COPY that met a row already there: the batch again, row by row
                log.warning(
                    "bulk load failed; applying the batch the usual way",
                    extra={"projection": self.projection.name, "error": repr(exc)},
                )
                outcome.applied = 0
                await self._apply(events, records, outcome)
        except Exception as exc:
            if unavailable(exc) or isinstance(exc, ParkingChanged):
                raise  # the database is away: nothing applied, the batch comes again
            # One bad event must not stop the projection: find it by applying one by one;
            # the later events of its key are held behind it.
            log.warning(
                "batch failed; applying its events one by one",
                extra={"projection": self.projection.name, "error": repr(exc)},
            )
            outcome.applied = 0
            blocked = {parking.key_of(r) for r, _ in outcome.dead}
            for e in events:
                record = _record_of(records, e)
                key = parking.key_of(record)
                if self.parks and key is not None and key in blocked:
                    outcome.held.append(record)
                    continue
                try:
                    await self._apply([e], [], outcome)
                except Exception as one_exc:
                    if unavailable(one_exc):
                        raise
                    outcome.dead.append((record, f"{type(one_exc).__name__}: {one_exc}"))
                    blocked.add(key)
            await self._apply([], records, outcome)  # positions and counters of the whole batch
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "batch applied",
                extra={
                    "projection": self.projection.name,
                    "records": len(records),
                    "dead": len(outcome.dead),
                    "held": len(outcome.held),
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
                outcome.at.append(await self._dead_letter(record, error))
                outcome.sent += 1
        heads: list[parking.Head] = []
        if records and self.parks:
            heads = [
                parking.Head(r, error, *at)
                for (r, error), at in zip(outcome.dead, outcome.at, strict=True)
                if at is not None and parking.key_of(r) is not None
            ]
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
                    if outcome.was_parked and records:
                        name, version = self.projection.name, self.projection.version
                        if (
                            await parking.still_parked(conn, name, version, outcome.was_parked)
                            != outcome.was_parked
                        ):
                            raise ParkingChanged
                    if (heads or outcome.held) and records:
                        await parking.park(
                            conn, self.projection.name, self.projection.version, heads, outcome.held
                        )
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
        if heads and self.parked is not None:
            self.parked.update(k for h in heads if (k := parking.key_of(h.record)) is not None)

    async def serve_requests(self) -> int:
        """Do what operators asked of this version's parked keys (retry or skip their
        dead letter), oldest first: how many requests were done."""
        if not self.parks:
            return 0
        name, version = self.projection.name, self.projection.version
        requests = await parking.requests(self.pool, name, version)
        for request in requests:
            async with self.lock:
                await self._release(request)
        return len(requests)

    async def _release(self, request: parking.Request) -> None:
        name, version, key = self.projection.name, self.projection.version, request.key
        skip = request.action == "skip"
        async with self.pool.acquire() as conn:
            # Most often all at once: the held records in one transaction, the key locked.
            try:
                async with conn.transaction():
                    items = await parking.held(conn, name, version, key)
                    if await parking.requested(conn, name, version, key) != request.action_id:
                        return  # done already (by another worker)
                    todo = items[1:] if skip else items
                    events = [decode(self.codec, r) for _, r in todo]
                    if events:
                        await self.projection.apply(conn, events)
                    await parking.let_go(conn, name, version, key, [seq for seq, _ in items])
                    await parking.unpark(conn, name, version, key)
                    await parking.done(conn, request.action_id, "applied", len(events))
                    await notify_applied(
                        conn, self.channel, name, version, {}, self.projection.touched(events)
                    )
            except Exception as exc:
                self.projection.rolled_back()
                if unavailable(exc):
                    raise
                log.warning(
                    "released records not applied at once; one by one",
                    extra={"projection": name, "key": key, "error": repr(exc)},
                )
            else:
                self.projection.committed()
                self._released(request, len(events))
                return
            await self._release_one_by_one(conn, request)

    async def _release_one_by_one(self, conn: asyncpg.Connection, request: parking.Request) -> None:
        """Each held record in its own transaction, in order, until one fails: that one is
        the dead letter the key is parked behind now (or, on a retry, the same one)."""
        name, version, key = self.projection.name, self.projection.version, request.key
        items, drop = await parking.release_start(conn, name, version, request)
        applied = 0
        while True:
            for i, (seq, record) in enumerate(items):
                try:
                    async with conn.transaction():
                        event = decode(self.codec, record)
                        await self.projection.apply(conn, [event])
                        await parking.let_go(conn, name, version, key, [*drop, seq])
                        await notify_applied(
                            conn, self.channel, name, version, {}, self.projection.touched([event])
                        )
                except Exception as exc:
                    self.projection.rolled_back()
                    if unavailable(exc):
                        raise
                    error = f"{type(exc).__name__}: {exc}"
                    same = i == 0 and applied == 0 and request.action == "retry"
                    at = None if same else await self._dead_letter(record, error)
                    failed = None if at is None else parking.Head(record, error, *at)
                    await parking.stopped(conn, name, version, request, drop, failed, error, applied)
                    log.warning(
                        "released records stopped at a record that fails",
                        extra={"projection": name, "key": key, "applied": applied, "error": error},
                    )
                    return
                self.projection.committed()
                drop = []
                applied += 1
            if not await parking.released(conn, name, version, request, drop, applied):
                drop = []
                async with conn.transaction():  # held meanwhile by another worker: those too
                    items = await parking.held(conn, name, version, key)
                continue
            self._released(request, applied)
            return

    def _released(self, request: parking.Request, applied: int) -> None:
        if self.parked is not None:
            self.parked.discard(request.key)
        log.info(
            "parked key released",
            extra={
                "projection": self.projection.name,
                "key": request.key,
                "action": request.action,
                "applied": applied,
            },
        )

    async def _dead_letter(self, record: Record, error: str) -> tuple[int, int] | None:
        """Send `record` to the dead-letter topic: where it is there (None when silent)."""
        source = f"{record.topic}:{record.partition}:{record.offset}"
        if self.silent:
            log.warning(
                "event not applied (rebuild: no dead letter produced)",
                extra={
                    "projection": self.projection.name,
                    "version": self.projection.version,
                    "source": source,
                    "error": error,
                },
            )
            return None
        sent = await self.producer.send_and_wait(
            self.dlq_topic,
            record.value,
            key=record.key,
            headers=[
                *record.headers,
                ("dlq-error", error.encode()[:4000]),
                ("dlq-source", source.encode()),
                ("dlq-projection", self.projection.name.encode()),
                ("dlq-projection-version", str(self.projection.version).encode()),
            ],
        )
        metrics.DEAD_LETTERS.labels(self.projection.name).inc()
        log.error(
            "event dead-lettered",
            extra={
                "projection": self.projection.name,
                "source": source,
                "error": error,
                "key": parking.key_of(record),
            },
        )
        return sent.partition, sent.offset

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
