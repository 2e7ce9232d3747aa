"""Per-key parking: when a projection or a stream job dead-letters a record, the key it
carries (the aggregate id) is parked, and that consumer's later records of the key are
held in PostgreSQL in order, not applied, while other keys flow. A projection writes the
parking in the batch's transaction, with its positions, so a crash parks a record or
applies it, never neither; a job writes it before the record is acked. An operator then
retries the dead letter (after a fix: it and the held records are applied in order) or
skips it (the held records are applied); the consumer does it (`Projector.serve_requests`,
`JobApp._serve_requests`), and each such request is kept with its actor and outcome in
`dead_letter_actions`.

Keys are parked per projection version: a version being rebuilt (silent) parks nothing.
A stream job has no versions: it parks at `UNVERSIONED`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg

from projections.events import Record
from shared_kernel.topics import COMMAND_PROCESSOR

ACTIONS = ("retry", "skip")
UNVERSIONED = 1  # the version of a consumer without versions (a stream job)
# Operators see and act on the keys parked by the live version of each projection: a
# retired version's stay as they are, for a rollback to find them.
LIVE = (
    "LEFT JOIN projection_versions v ON v.projection = k.consumer AND v.state = 'live' "
    "WHERE k.version = coalesce(v.version, 1)"
)


def parks(consumer: str) -> bool:
    """Does `consumer` park keys behind its dead letters (a projection, a stream job, the
    command processor)?"""
    from projections.registry import PROJECTIONS

    return consumer in PROJECTIONS or consumer.startswith("job-") or consumer == COMMAND_PROCESSOR


def key_of(record: Record) -> str | None:
    return record.key.decode(errors="replace") if record.key else None


@dataclass(frozen=True)
class Head:
    """A record dead-lettered: its key is parked behind it."""

    record: Record
    error: str
    dlq_partition: int | None
    dlq_offset: int | None
    # where the key's records come from, when not the record's own place (a command handed
    # to the processor directly is held as `http`, its key's records are of a commands partition)
    source: tuple[str, int] | None = None


@dataclass(frozen=True)
class Request:
    action_id: int
    key: str
    action: str
    topic: str = ""  # where the key's records come from
    partition: int = -1


async def parked(conn: asyncpg.Connection | asyncpg.Pool, consumer: str, version: int) -> set[str]:
    rows = await conn.fetch(
        "SELECT key FROM parked_keys WHERE consumer = $1 AND version = $2", consumer, version
    )
    return {r["key"] for r in rows}


async def parked_from(pool: asyncpg.Pool, consumer: str, version: int, partitions: Iterable[int]) -> set[str]:
    """The keys parked whose records come from these partitions (the command processor's
    of the commands partitions it owns)."""
    rows = await pool.fetch(
        "SELECT key FROM parked_keys "
        "WHERE consumer = $1 AND version = $2 AND source_partition = ANY($3::int[])",
        consumer,
        version,
        list(partitions),
    )
    return {r["key"] for r in rows}


async def still_parked(
    conn: asyncpg.Connection, consumer: str, version: int, keys: Iterable[str]
) -> set[str]:
    """Which of `keys` are parked, locked against a release until this transaction ends."""
    rows = await conn.fetch(
        "SELECT key FROM parked_keys WHERE consumer = $1 AND version = $2 AND key = ANY($3::text[]) "
        "FOR SHARE",
        consumer,
        version,
        list(keys),
    )
    return {r["key"] for r in rows}


async def park(
    conn: asyncpg.Connection, consumer: str, version: int, heads: Sequence[Head], held: Sequence[Record]
) -> None:
    """In the batch's transaction: park the keys of `heads` behind them and hold their
    records and `held` (records of keys parked already). A batch that comes again (after
    a crash before its offsets were committed) changes nothing."""
    if heads:
        await conn.executemany(
            "INSERT INTO parked_keys (consumer, version, key, source_topic, source_partition, "
            "dlq_partition, dlq_offset, error) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) "
            "ON CONFLICT (consumer, version, key) DO NOTHING",
            [
                (
                    consumer,
                    version,
                    key_of(h.record),
                    *(h.source or (h.record.topic, h.record.partition)),
                    h.dlq_partition,
                    h.dlq_offset,
                    h.error[:4000],
                )
                for h in heads
            ],
        )
    records = [h.record for h in heads] + list(held)
    records.sort(key=lambda r: (r.topic, r.partition, r.offset))
    if records:
        await conn.executemany(
            'INSERT INTO parked_records (consumer, version, key, topic, partition, "offset", '
            "timestamp_ms, record_key, value, header_names, header_values) "
            "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) ON CONFLICT DO NOTHING",
            [
                (
                    consumer,
                    version,
                    key_of(r),
                    r.topic,
                    r.partition,
                    r.offset,
                    r.timestamp_ms,
                    r.key,
                    r.value,
                    [k for k, _ in r.headers],
                    [v for _, v in r.headers],
                )
                for r in records
            ],
        )


async def requests(pool: asyncpg.Pool, consumer: str, version: int) -> list[Request]:
    """The operators' requests waiting for this projection version, oldest first."""
    rows = await pool.fetch(
        "SELECT k.key, k.source_topic, k.source_partition, a.id, a.action FROM parked_keys k "
        "JOIN dead_letter_actions a ON a.id = k.request_id "
        "WHERE k.consumer = $1 AND k.version = $2 AND k.request_id IS NOT NULL ORDER BY a.id",
        consumer,
        version,
    )
    return [Request(r["id"], r["key"], r["action"], r["source_topic"], r["source_partition"]) for r in rows]


async def hold(pool: asyncpg.Pool, consumer: str, version: int, record: Record) -> bool:
    """Hold `record` behind its parked key; False if the key is no longer parked."""
    key = key_of(record)
    async with pool.acquire() as conn, conn.transaction():
        if key is None or not await still_parked(conn, consumer, version, [key]):
            return False
        await park(conn, consumer, version, [], [record])
    return True


async def park_behind(pool: asyncpg.Pool, consumer: str, version: int, head: Head) -> None:
    """Park the key of `head` behind it (a consumer outside any batch transaction)."""
    async with pool.acquire() as conn, conn.transaction():
        await park(conn, consumer, version, [head], [])


async def requested(conn: asyncpg.Connection, consumer: str, version: int, key: str) -> int | None:
    """The action waiting for the key, if any."""
    value: int | None = await conn.fetchval(
        "SELECT request_id FROM parked_keys WHERE consumer = $1 AND version = $2 AND key = $3",
        consumer,
        version,
        key,
    )
    return value


async def held(conn: asyncpg.Connection, consumer: str, version: int, key: str) -> list[tuple[int, Record]]:
    """The key's held records in order, the dead-lettered one first, locking the key."""
    await conn.execute(
        "SELECT 1 FROM parked_keys WHERE consumer = $1 AND version = $2 AND key = $3 FOR UPDATE",
        consumer,
        version,
        key,
    )
    rows = await conn.fetch(
        'SELECT seq, topic, partition, "offset", timestamp_ms, record_key, value, header_names, '
        "header_values FROM parked_records WHERE consumer = $1 AND version = $2 AND key = $3 ORDER BY seq",
        consumer,
        version,
        key,
    )
    return [
        (
            r["seq"],
            Record(
                topic=r["topic"],
                partition=r["partition"],
                offset=r["offset"],
                key=r["record_key"],
                value=r["value"],
                headers=list(zip(r["header_names"], r["header_values"], strict=True)),
                timestamp_ms=r["timestamp_ms"],
            ),
        )
        for r in rows
    ]


async def let_go(
    conn: asyncpg.Connection, consumer: str, version: int, key: str, seqs: Sequence[int]
) -> None:
    """The records `seqs` are applied (or skipped): no longer held."""
    await conn.execute(
        "DELETE FROM parked_records "
        "WHERE consumer = $1 AND version = $2 AND key = $3 AND seq = ANY($4::bigint[])",
        consumer,
        version,
        key,
        list(seqs),
    )


async def unpark(conn: asyncpg.Connection, consumer: str, version: int, key: str) -> None:
    await conn.execute(
        "DELETE FROM parked_keys WHERE consumer = $1 AND version = $2 AND key = $3", consumer, version, key
    )


async def new_head(conn: asyncpg.Connection, consumer: str, version: int, key: str, head: Head) -> None:
    """The key stays parked, behind `head` now (a held record that failed in its turn)."""
    await conn.execute(
        "UPDATE parked_keys SET dlq_partition = $4, dlq_offset = $5, error = $6, source_topic = $7, "
        "source_partition = $8, parked_at = now(), request_id = NULL "
        "WHERE consumer = $1 AND version = $2 AND key = $3",
        consumer,
        version,
        key,
        head.dlq_partition,
        head.dlq_offset,
        head.error[:4000],
        *(head.source or (head.record.topic, head.record.partition)),
    )


async def still_failing(conn: asyncpg.Connection, consumer: str, version: int, key: str, error: str) -> None:
    await conn.execute(
        "UPDATE parked_keys SET error = $4, request_id = NULL "
        "WHERE consumer = $1 AND version = $2 AND key = $3",
        consumer,
        version,
        key,
        error[:4000],
    )


async def done(
    conn: asyncpg.Connection, action_id: int, outcome: str, applied: int, error: str | None = None
) -> None:
    await conn.execute(
        "UPDATE dead_letter_actions SET done_at = now(), outcome = $2, applied = $3, error = $4 "
        "WHERE id = $1",
        action_id,
        outcome,
        applied,
        None if error is None else error[:4000],
    )


async def stopped(
    conn: asyncpg.Connection,
    consumer: str,
    version: int,
    request: Request,
    drop: Sequence[int],
    failed: Head | None,
    error: str,
    applied: int,
) -> None:
    """A release stopped at a record that fails: the key stays parked, behind the same
    dead letter (`failed` None: a retry of it failed again) or behind `failed` (a held
    record that was dead-lettered in its turn); `drop` (a skipped one) is let go."""
    async with conn.transaction():
        await let_go(conn, consumer, version, request.key, drop)
        if failed is None:
            await still_failing(conn, consumer, version, request.key, error)
            await done(conn, request.action_id, "failed", 0, error)
        else:
            await new_head(conn, consumer, version, request.key, failed)
            await done(conn, request.action_id, "parked-again", applied, error)


async def released(
    conn: asyncpg.Connection, consumer: str, version: int, request: Request, drop: Sequence[int], applied: int
) -> bool:
    """The held records are all applied (and `drop`, a skipped one, let go): unpark the
    key, unless more were held meanwhile (False: go on with those)."""
    async with conn.transaction():
        await let_go(conn, consumer, version, request.key, drop)
        if await held(conn, consumer, version, request.key):
            return False
        await unpark(conn, consumer, version, request.key)
        await done(conn, request.action_id, "applied", applied)
    return True


# The API's side: what operators see and ask.


class NotParked(Exception):
    """The dead letter holds no key back (nothing to retry or skip), or a request for it
    is waiting already."""


async def request(
    pool: asyncpg.Pool, consumer: str, dlq_partition: int, dlq_offset: int, action: str, actor: str
) -> dict[str, Any]:
    """Ask the projector to retry or skip the dead letter at (dlq_partition, dlq_offset):
    the action's row, pending until the projector has done it."""
    assert action in ACTIONS
    async with pool.acquire() as conn, conn.transaction():
        row = await conn.fetchrow(
            f"SELECT k.version, k.key, k.request_id FROM parked_keys k {LIVE} "
            "AND k.consumer = $1 AND k.dlq_partition = $2 AND k.dlq_offset = $3 FOR UPDATE OF k",
            consumer,
            dlq_partition,
            dlq_offset,
        )
        if row is None:
            raise NotParked(
                f"the dead letter of {consumer} at {dlq_partition}:{dlq_offset} holds no key back"
            )
        if row["request_id"] is not None:
            raise NotParked(f"a request for it is waiting already (action {row['request_id']})")
        action_row = await conn.fetchrow(
            "INSERT INTO dead_letter_actions "
            "(consumer, version, key, dlq_partition, dlq_offset, action, actor) "
            "VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING *",
            consumer,
            row["version"],
            row["key"],
            dlq_partition,
            dlq_offset,
            action,
            actor,
        )
        await conn.execute(
            "UPDATE parked_keys SET request_id = $4 WHERE consumer = $1 AND version = $2 AND key = $3",
            consumer,
            row["version"],
            row["key"],
            action_row["id"],
        )
    return action_document(action_row)


async def request_all(pool: asyncpg.Pool, consumer: str, key: str | None, actor: str) -> list[dict[str, Any]]:
    """Retry every dead letter of `consumer` that holds a key back (or only `key`'s) that
    has no request waiting: the actions asked."""
    asked: list[dict[str, Any]] = []
    for parked in await parked_listing(pool, consumer, key, 100_000):
        if parked["request_id"] is not None:
            continue
        at = parked["dead_letter"]
        try:
            asked.append(await request(pool, consumer, at["partition"], at["offset"], "retry", actor))
        except NotParked:
            continue  # let go meanwhile
    return asked


def action_document(row: asyncpg.Record) -> dict[str, Any]:
    return {
        "id": row["id"],
        "consumer": row["consumer"],
        "version": row["version"],
        "key": row["key"],
        "dead_letter": {"partition": row["dlq_partition"], "offset": row["dlq_offset"]},
        "action": row["action"],
        "actor": row["actor"],
        "requested_at": row["requested_at"].isoformat(),
        "done_at": row["done_at"].isoformat() if row["done_at"] else None,
        "outcome": row["outcome"],
        "applied": row["applied"],
        "error": row["error"],
    }


async def action(pool: asyncpg.Pool, action_id: int) -> dict[str, Any] | None:
    row = await pool.fetchrow("SELECT * FROM dead_letter_actions WHERE id = $1", action_id)
    return None if row is None else action_document(row)


async def actions(pool: asyncpg.Pool, consumer: str | None, limit: int) -> list[dict[str, Any]]:
    rows = await pool.fetch(
        "SELECT * FROM dead_letter_actions WHERE $1::text IS NULL OR consumer = $1 ORDER BY id DESC LIMIT $2",
        consumer,
        limit,
    )
    return [action_document(r) for r in rows]


async def parked_listing(
    pool: asyncpg.Pool, consumer: str | None, key: str | None, limit: int
) -> list[dict[str, Any]]:
    """Parked keys, newest first: behind which dead letter, why, how many records held."""
    rows = await pool.fetch(
        "SELECT k.*, (SELECT count(*) FROM parked_records r WHERE r.consumer = k.consumer "
        f"AND r.version = k.version AND r.key = k.key) AS held FROM parked_keys k {LIVE} "
        "AND ($1::text IS NULL OR k.consumer = $1) AND ($2::text IS NULL OR k.key = $2) "
        "ORDER BY k.parked_at DESC LIMIT $3",
        consumer,
        key,
        limit,
    )
    return [
        {
            "consumer": r["consumer"],
            "version": r["version"],
            "key": r["key"],
            "dead_letter": {"partition": r["dlq_partition"], "offset": r["dlq_offset"]},
            "source": f"{r['source_topic']}:{r['source_partition']}",
            "error": r["error"],
            "parked_at": r["parked_at"].isoformat(),
            "held": r["held"] - 1,  # behind the dead-lettered record
            "request_id": r["request_id"],
        }
        for r in rows
    ]


async def states(
    pool: asyncpg.Pool, positions: Iterable[tuple[str, int, int]]
) -> dict[tuple[str, int, int], str]:
    """(consumer, dlq partition, dlq offset) -> `parked` (its key is held behind it),
    `retried` or `skipped` (an operator's request for it was done), for those that are."""
    wanted = list(positions)
    if not wanted:
        return {}
    consumers, partitions, offsets = (list(x) for x in zip(*wanted, strict=True))
    rows = await pool.fetch(
        "WITH w AS (SELECT * FROM unnest($1::text[], $2::int[], $3::bigint[]) AS w(c, p, o)) "
        "SELECT w.c, w.p, w.o, "
        f"EXISTS (SELECT 1 FROM parked_keys k {LIVE} AND k.consumer = w.c AND k.dlq_partition = w.p "
        "AND k.dlq_offset = w.o) AS parked, "
        "(SELECT a.action FROM dead_letter_actions a WHERE a.consumer = w.c AND a.dlq_partition = w.p "
        "AND a.dlq_offset = w.o AND a.outcome IN ('applied', 'parked-again') ORDER BY a.id DESC LIMIT 1) "
        "AS resolved FROM w",
        consumers,
        partitions,
        offsets,
    )
    out: dict[tuple[str, int, int], str] = {}
    for r in rows:
        if r["parked"]:
            out[(r["c"], r["p"], r["o"])] = "parked"
        elif r["resolved"]:
            out[(r["c"], r["p"], r["o"])] = "retried" if r["resolved"] == "retry" else "skipped"
    return out


async def with_states(
    pool: asyncpg.Pool, items: list[dict[str, Any]], state: str, limit: int
) -> list[dict[str, Any]]:
    """Dead letters (`streams.dead_letters.summary`) with their `state` set, those in
    `state` (`all`, `unresolved`: parked or open, or one state), at most `limit`."""
    known = await states(pool, [(d["consumer"], d["partition"], d["offset"]) for d in items])
    for d in items:
        d["state"] = known.get((d["consumer"], d["partition"], d["offset"]), "open")
    wanted = {"all": None, "unresolved": ("parked", "open")}.get(state, (state,))
    return [d for d in items if wanted is None or d["state"] in wanted][:limit]


async def release_start(
    conn: asyncpg.Connection, consumer: str, version: int, request: Request
) -> tuple[list[tuple[int, Record]], list[int]]:
    """What a release applies (the held records, without the dead letter on a skip) and
    what it lets go unapplied (the skipped dead letter)."""
    async with conn.transaction():
        items = await held(conn, consumer, version, request.key)
    drop = [items[0][0]] if request.action == "skip" and items else []
    return (items[1:] if drop else items), drop
