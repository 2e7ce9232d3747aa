"""Requests per principal and window, counted in Redis (`APP_RATE_LIMITS` by role).

One fixed window per principal (`APP_RATE_LIMIT_WINDOW_S`). The count is Redis's, and
an API instance takes it in *leases*: one atomic script grants it up to `want` of the
window's remaining requests, and the instance spends them locally, one per request,
before it asks again. The first lease of a principal is one request, and each next one
twice the last (up to `MAX_LEASE`), but never more than an eighth of what remains of
the window: a client sending one request an hour costs one Redis call each, a busy one
one call per 64 requests. Nothing is counted twice or admitted beyond the limit, on any
number of instances (a request is admitted only with a granted token); what a lease
holds unspent when the window ends is not given to anyone else: at most an eighth of
the remainder, per instance.

Over the limit: 429 with `Retry-After` (the window's remaining seconds). Every answer
carries `RateLimit-Limit`, `-Remaining`, `-Reset` and `-Policy` (the remaining count is
the window's as this instance last saw it, less what it spent since).

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

MAX_LEASE = 64
LEASES_KEPT = 100_000

# KEYS[1] the window's counter; ARGV: window ms, wanted, limit -> {granted, used, ttl ms}
_LEASE = """
local used = tonumber(redis.call('GET', KEYS[1]) or '0')
local limit = tonumber(ARGV[3])
local grant = math.min(tonumber(ARGV[2]), limit - used, math.max(1, math.floor((limit - used) / 8)))
if grant > 0 then
  used = redis.call('INCRBY', KEYS[1], grant)
  if used == grant then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
else
  grant = 0
end
local ttl = redis.call('PTTL', KEYS[1])
if ttl < 0 then
  if used > 0 then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
  ttl = tonumber(ARGV[1])
end
return {grant, used, ttl}
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


@dataclass(slots=True)
class Lease:
    left: int  # granted to this instance, not spent yet
    used: int  # the window's count (every instance's grants) when last asked
    ends: float  # monotonic time the window ends
    next: int = 1  # how many to ask for next time

    def verdict(self, limit: int) -> Verdict:
        reset = max(1, int(self.ends - time.monotonic() + 0.999))
        return Verdict(True, limit, max(0, limit - self.used + self.left), reset)


class RateLimiter:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.redis: Redis | None = None
        self._script: object = None
        self._leases: dict[str, Lease] = {}
        self._warned = 0.0

    def attach(self, redis: Redis) -> None:
        self.redis = redis
        self._script = redis.register_script(_LEASE)

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
        key = f"{self.settings.topic_prefix}:rate:{principal.tenant}:{principal.subject}"
        lease = self._leases.get(key)
        if lease is not None and lease.left > 0 and time.monotonic() < lease.ends:
            lease.left -= 1
            return lease.verdict(limit)
        want = lease.next if lease is not None and time.monotonic() < lease.ends else 1
        window_ms = self.settings.rate_limit_window_s * 1000
        try:
            if self.redis is None or self._script is None:
                raise RedisError("no Redis client yet")
            granted, used, ttl_ms = await self._script(keys=[key], args=[window_ms, want, limit])  # type: ignore[operator]
        except (RedisError, OSError) as exc:
            return self._redis_down(exc, limit)
        now = time.monotonic()
        lease = self._leases.get(key)  # another request of the principal may have taken one meanwhile
        if lease is None or now >= lease.ends:
            lease = self._leases[key] = Lease(0, 0, 0.0)
            if len(self._leases) > LEASES_KEPT:
                self._forget(now)
        lease.left += int(granted)
        lease.used = max(lease.used, int(used))
        lease.ends = now + int(ttl_ms) / 1000
        lease.next = min(MAX_LEASE, want * 2)
        if lease.left > 0:
            lease.left -= 1
            return lease.verdict(limit)
        lease.next = 1
        return Verdict(False, limit, 0, max(1, -(-int(ttl_ms) // 1000)))

    def _forget(self, now: float) -> None:
        for key in [k for k, lease in self._leases.items() if lease.ends <= now or not lease.left]:
            del self._leases[key]

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
