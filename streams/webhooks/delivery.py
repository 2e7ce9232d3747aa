"""The webhooks' delivery job: every event that matches an active subscription of its
tenant is POSTed to the subscription's URL, signed the Standard Webhooks way.

Two halves in one Faust app (its consumer group `<prefix>.job.webhook-delivery`):

- **What is owed.** The agent reads every context's events; for each subscription that
  wants an event (its tenant, its context and event-type filters, registered before the
  event occurred, `active` or `failing`) it records a delivery in PostgreSQL
  (`projections.webhooks.deliveries`), keyed by the `webhook-id`, before the event is
  acked. A redelivered event finds its deliveries there already.
- **Paying it.** A pump every `PUMP_S` claims the due heads (the lowest undelivered
  version of each subscription and aggregate, so order per aggregate holds) with a lease,
  at most `APP_WEBHOOK_PER_TARGET` in flight per subscription and
  `APP_WEBHOOK_IN_FLIGHT` in all, and POSTs each: 2xx is delivered; another status, a
  timeout or a refused connection is retried after `APP_WEBHOOK_RETRY_S` (with up to
  20 % jitter); after the last pause the delivery is parked and the subscription marked
  failing (`MarkWebhookFailing`); `410 Gone` disables the subscription
  (`DisableWebhook`). Redirects are not followed, at most `APP_WEBHOOK_RESPONSE_BYTES`
  of an answer is read, and the target's address is checked before every attempt
  (`commands.webhooks.signing`). A worker killed mid-attempt leaves its lease to lapse;
  the next claim sends the same `webhook-id` again: at least once.

The subscriptions come from their read model (`webhook_subscriptions`), read once it has
applied every webhooks event committed so far, and read again for an event that occurred
after the last read (at most every `PUMP_S`, shared by the events of that time) and every
`SUBSCRIPTIONS_S`: an event goes to every subscription registered before it occurred.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import time
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

import aiohttp
import asyncpg
import orjson
from aiokafka.errors import KafkaError
from aiokafka.structs import TopicPartition
from prometheus_client import Counter, Histogram

from api.errors import RequestProblem
from api.readmodels import wait_for
from commands.webhooks import CONTEXT as WEBHOOKS
from commands.webhooks import commands as c
from commands.webhooks import signing as w
from projections.db import create_pool
from projections.events import StoredEvent, event_document
from projections.webhooks import deliveries
from shared_kernel import kafka
from shared_kernel.position import PositionToken
from shared_kernel.topics import Topics
from streams.jobs import RETRY_S, Job, derived_id

log = logging.getLogger(__name__)

ATTEMPTS = Counter(
    "cqrs_webhook_attempts_total",
    "Webhook delivery attempts by outcome (delivered, retry, gone, refused)",
    ["outcome"],
)
ATTEMPT_DURATION = Histogram(
    "cqrs_webhook_attempt_duration_seconds", "One webhook delivery attempt, request to answer", ["outcome"]
)
PUMP_S = 0.1
SUBSCRIPTIONS_S = 1.0
PURGE_S = 3600.0


class WebhookDelivery(Job):
    name = "webhook-delivery"
    concurrency = 16

    def __init__(self, settings: Any) -> None:
        super().__init__(settings)
        from commands import CONTEXTS

        self.contexts = tuple(ctx.name for ctx in CONTEXTS)  # type: ignore[misc]
        self.key = w.webhook_key(settings)
        self.pool: asyncpg.Pool | None = None
        self.http: aiohttp.ClientSession | None = None
        self.subscriptions: list[dict[str, Any]] = []
        self.read_at = 0.0  # monotonic
        self.read_wall = datetime.fromtimestamp(0, UTC)
        self.in_flight: set[asyncio.Task[None]] = set()
        self.reading = asyncio.Lock()
        self.pumping = False
        self.again = False
        self.outcomes: list[tuple[deliveries.Attempt, asyncio.Future[None]]] = []
        self.writing = False
        self.pumps: set[asyncio.Future[None]] = set()
        self.ends: Any = None  # a consumer that reads the webhooks topic's end offsets
        self.stable: dict[Any, int] = {}  # its last stable offsets the read model had reached
        self.delivered = 0
        self.last_purge = 0.0

    def timers(self, app: Any) -> None:
        app.timer(PUMP_S)(self.pump)

    async def _pool(self) -> asyncpg.Pool:
        if self.pool is None:
            pool = await create_pool(self.settings, "webhook-delivery", max_size=8)
            await deliveries.ensure(pool)
            self.pool = pool
        return self.pool

    # ---- what is owed ---------------------------------------------------------

    async def _read_subscriptions(self) -> None:
        """The subscriptions as of now: once their read model has applied every webhooks
        event committed so far (the topic's end offsets), so none registered before an
        event that is handled after this read is missing."""
        pool = await self._pool()
        topic = Topics(self.settings.topic_prefix).events("webhooks")
        for attempt in itertools.count():
            wall = datetime.now(UTC)
            try:
                tps = [TopicPartition(topic, p) for p in range(self.settings.partitions)]
                stable = await (await self._offsets()).end_offsets(tps)  # moves on a registration
                if stable != self.stable:
                    # where the last records end (the stable offsets are past the markers)
                    ends = await self._after_last_records(tps)
                    after = {tp.partition: end for tp, end in zip(tps, ends, strict=True) if end}
                    await wait_for(
                        pool, self.settings, PositionToken({topic: after}), ("webhook_subscriptions",)
                    )
                    self.stable = stable
                rows = await pool.fetch(
                    "SELECT id, tenant, contexts, event_types, created_at FROM webhook_subscriptions "
                    "WHERE status IN ('active', 'failing')"
                )
                break
            except (RequestProblem, asyncpg.UndefinedTableError, KafkaError, OSError) as exc:
                # the projector is behind or not there yet (the registrations may be in
                # the log already), or Kafka is away: wait for them
                pause = RETRY_S[min(attempt, len(RETRY_S) - 1)]
                log.warning(
                    "the webhook subscriptions cannot be read up to date yet",
                    extra={"error": repr(exc), "retry_in_s": pause},
                )
                await asyncio.sleep(pause)
        self.subscriptions = [dict(r) for r in rows]
        self.read_at, self.read_wall = time.monotonic(), wall

    async def _offsets(self) -> Any:
        """A consumer that asks for offsets only: with no partition assigned it has no
        fetch in flight (a broker answers a connection's requests in order, so a long-poll
        fetch would hold the answer back up to its wait: 1 s per read, measured)."""
        if self.ends is None:
            consumer = kafka.consumer(self.settings)
            await consumer.start()
            self.ends = consumer
        return self.ends

    async def _after_last_records(self, tps: list[TopicPartition]) -> list[int]:
        consumer = kafka.consumer(self.settings)
        await consumer.start()
        try:
            consumer.assign(tps)
            return await kafka.after_last_records(consumer, tps)
        finally:
            await consumer.stop()

    def _stale_for(self, event: StoredEvent) -> bool:
        return event.meta.occurred_at >= self.read_wall or time.monotonic() - self.read_at > SUBSCRIPTIONS_S

    async def _wanted_by(self, event: StoredEvent) -> list[dict[str, Any]]:
        """The subscriptions that want `event`, read after it occurred (a read is shared
        by the events of `PUMP_S`), or again after `SUBSCRIPTIONS_S` (pauses, deletes)."""
        while event.meta.occurred_at >= self.read_wall or time.monotonic() - self.read_at > SUBSCRIPTIONS_S:
            async with self.reading:
                if (
                    event.meta.occurred_at < self.read_wall
                    and time.monotonic() - self.read_at <= SUBSCRIPTIONS_S
                ):
                    break
                await asyncio.sleep(max(0.0, PUMP_S - (time.monotonic() - self.read_at)))
                await self._read_subscriptions()
        return [
            s
            for s in self.subscriptions
            if s["tenant"] == event.meta.tenant
            and (not s["contexts"] or event.context in s["contexts"])
            and (not s["event_types"] or event.type_name in s["event_types"])
            and s["created_at"] <= event.meta.occurred_at
        ]

    async def handle(self, event: StoredEvent) -> None:
        wanted = await self._wanted_by(event)
        if not wanted:
            return
        document = event_document(
            event.meta, event.payload, event.topic, event.partition, event.offset, event.timestamp_ms
        )
        rows = []
        for sub in wanted:
            msg_id = w.webhook_id_of(str(sub["id"]), str(event.meta.event_id))
            body = orjson.dumps({"type": "event", "id": msg_id, **document}, default=str).decode()
            rows.append(
                (
                    msg_id,
                    sub["id"],
                    event.meta.tenant,
                    str(event.meta.event_id),
                    event.type_name,
                    event.meta.aggregate_id,
                    event.version,
                    f"{event.topic}:{event.partition}:{event.offset}",
                    body,
                )
            )
        await deliveries.owe(await self._pool(), rows)

    # ---- paying it --------------------------------------------------------------

    async def pump(self) -> None:
        """Start the attempts that are due, as far as there is room; again at once while
        it finds some, and when an attempt ends (its slot is free): so a pump runs on every
        tick of `PUMP_S` and after every attempt, one at a time."""
        if self.pumping:
            self.again = True
            return
        self.pumping = True
        try:
            while True:
                self.again = False
                started = await self._start_due()
                if not started and not self.again:
                    break
        finally:
            self.pumping = False

    async def _start_due(self) -> int:
        try:
            pool = await self._pool()
            room = self.settings.webhook_in_flight - len(self.in_flight)
            lease = self.settings.webhook_timeout_s + 5.0
            claimed = await deliveries.claim(pool, self.settings.webhook_per_target, lease, room)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            if not isinstance(exc, asyncpg.UndefinedTableError):
                log.warning("webhook deliveries cannot be claimed", extra={"error": repr(exc)})
            return 0
        for delivery in claimed:
            task = asyncio.create_task(self._attempt(delivery))
            self.in_flight.add(task)
            task.add_done_callback(self._attempt_ended)
        if time.monotonic() - self.last_purge > PURGE_S:
            self.last_purge = time.monotonic()
            try:
                await deliveries.purge(pool, self.settings.webhook_keep_days)
            except (OSError, asyncpg.PostgresError) as exc:
                log.warning("old webhook deliveries not purged", extra={"error": repr(exc)})
        return len(claimed)

    async def _record(self, attempt: deliveries.Attempt) -> None:
        """Write the attempt with those that end meanwhile (one transaction for all);
        return once it is written."""
        written: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.outcomes.append((attempt, written))
        if not self.writing:
            self.writing = True
            try:
                while self.outcomes:
                    batch, self.outcomes = self.outcomes, []
                    try:
                        await deliveries.attempted(await self._pool(), [a for a, _ in batch])
                        failed: BaseException | None = None
                    except Exception as exc:  # every waiter gets it (its own await raises it)
                        failed = exc
                    for _, f in batch:
                        if failed is None:
                            f.set_result(None)
                        else:
                            f.set_exception(failed)
            finally:
                self.writing = False
        await written

    def _attempt_ended(self, task: asyncio.Task[None]) -> None:
        self.in_flight.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("a webhook attempt failed", extra={"error": repr(task.exception())})
        self.pumps.add(pump := asyncio.ensure_future(self.pump()))
        pump.add_done_callback(self.pumps.discard)

    def _client(self) -> aiohttp.ClientSession:
        if self.http is None or self.http.closed:
            self.http = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(
                    limit=self.settings.webhook_in_flight, limit_per_host=self.settings.webhook_per_target
                ),
                timeout=aiohttp.ClientTimeout(total=self.settings.webhook_timeout_s),
                auto_decompress=False,
            )
        return self.http

    def _secrets(self, d: dict[str, Any], now: datetime) -> list[str]:
        current = w.secret_of(self.key, d["tenant"], str(d["subscription_id"]), d["generation"])
        secrets = [current]
        previous_until = d["previous_until"]
        if d["previous_generation"] and previous_until and datetime.fromisoformat(previous_until) > now:
            previous = int(d["previous_generation"])
            secrets.append(w.secret_of(self.key, d["tenant"], str(d["subscription_id"]), previous))
        return secrets

    async def _attempt(self, d: dict[str, Any]) -> None:
        settings = self.settings
        started = datetime.now(UTC)
        t0 = time.perf_counter()
        status: int | None = None
        error: str | None = None
        answer: str | None = None
        outcome = "retry"
        try:
            why = await w.resolved_refusal(d["url"], settings.webhook_allowed_networks)
            if why is not None:
                error, outcome = f"refused: {why}", "refused"
            else:
                headers = w.headers(d["id"], d["body"], self._secrets(d, started), started)
                async with self._client().post(
                    d["url"], data=d["body"].encode(), headers=headers, allow_redirects=False
                ) as response:
                    status = response.status
                    raw = await response.content.read(settings.webhook_response_bytes)
                    answer = raw.decode(errors="replace") or None
                if 200 <= status < 300:
                    outcome = "delivered"
                elif status == 410:
                    outcome, error = "gone", "410 Gone"
                else:
                    error = f"HTTP {status}"
        except TimeoutError:
            error = f"no answer within {settings.webhook_timeout_s:g} s"
        except aiohttp.ClientError as exc:
            error = f"{type(exc).__name__}: {exc}"
        latency_ms = round(1000 * (time.perf_counter() - t0), 1)
        ATTEMPTS.labels(outcome).inc()
        ATTEMPT_DURATION.labels(outcome).observe(latency_ms / 1000)
        n, ident = d["attempts"], d["id"]
        if outcome == "delivered":
            await self._record(
                deliveries.Attempt(ident, n, started, status, latency_ms, None, answer, "delivered")
            )
            self.delivered += 1
            return
        retries = settings.webhook_retry_s
        if outcome in ("retry", "refused") and n > len(retries):
            await self._record(
                deliveries.Attempt(ident, n, started, status, latency_ms, error, answer, "parked")
            )
            log.warning(
                "webhook delivery parked after its last attempt",
                extra={"delivery": d["id"], "subscription": str(d["subscription_id"]), "error": error},
            )
            if d["subscription_status"] == "active":
                since = (d["first_attempt_at"] or started).isoformat()
                command = c.MarkWebhookFailing(UUID(str(d["subscription_id"])), error or "failed", since)
                await self.send(WEBHOOKS, command, derived_id("failing", d["id"]), d["tenant"], None)
            return
        pause = retries[min(n - 1, len(retries) - 1)] * (1 + 0.2 * random.random())
        due = datetime.now(UTC) + timedelta(seconds=pause)
        await self._record(
            deliveries.Attempt(ident, n, started, status, latency_ms, error, answer, "retry", due)
        )
        if outcome == "gone":
            gone = f"the target answered 410 Gone ({d['url']})"
            disable = c.DisableWebhook(UUID(str(d["subscription_id"])), gone)
            await self.send(WEBHOOKS, disable, derived_id("gone", d["id"], n), d["tenant"], None)
