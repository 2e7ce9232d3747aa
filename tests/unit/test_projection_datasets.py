"""The datasets context's read models, given events: the catalogue row, the quality
checks, the search document. No services: the evolvers are pure, folded in memory as
the projectors fold each batch."""

from __future__ import annotations

import uuid
from uuid import UUID

from commands.datasets import CONTEXT
from commands.datasets import commands as c
from projections.datasets.quality import QualityMetricsProjection
from projections.datasets.rows import DatasetsProjection
from projections.datasets.search import SEARCHED_CHARS, DatasetsSearch
from projections.events import StoredEvent
from projections.folded import fold
from projections.projection import Row
from tests.unit.history import History

ROWS = DatasetsProjection()


def by_id(e: StoredEvent) -> UUID:
    return UUID(e.meta.aggregate_id)


def row_after(history: History, current: dict[UUID, Row] | None = None) -> Row:
    rows = {} if current is None else current
    fold(ROWS.evolvers, rows, history.events, by_id)
    (row,) = rows.values()
    return row


def a_dataset() -> tuple[UUID, History]:
    ident = uuid.uuid4()
    history = History(CONTEXT).then(
        c.RegisterDataset(
            ident, "Weather", "Hourly observations", "climate", ["Weather", "hourly"], {"unit": "C"}
        )
    )
    return ident, history


def test_a_registered_dataset_is_one_active_row_at_version_1() -> None:
    ident, history = a_dataset()
    assert row_after(history) == {
        "id": ident,
        "tenant": "acme",  # the tenant of the command that created it (its events' header)
        "version": 1,
        "name": "Weather",
        "description": "Hourly observations",
        "owner": "climate",
        "status": "active",
        "tags": ["weather", "hourly"],
        "metadata": {"unit": "C"},
        "latest_version": None,
        "versions": 0,
        "quality": {"checks": 0, "passed": 0, "metrics": {}},
        "archived_reason": None,
        "created_at": history.time(0),
        "updated_at": history.time(0),
    }
    assert set(ROWS.columns) == set(row_after(history))  # every column is written


def test_each_change_evolves_the_row_and_its_version() -> None:
    ident, history = a_dataset()
    history.then(
        c.DescribeDataset(ident, name="Weather (hourly)"),
        c.SetMetadataEntry(ident, "stations", [1, 2]),
        c.RemoveMetadataEntry(ident, "unit"),
        c.PublishVersion(ident, "1.0.0"),
        c.PublishVersion(ident, "1.1.0", "more stations"),
        c.RecordQualityCheck(ident, "completeness", 0.99, 0.95),
        c.RecordQualityCheck(ident, "freshness_h", 3.0, 2.0, "<="),
        c.ArchiveDataset(ident, "superseded"),
    )
    row = row_after(history)
    assert row["version"] == 9
    assert (row["name"], row["description"]) == ("Weather (hourly)", "Hourly observations")
    assert row["metadata"] == {"stations": [1, 2]}
    assert (row["latest_version"], row["versions"]) == ("1.1.0", 2)
    assert row["quality"]["checks"] == 2
    assert row["quality"]["passed"] == 1
    assert row["quality"]["metrics"]["freshness_h"] == {
        "value": 3.0,
        "threshold": 2.0,
        "comparator": "<=",
        "passed": False,
        "recorded_at": history.time(7).isoformat(),
    }
    assert (row["status"], row["archived_reason"]) == ("archived", "superseded")
    assert (row["created_at"], row["updated_at"]) == (history.time(0), history.time(8))


def test_a_batch_delivered_again_changes_nothing() -> None:
    ident, history = a_dataset()
    history.then(c.PublishVersion(ident, "1.0.0"), c.SetMetadataEntry(ident, "k", "v"))
    rows: dict[UUID, Row] = {}
    fold(ROWS.evolvers, rows, history.events, by_id)
    before = {k: dict(v) for k, v in rows.items()}
    assert fold(ROWS.evolvers, rows, history.events, by_id) == {}  # nothing changed
    assert rows == before
    # a batch overlapping the last one applies only what is new
    history.then(c.PublishVersion(ident, "2.0.0"))
    changed = fold(ROWS.evolvers, rows, history.events[1:], by_id)
    assert changed[ident]["version"] == 4
    assert changed[ident]["versions"] == 2


def test_a_change_of_a_dataset_never_registered_here_makes_no_row() -> None:
    ident, history = a_dataset()
    history.then(c.PublishVersion(ident, "1.0.0"))
    rows: dict[UUID, Row] = {}
    assert fold(ROWS.evolvers, rows, history.events[1:], by_id) == {}
    assert rows == {}


def test_touched_names_the_datasets_of_a_batch() -> None:
    ident, history = a_dataset()
    other, second = a_dataset()
    assert ROWS.touched(history.events + second.events) == {str(ident), str(other)}


def test_every_quality_check_is_a_row_of_its_own() -> None:
    ident, history = a_dataset()
    history.then(
        c.RecordQualityCheck(ident, "completeness", 0.9, 0.95),
        c.DescribeDataset(ident, description="d"),
        c.RecordQualityCheck(ident, "completeness", 0.97, 0.95),
    )
    rows = QualityMetricsProjection().rows(history.events)
    assert rows == [
        (ident, 2, "acme", "completeness", 0.9, 0.95, ">=", False, history.time(1)),
        (ident, 4, "acme", "completeness", 0.97, 0.95, ">=", True, history.time(3)),
    ]
    assert len(rows[0]) == len(QualityMetricsProjection.columns)


def test_the_search_document_is_the_row_keyed_by_the_id_text() -> None:
    ident, history = a_dataset()
    history.then(c.PublishVersion(ident, "1.0.0"), c.ArchiveDataset(ident, "old"))
    docs: dict[str, Row] = {}
    fold(DatasetsSearch().evolvers, docs, history.events, lambda e: e.meta.aggregate_id)
    assert docs == {str(ident): row_after(history)}
    mapped = set(DatasetsSearch.mapping["mappings"]["properties"])
    assert mapped <= set(docs[str(ident)]), "every mapped field is in the document"


def test_the_search_document_keeps_the_start_of_long_metadata_strings_and_the_row_all() -> None:
    ident, history = a_dataset()
    long = "x" * 150_000  # one flat_object leaf is one Lucene term: at most 32,766 bytes
    history.then(c.SetMetadataEntry(ident, "rows", {"sample": [long, "short"], "n": 3}))
    docs: dict[str, Row] = {}
    fold(DatasetsSearch().evolvers, docs, history.events, lambda e: e.meta.aggregate_id)
    assert docs[str(ident)]["metadata"] == {
        "unit": "C",
        "rows": {"sample": [long[:SEARCHED_CHARS], "short"], "n": 3},
    }
    assert row_after(history)["metadata"]["rows"]["sample"][0] == long
