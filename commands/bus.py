"""The command bus client used by the API: produce a command, wait for its result.

Each API instance listens on its own Redis reply channel; the command envelope names
it. Results are also cached by command id, so a retried request (same
Idempotency-Key) is answered from the cache without producing the command again, and
a result whose notification was missed is still found after the wait.

An envelope larger than a Kafka record may be is refused before anything is produced
(`CommandTooLarge`, a 413 at the API): it is no outage, and retrying cannot help.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import uuid

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError, MessageSizeTooLargeError
from redis.asyncio import Redis
from redis.exceptions import RedisError

from commands.replies import reply_channel, result_key
from commands.sizes import AIOKAFKA_DEFAULT_MAX_REQUEST_SIZE, TooLarge, record_size
from shared_kernel.envelope import CommandEnvelope, CommandResult
from shared_kernel.settings import Settings
from shared_kernel.topics import Topics

log = logging.getLogger(__name__)


class BusUnavailable(RuntimeError):
    """Kafka or Redis cannot be reached: the command was not (or may not have been) sent."""


class ResultTimeout(RuntimeError):
    """The command was sent but no result arrived in time; it may still apply."""


class CommandTooLarge(TooLarge):
    """The command is larger than a record of the commands topic: it was not sent."""


class CommandBus:
    def __init__(self, settings: Settings, producer: AIOKafkaProducer, redis: Redis) -> None:
        self.settings = settings
        self.producer = producer
        self.redis = redis
        self.topic = Topics(settings.topic_prefix).commands
        self.instance = uuid.uuid4().hex
        self.channel = reply_channel(settings.topic_prefix, self.instance)
        self._pending: dict[str, asyncio.Future[CommandResult]] = {}
        self._listener: asyncio.Task[None] | None = None
        self._subscribed = asyncio.Event()
        self.producer_ready = asyncio.Event()
        # The topic's limit, or the producer's own when that is tighter (aiokafka refuses
        # a record over its max_request_size before sending it).
        self.max_record_bytes = min(
            settings.kafka_max_message_bytes,
            int(getattr(producer, "_max_request_size", AIOKAFKA_DEFAULT_MAX_REQUEST_SIZE)),
        )

    async def start(self) -> None:
        self._listener = asyncio.create_task(self._listen(), name="command-replies")

    async def stop(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener

    async def _listen(self) -> None:
        """Deliver replies to waiting requests; resubscribe after a Redis outage."""
        while True:
            pubsub = self.redis.pubsub()
            try:
                await pubsub.subscribe(self.channel)
                self._subscribed.set()
                async for message in pubsub.listen():
                    if message.get("type") != "message":
                        continue
                    result = CommandResult.from_bytes(message["data"])
                    future = self._pending.get(result.command_id)
                    if future is not None and not future.done():
                        future.set_result(result)
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError):
                self._subscribed.clear()
                log.warning("reply channel lost; resubscribing", exc_info=True)
                await asyncio.sleep(1)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]

    async def cached(self, command_id: str) -> CommandResult | None:
        try:
            data = await self.redis.get(result_key(self.settings.topic_prefix, command_id))
        except (RedisError, OSError) as exc:
            raise BusUnavailable("Redis is unreachable") from exc
        return CommandResult.from_bytes(data) if data else None

    async def send(self, command: CommandEnvelope) -> CommandResult:
        """The command's result: from the cache for a retry, else produce and wait.

        Raises `CommandTooLarge` (nothing produced) for an envelope no record can hold.
        """
        key = command.aggregate_id.encode()
        value = dataclasses.replace(command, reply_to=self.channel).to_bytes()
        size = record_size(key, value)
        if size > self.max_record_bytes:
            raise CommandTooLarge("the command", size, self.max_record_bytes)
        cached = await self.cached(command.command_id)
        if cached is not None:
            return cached
        if not self.producer_ready.is_set() or not self._subscribed.is_set():
            raise BusUnavailable("Kafka or the reply channel is not connected yet")
        future = self._pending.get(command.command_id)
        owner = future is None
        if future is None:
            future = asyncio.get_running_loop().create_future()
            self._pending[command.command_id] = future
        timeout = self.settings.command_timeout_s
        try:
            if owner:
                try:
                    await asyncio.wait_for(self.producer.send_and_wait(self.topic, value, key=key), timeout)
                except MessageSizeTooLargeError as exc:  # the producer's or the broker's refusal
                    raise CommandTooLarge("the command", size, self.max_record_bytes) from exc
                except (KafkaError, TimeoutError) as exc:
                    raise BusUnavailable(f"Kafka did not take the command: {exc!r}") from exc
            try:
                return await asyncio.wait_for(asyncio.shield(future), timeout)
            except TimeoutError:
                late = await self.cached(command.command_id)
                if late is not None:
                    return late
                raise ResultTimeout(f"no result for command {command.command_id} within {timeout}s") from None
        finally:
            if owner:
                self._pending.pop(command.command_id, None)
