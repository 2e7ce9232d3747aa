"""Quality checks counted in event-time windows: the projection's counting against a
brute-force offline computation over the same events, late and out-of-order ones too."""

from __future__ import annotations

import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from projections.datasets.windows import count
from projections.events import StoredEvent
from shared_kernel.envelope import EventMetadata
from shared_kernel.windows import WindowKind

HOUR = 3_600_000
TUMBLING = WindowKind("tumbling", HOUR, HOUR)
HOPPING = WindowKind("hopping", 4 * HOUR, HOUR)
LATENESS = HOUR
T0 = datetime(2026, 12, 1, tzinfo=UTC)


def check(dataset: str, version: int, minutes: int, passed: bool, metric: str = "rows") -> StoredEvent:
    measured = T0 + timedelta(minutes=minutes)
    meta = EventMetadata(
        event_id=uuid.uuid4(),
        event_type="datasets.QualityCheckRecorded",
        aggregate_type="datasets.Dataset",
        aggregate_id=dataset,
        aggregate_version=version,
        occurred_at=T0 + timedelta(days=1),  # recorded later than measured: the event time is measured_at
        correlation_id="c",
        causation_id="c",
        tenant="acme",
    )
    payload = {"metric": metric, "value": 1.0, "threshold": 1.0, "comparator": ">=", "passed": passed}
    payload["measured_at"] = measured.isoformat()
    return StoredEvent("t", 0, version, "datasets", meta.event_type, payload, meta)


def offline(events: list[StoredEvent]) -> tuple[Counter[Any], Counter[Any]]:
    """Every window of every kind tried against every check: (checks, passed) per window."""
    checks: Counter[Any] = Counter()
    passed: Counter[Any] = Counter()
    stream: dict[str, int] = {}
    for e in events:
        t = int(datetime.fromisoformat(e.payload["measured_at"]).timestamp() * 1000)
        stream[e.meta.aggregate_id] = max(stream.get(e.meta.aggregate_id, t), t)
        for kind, size in (("tumbling", HOUR), ("hopping", 4 * HOUR)):
            for start in range(int(T0.timestamp() * 1000) - 8 * HOUR, t + 1, HOUR):
                end = start + size
                if kind == "tumbling" and start % size:
                    continue
                if start <= t < end and end + LATENESS > stream[e.meta.aggregate_id]:
                    key = (e.meta.aggregate_id, e.payload["metric"], kind, start)
                    checks[key] += 1
                    passed[key] += e.payload["passed"]
    return checks, passed


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from("ab"), st.integers(0, 600), st.booleans()), max_size=40))
def test_windows_equal_the_offline_computation_with_late_and_out_of_order_checks(
    draws: list[tuple[str, int, bool]],
) -> None:
    versions: Counter[str] = Counter()
    events = []
    for name, minutes, ok in draws:
        dataset = str(uuid.UUID(int=ord(name)))
        versions[dataset] += 1
        events.append(check(dataset, versions[dataset] + 1, minutes, ok))
    added = count(events, {}, (TUMBLING, HOPPING), LATENESS)
    checks, passed = offline(events)
    got = {(str(d), m, k, s): (c.checks, c.passed) for (d, m, k, s), c in added.items()}
    assert got == {k: (checks[k], passed[k]) for k in checks}


def test_a_check_later_than_the_lateness_is_dropped_and_counted_and_a_redelivery_is_skipped() -> None:
    d = str(uuid.uuid4())
    clocks: dict[Any, Any] = {}
    first = [check(d, 2, 300, True), check(d, 3, 30, False)]  # 04:30 no longer takes 00:30 (00-01 + 1 h)
    added = count(first, clocks, (TUMBLING,), LATENESS)
    assert [(k[3] - int(T0.timestamp() * 1000)) // HOUR for k in added] == [5]
    (clock,) = clocks.values()
    assert (clock.version, clock.dropped) == (3, 1)
    assert count(first, clocks, (TUMBLING,), LATENESS) == {}  # both are there already
    assert len(count([check(d, 4, 250, False)], clocks, (TUMBLING,), LATENESS)) == 1  # within lateness


def test_an_instant_is_in_as_many_hopping_windows_as_steps_fit_in_one() -> None:
    day = WindowKind("hopping", 24 * HOUR, HOUR)
    windows = day.containing(10 * HOUR + 5)
    assert len(windows) == 24
    assert windows[0] == (-13 * HOUR, 11 * HOUR)
    assert windows[-1] == (10 * HOUR, 34 * HOUR)
    assert day.current(10 * HOUR + 5) == (-13 * HOUR, 11 * HOUR)
