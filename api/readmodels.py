"""The read models as the API sees them: a PostgreSQL pool and read-your-writes.

A query may carry the position token a command returned (`?consistent_with=` or the
`X-Consistency-Token` header). It is answered once every projection it reads has
applied the token's positions on that projection's topics, or gets 504 after
`query_consistency_timeout_s`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from typing import Annotated, Any

import asyncpg
from fastapi import Depends, Header, Query, Request

from api.consistency import CommittedPositions
from api.errors import ReadModelsUnavailable, RequestProblem
from api.inputs import TokenHeader, TokenText
from projections.registry import PROJECTIONS
from shared_kernel.position import InvalidToken, PositionToken
from shared_kernel.settings import Settings
from shared_kernel.topics import Topics

POLL_S = 0.01  # how often PostgreSQL is asked while the change notifications are not followed
RECHECK_S = 0.1  # how often it is asked anyway while one is


async def get_pool(request: Request) -> asyncpg.Pool:
    pool: asyncpg.Pool | None = getattr(request.app.state, "pool", None)
    if pool is None:
        raise ReadModelsUnavailable("the read models are not reachable yet")
    return pool


PoolDep = Annotated[asyncpg.Pool, Depends(get_pool)]


async def position_token(
    consistent_with: Annotated[
        TokenText | None,
        Query(description="A position token from a command: answer once the read model has it."),
    ] = None,
    x_consistency_token: Annotated[
        TokenHeader | None, Header(description="Same as `consistent_with` (which wins).")
    ] = None,
) -> PositionToken | None:
    """The caller's position token, if it gave one (422 naming the field when malformed:
    not a token, or partitions beyond int32, offsets beyond int64, too many of them)."""
    raw = consistent_with or x_consistency_token
    if not raw:
        return None
    try:
        return PositionToken.decode(raw)
    except InvalidToken as exc:
        where = "query" if consistent_with else "header"
        name = "consistent_with" if consistent_with else "x-consistency-token"
        raise RequestProblem(422, "invalid_token", str(exc), field=name, location=where) from exc


TokenDep = Annotated[PositionToken | None, Depends(position_token)]


def consistent(*projections: str) -> Callable[..., Coroutine[Any, Any, None]]:
    """A dependency that waits until the named projections reached the caller's token."""

    async def wait(request: Request, pool: PoolDep, token: TokenDep) -> None:
        if token is not None:
            state = request.app.state
            await wait_for(pool, state.settings, token, projections, state.positions)

    return wait


async def wait_for(
    pool: asyncpg.Pool,
    settings: Settings,
    token: PositionToken,
    names: tuple[str, ...],
    committed: CommittedPositions | None = None,
) -> None:
    """Return once the live versions of `names` have applied the token (504 after
    `query_consistency_timeout_s`). While the change notifications are followed
    (`committed`), they say so as soon as the batches commit; PostgreSQL is asked once
    first and then every `RECHECK_S` (its positions are the truth, the notifications' a
    lower bound: after a swap they know nothing of the new version until it commits)."""
    if committed is not None and committed.reached_all(names, token):
        return
    topics = Topics(settings.topic_prefix)
    wanted = [
        (name, topic, partition, offset)
        for name in names
        for topic in (topics.events(c) for c in PROJECTIONS[name].contexts)
        for partition, offset in token.offsets.get(topic, {}).items()
    ]
    if not wanted:
        return
    deadline = time.monotonic() + settings.query_consistency_timeout_s
    while True:
        rows = await pool.fetch(
            "SELECT w.projection FROM unnest($1::text[], $2::text[], $3::int[], $4::bigint[]) "
            "AS w(projection, topic, partition, next_offset) "
            "LEFT JOIN projection_versions v ON v.projection = w.projection AND v.state = 'live' "
            "LEFT JOIN projection_positions p ON p.projection = w.projection "
            "AND p.version = coalesce(v.version, 1) AND p.topic = w.topic AND p.partition = w.partition "
            "WHERE coalesce(p.next_offset, 0) < w.next_offset",
            [w[0] for w in wanted],
            [w[1] for w in wanted],
            [w[2] for w in wanted],
            [w[3] for w in wanted],
        )
        if not rows:
            return
        if time.monotonic() >= deadline:
            behind = sorted({r["projection"] for r in rows})
            raise RequestProblem(
                504,
                "not_consistent_yet",
                f"the read model has not reached the given position in "
                f"{settings.query_consistency_timeout_s:g} s; retry",
                projections=behind,
            )
        if committed is None or not committed.connected:
            await asyncio.sleep(POLL_S)
            continue
        recheck = min(time.monotonic() + RECHECK_S, deadline)
        while committed.connected and not committed.reached_all(names, token) and time.monotonic() < recheck:
            await committed.changed(recheck - time.monotonic())
        if committed.reached_all(names, token):
            return
