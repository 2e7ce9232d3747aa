"""Which process owns the partition of an aggregate, and how a command reaches it.

A command is decided by the single writer of its aggregate's partition (the partition
Kafka's default partitioner gives the aggregate id: the same one in the commands, the
events and the state topics). The owners are the members of the command processors'
consumer group; each one, when the group gives it partitions, writes itself into the
directory (a Redis hash, `<prefix>:owners`: partition -> url, instance, generation),
and a write of an older group generation never replaces a newer one. Any API instance
reads the directory to forward a command to its owner's internal endpoint.

The directory is only a hint: an owner that has lost a partition answers `not_owner`
and the sender reads the directory again, and a stale owner that still believes it
owns one cannot commit (its transactional id was fenced by the new owner).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import orjson
from aiokafka.partitioner import murmur2
from redis.asyncio import Redis

log = logging.getLogger(__name__)

# Write partition -> owner only if no newer group generation has written it.
_CLAIM = """
local current = redis.call('HGET', KEYS[1], ARGV[1])
if current then
  local gen = cjson.decode(current)['generation']
  if gen and gen > tonumber(ARGV[3]) then return 0 end
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return 1
"""

# Remove partition -> owner only while it still names this instance.
_RELEASE = """
local current = redis.call('HGET', KEYS[1], ARGV[1])
if current and cjson.decode(current)['instance'] == ARGV[2] then
  redis.call('HDEL', KEYS[1], ARGV[1])
end
return 1
"""

DIRECTORY_TTL_S = 1.0  # how long a sender trusts what it read before reading it again


def partition_for(aggregate_id: str, partitions: int) -> int:
    """The partition Kafka's default partitioner gives this key (Java's murmur2)."""
    return int(murmur2(aggregate_id.encode()) & 0x7FFFFFFF) % partitions


def directory_key(prefix: str) -> str:
    return f"{prefix}:owners"


@dataclass(frozen=True)
class Owner:
    url: str  # the owner's base URL, e.g. http://127.0.0.1:8000
    instance: str
    generation: int


class Directory:
    """The partition owners as the directory says, read at most once a second (or on demand)."""

    def __init__(self, redis: Redis, prefix: str) -> None:
        self.redis = redis
        self.key = directory_key(prefix)
        self.owners: dict[int, Owner] = {}
        self.read_at = float("-inf")

    async def owner(self, partition: int, *, fresh: bool = False) -> Owner | None:
        if fresh or time.monotonic() - self.read_at > DIRECTORY_TTL_S:
            await self.refresh()
        return self.owners.get(partition)

    async def refresh(self) -> None:
        raw = await self.redis.hgetall(self.key)
        owners = {}
        for field, value in raw.items():
            body = orjson.loads(value)
            owners[int(field)] = Owner(body["url"], body["instance"], int(body["generation"]))
        self.owners = owners
        self.read_at = time.monotonic()

    async def claim(self, partitions: list[int], owner: Owner) -> None:
        """Write `owner` for these partitions, unless a newer generation already has."""
        value = orjson.dumps({"url": owner.url, "instance": owner.instance, "generation": owner.generation})
        pipe = self.redis.pipeline(transaction=False)
        for p in partitions:
            pipe.eval(_CLAIM, 1, self.key, str(p), value, str(owner.generation))
        await pipe.execute()

    async def release(self, partitions: list[int], instance: str) -> None:
        """Remove this instance's entries (a graceful stop), so senders stop trying it."""
        pipe = self.redis.pipeline(transaction=False)
        for p in partitions:
            pipe.eval(_RELEASE, 1, self.key, str(p), instance)
        await pipe.execute()
