"""One client's subscription: its bounded mailbox, its position, its catch-up from the log.

A subscriber starting "now" is live at once: the feed offers it every matching record
after the feed's current position. A subscriber resuming from a token first catches
up with a short-lived consumer of its own (assign + seek to the token's offsets), then
joins the live feed. The hand-over has neither gap nor duplicate:

1. In one step (no await), the reader takes the feed's current position as its target
   and the feed starts buffering this subscriber's live matches in `pending`.
2. The reader delivers everything from the token up to the target, partition by
   partition. Records past the target are delivered too; they are also in `pending`.
3. In one step again, `pending` goes to the mailbox without the records the reader
   already delivered (an offset below the reader's position on that partition), and
   the subscriber is live.

If `pending` outgrows the buffer while the reader works (a long history under heavy
live traffic), it is dropped and the reader takes a new target: step 1 again, from
where it is. Memory stays bounded and nothing is lost: everything is in Kafka.

The mailbox is bounded too. The feed never waits for a subscriber: a live subscriber
whose mailbox is full is failed (`slow_consumer`), its mailbox dropped, and its
connection sends an `error` naming the last position it delivered, then closes. The
catch-up reader, in contrast, waits for room: it goes at the client's pace.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from dataclasses import dataclass
from typing import Protocol

from aiokafka import AIOKafkaConsumer, TopicPartition

from api.subscriptions.messages import Layout, LogEvent, Message
from api.subscriptions.spec import StreamSpec
from shared_kernel.avro import AvroCodec
from shared_kernel.settings import Settings

log = logging.getLogger(__name__)

BATCH = 64  # messages a connection takes from its mailbox at once
FETCH_TIMEOUT_MS = 1000


@dataclass(frozen=True)
class Failure:
    """Why a subscription ends with an `error` message."""

    code: str
    detail: str


class Ended(Exception):
    """The subscription is over: closed (client gone, shutdown) or failed."""

    def __init__(self, failure: Failure | None) -> None:
        super().__init__(failure.detail if failure else "closed")
        self.failure = failure


class Feed(Protocol):
    """What a subscriber reads of the live feed that offers it records (`LiveFeed`)."""

    settings: Settings
    codec: AvroCodec
    layout: Layout
    frontier: list[int]  # per index of `layout`, the offset after what the feed has offered
    readers: asyncio.Semaphore  # catch-up readers allowed at once

    def reader(self) -> AIOKafkaConsumer: ...


class Subscriber:
    """The server side of one subscription (one SSE response or one WebSocket)."""

    def __init__(
        self,
        feed: Feed,
        spec: StreamSpec,
        indices: tuple[int, ...],
        readable: frozenset[int],
        start: list[int] | None,
    ) -> None:
        self.feed, self.spec, self.indices, self.readable = feed, spec, indices, readable
        self.capacity = feed.settings.subscription_buffer
        self.mailbox: deque[Message] = deque()
        # live: `floor` is None while the position is the feed's; else the position,
        # ahead of the feed on some partition (after a catch-up)
        self.live = start is None
        self.floor: list[int] | None = None
        self.cursor: list[int] = start or []  # catching up: the reader's position
        self.pending: list[LogEvent] | None = None
        self.delivered = ""
        self.sent = 0
        self.ended = False
        self.failure: Failure | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._space: asyncio.Future[None] | None = None
        self.reader: asyncio.Task[None] | None = None

    # ---- the feed's side: synchronous, never waits ------------------------------------

    def offer(self, ev: LogEvent) -> bool:
        """Take a live record that matches the filters; False when this subscriber failed."""
        if self.ended:
            return True
        if not self.live:
            if self.pending is not None:
                if len(self.pending) >= self.capacity:
                    self.pending = None  # the reader will take a new target
                else:
                    self.pending.append(ev)
            return True
        message = self._live_message(ev)
        if message is None:
            return True
        if len(self.mailbox) >= self.capacity:
            self.fail(
                Failure(
                    "slow_consumer",
                    f"more than {self.capacity} events were waiting for this client; "
                    "reconnect from the id of this message",
                )
            )
            return False
        self._push(message)
        return True

    def _live_message(self, ev: LogEvent) -> Message | None:
        feed = self.feed
        if self.floor is None:
            return ev.shared(feed.layout, self.indices, feed.codec)
        if ev.offset < self.floor[ev.index]:
            return None  # the catch-up delivered it
        rest = ev.rest(feed.codec)
        if rest is None:
            return None
        position, aligned = self.floor, True
        for i in self.indices:
            if ev.snap[i] > position[i]:
                position[i] = ev.snap[i]
            elif ev.snap[i] < position[i]:
                aligned = False
        message = Message.event(feed.layout.token(position, self.indices), rest, ev.traceparent)
        if aligned:
            self.floor = None  # from now on the feed's position is ours: share its messages
        return message

    def fail(self, failure: Failure) -> None:
        if not self.ended:
            self.ended, self.failure = True, failure
            self.mailbox.clear()
            self.pending = None
            self._wake()

    def close(self) -> None:
        if not self.ended:
            self.ended = True
            self._wake()

    # ---- the connection's side ----------------------------------------------------------

    def position(self) -> str:
        """The position after everything delivered so far (the mailbox being empty)."""
        feed = self.feed
        if not self.live:
            return feed.layout.token(self.cursor, self.indices)
        if self.floor is None:
            return feed.layout.token(feed.frontier, self.indices)
        if all(feed.frontier[i] >= self.floor[i] for i in self.indices):
            self.floor = None
            return feed.layout.token(feed.frontier, self.indices)
        return feed.layout.token(
            [max(a, b) for a, b in zip(self.floor, feed.frontier, strict=True)], self.indices
        )

    async def next(self, idle_s: float) -> list[Message]:
        """The next messages, in order; [] when `idle_s` passed with none (heartbeat time)."""
        if not self.mailbox and not self.ended:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                async with asyncio.timeout(idle_s):
                    await self._waiter
            except TimeoutError:
                pass
            finally:
                self._waiter = None
        if self.ended:
            raise Ended(self.failure)
        batch = [self.mailbox.popleft() for _ in range(min(BATCH, len(self.mailbox)))]
        if self._space is not None and not self._space.done():
            self._space.set_result(None)
        return batch

    def acknowledge(self, message: Message, events: int = 0) -> None:
        """The connection handed `message` (the last of a batch) to the client."""
        self.delivered = message.id
        self.sent += events

    def _push(self, message: Message) -> None:
        self.mailbox.append(message)
        self._wake()

    def _wake(self) -> None:
        for future in (self._waiter, self._space):
            if future is not None and not future.done():
                future.set_result(None)

    # ---- catching up ----------------------------------------------------------------------

    def start_catch_up(self) -> None:
        self.reader = asyncio.create_task(self._catch_up(), name="subscription-catch-up")

    async def _catch_up(self) -> None:
        feed = self.feed
        try:
            async with feed.readers:
                consumer = feed.reader()
                await consumer.start()
                try:
                    while True:
                        # step 1: one synchronous step, so the feed buffers exactly what
                        # comes after the target
                        target = list(feed.frontier)
                        self.pending = []
                        for i in self.indices:
                            if i not in self.readable:  # no matching event can be there
                                self.cursor[i] = max(self.cursor[i], target[i])
                        await self._read(consumer, target)
                        if self.pending is not None:
                            self._go_live()
                            return
                        log.info("live events outran a catch-up; reading on", extra=self._log_extra())
                finally:
                    await consumer.stop()
        except asyncio.CancelledError:
            raise
        except Ended:
            return
        except Exception as exc:  # Kafka unreachable, or a bug: the client is told either way
            log.warning("catch-up failed", extra={**self._log_extra(), "error": repr(exc)})
            self.fail(Failure("unavailable", f"the event log could not be read ({exc}); retry"))

    async def _read(self, consumer: AIOKafkaConsumer, target: list[int]) -> None:
        """Step 2: deliver every matching record from the cursor up to the target."""
        feed, layout = self.feed, self.feed.layout
        todo = {i: TopicPartition(*layout.tps[i]) for i in self.readable if self.cursor[i] < target[i]}
        if not todo:
            return
        consumer.assign(list(todo.values()))
        for i, tp in todo.items():
            consumer.seek(tp, self.cursor[i])
        while todo:
            batch = await consumer.getmany(*todo.values(), timeout_ms=FETCH_TIMEOUT_MS, max_records=BATCH)
            for tp, records in batch.items():
                i = layout.index[(tp.topic, tp.partition)]
                for record in records:
                    ev = LogEvent(record, i)
                    if self.spec.matches(ev.aggregate_id, ev.event_type, ev.tenant):
                        rest = ev.rest(feed.codec)
                        if rest is not None:
                            after = list(self.cursor)
                            after[i] = record.offset + 1
                            await self._put(
                                Message.event(layout.token(after, self.indices), rest, ev.traceparent)
                            )
                    self.cursor[i] = record.offset + 1
            for i in [i for i in todo if self.cursor[i] >= target[i]]:
                # the target is the offset after a committed record: it is reached
                # when that record is read
                del todo[i]

    async def _put(self, message: Message) -> None:
        while len(self.mailbox) >= self.capacity:
            if self.ended:
                raise Ended(None)
            self._space = asyncio.get_running_loop().create_future()
            try:
                await self._space
            finally:
                self._space = None
        if self.ended:
            raise Ended(None)
        self._push(message)

    def _go_live(self) -> None:
        """Step 3: the buffered live records the reader has not delivered, then live."""
        feed, position = self.feed, self.cursor
        for ev in self.pending or ():
            if ev.offset < position[ev.index]:
                continue
            rest = ev.rest(feed.codec)
            if rest is None:
                continue
            for i in self.indices:
                position[i] = max(position[i], ev.snap[i])
            self.mailbox.append(
                Message.event(feed.layout.token(position, self.indices), rest, ev.traceparent)
            )
        self.pending = None
        self.floor, self.live = position, True
        self._wake()
        log.info("subscription caught up and live", extra=self._log_extra())

    def _log_extra(self) -> dict[str, object]:
        return {"filters": self.spec.describe(), "sent": self.sent}
