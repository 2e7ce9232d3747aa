"""The live feed: one read_committed consumer of every events topic per API process,
fanned out in process to the subscribers.

It starts at the end of the log and never waits for a subscriber: each record is
offered to the subscribers whose filters it matches (indexed by topic, and by
aggregate id for those that filter on it), each of which queues it or fails. A record
is decoded once, when its first subscriber wants it, and its JSON is shared.

With no subscriber for `APP_SUBSCRIPTION_IDLE_S` (30 s) the feed pauses: a process
nobody subscribes to reads no events (under S1's write load reading and skipping them
was about 5 % of the API's CPU, in every API process). The first subscriber after that
waits while the feed finds the log's end again, as at start, and reads on from there:
nobody was subscribed to miss what it skipped, and a subscriber that resumes from an
id catches up from the log, as always.

`frontier` is the feed's position: every record below it has been offered. It moves
one record at a time, synchronously with the offers, so a subscriber that registers
between two records knows exactly which records it will be offered. If the consumer
fails it is restarted from the frontier, not from the end: live subscribers see no
gap.

Positions are counted in records, as the write side's tokens and the projections'
positions are: the offset after the last committed record, never past the commit
marker that follows it (a marker is not a record, and a projection never reports
having passed one). So an id is also a read-your-writes token the read side can
satisfy. At start the frontier is found by reading back from the end of each partition
to its last committed record.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

from api.subscriptions.messages import Layout, LogEvent
from api.subscriptions.spec import StreamSpec
from api.subscriptions.subscriber import Failure, Subscriber
from commands import CONTEXTS
from shared_kernel import kafka
from shared_kernel.avro import AvroCodec
from shared_kernel.settings import Settings
from shared_kernel.topics import Topics

log = logging.getLogger(__name__)

PROBE_EVERY_S = 5.0
POLL_MS = 1000
MAX_RECORDS = 1000
WAKE_TIMEOUT_S = 10.0  # a subscriber waits this long at most for a paused feed to read again


class FeedUnavailable(Exception):
    """Kafka is not reachable (or the events topics do not exist yet): 503, retry later."""


class LiveFeed:
    """The process-wide live consumer and its subscribers."""

    def __init__(self, settings: Settings, codec: AvroCodec | None = None) -> None:
        self.settings = settings
        self.topics = Topics(settings.topic_prefix)
        self.codec = codec or AvroCodec.from_directory()
        self.layout = Layout({})
        self.frontier: list[int] = []
        self.ready = False  # assigned, and Kafka answered the last probe
        self.readers = asyncio.Semaphore(settings.subscription_catchup_readers)
        self._wide: dict[str, set[Subscriber]] = {}
        self._narrow: dict[tuple[str, str], set[Subscriber]] = {}
        self._subscribers: set[Subscriber] = set()
        self._task: asyncio.Task[None] | None = None
        self.paused = False  # idle: no subscriber for `subscription_idle_s`, reading nothing
        self._idle_since = time.monotonic()
        self._joining = 0  # subscribers waiting for the feed to read again
        self._wanted = asyncio.Event()
        self._awake = asyncio.Event()
        self._awake.set()

    # ---- life cycle ----------------------------------------------------------------------

    def start(self) -> None:
        """Connect in the background (the API serves while Kafka is down: 503 here)."""
        self._task = asyncio.create_task(self._run(), name="subscriptions-live-feed")

    async def stop(self) -> None:
        for sub in list(self._subscribers):
            self.unsubscribe(sub)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def reader(self) -> AIOKafkaConsumer:
        """A consumer for one subscriber's catch-up (assigned and sought by it)."""
        return kafka.consumer(
            self.settings,
            client_id=f"{self.settings.service_name}-catch-up",
            max_partition_fetch_bytes=1024 * 1024,
            fetch_max_bytes=4 * 1024 * 1024,
        )

    # ---- subscribers ----------------------------------------------------------------------

    async def subscribe(self, spec: StreamSpec) -> Subscriber:
        """Register a subscriber: live from now, or catching up from `spec.start`; once
        a paused feed reads again."""
        if not self.ready:
            raise FeedUnavailable("the event log is not reachable; retry")
        self._joining += 1
        try:
            if self.paused:
                self._wanted.set()
                try:
                    await asyncio.wait_for(self._awake.wait(), WAKE_TIMEOUT_S)
                except TimeoutError:
                    raise FeedUnavailable("the live feed did not read again in time; retry") from None
                if not self.ready:
                    raise FeedUnavailable("the event log is not reachable; retry")
            return self._register(spec)
        finally:
            self._joining -= 1

    def _register(self, spec: StreamSpec) -> Subscriber:
        layout = self.layout
        topics = spec.topics(self.settings.topic_prefix)
        indices = layout.indices(topics)
        if spec.aggregate_ids is None:
            readable = frozenset(indices)
        else:
            readable = frozenset(
                layout.index[(t, layout.partition_of(t, a))] for t in topics for a in spec.aggregate_ids
            )
        start = None if spec.start is None else layout.vector(spec.start)
        sub = Subscriber(self, spec, indices, readable, start)
        self._subscribers.add(sub)
        for topic in topics:
            if spec.aggregate_ids is None:
                self._wide.setdefault(topic, set()).add(sub)
            else:
                for a in spec.aggregate_ids:
                    self._narrow.setdefault((topic, a), set()).add(sub)
        if start is not None:
            sub.start_catch_up()
        log.info(
            "subscription opened",
            extra={
                "filters": spec.describe(),
                "resuming": start is not None,
                "subscribers": len(self._subscribers),
            },
        )
        return sub

    def unsubscribe(self, sub: Subscriber) -> None:
        if sub not in self._subscribers:
            return
        self._subscribers.discard(sub)
        for topic in sub.spec.topics(self.settings.topic_prefix):
            if sub.spec.aggregate_ids is None:
                _discard(self._wide, topic, sub)
            else:
                for a in sub.spec.aggregate_ids:
                    _discard(self._narrow, (topic, a), sub)
        sub.close()
        if sub.reader is not None:
            sub.reader.cancel()
        if not self._subscribers:
            self._idle_since = time.monotonic()
        log.info(
            "subscription closed",
            extra={
                "filters": sub.spec.describe(),
                "sent": sub.sent,
                "failure": sub.failure.code if sub.failure else None,
                "subscribers": len(self._subscribers),
            },
        )

    # ---- the consumer loop ----------------------------------------------------------------

    async def _run(self) -> None:
        delay = 0.5
        while True:
            consumer = kafka.consumer(
                self.settings,
                client_id=f"{self.settings.service_name}-live-feed",
                auto_offset_reset="latest",  # only if our offset vanished (the topic was truncated)
            )
            probe: asyncio.Task[None] | None = None
            try:
                await consumer.start()
                await self._assign(consumer)
                delay = 0.5
                probe = asyncio.create_task(self._probe(consumer, list(consumer.assignment())))
                while True:
                    if self._idle():
                        await self._pause_until_wanted(consumer)
                    batch = await consumer.getmany(timeout_ms=POLL_MS, max_records=MAX_RECORDS)
                    self._offer(batch)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Kafka down at start, or anything unexpected: restart
                self.ready = False
                log.warning(
                    "live feed interrupted; restarting", extra={"error": repr(exc), "retry_in_s": delay}
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10)
            finally:
                if probe is not None:
                    probe.cancel()
                with contextlib.suppress(Exception):
                    await consumer.stop()

    def _idle(self) -> bool:
        idle_s = self.settings.subscription_idle_s
        return (
            idle_s > 0
            and not self._subscribers
            and not self._joining
            and time.monotonic() - self._idle_since >= idle_s
        )

    async def _pause_until_wanted(self, consumer: AIOKafkaConsumer) -> None:
        """Read nothing until a subscriber comes; then from the log's end again."""
        tps = list(consumer.assignment())
        consumer.pause(*tps)
        self._awake.clear()
        self.paused = True
        log.info("live feed paused: no subscriber", extra={"idle_s": self.settings.subscription_idle_s})
        await self._wanted.wait()
        consumer.resume(*tps)
        await self._find_the_end(consumer)

    async def _find_the_end(self, consumer: AIOKafkaConsumer) -> None:
        tps = [TopicPartition(t, p) for t, p in self.layout.tps]
        self.frontier = await kafka.after_last_records(consumer, tps)
        for tp, offset in zip(tps, self.frontier, strict=True):
            consumer.seek(tp, offset)
        self._wanted.clear()
        self.paused = False
        self._idle_since = time.monotonic()
        self._awake.set()
        log.info(
            "live feed reading again", extra={"position": self.layout.token(self.frontier, range(len(tps)))}
        )

    async def _assign(self, consumer: AIOKafkaConsumer) -> None:
        """Assign every partition of the events topics at the frontier (first: the end of the log)."""
        names = [self.topics.events(c.name) for c in CONTEXTS]
        waited = False
        while True:
            await consumer._client.force_metadata_update()  # as projections.lag does: all topics
            found = {t: consumer.partitions_for_topic(t) or set() for t in names}
            if all(found.values()):
                break
            if not waited:
                log.info(
                    "waiting for the events topics", extra={"missing": [t for t in names if not found[t]]}
                )
                waited = True
            await asyncio.sleep(1)
        layout = Layout(found)
        tps = [TopicPartition(t, p) for t, p in layout.tps]
        consumer.assign(tps)
        if not self.frontier or layout.tps != self.layout.tps:
            for sub in list(self._subscribers):  # their positions are over the old layout
                sub.fail(Failure("unavailable", "the event log changed; reconnect from your last id"))
                self.unsubscribe(sub)
            frontier = await kafka.after_last_records(consumer, tps)
            self.layout, self.frontier = layout, frontier
        if self.paused:  # interrupted while paused: what it skipped is not read now either
            await self._find_the_end(consumer)
        else:
            for tp, offset in zip(tps, self.frontier, strict=True):
                consumer.seek(tp, offset)
        self.ready = True
        log.info(
            "live feed assigned",
            extra={"partitions": len(tps), "position": self.layout.token(self.frontier, range(len(tps)))},
        )

    async def _probe(self, consumer: AIOKafkaConsumer, tps: list[TopicPartition]) -> None:
        """Kafka answers: else new subscriptions get 503 (the consumer retries by itself).
        The question is a small one (the end offsets of our partitions), not the metadata
        of every topic of the cluster."""
        while True:
            await asyncio.sleep(PROBE_EVERY_S)
            try:
                await asyncio.wait_for(consumer.end_offsets(tps), PROBE_EVERY_S)
            except (KafkaError, TimeoutError, OSError) as exc:
                if self.ready:
                    log.warning(
                        "Kafka does not answer; new subscriptions get 503", extra={"error": repr(exc)}
                    )
                self.ready = False
            else:
                if not self.ready:
                    log.info("Kafka answers again")
                self.ready = True

    def _offer(self, batch: dict[Any, list[Any]]) -> None:
        layout, frontier, narrow = self.layout, self.frontier, self._narrow
        failed: list[Subscriber] = []
        for tp, records in batch.items():
            i = layout.index[(tp.topic, tp.partition)]
            wide = self._wide.get(tp.topic)
            for record in records:
                frontier[i] = record.offset + 1
                if not wide and not narrow:
                    continue
                ev = LogEvent(record, i)
                ev.snap = tuple(frontier)
                for sub in wide or ():
                    if sub.spec.matches(ev.aggregate_id, ev.event_type, ev.tenant) and not sub.offer(ev):
                        failed.append(sub)
                for sub in narrow.get((tp.topic, ev.aggregate_id), ()):
                    if sub.spec.matches(ev.aggregate_id, ev.event_type, ev.tenant) and not sub.offer(ev):
                        failed.append(sub)
        for sub in failed:
            log.warning(
                "slow subscriber disconnected",
                extra={"filters": sub.spec.describe(), "sent": sub.sent, "buffer": sub.capacity},
            )
            self.unsubscribe(sub)


def _discard(index: dict[Any, set[Subscriber]], key: Any, sub: Subscriber) -> None:
    subs = index.get(key)
    if subs is not None:
        subs.discard(sub)
        if not subs:
            del index[key]
