"""The delivery job's schedule: heads only, in version order per (subscription,
aggregate), room per subscription, retries when due, parked heads blocking their
aggregate, paused subscriptions held, partitions let go; and any interleaving of those
keeps each aggregate's deliveries in order (hypothesis)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from streams.webhooks.schedule import Owed, Schedule

SOURCE = "p.events.incidents:0"


def owed(sub: str, agg: str, version: int, due: float = 0.0, source: str = SOURCE) -> Owed:
    return Owed(f"{sub}/{agg}/{version}", sub, "t", agg, version, source, "{}", due=due)


def everyone(_: str) -> bool:
    return True


def ids(items: list[Owed]) -> list[str]:
    return sorted(o.id for o in items)


def test_only_the_head_of_an_aggregate_is_started_and_its_delivery_brings_the_next() -> None:
    s = Schedule()
    for v in (3, 1, 2):  # added out of order (a partition loaded after an event owed)
        s.add(owed("s", "a", v))
    s.add(owed("s", "b", 1))
    first = s.take(10.0, 16, 16, everyone)
    assert ids(first) == ["s/a/1", "s/b/1"]
    assert s.take(10.0, 16, 16, everyone) == []  # the heads are in flight
    s.ended(next(o for o in first if o.id == "s/a/1"), "delivered")
    assert ids(s.take(10.0, 16, 16, everyone)) == ["s/a/2"]


def test_an_owed_delivery_already_there_is_not_owed_twice() -> None:
    s = Schedule()
    assert s.add(owed("s", "a", 1)) is True
    assert s.add(owed("s", "a", 1)) is False
    assert len(s) == 1


def test_room_per_subscription_and_in_all() -> None:
    s = Schedule()
    for agg in "abcdef":
        s.add(owed("busy", agg, 1))
    s.add(owed("other", "x", 1))
    started = s.take(0.0, 16, 2, everyone)
    assert sorted(o.subscription_id for o in started) == ["busy", "busy", "other"]
    assert s.take(0.0, 16, 2, everyone) == []  # the busy one is full
    s.ended(started[0], "delivered")
    assert [o.subscription_id for o in s.take(0.0, 16, 2, everyone)] == ["busy"]  # a waiting head woke
    s2 = Schedule()
    for agg in "abcdef":
        s2.add(owed("s", agg, 1))
    assert len(s2.take(0.0, 4, 16, everyone)) == 4


def test_an_answered_attempt_frees_its_place_but_holds_its_aggregate_until_written() -> None:
    s = Schedule()
    s.add(owed("s", "a", 1))
    s.add(owed("s", "a", 2))
    s.add(owed("s", "b", 1))
    (first,) = s.take(0.0, 16, 1, everyone)
    assert s.take(0.0, 16, 1, everyone) == []  # its one place is taken
    s.answered(first)
    (second,) = s.take(0.0, 16, 1, everyone)  # the other aggregate's head, not a's next
    assert second.aggregate_id != first.aggregate_id
    s.answered(second)
    assert s.take(0.0, 16, 1, everyone) == []  # neither outcome is written yet
    s.ended(first, "delivered")
    assert [o.version for o in s.take(0.0, 16, 1, everyone)] == ([2] if first.aggregate_id == "a" else [])


def test_a_retry_waits_until_it_is_due() -> None:
    s = Schedule()
    s.add(owed("s", "a", 1))
    s.add(owed("s", "a", 2))
    (head,) = s.take(0.0, 16, 16, everyone)
    s.ended(head, "retry", due=5.0)
    assert s.take(4.9, 16, 16, everyone) == []
    (again,) = s.take(5.0, 16, 16, everyone)
    assert again is head
    assert again.attempts == 1
    s.ended(again, "retry", due=6.0, counted=False)  # its write failed: the same attempt again
    (third,) = s.take(6.0, 16, 16, everyone)
    assert third.attempts == 1


def test_a_parked_head_holds_its_aggregate_back_until_it_is_asked_again() -> None:
    s = Schedule()
    s.add(owed("s", "a", 1))
    s.add(owed("s", "a", 2))
    s.add(owed("s", "b", 1))
    started = s.take(0.0, 16, 16, everyone)
    parked = next(o for o in started if o.aggregate_id == "a")
    s.ended(parked, "parked")
    s.ended(next(o for o in started if o.aggregate_id == "b"), "delivered")
    assert s.take(100.0, 16, 16, everyone) == []  # a/2 waits behind the parked a/1
    s.requeue(owed("s", "a", 1, due=100.0))
    (again,) = s.take(100.0, 16, 16, everyone)
    assert again is parked
    assert (again.attempts, again.status) == (0, "pending")
    s.ended(again, "delivered")
    assert ids(s.take(100.0, 16, 16, everyone)) == ["s/a/2"]


def test_a_paused_subscription_is_held_and_released_when_it_is_active_again() -> None:
    s = Schedule()
    s.add(owed("paused", "a", 1))
    s.add(owed("live", "a", 1))
    active = {"live"}
    assert ids(s.take(0.0, 16, 16, active.__contains__)) == ["live/a/1"]
    assert s.take(0.0, 16, 16, active.__contains__) == []
    active.add("paused")
    s.release(active)
    assert ids(s.take(0.0, 16, 16, active.__contains__)) == ["paused/a/1"]


def test_a_partition_let_go_is_forgotten_and_its_attempt_in_flight_ends_quietly() -> None:
    s = Schedule()
    s.add(owed("s", "a", 1, source="t:0"))
    s.add(owed("s", "a", 2, source="t:0"))
    s.add(owed("s", "b", 1, source="t:1"))
    started = s.take(0.0, 16, 1, everyone)  # one of the two heads; the other waits for room
    s.drop({"t:0"})
    assert set(s.items) <= {"s/b/1"}
    for o in started:
        s.ended(o, "delivered")
    assert s.in_flight() == 0
    rest = s.take(0.0, 16, 1, everyone)
    assert ids(rest) == ([] if started[0].id == "s/b/1" else ["s/b/1"])


ACTIONS = st.lists(
    st.tuples(
        st.sampled_from(["add", "take", "answer", "deliver", "retry", "park", "requeue"]), st.integers(0, 30)
    ),
    max_size=120,
)


@settings(max_examples=300, deadline=None)
@given(ACTIONS)
def test_any_interleaving_delivers_each_aggregate_in_version_order(actions: list[tuple[str, int]]) -> None:
    s = Schedule()
    next_version: dict[str, int] = {}
    flying: list[Owed] = []
    parked: list[Owed] = []
    delivered: dict[str, list[int]] = {}
    now = 0.0
    for action, n in actions:
        now += 1.0
        agg = "abc"[n % 3]
        if action == "add":
            v = next_version.get(agg, 1)
            next_version[agg] = v + 1
            s.add(owed("s", agg, v, due=now))
        elif action == "take":
            started = s.take(now, 1 + n % 4, 2, everyone)
            assert all(o.version == min(q.version for q in s.queues[o.key]) for o in started)
            flying += started
        elif flying and action == "answer":
            s.answered(flying[n % len(flying)])
        elif flying and action in ("deliver", "retry", "park"):
            o = flying.pop(n % len(flying))
            if action == "deliver":
                delivered.setdefault(o.aggregate_id, []).append(o.version)
                s.ended(o, "delivered")
            elif action == "retry":
                s.ended(o, "retry", due=now + n % 3)
            else:
                s.ended(o, "parked")
                parked.append(o)
        elif parked and action == "requeue":
            o = parked.pop(n % len(parked))
            s.requeue(owed("s", o.aggregate_id, o.version, due=now))
        assert s.in_flight() == sum(o.slot for o in flying) <= 2
        assert all(o.in_flight for o in flying)
    for versions in delivered.values():
        assert versions == sorted(versions) == list(range(1, len(versions) + 1))
