"""The incidents context's read models, given events: the incident row through its life
cycle and the search document with the comments' text. No services."""

from __future__ import annotations

import uuid
from datetime import timedelta
from uuid import UUID

from commands.incidents import CONTEXT
from commands.incidents import commands as c
from projections.folded import fold
from projections.incidents.rows import IncidentsProjection
from projections.incidents.search import IncidentsSearch
from projections.projection import Row
from tests.unit.history import History

ROWS = IncidentsProjection()


def row_after(history: History) -> Row:
    rows: dict[UUID, Row] = {}
    fold(ROWS.evolvers, rows, history.events, lambda e: UUID(e.meta.aggregate_id))
    (row,) = rows.values()
    return row


def an_incident() -> tuple[UUID, History]:
    ident = uuid.uuid4()
    opened = c.OpenIncident(ident, "Nightly load failed", "exit 1", "high", "monitoring", "alert-7")
    return ident, History(CONTEXT).then(opened)


def test_an_opened_incident_is_an_open_row_with_nobody_assigned() -> None:
    ident, history = an_incident()
    assert row_after(history) == {
        "id": ident,
        "tenant": "acme",  # the tenant of the command that created it (its events' header)
        "version": 1,
        "title": "Nightly load failed",
        "description": "exit 1",
        "priority": "high",
        "source": "monitoring",
        "external_id": "alert-7",
        "status": "open",
        "assignee": None,
        "comments": 0,
        "opened_at": history.time(0),
        "updated_at": history.time(0),
        "resolved_at": None,
        "closed_at": None,
        "assigned_at": None,
        "assign_due_at": history.time(0) + timedelta(hours=1),  # the default service level of "high"
        "resolve_due_at": history.time(0) + timedelta(hours=8),
        "assign_breached": False,
        "resolve_breached": False,
        "escalation_level": 0,
    }
    assert set(ROWS.columns) == set(row_after(history))


def test_a_deadline_met_late_or_escalated_shows_as_breached() -> None:
    ident, history = an_incident()
    history.then(c.EscalateIncident(ident, "assignment", "2026-01-01T00:00:00+00:00"))
    row = row_after(history)
    assert (row["assign_breached"], row["resolve_breached"], row["escalation_level"]) == (True, False, 1)
    history.then(c.AssignIncident(ident, "bob"))
    assert row_after(history)["assigned_at"] == history.time(2)


def test_the_life_cycle_keeps_when_it_was_resolved_and_closed() -> None:
    ident, history = an_incident()
    history.then(
        c.AssignIncident(ident, "bob"),
        c.ChangeIncidentStatus(ident, "in_progress"),
        c.CommentOnIncident(ident, "bob", "looking"),
        c.ChangeIncidentStatus(ident, "resolved"),
    )
    row = row_after(history)
    assert (row["status"], row["assignee"], row["comments"]) == ("resolved", "bob", 1)
    assert (row["resolved_at"], row["closed_at"]) == (history.time(4), None)

    history.then(c.ChangeIncidentStatus(ident, "in_progress"))  # not fixed after all
    row = row_after(history)
    assert (row["status"], row["resolved_at"]) == ("in_progress", history.time(4))  # kept

    history.then(c.ChangeIncidentStatus(ident, "resolved"), c.ChangeIncidentStatus(ident, "closed"))
    row = row_after(history)
    assert (row["status"], row["resolved_at"], row["closed_at"]) == (
        "closed",
        history.time(6),
        history.time(7),
    )

    history.then(c.ReopenIncident(ident, "came back"))
    row = row_after(history)
    assert (row["status"], row["resolved_at"], row["closed_at"]) == ("open", None, None)
    assert (row["version"], row["updated_at"]) == (9, history.time(8))


def test_the_search_document_carries_the_comments_text() -> None:
    ident, history = an_incident()
    history.then(
        c.CommentOnIncident(ident, "bob", "disk full on node 3"),
        c.AssignIncident(ident, "carol"),
        c.CommentOnIncident(ident, "carol", "freed 20 GB"),
    )
    docs: dict[str, Row] = {}
    fold(IncidentsSearch().evolvers, docs, history.events, lambda e: e.meta.aggregate_id)
    doc = docs[str(ident)]
    assert doc["comment_texts"] == ["disk full on node 3", "freed 20 GB"]
    assert {k: v for k, v in doc.items() if k != "comment_texts"} == row_after(history)
    mapped = set(IncidentsSearch.mapping["mappings"]["properties"])
    assert mapped <= set(doc), "every mapped field is in the document"
