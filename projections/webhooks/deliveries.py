"""The webhooks' deliveries: what the delivery job owes each subscription, each attempt
it made, and what an admin asks again. Not a projection (the attempts are not events):
the delivery job's own tables, beside the read models in their schema, read by the
webhooks routes.

A delivery is one event for one subscription, keyed by its `webhook-id` (the same on
every attempt and after any restart). It is `pending` (owed: due at `next_attempt_at`),
`delivered`, or `parked` (its attempts ran out). (`lease_until` is no longer used: one
job worker pays a partition's deliveries, the owner of that events partition.)
Order per subscription and aggregate holds because only the head of each (subscription,
aggregate) — its lowest version not yet delivered — is ever attempted: a later event
waits behind an earlier pending or parked one, while other aggregates and other
subscriptions flow. The delivery job pays from memory (`streams.webhooks.schedule`):
these tables are its log, which the owner of an events partition loads (`owed`) when it
gets the partition, and where an admin's redelivery (`redeliver`, stamped `requeued_at`)
reaches it (`requeued`).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

DDL = """
CREATE TABLE IF NOT EXISTS webhook_deliveries (
    id                text        PRIMARY KEY,
    subscription_id   uuid        NOT NULL,
    tenant            text        NOT NULL,
    event_id          text        NOT NULL,
    event_type        text        NOT NULL,
    aggregate_id      text        NOT NULL,
    aggregate_version int         NOT NULL,
    position          text        NOT NULL,
    body              text        NOT NULL,
    status            text        NOT NULL DEFAULT 'pending',
    attempts          int         NOT NULL DEFAULT 0,
    next_attempt_at   timestamptz NOT NULL DEFAULT now(),
    lease_until       timestamptz,
    last_status       int,
    last_error        text,
    created_at        timestamptz NOT NULL DEFAULT now(),
    first_attempt_at  timestamptz,
    delivered_at      timestamptz,
    parked_at         timestamptz
);
CREATE INDEX IF NOT EXISTS webhook_deliveries_heads ON webhook_deliveries
    (subscription_id, aggregate_id, aggregate_version) WHERE status <> 'delivered';
CREATE INDEX IF NOT EXISTS webhook_deliveries_log ON webhook_deliveries (subscription_id, created_at, id);
ALTER TABLE webhook_deliveries ADD COLUMN IF NOT EXISTS requeued_at timestamptz;
CREATE INDEX IF NOT EXISTS webhook_deliveries_requeued ON webhook_deliveries (requeued_at)
    WHERE status = 'pending' AND requeued_at IS NOT NULL;
CREATE TABLE IF NOT EXISTS webhook_attempts (
    delivery_id  text        NOT NULL,
    n            int         NOT NULL,
    at           timestamptz NOT NULL,
    status_code  int,
    latency_ms   double precision NOT NULL,
    error        text,
    response     text,
    PRIMARY KEY (delivery_id, n)
);
"""

_ensured: set[int] = set()


async def ensure(pool: Any) -> None:
    """Create the tables once per pool (idempotent; every process may call it)."""
    if id(pool) in _ensured:
        return
    async with pool.acquire() as conn:
        await conn.execute("SELECT pg_advisory_lock(hashtext('webhook_deliveries'))")
        try:
            await conn.execute(DDL)
        finally:
            await conn.execute("SELECT pg_advisory_unlock(hashtext('webhook_deliveries'))")
    _ensured.add(id(pool))


async def owe(pool: Any, rows: list[tuple[Any, ...]]) -> set[str]:
    """Record deliveries owed (id, subscription, tenant, event id, type, aggregate,
    version, position, body); one already there is left as it is. Returns the ids it
    recorded (a redelivered event's deliveries are there already)."""
    if not rows:
        return set()
    columns = list(zip(*rows, strict=True))
    inserted = await pool.fetch(
        "INSERT INTO webhook_deliveries (id, subscription_id, tenant, event_id, event_type, "
        "aggregate_id, aggregate_version, position, body) SELECT * FROM unnest($1::text[], $2::uuid[], "
        "$3::text[], $4::text[], $5::text[], $6::text[], $7::int[], $8::text[], $9::text[]) "
        "ON CONFLICT (id) DO NOTHING RETURNING id",
        *[list(c) for c in columns],
    )
    return {r["id"] for r in inserted}


OWED_COLUMNS = (
    "id, subscription_id, tenant, aggregate_id, aggregate_version, position, body, status, attempts, "
    "first_attempt_at, next_attempt_at"
)


async def owed(pool: Any, sources: list[str]) -> list[Any]:
    """Every delivery not delivered yet (pending or parked) of these events partitions
    ("topic:partition"): what their new owner pays."""
    return list(
        await pool.fetch(
            f"SELECT {OWED_COLUMNS} FROM webhook_deliveries WHERE status <> 'delivered' "
            "AND regexp_replace(position, ':[0-9]+$', '') = ANY($1::text[])",
            sources,
        )
    )


async def requeued(pool: Any, sources: list[str], window_s: float) -> list[Any]:
    """The pending deliveries of these partitions an admin asked again in the last
    `window_s` seconds."""
    return list(
        await pool.fetch(
            f"SELECT {OWED_COLUMNS} FROM webhook_deliveries WHERE status = 'pending' "
            "AND requeued_at IS NOT NULL AND requeued_at >= now() - make_interval(secs => $2) "
            "AND regexp_replace(position, ':[0-9]+$', '') = ANY($1::text[])",
            sources,
            window_s,
        )
    )


@dataclass(frozen=True)
class Attempt:
    """One attempt and what follows from it: `delivered`, `retry` (due again at
    `next_attempt_at`) or `parked`."""

    delivery_id: str
    n: int
    at: datetime
    status_code: int | None
    latency_ms: float
    error: str | None
    response: str | None
    outcome: str
    next_attempt_at: datetime | None = None


async def attempted(pool: Any, attempts: list[Attempt]) -> None:
    """Record attempts and their outcomes, all in one transaction (the delivery job
    writes those that ended while the previous write ran together)."""
    if not attempts:
        return

    def column(name: str) -> list[Any]:
        return [getattr(a, name) for a in attempts]

    async with pool.acquire() as conn, conn.transaction():
        await conn.execute(
            "INSERT INTO webhook_attempts (delivery_id, n, at, status_code, latency_ms, error, response) "
            "SELECT * FROM unnest($1::text[], $2::int[], $3::timestamptz[], $4::int[], $5::float8[], "
            "$6::text[], $7::text[]) ON CONFLICT (delivery_id, n) DO NOTHING",
            column("delivery_id"),
            column("n"),
            column("at"),
            column("status_code"),
            column("latency_ms"),
            column("error"),
            column("response"),
        )
        await conn.execute(
            """
            UPDATE webhook_deliveries d SET
                status = CASE WHEN o.outcome IN ('delivered', 'parked') THEN o.outcome ELSE d.status END,
                delivered_at = CASE WHEN o.outcome = 'delivered' THEN now() ELSE d.delivered_at END,
                parked_at = CASE WHEN o.outcome = 'parked' THEN now() ELSE d.parked_at END,
                next_attempt_at = CASE WHEN o.outcome = 'retry' THEN o.next_at ELSE d.next_attempt_at END,
                attempts = o.n, first_attempt_at = coalesce(d.first_attempt_at, o.at),
                lease_until = NULL, last_status = o.status_code, last_error = o.error
            FROM unnest($1::text[], $2::text[], $3::timestamptz[], $4::int[], $5::text[], $6::int[],
                        $7::timestamptz[])
                AS o(id, outcome, next_at, status_code, error, n, at)
            WHERE d.id = o.id
            """,
            column("delivery_id"),
            column("outcome"),
            column("next_attempt_at"),
            column("status_code"),
            column("error"),
            column("n"),
            column("at"),
        )


async def redeliver(
    pool: Any,
    tenant: str,
    subscription_id: Any,
    delivery_id: str | None = None,
    since: datetime | None = None,
) -> int:
    """Owe again: one delivery, or every parked one, or every one since an instant
    (delivered ones too); their attempts start again from the first. Returns how many."""
    where = ["tenant = $1", "subscription_id = $2"]
    args: list[Any] = [tenant, subscription_id]
    if delivery_id is not None:
        args.append(delivery_id)
        where.append(f"id = ${len(args)}")
    elif since is not None:
        args.append(since)
        where.append(f"created_at >= ${len(args)}")
    else:
        where.append("status = 'parked'")
    done = await pool.execute(
        "UPDATE webhook_deliveries SET status = 'pending', attempts = 0, next_attempt_at = now(), "
        "requeued_at = now(), lease_until = NULL, parked_at = NULL, delivered_at = NULL WHERE "
        + " AND ".join(where),
        *args,
    )
    return int(done.split()[-1])


async def log(
    pool: Any, tenant: str, subscription_id: Any, status: str | None, limit: int, before: str | None
) -> dict[str, Any]:
    """The subscription's deliveries, newest first, each with its attempts, and the counts
    per status."""
    where = ["tenant = $1", "subscription_id = $2"]
    args: list[Any] = [tenant, subscription_id]
    if status:
        args.append(status)
        where.append(f"status = ${len(args)}")
    if before:
        args.append(before)
        n = len(args)
        where.append(f"(created_at, id) < (SELECT created_at, id FROM webhook_deliveries WHERE id = ${n})")
    args.append(limit)
    rows = await pool.fetch(
        "SELECT id, event_id, event_type, aggregate_id, aggregate_version, position, status, attempts, "
        "next_attempt_at, last_status, last_error, created_at, first_attempt_at, delivered_at, parked_at "
        f"FROM webhook_deliveries WHERE {' AND '.join(where)} "
        f"ORDER BY created_at DESC, id DESC LIMIT ${len(args)}",
        *args,
    )
    ids = [r["id"] for r in rows]
    attempts: dict[str, list[dict[str, Any]]] = {i: [] for i in ids}
    for a in await pool.fetch(
        "SELECT delivery_id, n, at, status_code, latency_ms, error FROM webhook_attempts "
        "WHERE delivery_id = ANY($1) ORDER BY delivery_id, n",
        ids,
    ):
        fields = ("n", "at", "status_code", "latency_ms", "error")
        attempts[a["delivery_id"]].append({k: a[k] for k in fields})
    counts = {
        r["status"]: r["n"]
        for r in await pool.fetch(
            "SELECT status, count(*) AS n FROM webhook_deliveries WHERE tenant = $1 AND subscription_id = $2 "
            "GROUP BY status",
            tenant,
            subscription_id,
        )
    }
    items = [{**dict(r), "attempt_log": attempts[r["id"]]} for r in rows]
    return {
        "items": items,
        "counts": {s: counts.get(s, 0) for s in ("pending", "delivered", "parked")},
        "next": items[-1]["id"] if len(items) == limit else None,
    }


async def purge(pool: Any, keep_days: int) -> int:
    """Forget delivered deliveries (and their attempts) older than `keep_days`."""
    done = await pool.execute(
        "WITH old AS (DELETE FROM webhook_deliveries WHERE status = 'delivered' "
        "AND delivered_at < now() - make_interval(days => $1) RETURNING id) "
        "DELETE FROM webhook_attempts WHERE delivery_id IN (SELECT id FROM old)",
        keep_days,
    )
    return int(done.split()[-1])
