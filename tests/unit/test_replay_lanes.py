"""Rebuild lanes share the partitions of every topic a projection reads."""

from __future__ import annotations

from aiokafka import TopicPartition
from hypothesis import given
from hypothesis import strategies as st

from streams.replay import lane_of


@given(partitions=st.integers(1, 64), topics=st.integers(1, 4), lanes=st.integers(1, 8))
def test_every_partition_is_replayed_by_exactly_one_lane(partitions: int, topics: int, lanes: int) -> None:
    every = [TopicPartition(f"app.events.c{t}", p) for t in range(topics) for p in range(partitions)]
    shares = [lane_of(every, lane, lanes) for lane in range(lanes)]
    assert sorted(tp for share in shares for tp in share) == sorted(every)


def test_each_lane_gets_partitions_of_each_topic() -> None:
    every = [TopicPartition(t, p) for t in ("app.events.datasets", "app.events.incidents") for p in range(6)]
    for lane in range(2):
        share = lane_of(every, lane, 2)
        assert {tp.topic for tp in share} == {"app.events.datasets", "app.events.incidents"}
        assert len(share) == 6
