"""Dataset behaviour: every command and every invariant, given/when/then."""

from __future__ import annotations

from uuid import uuid4

import pytest

from commands.datasets import CONTEXT
from commands.datasets import commands as c
from shared_kernel.domain import (
    AggregateAlreadyExists,
    AggregateNotFound,
    InvalidCommand,
    InvariantViolation,
    NotFound,
    VersionConflict,
)
from tests.unit.scenario import T0, Scenario

ID = uuid4()


def registered(**overrides: object) -> Scenario:
    fields = {
        "dataset_id": ID,
        "name": "Weather",
        "description": "Hourly obs",
        "owner": "climate",
        "tags": ["Weather"],
    }
    fields.update(overrides)
    return Scenario(CONTEXT).given(c.RegisterDataset(**fields))  # type: ignore[arg-type]


def test_registering_a_dataset_records_its_normalised_description() -> None:
    events = Scenario(CONTEXT).when(
        c.RegisterDataset(
            ID, " Weather ", "Hourly obs", "climate", ["Weather", "weather ", "hourly"], {"rows": 10}
        )
    )
    assert events == [
        (
            "DatasetRegistered",
            {
                "name": "Weather",
                "description": "Hourly obs",
                "owner": "climate",
                "tags": ["weather", "hourly"],
                "metadata": {"rows": "10"},
            },
        )
    ]


def test_events_are_stamped_by_the_clock_in_force() -> None:
    s = registered()
    assert s.state.created_on == T0
    assert s.state.version == 1


def test_a_dataset_needs_a_name() -> None:
    with pytest.raises(InvalidCommand) as err:
        Scenario(CONTEXT).when(c.RegisterDataset(ID, "  "))
    assert err.value.details["field"] == "name"


def test_registering_twice_is_refused_with_the_current_version() -> None:
    with pytest.raises(AggregateAlreadyExists) as err:
        registered().when(c.RegisterDataset(ID, "Again"))
    assert err.value.details["current_version"] == 1


def test_commands_for_an_unknown_dataset_are_not_found() -> None:
    with pytest.raises(AggregateNotFound):
        Scenario(CONTEXT).when(c.DescribeDataset(ID, name="x"))


def test_describe_changes_only_what_is_given() -> None:
    s = registered()
    assert s.when(c.DescribeDataset(ID, description="Daily obs")) == [
        ("DatasetDescribed", {"name": "Weather", "description": "Daily obs"})
    ]
    assert s.when(c.DescribeDataset(ID, name="Climate")) == [
        ("DatasetDescribed", {"name": "Climate", "description": "Daily obs"})
    ]


def test_describe_with_nothing_to_change_is_invalid() -> None:
    with pytest.raises(InvalidCommand):
        registered().when(c.DescribeDataset(ID))


def test_metadata_entries_are_set_as_json_and_removed() -> None:
    s = registered()
    assert s.when(c.SetMetadataEntry(ID, "licence", {"name": "CC-BY", "v": 4})) == [
        ("MetadataSet", {"key": "licence", "value_json": '{"name":"CC-BY","v":4}'})
    ]
    assert s.when(c.RemoveMetadataEntry(ID, "licence")) == [("MetadataRemoved", {"key": "licence"})]
    assert s.state.metadata == {}


def test_removing_a_missing_metadata_entry_is_not_found() -> None:
    with pytest.raises(NotFound):
        registered().when(c.RemoveMetadataEntry(ID, "nope"))


def test_published_versions_strictly_increase_by_semver_precedence() -> None:
    s = registered()
    assert s.when(c.PublishVersion(ID, "1.0.0-rc.1", "first")) == [
        ("VersionPublished", {"version": "1.0.0-rc.1", "notes": "first"})
    ]
    s.when(c.PublishVersion(ID, "1.0.0"))
    s.when(c.PublishVersion(ID, "1.10.0"))
    for not_greater in ("1.10.0", "1.9.9", "1.10.0-beta"):
        with pytest.raises(InvariantViolation) as err:
            s.when(c.PublishVersion(ID, not_greater))
        assert err.value.details["latest_version"] == "1.10.0"


def test_a_version_must_be_semantic() -> None:
    with pytest.raises(InvalidCommand) as err:
        registered().when(c.PublishVersion(ID, "v2"))
    assert err.value.details["field"] == "version"


@pytest.mark.parametrize(
    ("value", "comparator", "threshold", "passed"),
    [(0.99, ">=", 0.95, True), (0.90, ">=", 0.95, False), (3.0, "<", 5.0, True), (5.0, "<", 5.0, False)],
)
def test_a_quality_check_computes_whether_it_passed(
    value: float, comparator: str, threshold: float, passed: bool
) -> None:
    events = registered().when(c.RecordQualityCheck(ID, "completeness", value, threshold, comparator))
    assert events == [
        (
            "QualityCheckRecorded",
            {
                "metric": "completeness",
                "value": value,
                "threshold": threshold,
                "comparator": comparator,
                "passed": passed,
                "measured_at": None,
            },
        )
    ]


def test_a_quality_check_needs_a_known_comparator_and_finite_numbers() -> None:
    with pytest.raises(InvalidCommand):
        registered().when(c.RecordQualityCheck(ID, "m", 1.0, 1.0, "~"))
    with pytest.raises(InvalidCommand):
        registered().when(c.RecordQualityCheck(ID, "m", float("nan"), 1.0, ">="))


def test_an_archived_dataset_accepts_no_change() -> None:
    s = registered()
    assert s.when(c.ArchiveDataset(ID, "superseded")) == [("DatasetArchived", {"reason": "superseded"})]
    for command in (
        c.DescribeDataset(ID, name="x"),
        c.SetMetadataEntry(ID, "k", 1),
        c.RemoveMetadataEntry(ID, "k"),
        c.PublishVersion(ID, "9.0.0"),
        c.RecordQualityCheck(ID, "m", 1, 1, ">="),
        c.ArchiveDataset(ID, "again"),
    ):
        with pytest.raises(InvariantViolation):
            s.when(command)


def test_an_expected_version_other_than_the_current_one_conflicts() -> None:
    s = registered()
    s.when(c.DescribeDataset(ID, name="x"), expected_version=1)
    with pytest.raises(VersionConflict) as err:
        s.when(c.DescribeDataset(ID, name="y"), expected_version=1)
    assert err.value.details["current_version"] == 2


def test_a_quality_check_keeps_its_own_time_in_utc_and_refuses_one_without_a_zone() -> None:
    events = registered().when(
        c.RecordQualityCheck(ID, "rows", 1.0, 1.0, ">=", measured_at="2026-12-01T12:00:00+02:00")
    )
    assert events[0][1]["measured_at"] == "2026-12-01T10:00:00+00:00"
    with pytest.raises(InvalidCommand) as err:
        registered().when(c.RecordQualityCheck(ID, "rows", 1.0, 1.0, ">=", measured_at="2026-12-01T12:00:00"))
    assert err.value.details["field"] == "measured_at"


FIGURES = {
    "window_start": "2026-12-01T00:00:00+00:00",
    "window_end": "2026-12-02T00:00:00+00:00",
    "checks": 10,
    "failed": 6,
    "failure_rate": 0.6,
    "threshold": 0.5,
}


def test_quality_degrades_once_and_is_restored_once_per_metric() -> None:
    s = registered()
    events = s.when(c.MarkQualityDegraded(ID, "rows", FIGURES, check_version=5))
    assert events == [("DatasetQualityDegraded", {"metric": "rows", "check_version": 5, **FIGURES})]
    # the same decision again (a job replaying its input), or an older one: refused
    for version in (5, 4, 7):
        with pytest.raises(InvariantViolation):
            s.when(c.MarkQualityDegraded(ID, "rows", FIGURES, check_version=version))
    # another metric is its own
    assert s.when(c.MarkQualityDegraded(ID, "nulls", FIGURES, check_version=6))
    restored = {**FIGURES, "failed": 1, "failure_rate": 0.1, "threshold": 0.2}
    with pytest.raises(InvariantViolation):  # not after the degradation's own check
        s.when(c.MarkQualityRestored(ID, "rows", restored, check_version=5))
    events = s.when(c.MarkQualityRestored(ID, "rows", restored, check_version=9))
    assert events[0][1]["degraded_check_version"] == 5
    with pytest.raises(InvariantViolation):
        s.when(c.MarkQualityRestored(ID, "rows", restored, check_version=10))
    with pytest.raises(InvariantViolation):  # a replayed degradation from before the restoration
        s.when(c.MarkQualityDegraded(ID, "rows", FIGURES, check_version=5))
    assert s.when(c.MarkQualityDegraded(ID, "rows", FIGURES, check_version=12))


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"failure_rate": 1.5}, "figures.failure_rate"),
        ({"checks": -1}, "figures.checks"),
        ({"window_start": "yesterday"}, "figures.window_start"),
        ({"failed": None}, "figures.failed"),
    ],
)
def test_degradation_figures_are_checked(change: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidCommand) as err:
        registered().when(c.MarkQualityDegraded(ID, "rows", {**FIGURES, **change}, check_version=3))
    assert err.value.details["field"] == field
