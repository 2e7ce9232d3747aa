"""Requests per principal and window, counted in Redis (`APP_RATE_LIMITS` by role).

One fixed window per principal: the first request of a window creates its counter with
the window's expiry, each request increments it, in one atomic script, so concurrent
requests on any number of API instances are counted exactly. Over the limit: 429 with
`Retry-After` (the window's remaining seconds) and the `RateLimit-*` headers that every
answer carries (`RateLimit-Limit`, `-Remaining`, `-Reset`, `-Policy`).

While Redis is unreachable, `APP_RATE_LIMIT_WHEN_REDIS_DOWN` decides: `allow` (the
default: the counter's outage must not stop the API, whose credentials and permissions
still hold) or `refuse` (503 with Retry-After).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from redis.asyncio import Redis
from redis.exceptions import RedisError

from api.auth.principal import Principal
from shared_kernel.settings import Settings

log = logging.getLogger(__name__)

_COUNT = """
local n = redis.call('INCR', KEYS[1])
if n == 1 then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
local ttl = redis.call('PTTL', KEYS[1])
if ttl < 0 then redis.call('PEXPIRE', KEYS[1], ARGV[1]); ttl = tonumber(ARGV[1]) end
return {n, ttl}
"""


@dataclass(frozen=True, slots=True)
class Verdict:
    allowed: bool
    limit: int = 0  # 0: no limit (no headers)
    remaining: int = 0
    reset_s: int = 0
    unavailable: bool = False  # Redis down and the setting says refuse

    def headers(self, window_s: int) -> list[tuple[bytes, bytes]]:
        if not self.limit:
            return []
        return [
            (b"ratelimit-limit", str(self.limit).encode()),
            (b"ratelimit-remaining", str(self.remaining).encode()),
            (b"ratelimit-reset", str(self.reset_s).encode()),
            (b"ratelimit-policy", f"{self.limit};w={window_s}".encode()),
        ]


UNLIMITED = Verdict(True)


class RateLimiter:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.redis: Redis | None = None
        self._script: object = None
        self._warned = 0.0

    def attach(self, redis: Redis) -> None:
        self.redis = redis
        self._script = redis.register_script(_COUNT)

    def limit_of(self, principal: Principal) -> int:
        limits = self.settings.rate_limits
        known = [limits[r] for r in principal.roles if r in limits]
        if not known:
            return 0 if principal.role in ("admin", "platform") else limits.get("viewer", 0)
        return 0 if 0 in known else max(known)

    async def hit(self, principal: Principal) -> Verdict:
        limit = self.limit_of(principal)
        if not limit:
            return UNLIMITED
        window_ms = self.settings.rate_limit_window_s * 1000
        key = f"{self.settings.topic_prefix}:rate:{principal.tenant}:{principal.subject}"
        try:
            if self.redis is None or self._script is None:
                raise RedisError("no Redis client yet")
            count, ttl_ms = await self._script(keys=[key], args=[window_ms])  # type: ignore[operator]
        except (RedisError, OSError) as exc:
            return self._redis_down(exc, limit)
        reset = max(1, -(-int(ttl_ms) // 1000))
        return Verdict(int(count) <= limit, limit, max(0, limit - int(count)), reset)

    def _redis_down(self, exc: Exception, limit: int) -> Verdict:
        now = time.monotonic()
        if now - self._warned > 10:
            self._warned = now
            log.warning(
                "rate limits cannot be counted: Redis is unreachable",
                extra={"error": repr(exc), "policy": self.settings.rate_limit_when_redis_down},
            )
        if self.settings.rate_limit_when_redis_down == "allow":
            return UNLIMITED
        return Verdict(False, limit, 0, self.settings.retry_after_s, unavailable=True)
