"""The processor's local store: the current state of every aggregate of one partition.

Restored on assignment from `<prefix>.state.<context>` (compacted, read_committed, to
the end of the log). Holds the committed snapshot bytes and decodes an aggregate only
when a command first touches it, so restoring a large partition is one pass of reads.
"""

from __future__ import annotations

import logging
import time

from aiokafka import TopicPartition

from commands.context import BoundedContext
from commands.snapshots import LoadedAggregate, load
from shared_kernel import kafka
from shared_kernel.position import Position
from shared_kernel.settings import Settings
from shared_kernel.topics import Topics

log = logging.getLogger(__name__)

Key = tuple[str, str]  # (context name, aggregate id)


class PartitionState:
    """Aggregates of one partition: committed snapshots plus the decoded ones in use."""

    def __init__(self, contexts: dict[str, BoundedContext]) -> None:
        self.contexts = contexts
        self.committed: dict[Key, bytes] = {}
        self.live: dict[Key, LoadedAggregate] = {}
        # events topic -> where its next event will go, learnt from this owner's own commits
        # (commands.transaction); unknown after a restore, until the first commit there.
        self.next_event_offsets: dict[str, Position] = {}

    def get(self, key: Key) -> LoadedAggregate | None:
        loaded = self.live.get(key)
        if loaded is None:
            data = self.committed.get(key)
            if data is None:
                return None
            loaded = load(self.contexts[key[0]], key[1], data)
            self.live[key] = loaded
        return loaded

    def forget_live(self, key: Key) -> None:
        """Drop the decoded copy; the next `get` decodes the committed snapshot again."""
        self.live.pop(key, None)

    def commit(self, key: Key, data: bytes, loaded: LoadedAggregate) -> None:
        self.committed[key] = data
        self.live[key] = loaded

    def __contains__(self, key: object) -> bool:
        """Whether the partition has this aggregate committed: a lookup, nothing decoded."""
        return key in self.committed

    def __len__(self) -> int:
        return len(self.committed)


async def restore(settings: Settings, contexts: dict[str, BoundedContext], partition: int) -> PartitionState:
    """Read every context's state partition from the beginning to the end of the log."""
    topics = Topics(settings.topic_prefix)
    state = PartitionState(contexts)
    started = time.perf_counter()
    consumer = kafka.consumer(
        settings, isolation_level="read_committed", max_partition_fetch_bytes=8 * 1024 * 1024
    )
    await consumer.start()
    try:
        tps = {TopicPartition(topics.state(name), partition): name for name in contexts}
        # Ends first: once assigned, a fetch long-polls the broker and a ListOffsets request
        # on the same connection would wait behind it (up to APP_KAFKA_FETCH_MAX_WAIT_MS).
        ends = await consumer.end_offsets(list(tps))
        consumer.assign(list(tps))
        await consumer.seek_to_beginning(*tps)
        pending = {tp for tp in tps if ends[tp] > 0}
        while pending:
            batch = await consumer.getmany(*pending, timeout_ms=500, max_records=20_000)
            for tp, records in batch.items():
                name = tps[tp]
                for r in records:
                    key = (name, r.key.decode())
                    if r.value is None:
                        state.committed.pop(key, None)
                    else:
                        state.committed[key] = r.value
            # Compare positions, not last offsets: transaction markers take offsets too.
            pending = {tp for tp in pending if await consumer.position(tp) < ends[tp]}
    finally:
        await consumer.stop()
    log.info(
        "partition state restored",
        extra={
            "partition": partition,
            "aggregates": len(state),
            "ms": round((time.perf_counter() - started) * 1000),
        },
    )
    return state
