"""The delivery job's schedule: what it owes, in memory, in the order it is paid.

PostgreSQL holds every delivery (`projections.webhooks.deliveries`): it is the log a
restarted or new owner loads. The schedule is what the owner of an events partition
pays from, without asking the database what is next: one queue per (subscription,
aggregate) in version order, whose head alone is ever attempted, so order per aggregate
holds while other aggregates and subscriptions flow; a timeline of the heads by the
time they are due; and per subscription, the heads that wait for room (at most
`per_subscription` attempts awaiting their target's answer) or for the subscription to
be active again. A place is free once the target answers; the aggregate's next delivery
waits until the outcome is written.

`take` costs what it starts, not what is owed: a backlog of any size is paid at the
receivers' pace.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

Key = tuple[str, str]  # (subscription id, aggregate id)


@dataclass(eq=False)
class Owed:
    """One delivery the job owes: `pending` (due at `due`, an epoch second) or `parked`
    (its attempts ran out: its aggregate's later deliveries wait behind it)."""

    id: str
    subscription_id: str
    tenant: str
    aggregate_id: str
    version: int
    source: str  # the events partition it came from, "topic:partition"
    body: str
    attempts: int = 0
    first_attempt_at: datetime | None = None
    due: float = 0.0
    status: str = "pending"
    in_flight: bool = field(default=False)  # attempted, its outcome not written yet
    slot: bool = field(default=False)  # holds one of its subscription's places in flight

    @property
    def key(self) -> Key:
        return (self.subscription_id, self.aggregate_id)

    @classmethod
    def of_row(cls, row: Any) -> Owed:
        """From a `webhook_deliveries` row."""
        return cls(
            id=row["id"],
            subscription_id=str(row["subscription_id"]),
            tenant=row["tenant"],
            aggregate_id=row["aggregate_id"],
            version=row["aggregate_version"],
            source=row["position"].rpartition(":")[0],
            body=row["body"],
            attempts=row["attempts"],
            first_attempt_at=row["first_attempt_at"],
            due=row["next_attempt_at"].timestamp(),
            status=row["status"],
        )


class Schedule:
    def __init__(self) -> None:
        self.items: dict[str, Owed] = {}
        self.queues: dict[Key, list[Owed]] = {}
        self.busy: Counter[str] = Counter()  # in flight per subscription
        self.timeline: list[tuple[float, int, Key]] = []  # heads by due time (stale entries are skipped)
        self.waiting: dict[str, deque[Key]] = {}  # due heads of a subscription with no room
        self.held: dict[str, set[Key]] = {}  # due heads of a subscription not active now
        self._seq = itertools.count()

    def __len__(self) -> int:
        return len(self.items)

    def _wake(self, key: Key, at: float) -> None:
        heapq.heappush(self.timeline, (at, next(self._seq), key))

    def add(self, owed: Owed) -> bool:
        """Owe `owed` (False: it is owed already)."""
        if owed.id in self.items:
            return False
        self.items[owed.id] = owed
        queue = self.queues.setdefault(owed.key, [])
        versions = [o.version for o in queue]
        queue.insert(bisect.bisect_right(versions, owed.version), owed)
        if queue[0] is owed:
            self._wake(owed.key, owed.due)
        return True

    def requeue(self, owed: Owed) -> None:
        """Owe again what an admin asked again (its attempts start from the first)."""
        known = self.items.get(owed.id)
        if known is None:
            self.add(owed)
            return
        if known.in_flight:
            return  # it ends on its own; what it owes then follows from its outcome
        known.status, known.attempts, known.due = "pending", 0, owed.due
        self._wake(known.key, known.due)

    def take(self, now: float, room: int, per_subscription: int, active: Callable[[str], bool]) -> list[Owed]:
        """Up to `room` heads due by `now`, at most `per_subscription` in flight for each
        subscription and none of one that is not `active`; each is in flight until `ended`."""
        started: list[Owed] = []
        while self.timeline and self.timeline[0][0] <= now and len(started) < room:
            _, _, key = heapq.heappop(self.timeline)
            queue = self.queues.get(key)
            if not queue:
                continue
            head = queue[0]
            if head.in_flight or head.status != "pending":
                continue  # its end wakes the queue again; a parked head waits for a redelivery
            if head.due > now:
                self._wake(key, head.due)
                continue
            sub = head.subscription_id
            if not active(sub):
                self.held.setdefault(sub, set()).add(key)
                continue
            if self.busy[sub] >= per_subscription:
                self.waiting.setdefault(sub, deque()).append(key)
                continue
            head.in_flight = head.slot = True
            self.busy[sub] += 1
            started.append(head)
        return started

    def answered(self, owed: Owed) -> None:
        """The target has answered `owed`: its place goes to another head of the
        subscription, while its own aggregate waits until its outcome is written."""
        if not owed.slot:
            return
        owed.slot = False
        sub = owed.subscription_id
        self.busy[sub] -= 1
        if self.busy[sub] <= 0:
            del self.busy[sub]
        waiting = self.waiting.get(sub)
        if waiting:
            self._wake(waiting.popleft(), 0.0)
            if not waiting:
                del self.waiting[sub]

    def ended(self, owed: Owed, outcome: str, due: float | None = None, counted: bool = True) -> None:
        """An attempt's outcome: `delivered` (the next of its aggregate is the head),
        `retry` (due again at `due`) or `parked`; one not `counted` (its write failed)
        is tried again as the same attempt."""
        self.answered(owed)
        owed.in_flight = False
        owed.attempts += counted
        if self.items.get(owed.id) is not owed:
            return  # dropped meanwhile (its partition went to another owner)
        if outcome == "delivered":
            del self.items[owed.id]
            queue = self.queues[owed.key]
            queue.remove(owed)
            if queue:
                self._wake(owed.key, queue[0].due)
            else:
                del self.queues[owed.key]
        elif outcome == "parked":
            owed.status = "parked"
        else:
            owed.due = due if due is not None else 0.0
            self._wake(owed.key, owed.due)

    def release(self, subscriptions: Iterable[str]) -> None:
        """Wake the heads of these subscriptions held while they were not active."""
        for sub in subscriptions:
            for key in self.held.pop(sub, ()):
                self._wake(key, 0.0)

    def drop(self, sources: set[str]) -> None:
        """Forget what came from these events partitions (another owner pays it now)."""
        for owed in [o for o in self.items.values() if o.source in sources]:
            del self.items[owed.id]
            queue = self.queues[owed.key]
            queue.remove(owed)
            if not queue:
                del self.queues[owed.key]

    def in_flight(self) -> int:
        """How many places in flight are held (attempts not answered yet)."""
        return sum(self.busy.values())
