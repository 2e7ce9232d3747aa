"""What authentication costs a request, measured in this process on the real Redis and
PostgreSQL: the edge middleware (`api.auth.edge.Authenticate`) in front of an app that
does nothing, so every microsecond is the credential's check, the rate limit's count
and the headers; and its parts (a token's first check, an API key's first check).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from redis.asyncio import Redis

from api.auth.edge import Authenticate, Identity
from api.auth.local import issue_token
from projections.db import create_pool
from projections.migrations import migrate
from shared_kernel.settings import Settings

ROUNDS = 3000


async def _nothing(scope: Any, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b""})


def _scope(headers: list[tuple[bytes, bytes]]) -> dict[str, Any]:
    return {
        "type": "http",
        "method": "GET",
        "path": "/api/v1/incidents",
        "query_string": b"",
        "headers": headers,
        "client": ("127.0.0.1", 5000),
    }


async def _per_request_us(edge: Authenticate, headers: list[tuple[bytes, bytes]], rounds: int) -> float:
    statuses: list[int] = []

    async def send(message: Any) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    async def receive() -> Any:
        return {"type": "http.request", "body": b""}

    t0 = time.perf_counter()
    for _ in range(rounds):
        await edge(_scope(headers), receive, send)
    spent = time.perf_counter() - t0
    if set(statuses) != {200}:
        raise RuntimeError(f"the edge refused the benchmark's credential: {set(statuses)}")
    return spent / rounds * 1e6


async def measure(settings: Settings) -> dict[str, Any]:
    limited = settings.model_copy(update={"rate_limits": {"operator": 10**9, "admin": 0}})
    identity = Identity(limited)
    redis = Redis.from_url(settings.redis_url)
    identity.attach(redis)
    await migrate(settings)
    identity.pool = await create_pool(settings, "bench-auth", min_size=1, max_size=2)
    edge = Authenticate(_nothing, identity)
    try:
        token = issue_token(settings, "bench-auth", ["operator"], "bench", 3600)
        bearer = [(b"authorization", f"Bearer {token}".encode())]
        admin = issue_token(settings, "bench-admin", ["admin"], "bench", 3600)
        await _per_request_us(edge, bearer, 50)  # warm: the JWKS read, the script loaded
        per_token = await _per_request_us(edge, bearer, ROUNDS)
        unlimited = await _per_request_us(edge, [(b"authorization", f"Bearer {admin}".encode())], ROUNDS)
        fresh = [issue_token(settings, f"bench-{i}", ["operator"], "bench", 3600) for i in range(200)]
        t0 = time.perf_counter()
        for t in fresh:
            await identity.tokens.verify(t)
        first_check = (time.perf_counter() - t0) / len(fresh) * 1e6
        _, key = await identity.keys.issue(
            identity.pool, tenant="bench", role="operator", name="bench", created_by="bench"
        )
        with_key = [(b"x-api-key", key.encode())]
        t0 = time.perf_counter()
        await _per_request_us(edge, with_key, 1)
        key_first_ms = (time.perf_counter() - t0) * 1e3
        per_key = await _per_request_us(edge, with_key, ROUNDS)
    finally:
        await identity.pool.close()
        await redis.aclose()
    return {
        "what": "the edge's cost per request (credential, rate limit count, headers) before any route",
        "token_us_per_request": round(per_token, 1),
        "token_without_rate_limit_us_per_request": round(unlimited, 1),
        "rate_limit_count_us_per_request": round(per_token - unlimited, 1),
        "token_first_check_us": round(first_check, 1),
        "api_key_us_per_request": round(per_key, 1),
        "api_key_first_check_ms": round(key_first_ms, 1),
    }


if __name__ == "__main__":
    print(asyncio.run(measure(Settings())))
