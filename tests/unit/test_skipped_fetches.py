"""A fetch Faust lets go unhanded (a generation change or a stopped flow mid-fetch, a
partition it does not count active) is read again: each assigned partition is sought
back to the first record let go, or to its commit when that is earlier."""

from __future__ import annotations

from collections import namedtuple
from typing import Any

import pytest

from streams.skipped import _read_again_what_was_let_go

TP = namedtuple("TP", "topic partition")
Rec = namedtuple("Rec", "offset")
EVENTS = TP("p.events.incidents", 1)
OTHER = TP("p.events.incidents", 2)
CHANGELOG = TP("p.job.x-changelog", 1)


class Topics:
    def acks_enabled_for(self, topic: str) -> bool:
        return "changelog" not in topic


class App:
    topics = Topics()


class Consumer:
    def __init__(self, fetched: dict[Any, list[Rec]], committed: dict[Any, int | None]) -> None:
        self._cqrs_fetched = fetched
        self._committed_offset = committed
        self.app = App()
        self.should_stop = False
        self.flow_active = True
        self.sought: list[tuple[Any, int]] = []

    def assignment(self) -> set[Any]:
        return {EVENTS, OTHER, CHANGELOG}

    async def seek(self, tp: Any, offset: int) -> None:
        self.sought.append((tp, offset))


async def test_records_let_go_after_the_last_handed_over_are_read_again_from_the_first() -> None:
    c = Consumer({EVENTS: [Rec(7), Rec(8), Rec(9)], OTHER: [Rec(3)]}, {EVENTS: 7, OTHER: 3})
    await _read_again_what_was_let_go(c, set(), {EVENTS: 7, OTHER: 3})
    assert c.sought == [(EVENTS, 7)]  # min(first let go 8, committed 7)


async def test_a_partition_with_nothing_handed_over_is_sought_to_its_first_record() -> None:
    c = Consumer({EVENTS: [Rec(8), Rec(9)]}, {EVENTS: None})
    await _read_again_what_was_let_go(c, set(), {})
    assert c.sought == [(EVENTS, 8)]


@pytest.mark.parametrize("why", ["everything handed", "stopping", "flow suspended", "held", "unassigned"])
async def test_nothing_is_sought_when_nothing_was_let_go_or_faust_seeks_itself(why: str) -> None:
    tp = TP("p.events.incidents", 9) if why == "unassigned" else EVENTS
    c = Consumer({tp: [Rec(7), Rec(8)], CHANGELOG: [Rec(1)]}, {tp: 7})
    c.should_stop = why == "stopping"
    c.flow_active = why != "flow suspended"
    handed = {tp: 8} if why == "everything handed" else {}
    await _read_again_what_was_let_go(c, {tp} if why == "held" else set(), handed)
    assert c.sought == []  # and never a changelog's partition
