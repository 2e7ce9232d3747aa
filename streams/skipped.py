"""No record lost after a rebalance or a restart: four ways Faust's worker could
skip records it never handled, closed.

1. **A jump in offsets taken for markers.** Faust's consumer takes a jump in a
   partition's offsets for records that do not exist (the markers of transactions,
   records compacted or aborted) and lets its commits step over it. After a rebalance a
   fetch from before the seek to the committed offsets can hand it a record from well
   past them. A jump in the events topics is at most one offset (each transaction's
   marker) unless a transaction aborted, so a larger one is checked: a read-committed
   consumer reads the offsets in between, and if any record is there the partition is
   sought back to the first of them and the rest of that fetch for it is let go (they
   come again, in order).
2. **A record skipped and acked.** Faust's stream drops a record it takes while its flow
   is suspended (a rebalance under way, a table's recovery) or that was fetched in an
   earlier group generation, and acks it, so the commit passes it: a restarted quality
   monitor handled a dataset's checks 12 and 13 after check 1 and never 2-11 (seen in
   its table's changelog). An ack then is refused here: the record is not committed, and
   the partition's owner reads it again from the committed offset.

3. **A partition with no committed offset.** aiokafka seeks only to a committed offset
   above 0, so a partition whose group never committed (a worker killed before its first
   commit) stayed where the fetches made during a table's recovery had left it, past the
   records let go then: the new member of a rebalance handled none of a dataset's checks
   after the poison record at offset 0. Such a partition is sought to its beginning (the
   apps' offset reset) once the committed offsets are applied.

4. **A fetch let go.** Faust's consumer lets the rest of a fetch go when the group's
   generation changes while it hands the fetch over, or its flow stops, and drops the
   records of a partition it does not count active, while the consumer's position is
   past them already. A fetch that straddles a rebalance's seek to the committed offsets
   is let go so, and nothing seeks again: a restarted deadlines job held its partitions
   at their end and never handled the incident opened while it was down (its position
   10, its commit 7). After such a fetch each partition still assigned is sought back
   to the first record let go (or to its committed offset, when that is earlier).

A record delivered twice is what at-least-once allows (the jobs and projections apply
idempotently); one never handled is what this prevents.
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from aiokafka.structs import TopicPartition
from faust.transport import consumer as faust_consumer
from faust.transport.drivers.aiokafka import ensure_aiokafka_TP

from shared_kernel import kafka, metrics
from shared_kernel.settings import Settings

log = logging.getLogger(__name__)

MARKER_GAP = 2  # a record, then the marker that ends its transaction, then the next one
CHECK_S = 10.0

_settings: Settings | None = None
rereads: collections.Counter[str] = collections.Counter()  # by reason, for the progress lines


async def committed_records_between(settings: Settings, tp: Any, start: int, end: int) -> bool:
    """Whether any committed record lies at offsets [start, end) of `tp` (a check that
    cannot answer in `CHECK_S` says yes: reading again costs only repeats)."""
    consumer = kafka.consumer(settings)
    await consumer.start()
    try:
        part = TopicPartition(tp.topic, tp.partition)
        consumer.assign([part])
        consumer.seek(part, start)
        deadline = time.monotonic() + CHECK_S
        while await consumer.position(part) < end:
            if time.monotonic() > deadline:
                return True
            batch = await consumer.getmany(part, timeout_ms=500)
            if any(r.offset < end for r in batch.get(part, [])):
                return True
        return False
    finally:
        await consumer.stop()


def refetch_skipped_records(settings: Settings) -> None:
    """Install both on Faust's consumer (once per process)."""
    global _settings
    _settings = settings
    cls: Any = faust_consumer.Consumer
    if getattr(cls, "_cqrs_refetch", False):
        return
    original = cls.getmany
    original_wait = cls._wait_next_records

    async def _wait_next_records(self: Any, timeout: float) -> Any:  # noqa: ASYNC109 (Faust's signature)
        records, active = await original_wait(self, timeout)
        self._cqrs_fetched = records  # what this fetch holds, to see what getmany lets go
        return records, active

    async def getmany(self: Any, timeout: float) -> AsyncIterator[tuple[Any, Any]]:  # noqa: ASYNC109 (Faust's signature)
        held: set[Any] = set()
        handed: dict[Any, int] = {}  # tp -> the last offset handed over
        async for tp, message in original(self, timeout):
            if tp in held:
                continue  # read again from the next fetch
            last = self._read_offset[tp]
            if (
                last is not None
                and message.offset - last > MARKER_GAP
                and self.app.topics.acks_enabled_for(message.topic)
                and _settings is not None
                and await committed_records_between(_settings, tp, last + 1, message.offset)
            ):
                log.warning(
                    "a fetch skipped records; reading them again",
                    extra={
                        "partition": f"{tp.topic}:{tp.partition}",
                        "from": last + 1,
                        "got": message.offset,
                    },
                )
                held.add(tp)
                metrics.REREAD.labels("jump").inc()
                rereads["jump"] += 1
                await self.seek(tp, last + 1)
                continue
            handed[tp] = message.offset
            yield tp, message
        await _read_again_what_was_let_go(self, held, handed)

    original_ack = cls.ack

    def ack(self: Any, message: Any) -> bool:
        app = self.app
        stale = message.generation_id is not None and message.generation_id != app.consumer_generation_id
        if stale or not app.flow_control.is_active():
            metrics.REREAD.labels("skipped").inc()
            rereads["skipped"] += 1
            return False  # not handled now, or handled for a generation gone: read again
        return bool(original_ack(self, message))

    original_seek = cls.perform_seek

    async def perform_seek(self: Any) -> None:
        await original_seek(self)
        # aiokafka seeks only to a committed offset above 0: a partition with none (or 0)
        # stays where the fetches made during the table's recovery left it, past records
        # that were let go then. From the beginning, as the apps' offset reset says.
        fresh = [
            tp
            for tp in self.assignment()
            if self.app.topics.acks_enabled_for(tp.topic) and self._committed_offset[tp] is None
        ]
        if fresh:
            await self._thread.seek_to_beginning(*(ensure_aiokafka_TP(tp) for tp in fresh))
            for tp in fresh:
                self._read_offset[tp] = None

    cls._wait_next_records = _wait_next_records
    cls.getmany = getmany
    cls.ack = ack
    cls.perform_seek = perform_seek
    cls._cqrs_refetch = True


async def _read_again_what_was_let_go(consumer: Any, held: set[Any], handed: dict[Any, int]) -> None:
    """Seek back each partition whose records this fetch let go unhanded (see 4)."""
    fetched = consumer.__dict__.pop("_cqrs_fetched", None)
    if not fetched or consumer.should_stop or not consumer.flow_active:
        return  # stopping, or the flow is suspended: Faust seeks to the commits itself on resuming
    assigned = consumer.assignment()
    for tp, records in fetched.items():
        if tp in held or tp not in assigned or not consumer.app.topics.acks_enabled_for(tp.topic):
            continue
        last = handed.get(tp)
        if not records or (last is not None and records[-1].offset <= last):
            continue  # all of it handed over (the usual case)
        first = next((r.offset for r in records if last is None or r.offset > last), None)
        if first is None:
            continue
        committed = consumer._committed_offset[tp]
        target = first if committed is None else min(first, committed)
        log.warning(
            "a fetch's records were let go unhandled; reading them again",
            extra={"partition": f"{tp.topic}:{tp.partition}", "from": target, "let_go_from": first},
        )
        metrics.REREAD.labels("dropped").inc()
        rereads["dropped"] += 1
        await consumer.seek(tp, target)
