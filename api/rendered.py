"""Rendered single-resource reads kept in memory, each under a lease that a change of
its row breaks: a bounded LRU of the answers (status 200, headers, body, exactly as the
route rendered them), keyed by (projection, aggregate id).

A read that misses takes a *lease* on its key before it queries. A change notification
for the key (`api.changes`) breaks the lease, and a broken lease's answer is not kept:
an answer read before a commit can never outlive that commit's notification. While the
follower does not listen, everything is forgotten (notifications may be missed).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from uuid import UUID

from api.changes import ChangeListener, Positions
from projections.changes import Change

Key = tuple[str, str]  # (projection, aggregate id)


@dataclass(frozen=True, slots=True)
class Rendered:
    headers: list[tuple[bytes, bytes]]
    body: bytes
    etag: bytes
    generation: int
    size: int
    tenant: str = ""  # whose row it renders: only that tenant's reads are answered with it


class Lease:
    """A read's claim to keep its answer; broken when the key changes meanwhile."""

    __slots__ = ("generation",)

    def __init__(self, generation: int) -> None:
        self.generation = generation


class RenderedReads(ChangeListener):
    """A bounded LRU of rendered answers per (projection, id), with leases: at most
    `capacity` answers and `max_bytes` of bodies and headers (one answer bigger than a
    sixteenth of that is never kept)."""

    def __init__(self, capacity: int, max_bytes: int = 64 << 20) -> None:
        self.capacity = capacity
        self.max_bytes = max_bytes
        self.bytes = 0
        self._entries: OrderedDict[Key, Rendered] = OrderedDict()
        self._leases: dict[Key, Lease] = {}
        self._generation: dict[str, int] = {}  # bumped to drop a whole projection at once
        self.hits = self.misses = self.kept = 0

    def get(self, key: Key) -> Rendered | None:
        entry = self._entries.get(key)
        if entry is None or entry.generation != self._generation.get(key[0], 0):
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return entry

    def lease(self, key: Key) -> Lease:
        lease = Lease(self._generation.get(key[0], 0))
        self._leases[key] = lease  # a newer read of the key supersedes an older one
        return lease

    def keep(
        self, key: Key, lease: Lease, headers: list[tuple[bytes, bytes]], body: bytes, tenant: str = ""
    ) -> bool:
        """Keep an answer if its lease still holds (nothing changed the key meanwhile)."""
        if self._leases.get(key) is not lease:
            return False
        del self._leases[key]
        size = len(body) + sum(len(k) + len(v) for k, v in headers)
        if lease.generation != self._generation.get(key[0], 0) or size > self.max_bytes // 16:
            return False
        etag = next((v for k, v in headers if k == b"etag"), b"")
        self._drop(key)
        self._entries[key] = Rendered(headers, body, etag, lease.generation, size, tenant)
        self.bytes += size
        while len(self._entries) > self.capacity or self.bytes > self.max_bytes:
            self.bytes -= self._entries.popitem(last=False)[1].size
        self.kept += 1
        return True

    def release(self, key: Key, lease: Lease) -> None:
        if self._leases.get(key) is lease:
            del self._leases[key]

    def invalidate(self, projection: str, aggregates: frozenset[str] | None) -> None:
        """Drop what a batch changed: these aggregates of `projection`, or all of it."""
        if aggregates is None:
            self._generation[projection] = self._generation.get(projection, 0) + 1
            return
        for aggregate in aggregates:
            key = (projection, aggregate)
            self._drop(key)
            self._leases.pop(key, None)

    def _drop(self, key: Key) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self.bytes -= entry.size

    def clear(self) -> None:
        """Forget everything; reads in flight keep nothing (their leases are gone)."""
        self._entries.clear()
        self._leases.clear()
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def stats(self) -> dict[str, int]:
        return {
            "entries": len(self._entries),
            "bytes": self.bytes,
            "max_entries": self.capacity,
            "max_bytes": self.max_bytes,
            "hits": self.hits,
            "misses": self.misses,
            "kept": self.kept,
        }

    # ---- told by the change follower (api.changes) ----

    def following(self, live: Mapping[str, int], positions: Positions) -> None:
        self.clear()  # what was kept before may have changed unseen

    def committed(self, change: Change) -> None:
        if change.live is not None:
            self.invalidate(change.projection, None)
        else:
            aggregates = change.aggregates
            self.invalidate(
                change.projection, None if aggregates is None else frozenset(map(_canonical, aggregates))
            )

    def forget(self) -> None:
        self.clear()

    def lost(self) -> None:
        self.clear()


def _canonical(aggregate: str) -> str:
    try:
        return str(UUID(aggregate))
    except ValueError:
        return aggregate
