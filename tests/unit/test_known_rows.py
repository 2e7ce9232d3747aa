"""What a projection worker may skip reading back: KnownRows."""

from __future__ import annotations

from datetime import UTC, datetime
from uuid import uuid4

from projections.events import StoredEvent
from projections.folded import KnownRows
from shared_kernel.envelope import EventMetadata


def _event(aggregate: str, version: int) -> StoredEvent:
    meta = EventMetadata(
        event_id=uuid4(),
        event_type="datasets.MetadataSet",
        aggregate_type="datasets.Dataset",
        aggregate_id=aggregate,
        aggregate_version=version,
        occurred_at=datetime(2026, 1, 1, tzinfo=UTC),
        correlation_id="",
        causation_id="",
    )
    return StoredEvent("t", 0, version, "datasets", "datasets.MetadataSet", {}, meta)


def key(e: StoredEvent) -> str:
    return e.meta.aggregate_id


def test_a_creation_needs_no_read_and_a_known_previous_version_is_used() -> None:
    known: KnownRows[str] = KnownRows(10)
    known.stage({"b": {"version": 4}, "c": {"version": 2}})
    known.commit()
    rows, unknown = known.split([_event("a", 1), _event("a", 2), _event("b", 5), _event("c", 7)], key)
    assert rows == {"b": {"version": 4}}  # "a" is created in the batch
    assert unknown == ["c"]  # version 2 is known, the batch starts at 7: read it


def test_rows_of_a_rolled_back_batch_are_not_known() -> None:
    known: KnownRows[str] = KnownRows(10)
    known.stage({"a": {"version": 1}})
    known.discard()
    assert known.split([_event("a", 2)], key) == ({}, ["a"])


def test_the_least_recently_written_rows_are_forgotten_first() -> None:
    known: KnownRows[str] = KnownRows(2)
    for name in ("a", "b", "c"):
        known.stage({name: {"version": 1}})
        known.commit()
    rows, unknown = known.split([_event("a", 2), _event("b", 2), _event("c", 2)], key)
    assert set(rows) == {"b", "c"}
    assert unknown == ["a"]
