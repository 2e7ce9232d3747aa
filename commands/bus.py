"""The command bus client used by the API: a command to its partition's owner, its result back.

The synchronous path (what a `POST` waits for): the command goes straight to the
process that owns its aggregate's partition (commands.routing): this process, when it
owns the partition (`cqrs serve api` runs an owner by default), else the owner's
internal endpoint, found in the partition directory. The owner decides and commits it
and answers on the same connection: no produce to the commands topic, no fetch, no
reply channel. While a partition changes hands (no owner yet, or the one the directory
named has lost it), the bus reads the directory again for a moment, then answers 503
with Retry-After.

The asynchronous path (`Prefer: respond-async`, for bulk submitters): the command is
appended to `<prefix>.commands` and answered 202 at once; the partition's owner
consumes and decides it, and its result is in the result cache under the command id.

Results are cached in Redis by command id, so a retried request (same Idempotency-Key)
is answered without sending the command again. A command whose send failed midway is
sent again with the same id: its owner knows the outcomes of recent commands of each
aggregate (commands.snapshots) and answers a repeat with the first outcome.

An envelope larger than a Kafka record may be is refused before anything is sent
(`CommandTooLarge`, a 413 at the API): it is no outage, and retrying cannot help.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

import aiohttp
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError, MessageSizeTooLargeError
from redis.asyncio import Redis
from redis.exceptions import RedisError

from commands.partition import Backlogged, NotOwner, Unsettled
from commands.replies import result_key
from commands.routing import Directory, partition_for
from commands.sizes import AIOKAFKA_DEFAULT_MAX_REQUEST_SIZE, TooLarge, record_size
from shared_kernel.credentials import CLUSTER_HEADER, cluster_secret
from shared_kernel.envelope import CommandEnvelope, CommandResult
from shared_kernel.settings import Settings
from shared_kernel.topics import Topics

if TYPE_CHECKING:
    from commands.processor import CommandProcessor

log = logging.getLogger(__name__)

INTERNAL_COMMANDS = "/internal/v1/commands"  # where an owner takes forwarded commands
NOT_OWNER = "not_owner"  # the `error` of an owner's 409 for a partition it does not own
HANDOVER_WAIT_S = 2.0  # how long a command waits for its partition to get an owner


class BusUnavailable(RuntimeError):
    """Kafka or Redis cannot be reached: the command was not (or may not have been) sent."""


class ResultTimeout(RuntimeError):
    """The command was sent but no result arrived in time; it may still apply."""


class CommandTooLarge(TooLarge):
    """The command is larger than a record of the commands topic: it was not sent."""


class NoOwner(BusUnavailable):
    """No process answers for the command's partition now (a handover): nothing was written."""


class CommandBus:
    def __init__(
        self,
        settings: Settings,
        producer: AIOKafkaProducer,
        redis: Redis,
        owner: CommandProcessor | None = None,
    ) -> None:
        self.settings = settings
        self.producer = producer
        self.redis = redis
        self.owner = owner  # the partitions' owner in this process, if it runs one
        self.directory = Directory(redis, settings.topic_prefix)
        self.cluster_secret = cluster_secret(settings)
        self.http: aiohttp.ClientSession | None = None
        self.topic = Topics(settings.topic_prefix).commands
        self.producer_ready = asyncio.Event()
        # The topic's limit, or the producer's own when that is tighter (aiokafka refuses
        # a record over its max_request_size before sending it).
        self.max_record_bytes = min(
            settings.kafka_max_message_bytes,
            int(getattr(producer, "_max_request_size", AIOKAFKA_DEFAULT_MAX_REQUEST_SIZE)),
        )

    async def start(self) -> None:
        self.http = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.settings.command_timeout_s),
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=30),
        )

    async def stop(self) -> None:
        if self.http is not None:
            await self.http.close()

    async def cached(self, tenant: str, command_id: str) -> CommandResult | None:
        try:
            data = await self.redis.get(result_key(self.settings.topic_prefix, tenant, command_id))
        except (RedisError, OSError) as exc:
            raise BusUnavailable("Redis is unreachable") from exc
        return CommandResult.from_bytes(data) if data else None

    def _encoded(self, command: CommandEnvelope) -> bytes:
        value = command.to_bytes()
        size = record_size(command.aggregate_id.encode(), value)
        if size > self.max_record_bytes:
            raise CommandTooLarge("the command", size, self.max_record_bytes)
        return value

    async def send(self, command: CommandEnvelope) -> CommandResult:
        """The command's committed result: from the cache for a retry, else from its owner.

        Raises `CommandTooLarge` (nothing sent), `NoOwner` or `BusUnavailable` (503: send
        it again with the same id), `ResultTimeout` (it may still apply)."""
        value = self._encoded(command)
        if command.retriable:  # a command without a key cannot be a retry: nothing to look up
            cached = await self.cached(command.tenant, command.command_id)
            if cached is not None:
                return cached
        timeout = self.settings.command_timeout_s
        deadline = time.monotonic() + timeout
        handover = time.monotonic() + min(HANDOVER_WAIT_S, timeout)
        partition = partition_for(command.aggregate_id, self.settings.partitions)
        fresh = False
        while True:
            try:
                result = await self._to_owner(command, value, partition, fresh, deadline)
            except NotOwner as exc:
                if time.monotonic() >= handover:
                    raise NoOwner(f"partition {partition} has no owner now: {exc}") from None
                fresh = True
                await asyncio.sleep(0.05)
                continue
            except TimeoutError:
                raise ResultTimeout(f"no result for command {command.command_id} within {timeout}s") from None
            return result

    async def _to_owner(
        self, command: CommandEnvelope, value: bytes, partition: int, fresh: bool, deadline: float
    ) -> CommandResult:
        """One attempt: the local owner, or the one the directory names (`NotOwner` if none)."""
        remaining = max(deadline - time.monotonic(), 0.001)
        owner = self.owner
        if owner is not None and partition in owner.workers:
            try:
                return await asyncio.wait_for(owner.submit(command, value, partition), remaining)
            except (Backlogged, Unsettled) as exc:
                raise BusUnavailable(str(exc)) from exc
        try:
            route = await self.directory.owner(partition, fresh=fresh)
        except (RedisError, OSError) as exc:
            raise BusUnavailable("Redis is unreachable") from exc
        if route is None or (owner is not None and route.url == owner.url):
            raise NotOwner(f"the directory names no other owner of partition {partition}")
        assert self.http is not None
        try:
            async with self.http.post(
                route.url + INTERNAL_COMMANDS,
                data=value,
                headers={"Content-Type": "application/json", CLUSTER_HEADER: self.cluster_secret},
                timeout=aiohttp.ClientTimeout(total=remaining),
            ) as r:
                body = await r.read()
                if r.status == 200:
                    return CommandResult.from_bytes(body)
                if r.status == 409:
                    raise NotOwner(f"{route.url} does not own partition {partition}")
                raise BusUnavailable(f"the owner of partition {partition} answered {r.status}")
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as exc:
            # The owner is gone (or going): the command may have been committed; sending it
            # again with the same id to the next owner gets its first outcome.
            raise NotOwner(f"{route.url} is unreachable: {exc!r}") from None

    async def enqueue(self, command: CommandEnvelope) -> None:
        """The asynchronous path: append the command to the commands topic; its owner
        decides it in turn, and its result goes to the result cache."""
        value = self._encoded(command)
        if not self.producer_ready.is_set():
            raise BusUnavailable("Kafka is not connected yet")
        key = command.aggregate_id.encode()
        try:
            await asyncio.wait_for(
                self.producer.send_and_wait(self.topic, value, key=key), self.settings.command_timeout_s
            )
        except MessageSizeTooLargeError as exc:
            size = record_size(key, value)
            raise CommandTooLarge("the command", size, self.max_record_bytes) from exc
        except (KafkaError, TimeoutError) as exc:
            raise BusUnavailable(f"Kafka did not take the command: {exc!r}") from exc
