"""Incident behaviour: the status life cycle and every invariant, given/when/then."""

from __future__ import annotations

from uuid import uuid4

import pytest

from commands.incidents import CONTEXT
from commands.incidents import commands as c
from shared_kernel.domain import InvalidCommand, InvariantViolation
from tests.unit.scenario import Scenario

ID = uuid4()


def opened() -> Scenario:
    return Scenario(CONTEXT).given(
        c.OpenIncident(ID, "DB down", "primary unreachable", "critical", "pager", "PD-1")
    )


def test_opening_an_incident() -> None:
    events = Scenario(CONTEXT).when(c.OpenIncident(ID, "Disk full", priority="high", source="monitoring"))
    assert events == [
        (
            "IncidentOpened",
            {
                "title": "Disk full",
                "description": "",
                "priority": "high",
                "source": "monitoring",
                "external_id": "",
            },
        )
    ]


def test_priority_must_be_known() -> None:
    with pytest.raises(InvalidCommand) as err:
        Scenario(CONTEXT).when(c.OpenIncident(ID, "x", priority="urgent"))
    assert err.value.details["field"] == "priority"


def test_the_happy_life_cycle() -> None:
    s = opened()
    s.when(c.AssignIncident(ID, "alice"))
    assert s.when(c.ChangeIncidentStatus(ID, "in_progress")) == [
        ("IncidentStatusChanged", {"from_status": "open", "to_status": "in_progress", "reason": ""})
    ]
    s.when(c.ChangeIncidentStatus(ID, "resolved", "failover done"))
    s.when(c.ChangeIncidentStatus(ID, "closed"))
    assert (s.state.status, s.state.assignee, s.state.version) == ("closed", "alice", 5)


def test_a_resolved_incident_can_go_back_to_in_progress() -> None:
    s = opened().given(c.ChangeIncidentStatus(ID, "in_progress"), c.ChangeIncidentStatus(ID, "resolved"))
    assert s.when(c.ChangeIncidentStatus(ID, "in_progress"))[0][1]["to_status"] == "in_progress"


@pytest.mark.parametrize(
    ("path", "target", "allowed"),
    [
        ([], "resolved", ["in_progress"]),
        ([], "closed", ["in_progress"]),
        (["in_progress"], "open", ["resolved"]),
        (["in_progress"], "closed", ["resolved"]),
        (["in_progress", "resolved"], "open", ["closed", "in_progress"]),
    ],
)
def test_an_invalid_transition_names_the_allowed_ones(
    path: list[str], target: str, allowed: list[str]
) -> None:
    s = opened().given(*(c.ChangeIncidentStatus(ID, p) for p in path))
    with pytest.raises(InvariantViolation) as err:
        s.when(c.ChangeIncidentStatus(ID, target))
    assert err.value.details["allowed"] == allowed
    assert all(a in err.value.message for a in allowed)


def test_an_unknown_status_is_invalid() -> None:
    with pytest.raises(InvalidCommand):
        opened().when(c.ChangeIncidentStatus(ID, "done"))


def closed() -> Scenario:
    return opened().given(
        c.ChangeIncidentStatus(ID, "in_progress"),
        c.ChangeIncidentStatus(ID, "resolved"),
        c.ChangeIncidentStatus(ID, "closed"),
    )


def test_a_closed_incident_only_reopens() -> None:
    s = closed()
    for command in (
        c.AssignIncident(ID, "bob"),
        c.CommentOnIncident(ID, "bob", "hello"),
        c.ChangeIncidentStatus(ID, "open"),
        c.ChangeIncidentStatus(ID, "in_progress"),
    ):
        with pytest.raises(InvariantViolation) as err:
            s.when(command)
        assert err.value.details["allowed"] == ["reopen"]
    assert s.when(c.ReopenIncident(ID, "came back")) == [
        ("IncidentStatusChanged", {"from_status": "closed", "to_status": "open", "reason": "came back"})
    ]
    assert s.state.status == "open"


def test_only_a_closed_incident_can_be_reopened() -> None:
    with pytest.raises(InvariantViolation):
        opened().when(c.ReopenIncident(ID))


def test_comments_need_an_author_and_a_body() -> None:
    s = opened()
    assert s.when(c.CommentOnIncident(ID, "bob", " on it ")) == [
        ("IncidentCommented", {"author": "bob", "body": "on it"})
    ]
    with pytest.raises(InvalidCommand):
        s.when(c.CommentOnIncident(ID, "bob", "   "))
    assert s.state.comments == 1


DUE = "2026-12-01T10:15:00+00:00"


def test_an_unmet_deadline_escalates_once_with_a_growing_level() -> None:
    s = opened()
    assert s.when(c.EscalateIncident(ID, "assignment", DUE)) == [
        ("IncidentEscalated", {"level": 1, "deadline": "assignment", "due_at": DUE})
    ]
    with pytest.raises(InvariantViolation):
        s.when(c.EscalateIncident(ID, "assignment", DUE))
    assert s.when(c.EscalateIncident(ID, "resolution", DUE))[0][1]["level"] == 2


def test_a_met_deadline_does_not_escalate() -> None:
    s = opened().given(c.AssignIncident(ID, "alice"))
    with pytest.raises(InvariantViolation):
        s.when(c.EscalateIncident(ID, "assignment", DUE))
    s.given(c.ChangeIncidentStatus(ID, "in_progress"), c.ChangeIncidentStatus(ID, "resolved"))
    with pytest.raises(InvariantViolation):
        s.when(c.EscalateIncident(ID, "resolution", DUE))


def test_an_escalation_names_a_known_deadline_and_an_instant() -> None:
    with pytest.raises(InvalidCommand) as err:
        opened().when(c.EscalateIncident(ID, "response", DUE))
    assert err.value.details["field"] == "deadline"
    with pytest.raises(InvalidCommand) as err:
        opened().when(c.EscalateIncident(ID, "assignment", "2026-12-01T10:15:00"))
    assert err.value.details["field"] == "due_at"
