"""Batches of a Faust stream's events that cost nothing while the stream is quiet.

Faust's `Stream.take_events(max_, within)` wakes every `within` seconds whether events
came or not: with the projections' 10 ms that is 100 wake-ups a second per projection
at rest, about half of an idle worker's CPU. And it acks a batch whenever its iteration
ends, even when the batch failed, so a worker had to exit on the spot to keep a failed
batch from being committed.

`take_batches` waits for the first event without a timeout, then for more while they
keep coming (a pause of `QUIET_S` ends the batch: the records of one fetch reach the
stream together), at most `within` or until it holds `max_`, and yields it; the caller
acks the events once they are applied (`ack`). A batch that is never acked is never
committed: after a restart or a rebalance it comes again. It uses the same means as
Faust's own (a processor that fills the buffer while the stream is drained passively),
so events are never cancelled mid-delivery. Its waits are plain asyncio ones: here a
stream's own `wait_for_stopped` on an event did not return when the event was set
(only a timeout ended it; it makes its futures with `loop=stream.loop`). A stopping
app cancels the agent, and with it these waits.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

from mode.utils.aiter import aiter

QUIET_S = 0.001


async def take_batches(stream: Any, max_: int, within: float) -> AsyncIterator[list[Any]]:
    """Lists of up to `max_` events of `stream` (a `faust.Stream`), not acked."""
    events: list[Any] = []
    arrived = asyncio.Event()  # the buffer holds an event
    full = asyncio.Event()
    taken = asyncio.Event()  # the full buffer was taken: more may come

    async def add(value: Any) -> Any:
        event = stream.current_event
        if event is None:
            raise RuntimeError("a stream's processor ran without its event")
        events.append(event)
        arrived.set()
        if len(events) >= max_:
            full.set()
            taken.clear()
            await taken.wait()  # no more than max_ in one batch
        return value

    stream.enable_acks = False
    stream.add_processor(add)
    stream._enable_passive(aiter(stream.channel))  # as take_events: errors go to the channel
    try:
        while not stream.should_stop:
            await arrived.wait()
            deadline = time.monotonic() + within
            while not full.is_set() and time.monotonic() < deadline:
                seen = len(events)
                await asyncio.sleep(QUIET_S)
                if len(events) == seen:
                    break  # what was delivered together is in: a lone event does not wait
            batch = events[:]
            events.clear()
            arrived.clear()
            full.clear()
            taken.set()
            yield batch
    finally:
        taken.set()  # an `add` waiting for room returns (its event is not acked)
        stream._processors.remove(add)


async def ack(stream: Any, events: list[Any]) -> None:
    """The events are done with: their offsets may be committed."""
    for event in events:
        await stream.ack(event)
