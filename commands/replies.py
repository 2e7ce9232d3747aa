"""Where command results go: a Redis key per command id (the result cache, so a retried
request gets the same answer, and the status of an asynchronous command), and the Redis
channel a command's envelope names in `reply_to`, if any."""

from __future__ import annotations

from collections.abc import Iterable

from redis.asyncio import Redis

from shared_kernel.audit import PARKED_RETRY_AFTER_S, PASSING
from shared_kernel.envelope import CommandResult


def result_key(prefix: str, tenant: str, command_id: str) -> str:
    """A command id is its tenant's (an Idempotency-Key in two tenants names two commands)."""
    return f"{prefix}:result:{tenant}:{command_id}"


async def publish(
    redis: Redis, prefix: str, results: Iterable[tuple[str, CommandResult]], ttl_s: int
) -> None:
    """Cache every result and notify its waiting API instance, in one round trip."""
    pipe = redis.pipeline(transaction=False)
    count = 0
    for reply_to, result in results:
        data = result.to_bytes()
        # a bug may be fixed, a key released: let a retry run again (soon, for a parked one)
        if result.code not in PASSING or result.code == "aggregate_parked":
            ttl = PARKED_RETRY_AFTER_S if result.code == "aggregate_parked" else ttl_s
            pipe.set(result_key(prefix, result.tenant, result.command_id), data, ex=ttl)
        if reply_to:
            pipe.publish(reply_to, data)
        count += 1
    if count:
        await pipe.execute()
