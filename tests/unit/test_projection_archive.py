"""The events archive, given events of every context: one row per event with its
position, headers and payload. No services."""

from __future__ import annotations

import uuid

from commands.datasets import CONTEXT as DATASETS
from commands.datasets import commands as dc
from commands.incidents import CONTEXT as INCIDENTS
from commands.incidents import commands as ic
from projections.archive import EventsArchiveProjection
from projections.registry import CONTEXTS, PROJECTIONS
from tests.unit.history import History


def test_the_archive_follows_every_context_of_the_read_side() -> None:
    assert PROJECTIONS["events"].contexts == tuple(c.name for c in CONTEXTS)
    assert {"datasets", "incidents"} <= set(PROJECTIONS["events"].contexts)


def test_every_event_is_a_row_with_its_position_headers_and_payload() -> None:
    archive = PROJECTIONS["events"]
    assert isinstance(archive, EventsArchiveProjection)
    dataset, incident = uuid.uuid4(), uuid.uuid4()
    datasets = History(DATASETS).then(
        dc.RegisterDataset(dataset, "Rain"), dc.PublishVersion(dataset, "1.0.0")
    )
    incidents = History(INCIDENTS).then(ic.OpenIncident(incident, "Gauge offline"))
    rows = archive.rows(datasets.events + incidents.events)
    columns = archive.columns
    assert [dict(zip(columns, r, strict=True))["event_type"] for r in rows] == [
        "datasets.DatasetRegistered",
        "datasets.VersionPublished",
        "incidents.IncidentOpened",
    ]
    published = dict(zip(columns, rows[1], strict=True))
    event = datasets.events[1]
    assert published == {
        "event_id": event.meta.event_id,
        "topic": "unit.events.datasets",
        "partition": 0,
        "offset": 1,
        "context": "datasets",
        "aggregate_type": "datasets.Dataset",
        "aggregate_id": str(dataset),
        "tenant": "acme",
        "version": 2,
        "event_type": "datasets.VersionPublished",
        "occurred_at": datasets.time(1),
        "headers": published["headers"],
        "payload": {"version": "1.0.0", "notes": ""},
    }
    headers = published["headers"]
    assert headers["event-type"] == "datasets.VersionPublished"
    assert headers["aggregate-version"] == "2"
    assert headers["actor"] == "alice"
