"""What the admin API and `cqrs projections` show: versions, lag, counters, workers."""

from __future__ import annotations

from typing import Any

import asyncpg

from projections import versions
from projections.db import create_pool
from projections.lag import LagProbe, lag_of
from projections.registry import PROJECTIONS
from shared_kernel.settings import Settings
from shared_kernel.topics import Topics


async def overview(
    settings: Settings, pool: asyncpg.Pool | None = None, probe: LagProbe | None = None
) -> dict[str, dict[str, Any]]:
    """Every projection: live version, lag of it (events, seconds), counters, rebuild."""
    own_pool, own_probe = pool is None, probe is None
    pool = pool or await create_pool(settings, min_size=1, max_size=1)
    probe = probe or LagProbe(settings)
    try:
        return await _overview(settings, pool, probe)
    finally:
        if own_probe:
            await probe.stop()
        if own_pool:
            await pool.close()


LIVE = (
    "LEFT JOIN projection_versions v ON v.projection = x.projection AND v.state = 'live' "
    "WHERE x.version = coalesce(v.version, 1)"
)


async def _overview(settings: Settings, pool: asyncpg.Pool, probe: LagProbe) -> dict[str, dict[str, Any]]:
    topics = Topics(settings.topic_prefix)
    positions = [
        dict(r)
        for r in await pool.fetch(
            "SELECT x.projection, x.topic, x.partition, x.next_offset, x.event_time "
            f"FROM projection_positions x {LIVE}"
        )
    ]
    stats = {r["projection"]: dict(r) for r in await pool.fetch(f"SELECT x.* FROM projection_stats x {LIVE}")}
    parked = {
        r["projection"]: r["n"]
        for r in await pool.fetch(
            "SELECT x.consumer AS projection, count(*) AS n FROM parked_keys x "
            "LEFT JOIN projection_versions v ON v.projection = x.consumer AND v.state = 'live' "
            "WHERE x.version = coalesce(v.version, 1) GROUP BY x.consumer"
        )
    }
    all_versions: dict[str, list[versions.Version]] = {}
    for v in [
        versions.Version.of(r)
        for r in await pool.fetch(
            "SELECT * FROM projection_versions WHERE state <> 'dropped' ORDER BY version"
        )
    ]:
        all_versions.setdefault(v.projection, []).append(v)
    topics_of = {name: [topics.events(c) for c in p.contexts] for name, p in PROJECTIONS.items()}
    lag = await lag_of(probe, topics_of, positions)
    out: dict[str, dict[str, Any]] = {}
    for name, p in PROJECTIONS.items():
        s = stats.get(name, {})
        mine = all_versions.get(name, [])
        live = next((v.version for v in mine if v.state == "live"), 1)
        building = next((v.as_dict() for v in mine if v.state == "building"), None)
        out[name] = {
            "store": p.store,
            "status": "rebuilding" if building else "live",
            "live_version": live,
            "building": building,
            "events_behind": lag[name]["events_behind"],
            "seconds_behind": lag[name]["seconds_behind"],
            "applied": s.get("applied", 0),
            "dead_lettered": s.get("dead_lettered", 0),
            "parked": parked.get(name, 0),  # keys held behind a dead letter (projections.parking)
            "dead_letter_topic": topics.dlq(name),
            "last_error": s.get("last_error"),
            "positions": lag[name]["positions"],
        }
    return out


async def describe(settings: Settings, name: str, pool: asyncpg.Pool | None = None) -> dict[str, Any]:
    """One projection's versions, each with its progress and live workers."""
    own_pool = pool is None
    pool = pool or await create_pool(settings, min_size=1, max_size=1)
    try:
        out = []
        for v in await versions.versions(pool, name):
            entry = v.as_dict()
            entry["workers"] = await versions.workers(pool, name, v.version)
            if v.total and v.rate and v.state == "building":
                entry["eta_s"] = round(max(0, v.total - (v.done or 0)) / v.rate, 1)
            out.append(entry)
        return {"projection": name, "versions": out}
    finally:
        if own_pool:
            await pool.close()
