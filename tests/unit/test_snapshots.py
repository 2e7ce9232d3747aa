"""Snapshots in the state topic restore the same aggregate and its recent command outcomes."""

from __future__ import annotations

from uuid import uuid4

from commands.datasets import CONTEXT
from commands.datasets import commands as c
from commands.snapshots import RECENT_COMMANDS, LoadedAggregate, dump, load
from shared_kernel.envelope import CommandResult
from tests.unit.scenario import Scenario


def test_a_snapshot_restores_state_version_and_recent_results() -> None:
    ID = uuid4()
    s = Scenario(CONTEXT).given(
        c.RegisterDataset(ID, "Weather", tags=["a"], metadata={"k": [1, 2]}),
        c.PublishVersion(ID, "1.0.0"),
        c.RecordQualityCheck(ID, "rows", 10, 5, ">"),
    )
    assert s.aggregate is not None
    loaded = LoadedAggregate(s.aggregate)
    loaded.remember(
        CommandResult("cmd-1", "accepted", str(ID), version=3, position="tok", events=1, fingerprint="f")
    )
    loaded.remember(
        CommandResult("cmd-2", "rejected", str(ID), code="version_conflict", reason="r", current_version=3)
    )

    restored = load(CONTEXT, str(ID), dump(CONTEXT, loaded))

    assert restored.version == 3
    assert vars(restored.aggregate) == {**vars(s.aggregate), "_pending_events": []}
    assert list(restored.recent.values()) == list(loaded.recent.values())
    # The restored aggregate keeps deciding: versions continue from the snapshot.
    restored.aggregate.publish_version("1.1.0", "")  # type: ignore[attr-defined]
    assert [e.originator_version for e in restored.aggregate.collect_events()] == [4]


def test_only_the_most_recent_command_results_are_kept() -> None:
    ID = uuid4()
    s = Scenario(CONTEXT).given(c.RegisterDataset(ID, "Weather"))
    assert s.aggregate is not None
    loaded = LoadedAggregate(s.aggregate)
    for i in range(RECENT_COMMANDS + 5):
        loaded.remember(CommandResult(f"cmd-{i}", "accepted", str(ID), version=1))
    assert next(iter(loaded.recent)) == "cmd-5"
    assert len(load(CONTEXT, str(ID), dump(CONTEXT, loaded)).recent) == RECENT_COMMANDS
