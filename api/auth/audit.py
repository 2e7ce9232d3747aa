"""The audit trail: every command outcome and every refused request, on `<prefix>.audit`.

A record names who (actor, tenant, credential), what (method, route, aggregate,
command id), the outcome (accepted, rejected, queued, failed, unauthenticated,
forbidden, rate_limited), its status and reason, and from where (client IP, user
agent, correlation id). Records are queued in memory and produced in the background,
so a request does not wait for them; `streams.audit` writes them into PostgreSQL,
where `GET /api/v1/admin/audit` reads them. A refusal without a valid credential has
no tenant: its record carries the tenant "" (on the topic, for the platform's operators).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import MutableMapping
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from api.auth.principal import Principal
from shared_kernel import kafka
from shared_kernel.audit import audit_record
from shared_kernel.settings import Settings
from shared_kernel.topics import Topics

log = logging.getLogger(__name__)

QUEUED_MAX = 50_000
LINGER_MS = 50


def audit_topic(settings: Settings) -> str:
    return Topics(settings.topic_prefix).audit(settings.audit_topic_suffix)


def client_of(scope: MutableMapping[str, Any]) -> tuple[str, str, str]:
    """(client IP, user agent, correlation id) of a request's scope."""
    client = scope.get("client")
    ip = client[0] if client else ""
    agent = correlation = ""
    for name, value in scope.get("headers", ()):
        if name == b"user-agent":
            agent = value.decode("latin-1")[:300]
        elif name == b"x-correlation-id":
            correlation = value.decode("latin-1")[:200]
    return ip, agent, correlation


class AuditLog:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.topic = audit_topic(settings)
        self.producer: AIOKafkaProducer | None = None
        self.queue: asyncio.Queue[tuple[bytes, bytes]] = asyncio.Queue(QUEUED_MAX)
        self.dropped = 0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Produce what is recorded from now on, in the background. A producer of its own
        that lingers (`LINGER_MS`): records wait a little to share a request, where the
        commands' producer sends at once."""
        self._task = asyncio.create_task(self._send(), name="audit")

    async def stop(self) -> None:
        if self._task is None:
            return
        with contextlib.suppress(TimeoutError):  # what is queued goes out first, briefly
            await asyncio.wait_for(self.queue.join(), 2.0)
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    def record(
        self,
        scope: MutableMapping[str, Any],
        principal: Principal | None,
        outcome: str,
        status: int,
        reason: str = "",
        *,
        route: str = "",
        aggregate_id: str = "",
        command_id: str = "",
    ) -> None:
        ip, agent, correlation = client_of(scope)
        method = scope.get("method", "WEBSOCKET" if scope.get("type") == "websocket" else "")
        record = audit_record(
            tenant=principal.tenant if principal else "",
            actor=principal.subject if principal else "",
            credential=principal.credential if principal else "",
            method=method,
            route=route or getattr(scope.get("route"), "path", None) or scope.get("path", ""),
            aggregate_id=aggregate_id,
            command_id=command_id,
            outcome=outcome,
            status=status,
            reason=reason,
            client_ip=ip,
            user_agent=agent,
            correlation_id=correlation,
        )
        try:
            self.queue.put_nowait(record)
        except asyncio.QueueFull:
            self.dropped += 1
            if self.dropped % 1000 == 1:
                log.error("audit records dropped: Kafka has not taken them", extra={"dropped": self.dropped})

    async def _connect(self) -> AIOKafkaProducer:
        delay = 0.5
        while True:
            producer = kafka.producer(self.settings, linger_ms=LINGER_MS)
            try:
                await producer.start()
                return producer
            except KafkaError as exc:
                await producer.stop()
                log.warning(
                    "audit: Kafka unreachable; retrying", extra={"error": repr(exc), "retry_in_s": delay}
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10)

    async def _send(self) -> None:
        self.producer = await self._connect()
        try:
            await self._produce(self.producer)
        finally:
            await self.producer.stop()

    async def _produce(self, producer: AIOKafkaProducer) -> None:
        while True:
            key, value = await self.queue.get()
            batch = [(key, value)]
            while not self.queue.empty() and len(batch) < 500:
                batch.append(self.queue.get_nowait())
            delay = 0.5
            while True:
                try:
                    sent = [await producer.send(self.topic, v, key=k) for k, v in batch]
                    await asyncio.gather(*sent)
                    break
                except KafkaError as exc:
                    log.warning("audit records not produced yet; retrying", extra={"error": repr(exc)})
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 10)
            for _ in batch:
                self.queue.task_done()
