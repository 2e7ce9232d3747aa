"""The versions of each projection: which one readers see, which one is being built.

A projection starts at version 1, live. A rebuild registers the next version as
`building`, creates its storage beside the live one and fills it from offset 0; the
swap then makes it `live` and the previous one `retired` in one PostgreSQL
transaction (the view readers query is replaced in it; an OpenSearch alias moves in
one atomic alias update just before). The retired version is kept for rollback until
the next rebuild starts.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from projections.changes import channel, notify_swapped
from projections.db import schema_name
from projections.projection import Projection
from shared_kernel.settings import Settings

log = logging.getLogger(__name__)

STALE_BUILD_S = 5  # a building version whose builder has said nothing for this long is resumed


class VersionError(Exception):
    """The requested change of versions is not possible now (the message says why)."""


class NotCaughtUp(VersionError):
    """The version to swap in has applied less than the live one on some partition:
    readers would see the model step back."""


class BuildRunning(VersionError):
    """Another builder reported progress recently; after `wait_s` without news from it,
    its version may be resumed."""

    def __init__(self, message: str, wait_s: float) -> None:
        super().__init__(message)
        self.wait_s = wait_s


@dataclass(frozen=True)
class Version:
    projection: str
    version: int
    state: str
    created_at: datetime
    live_since: datetime | None
    retired_at: datetime | None
    total: int | None
    done: int | None
    rate: float | None
    detail: str | None
    updated_at: datetime
    phase: str | None = None

    @classmethod
    def of(cls, row: asyncpg.Record) -> Version:
        return cls(**dict(row))

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


async def register(conn: asyncpg.Connection | asyncpg.Pool, name: str) -> None:
    """Version 1 is live for a projection that has no versions yet."""
    await conn.execute(
        "INSERT INTO projection_versions (projection, version, state, live_since) "
        "SELECT $1, 1, 'live', now() WHERE NOT EXISTS "
        "(SELECT 1 FROM projection_versions WHERE projection = $1) ON CONFLICT DO NOTHING",
        name,
    )


async def live_version(conn: asyncpg.Connection | asyncpg.Pool, name: str) -> int:
    version = await conn.fetchval(
        "SELECT version FROM projection_versions WHERE projection = $1 AND state = 'live'", name
    )
    return int(version) if version is not None else 1


async def versions(conn: asyncpg.Connection | asyncpg.Pool, name: str) -> list[Version]:
    """The versions that exist (dropped ones only keep their number taken)."""
    rows = await conn.fetch(
        "SELECT * FROM projection_versions WHERE projection = $1 AND state <> 'dropped' ORDER BY version",
        name,
    )
    return [Version.of(r) for r in rows]


async def state_of(conn: asyncpg.Connection | asyncpg.Pool, name: str, version: int) -> str | None:
    state = await conn.fetchval(
        "SELECT state FROM projection_versions WHERE projection = $1 AND version = $2", name, version
    )
    return None if state is None else str(state)


def lock_key(what: str) -> int:
    """An advisory lock key for `what` (64 bits of its hash)."""
    return int.from_bytes(hashlib.blake2b(what.encode(), digest_size=8).digest(), "big", signed=True)


def _lock_key(name: str) -> int:
    return lock_key(f"rebuild:{name}")


async def begin(pool: asyncpg.Pool, settings: Settings, projection: Projection) -> Projection:
    """Register the next version of `projection` as building and create its storage;
    or return the building version when its builder is gone (to resume it). Drops what
    older rebuilds left (versions neither live nor building)."""
    name = projection.name
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _lock_key(name))
        await register(conn, name)
        existing = await versions(conn, name)
        for v in existing:
            if v.state == "building":
                idle = await conn.fetchval("SELECT extract(epoch FROM now() - $1::timestamptz)", v.updated_at)
                if idle < STALE_BUILD_S:
                    raise BuildRunning(
                        f"version {v.version} of {name} is being built already "
                        f"(last progress {idle:.0f} s ago)",
                        wait_s=STALE_BUILD_S - float(idle),
                    )
                # its builder is gone: resume from the version's own positions
                await conn.execute(
                    "UPDATE projection_versions SET updated_at = now(), detail = 'resumed' "
                    "WHERE projection = $1 AND version = $2",
                    name,
                    v.version,
                )
                log.info("rebuild resumed", extra={"projection": name, "version": v.version})
                return projection.at(v.version)
        live = await live_version(conn, name)
        for v in existing:
            if v.version != live:
                await projection.at(v.version).drop_storage(conn, settings)
                await conn.execute(
                    "UPDATE projection_versions SET state = 'dropped', updated_at = now() "
                    "WHERE projection = $1 AND version = $2",
                    name,
                    v.version,
                )
                await _forget(conn, name, v.version)
                log.info("old version dropped", extra={"projection": name, "version": v.version})
        # never a number used before: its consumer group would carry the old offsets
        last = await conn.fetchval("SELECT max(version) FROM projection_versions WHERE projection = $1", name)
        new = projection.at(int(last) + 1)
        await new.create_storage(conn, settings)
        await conn.execute(
            "INSERT INTO projection_versions (projection, version, state) VALUES ($1, $2, 'building')",
            name,
            new.version,
        )
    log.info("rebuild registered", extra={"projection": name, "version": new.version, "live": live})
    return new


async def _forget(conn: asyncpg.Connection, name: str, version: int) -> None:
    for table in ("projection_positions", "projection_stats", "projection_workers"):
        await conn.execute(f"DELETE FROM {table} WHERE projection = $1 AND version = $2", name, version)


async def progress(
    conn: asyncpg.Connection | asyncpg.Pool,
    name: str,
    version: int,
    total: int,
    done: int,
    rate: float,
    phase: str | None = None,
) -> None:
    await conn.execute(
        "UPDATE projection_versions SET total = $3, done = $4, rate = $5, phase = $6, updated_at = now() "
        "WHERE projection = $1 AND version = $2",
        name,
        version,
        total,
        done,
        rate,
        phase,
    )


async def fail(conn: asyncpg.Connection | asyncpg.Pool, name: str, version: int, detail: str) -> None:
    """Mark a version that was being built as failed (a live or retired one stays)."""
    await conn.execute(
        "UPDATE projection_versions SET state = 'failed', detail = $3, updated_at = now() "
        "WHERE projection = $1 AND version = $2 AND state = 'building'",
        name,
        version,
        detail,
    )


async def swap(
    pool: asyncpg.Pool, settings: Settings, projection: Projection, to: int, caught_up: bool = False
) -> int:
    """Make version `to` live and the live one retired; returns the version retired.

    With `caught_up`, only if `to` has applied at least what the live version has, on
    every partition (else `NotCaughtUp`): the live version's positions are locked until
    the swap commits, so no reader sees the new version behind what the old one showed.
    A rollback swaps without it (the retired version catches up once its worker runs)."""
    name = projection.name
    target = projection.at(to)
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _lock_key(name))
        await register(conn, name)
        live = await live_version(conn, name)
        if live == to:
            raise VersionError(f"version {to} of {name} is live already")
        if await state_of(conn, name, to) is None:
            raise VersionError(f"{name} has no version {to}")
        if caught_up:
            await _check_caught_up(conn, name, live, to)
        await target.make_live(conn, settings)
        await conn.execute(
            "UPDATE projection_versions SET state = 'retired', retired_at = now(), updated_at = now() "
            "WHERE projection = $1 AND version = $2",
            name,
            live,
        )
        await conn.execute(
            "UPDATE projection_versions SET state = 'live', live_since = now(), retired_at = NULL, "
            "detail = NULL, updated_at = now() WHERE projection = $1 AND version = $2",
            name,
            to,
        )
        await notify_swapped(conn, channel(schema_name(settings)), name, to)
    log.info("version swapped in", extra={"projection": name, "live": to, "retired": live})
    return live


async def _check_caught_up(conn: asyncpg.Connection, name: str, live: int, to: int) -> None:
    rows = await conn.fetch(
        "SELECT l.topic, l.partition, l.next_offset AS live, coalesce(n.next_offset, 0) AS new "
        "FROM projection_positions l LEFT JOIN projection_positions n ON n.projection = l.projection "
        "AND n.version = $3 AND n.topic = l.topic AND n.partition = l.partition "
        "WHERE l.projection = $1 AND l.version = $2 FOR UPDATE OF l",
        name,
        live,
        to,
    )
    behind = [r for r in rows if r["new"] < r["live"]]
    if behind:
        r = behind[0]
        raise NotCaughtUp(
            f"version {to} of {name} is behind version {live} on {len(behind)} partition(s), "
            f"e.g. {r['topic']}:{r['partition']} at {r['new']} < {r['live']}"
        )


async def previous(conn: asyncpg.Connection | asyncpg.Pool, name: str) -> int:
    """The retired version a rollback returns to."""
    version = await conn.fetchval(
        "SELECT version FROM projection_versions WHERE projection = $1 AND state = 'retired' "
        "ORDER BY retired_at DESC NULLS LAST, version DESC LIMIT 1",
        name,
    )
    if version is None:
        raise VersionError(f"{name} has no retired version to roll back to")
    return int(version)


async def heartbeat(conn: asyncpg.Connection | asyncpg.Pool, name: str, version: int, worker: str) -> None:
    await conn.execute(
        "INSERT INTO projection_workers (projection, version, worker) VALUES ($1, $2, $3) "
        "ON CONFLICT (projection, version, worker) DO UPDATE SET heartbeat_at = now()",
        name,
        version,
        worker,
    )


async def workers(
    conn: asyncpg.Connection | asyncpg.Pool, name: str, version: int, within_s: float = 5
) -> list[str]:
    rows = await conn.fetch(
        "SELECT worker FROM projection_workers WHERE projection = $1 AND version = $2 "
        "AND heartbeat_at > now() - make_interval(secs => $3)",
        name,
        version,
        within_s,
    )
    return [r["worker"] for r in rows]
