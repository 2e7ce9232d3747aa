"""The webhooks' delivery job: every event that matches an active subscription of its
tenant is POSTed to the subscription's URL, signed the Standard Webhooks way.

Two halves in one Faust app (its consumer group `<prefix>.job.webhook-delivery`):

- **What is owed.** The agent reads every context's events; for each subscription that
  wants an event (its tenant, its context and event-type filters, registered before the
  event occurred, `active` or `failing`) it records a delivery in PostgreSQL
  (`projections.webhooks.deliveries`), keyed by the `webhook-id`, before the event is
  acked. A redelivered event finds its deliveries there already.
- **Paying it.** The worker that owns an events partition pays what it owes from memory
  (`streams.webhooks.schedule`): loaded from PostgreSQL when it gets the partition, added
  to as the agent records what is owed. A pump (every `PUMP_S`, after each delivery owed
  and after each attempt) starts the due heads (the lowest undelivered version of each
  subscription and aggregate, so order per aggregate holds), at most
  `APP_WEBHOOK_PER_TARGET` in flight per subscription and `APP_WEBHOOK_IN_FLIGHT` in
  all, and POSTs each: 2xx is delivered; another status, a timeout or a refused
  connection is retried after `APP_WEBHOOK_RETRY_S` (with up to 20 % jitter); after the
  last pause the delivery is parked and the subscription marked failing
  (`MarkWebhookFailing`); `410 Gone` disables the subscription (`DisableWebhook`).
  Redirects are not followed, at most `APP_WEBHOOK_RESPONSE_BYTES` of an answer is read,
  and the target's address is checked before every attempt (`commands.webhooks.signing`).
  Every attempt is written (those that end together in one transaction) before what
  follows from it is done. A worker killed mid-attempt had not written it: the next owner
  of the partition sends the same `webhook-id` again (at least once). An admin's
  redelivery reaches the owner within `REQUEUED_S`; every `RESYNC_S` the owner compares
  its memory with the log.

The subscriptions come from their read model (`webhook_subscriptions`), read once it has
applied every webhooks event committed so far. For an event that occurred after the last
read the job asks the webhooks topic's end offsets again (one question serves every event
waiting), and reads the rows again only when they moved, or after `SUBSCRIPTIONS_S`: an
event goes to every subscription registered before it occurred.
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
from streams.webhooks.schedule import Owed, Schedule

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
REQUEUED_S = 1.0  # how often the owner looks for redeliveries
REQUEUED_WINDOW_S = 10.0  # how far back it looks
RESYNC_S = 30.0
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
        self.active: dict[str, dict[str, Any]] = {}  # the subscriptions paid now, by id
        self.read_at = 0.0  # monotonic: when the subscriptions were last known current
        self.rows_at = 0.0  # monotonic: when their rows were last read
        self.read_wall = datetime.fromtimestamp(0, UTC)
        self.schedule = Schedule()
        self.owned: set[str] = set()  # the events partitions ("topic:partition") loaded
        self.store = asyncio.Lock()  # a write of attempts or a read of the log at a time
        self.in_flight: dict[asyncio.Task[None], Owed] = {}
        self.reading = asyncio.Lock()
        self.pumping = False
        self.again = False
        self.outcomes: list[tuple[deliveries.Attempt, Owed, asyncio.Future[None]]] = []
        self.writing = False
        self.owing: list[tuple[list[tuple[Any, ...]], asyncio.Future[set[str]]]] = []
        self.owe_writing = False
        self.pumps: set[asyncio.Future[None]] = set()
        self.ends: Any = None  # a consumer that reads the webhooks topic's end offsets
        self.stable: dict[Any, int] = {}  # its last stable offsets the read model had reached
        self.delivered = 0
        self.last_requeued = 0.0
        self.last_resync = time.monotonic()
        self.last_purge = 0.0

    def timers(self, app: Any) -> None:
        app.timer(PUMP_S)(self.pump)

    def progress(self) -> dict[str, Any]:
        return {
            "delivered": self.delivered,
            "owed": len(self.schedule),
            "in_flight": len(self.in_flight),
            "owned": len(self.owned),
        }

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
        event that is handled after this read is missing. While those end offsets stay
        where they were, the rows are too: only the offsets are asked (a few ms)."""
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
                elif time.monotonic() - self.rows_at <= SUBSCRIPTIONS_S:
                    # no webhooks event since the last read: the rows are as they were
                    self.read_at, self.read_wall = time.monotonic(), wall
                    return
                rows = await pool.fetch(
                    "SELECT id, tenant, contexts, event_types, created_at, url, status, "
                    "secret_generation, previous_generation, previous_until FROM webhook_subscriptions "
                    "WHERE status IN ('active', 'failing')"
                )
                self.rows_at = time.monotonic()
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
        self.active = {str(r["id"]): r for r in self.subscriptions}
        self.read_at, self.read_wall = time.monotonic(), wall
        self.schedule.release(self.active)

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

    async def _wanted_by(self, event: StoredEvent) -> list[dict[str, Any]]:
        """The subscriptions that want `event`, known current after it occurred (one read
        serves the events that occurred before it), or again after `SUBSCRIPTIONS_S`."""
        while event.meta.occurred_at >= self.read_wall or time.monotonic() - self.read_at > SUBSCRIPTIONS_S:
            async with self.reading:
                if (
                    event.meta.occurred_at < self.read_wall
                    and time.monotonic() - self.read_at <= SUBSCRIPTIONS_S
                ):
                    break
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
        source = f"{event.topic}:{event.partition}"
        await self._load({source})  # what was owed before comes first
        document = event_document(
            event.meta, event.payload, event.topic, event.partition, event.offset, event.timestamp_ms
        )
        position = f"{source}:{event.offset}"
        owed = []
        for sub in wanted:
            msg_id = w.webhook_id_of(str(sub["id"]), str(event.meta.event_id))
            body = orjson.dumps({"type": "event", "id": msg_id, **document}, default=str).decode()
            owed.append(
                Owed(
                    msg_id,
                    str(sub["id"]),
                    event.meta.tenant,
                    event.meta.aggregate_id,
                    event.version,
                    source,
                    body,
                )
            )
        rows = [
            (
                o.id,
                UUID(o.subscription_id),
                o.tenant,
                str(event.meta.event_id),
                event.type_name,
                o.aggregate_id,
                o.version,
                position,
                o.body,
            )
            for o in owed
        ]
        recorded = await self._owe(rows)
        if source not in self.owned:
            return  # the partition went to another owner meanwhile: it loads these
        now = time.time()
        added = 0
        for o in owed:
            if o.id in recorded:  # one there already was loaded with the partition, or is paid
                o.due = now
                added += self.schedule.add(o)
        if added:
            self._kick()

    async def _owe(self, rows: list[tuple[Any, ...]]) -> set[str]:
        """Record what is owed with what the events handled meanwhile owe (one statement
        for all); return the ids recorded."""
        recorded: asyncio.Future[set[str]] = asyncio.get_running_loop().create_future()
        self.owing.append((rows, recorded))
        if not self.owe_writing:
            self.owe_writing = True
            try:
                while self.owing:
                    batch, self.owing = self.owing, []
                    try:
                        ids = await deliveries.owe(await self._pool(), [r for rs, _ in batch for r in rs])
                        for _, f in batch:
                            f.set_result(ids)
                    except Exception as exc:  # every waiter gets it (its own await raises it)
                        for _, f in batch:
                            f.set_exception(exc)
            finally:
                self.owe_writing = False
        return await recorded

    async def _load(self, sources: set[str]) -> None:
        """Take on what is owed for these events partitions (once each)."""
        if sources <= self.owned:
            return
        async with self.store:
            todo = sorted(sources - self.owned)
            if not todo:
                return
            rows = await deliveries.owed(await self._pool(), todo)
            for row in rows:
                self.schedule.add(Owed.of_row(row))
            self.owned.update(todo)
        log.info("webhook deliveries taken on", extra={"partitions": todo, "owed": len(rows)})
        self._kick()

    def _assigned(self) -> set[str] | None:
        runner = self.runner
        if runner is None:
            return None
        sources = set(self.source_topics(runner.topics))
        return {
            f"{tp.topic}:{tp.partition}" for tp in runner.app.consumer.assignment() if tp.topic in sources
        }

    async def _follow_assignment(self) -> None:
        """Let go of the partitions gone to another owner; take on those assigned here."""
        assigned = self._assigned()
        if assigned is None:
            return
        lost = self.owned - assigned
        if lost:
            async with self.store:
                self.owned -= lost
                self.schedule.drop(lost)
            log.info("webhook deliveries let go", extra={"partitions": sorted(lost)})
        if assigned - self.owned:
            await self._load(assigned)

    async def _requeued(self) -> None:
        """What an admin asked again (every `REQUEUED_S`), and every `RESYNC_S` the whole
        log of the partitions held: a delivery pending there but not here is taken on."""
        full = time.monotonic() - self.last_resync > RESYNC_S
        if not self.owned or (not full and time.monotonic() - self.last_requeued < REQUEUED_S):
            return
        self.last_requeued = time.monotonic()
        async with self.store:
            pool = await self._pool()
            owned = sorted(self.owned)
            if full:
                self.last_resync = time.monotonic()
                rows = await deliveries.owed(pool, owned)
            else:
                rows = await deliveries.requeued(pool, owned, REQUEUED_WINDOW_S)
            for row in rows:
                known = self.schedule.items.get(row["id"])
                if known is None:
                    self.schedule.add(Owed.of_row(row))
                elif known.status == "parked" and row["status"] == "pending":
                    self.schedule.requeue(Owed.of_row(row))

    # ---- paying it --------------------------------------------------------------

    def _kick(self) -> None:
        self.pumps.add(pump := asyncio.ensure_future(self.pump()))
        pump.add_done_callback(self.pumps.discard)

    async def pump(self) -> None:
        """Start the attempts that are due, as far as there is room; again at once while
        something happened meanwhile (a delivery owed, an attempt ended): one at a time."""
        if self.pumping:
            self.again = True
            return
        self.pumping = True
        try:
            try:
                await self._maintain()
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                if not isinstance(exc, asyncpg.UndefinedTableError):
                    log.warning("webhook deliveries cannot be read", extra={"error": repr(exc)})
            while True:
                self.again = False
                started = self._start_due()
                if not started and not self.again:
                    break
                await asyncio.sleep(0)  # let what ended meanwhile say so
        finally:
            self.pumping = False

    async def _maintain(self) -> None:
        await self._follow_assignment()
        if time.monotonic() - self.read_at > SUBSCRIPTIONS_S and not self.reading.locked():
            async with self.reading:
                await self._read_subscriptions()  # a paused subscription resumed, a URL changed
        await self._requeued()
        if time.monotonic() - self.last_purge > PURGE_S:
            self.last_purge = time.monotonic()
            await deliveries.purge(await self._pool(), self.settings.webhook_keep_days)

    def _start_due(self) -> int:
        room = self.settings.webhook_in_flight - len(self.in_flight)
        if room <= 0:
            return 0
        active = self.active
        started = self.schedule.take(time.time(), room, self.settings.webhook_per_target, active.__contains__)
        for owed in started:
            task = asyncio.create_task(self._attempt(owed, active[owed.subscription_id]))
            self.in_flight[task] = owed
            task.add_done_callback(self._attempt_ended)
        return len(started)

    async def _record(self, attempt: deliveries.Attempt, owed: Owed) -> None:
        """Write the attempt with those that end meanwhile (one transaction for all), then
        let the schedule know; return once it is written. A write that fails leaves the
        delivery due again soon."""
        written: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.outcomes.append((attempt, owed, written))
        if not self.writing:
            self.writing = True
            try:
                while self.outcomes:
                    batch, self.outcomes = self.outcomes, []
                    async with self.store:
                        try:
                            await deliveries.attempted(await self._pool(), [a for a, _, _ in batch])
                            failed: BaseException | None = None
                        except Exception as exc:  # every waiter gets it (its own await raises it)
                            failed = exc
                        for a, o, f in batch:
                            if failed is None:
                                due = a.next_attempt_at.timestamp() if a.next_attempt_at else None
                                self.schedule.ended(o, a.outcome, due)
                                f.set_result(None)
                            else:
                                self.schedule.ended(o, "retry", time.time() + RETRY_S[0], counted=False)
                                f.set_exception(failed)
            finally:
                self.writing = False
        await written

    def _attempt_ended(self, task: asyncio.Task[None]) -> None:
        owed = self.in_flight.pop(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("a webhook attempt failed", extra={"error": repr(task.exception())})
        if owed.in_flight:  # it ended before its outcome was written: the same attempt, later
            self.schedule.ended(owed, "retry", time.time() + RETRY_S[-1], counted=False)
        self._kick()

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

    def _secrets(self, owed: Owed, sub: dict[str, Any], now: datetime) -> list[str]:
        secrets = [w.secret_of(self.key, owed.tenant, owed.subscription_id, sub["secret_generation"])]
        previous_until = sub["previous_until"]
        if sub["previous_generation"] and previous_until and datetime.fromisoformat(previous_until) > now:
            previous = int(sub["previous_generation"])
            secrets.append(w.secret_of(self.key, owed.tenant, owed.subscription_id, previous))
        return secrets

    async def _attempt(self, owed: Owed, sub: dict[str, Any]) -> None:
        settings = self.settings
        started = datetime.now(UTC)
        t0 = time.perf_counter()
        status: int | None = None
        error: str | None = None
        answer: str | None = None
        outcome = "retry"
        url = sub["url"]
        try:
            why = await w.resolved_refusal(url, settings.webhook_allowed_networks)
            if why is not None:
                error, outcome = f"refused: {why}", "refused"
            else:
                headers = w.headers(owed.id, owed.body, self._secrets(owed, sub, started), started)
                async with self._client().post(
                    url, data=owed.body.encode(), headers=headers, allow_redirects=False
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
        self.schedule.answered(owed)  # the target is free for another delivery
        self._kick()
        ATTEMPTS.labels(outcome).inc()
        ATTEMPT_DURATION.labels(outcome).observe(latency_ms / 1000)
        n, ident = owed.attempts + 1, owed.id
        first_attempt_at = owed.first_attempt_at = owed.first_attempt_at or started
        if outcome == "delivered":
            await self._record(
                deliveries.Attempt(ident, n, started, status, latency_ms, None, answer, "delivered"), owed
            )
            self.delivered += 1
            return
        retries = settings.webhook_retry_s
        if outcome in ("retry", "refused") and n > len(retries):
            await self._record(
                deliveries.Attempt(ident, n, started, status, latency_ms, error, answer, "parked"), owed
            )
            log.warning(
                "webhook delivery parked after its last attempt",
                extra={"delivery": ident, "subscription": owed.subscription_id, "error": error},
            )
            if sub["status"] == "active":
                command = c.MarkWebhookFailing(
                    UUID(owed.subscription_id), error or "failed", first_attempt_at.isoformat()
                )
                await self.send(WEBHOOKS, command, derived_id("failing", ident), owed.tenant, None)
            return
        pause = retries[min(n - 1, len(retries) - 1)] * (1 + 0.2 * random.random())
        due = datetime.now(UTC) + timedelta(seconds=pause)
        await self._record(
            deliveries.Attempt(ident, n, started, status, latency_ms, error, answer, "retry", due), owed
        )
        if outcome == "gone":
            gone = f"the target answered 410 Gone ({url})"
            disable = c.DisableWebhook(UUID(owed.subscription_id), gone)
            await self.send(WEBHOOKS, disable, derived_id("gone", ident, n), owed.tenant, None)
