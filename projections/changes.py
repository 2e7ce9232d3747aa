"""What each committed batch changed, told to readers by PostgreSQL `NOTIFY`.

A projector's batch transaction ends with one notification on the deployment's
channel: the projection, its version, the positions the batch recorded and the
aggregates it touched (or `null`: too many to name, anything may have changed). A swap
of versions sends one too. PostgreSQL delivers a notification when, and only when, its
transaction commits, in commit order, so a listener that has seen a notification knows
that every row the batch wrote is readable. The API uses this to keep rendered read
models in memory (`api.readcache`): it drops what a batch changed, and answers a
position token from memory once the notifications have reached it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import asyncpg
import orjson

PAYLOAD_MAX = 7_900  # PostgreSQL refuses payloads of 8,000 bytes or more


def channel(schema: str) -> str:
    """The notification channel of the read models in `schema` (an identifier, <= 63)."""
    return f"{schema}_changes"[-63:]


@dataclass(frozen=True)
class Change:
    """A notification, decoded. `aggregates` is None when anything may have changed;
    `live` is set (and the rest empty) when a swap made version `live` the one readers see."""

    projection: str
    version: int
    positions: tuple[tuple[str, int, int], ...] = ()
    aggregates: frozenset[str] | None = frozenset()
    live: int | None = None

    @classmethod
    def parse(cls, payload: str) -> Change:
        body = orjson.loads(payload)
        keys = body.get("a")
        return cls(
            projection=str(body["p"]),
            version=int(body["v"]),
            positions=tuple((str(t), int(p), int(o)) for t, p, o in body.get("at", ())),
            aggregates=None if keys is None else frozenset(map(str, keys)),
            live=None if body.get("live") is None else int(body["live"]),
        )


def applied_payloads(
    projection: str, version: int, ends: Mapping[tuple[str, int], int], aggregates: Iterable[str] | None
) -> list[str]:
    """The notifications of one batch: its positions, in as many payloads as PostgreSQL's
    limit needs (all are delivered together, at its commit), the first naming the
    aggregates it touched, or null when they are too many to name or unknown."""
    named = None if aggregates is None else set(aggregates)
    positions = [[t, p, o] for (t, p), o in sorted(ends.items())]
    # a uuid takes 39 bytes in the list: a bulk batch's thousands are not even encoded
    first: dict[str, Any] = {"p": projection, "v": version, "at": positions}
    first["a"] = sorted(named) if named is not None and len(named) < 200 else None
    text = orjson.dumps(first).decode()
    if len(text) <= PAYLOAD_MAX:
        return [text]
    if first["a"] is not None:
        first["a"] = None
        text = orjson.dumps(first).decode()
        if len(text) <= PAYLOAD_MAX:
            return [text]
    # many partitions: their positions in chunks, the aggregates ("any") in the first
    chunk = max(1, len(positions) * PAYLOAD_MAX // len(text) - 1)
    return [
        orjson.dumps(
            {"p": projection, "v": version, "at": positions[i : i + chunk], "a": None if i == 0 else []}
        ).decode()
        for i in range(0, len(positions), chunk)
    ]


async def notify_applied(
    conn: asyncpg.Connection,
    channel_name: str,
    projection: str,
    version: int,
    ends: Mapping[tuple[str, int], int],
    aggregates: Iterable[str] | None,
) -> None:
    """In the batch's transaction: tell listeners what it changes once it commits."""
    for payload in applied_payloads(projection, version, ends, aggregates):
        await conn.execute("SELECT pg_notify($1, $2)", channel_name, payload)


def queue_full(exc: BaseException) -> bool:
    """PostgreSQL's notification queue is full (a listener that reads nothing holds it):
    a commit fails until it drains, which is no fault of the batch."""
    return isinstance(exc, asyncpg.ProgramLimitExceededError) and "NOTIFY queue" in str(exc)


async def notify_swapped(conn: asyncpg.Connection, channel_name: str, projection: str, live: int) -> None:
    """In the swap's transaction: readers see version `live` of `projection` from its commit."""
    payload = orjson.dumps({"p": projection, "v": live, "live": live}).decode()
    await conn.execute("SELECT pg_notify($1, $2)", channel_name, payload)
