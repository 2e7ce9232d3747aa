"""The CDC job's mapping from Debezium change events to dataset commands, without
services: the job's table is a dict and its command path a recorder that accepts."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from shared_kernel.envelope import CommandResult
from shared_kernel.settings import Settings
from streams.cdc import UNAVAILABLE, Change, Source, lsn_int
from streams.datasets.legacy_catalog import LegacyCatalog, dataset_of
from streams.jobs import Halt, Poison

ROW = {
    "id": "r1",
    "name": "Orders",
    "description": "every order",
    "status": "active",
    "owner_id": "sales",
    "metadata": '{"pii": true, "rows": 10}',
    "created_at": "2026-12-03T05:34:34.569943Z",
    "updated_at": "2026-12-03T05:34:34.569943Z",
}


class Table(dict[str, Any]):
    def get(self, key: str, default: Any = None) -> Any:
        return super().get(key, default)


class Recorder(LegacyCatalog):
    """The job with its Faust table as a dict and every command accepted and recorded."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.table = Table()
        self.sent: list[tuple[str, str, dict[str, Any]]] = []

    async def send(self, context: Any, command: Any, command_id: str, *args: Any, **kw: Any) -> CommandResult:
        self.sent.append((type(command).__name__, command_id, dict(vars(command))))
        return CommandResult(command_id=command_id, status="accepted", aggregate_id="", version=1)


def change(
    op: str, lsn: int, after: dict[str, Any] | None = None, key: str = "r1", snapshot: str = "false"
) -> Change:
    body = {
        "op": op,
        "before": {"id": key} if op == "d" else None,
        "after": after,
        "source": {"lsn": lsn, "snapshot": snapshot, "ts_ms": 1},
    }
    return Change.parse(orjson.dumps({"id": key}), orjson.dumps(body))


@pytest.fixture
def job() -> Recorder:
    return Recorder(Settings(cdc_source_table="catalog.datasets", cdc_tenant="acme"))


def names(job: Recorder) -> list[str]:
    return [n for n, _, _ in job.sent]


async def test_a_new_row_registers_the_dataset_its_key_names_with_its_fields(job: Recorder) -> None:
    await job.handle(change("r", 100, ROW, snapshot="last"))
    [(name, _, fields)] = job.sent
    assert name == "RegisterDataset"
    assert fields["dataset_id"] == dataset_of(Source.of(job.settings), "r1")
    assert (fields["name"], fields["description"], fields["owner"], fields["metadata"]) == (
        "Orders",
        "every order",
        "sales",
        {"pii": True, "rows": 10},
    )


async def test_an_update_sends_only_what_changed_and_a_redelivery_sends_nothing(job: Recorder) -> None:
    await job.handle(change("c", 100, ROW))
    update = {**ROW, "description": "all orders", "metadata": '{"pii": false, "owner": "x"}'}
    await job.handle(change("u", 200, update))
    assert names(job) == [
        "RegisterDataset",
        "DescribeDataset",
        "SetMetadataEntry",
        "SetMetadataEntry",
        "RemoveMetadataEntry",
    ]
    described = job.sent[1][2]
    assert (described["name"], described["description"]) == (None, "all orders")
    assert [(f["key"], f.get("value")) for _, _, f in job.sent[2:]] == [
        ("pii", False),
        ("owner", "x"),
        ("rows", None),
    ]
    before = list(job.sent)
    await job.handle(change("u", 200, update))  # the same change again
    await job.handle(change("u", 150, ROW))  # an older one
    assert job.sent == before


async def test_command_ids_are_a_function_of_the_change_and_differ_between_steps(job: Recorder) -> None:
    await job.handle(change("c", 100, ROW))
    other = Recorder(job.settings)
    await other.handle(change("c", 100, ROW))
    assert [i for _, i, _ in job.sent] == [i for _, i, _ in other.sent]
    await job.handle(change("u", 200, {**ROW, "name": "New", "description": "new"}))
    ids = [i for _, i, _ in job.sent]
    assert len(set(ids)) == len(ids)


async def test_archived_status_and_deletes_archive_once(job: Recorder) -> None:
    await job.handle(change("c", 100, ROW))
    await job.handle(change("u", 200, {**ROW, "status": "archived"}))
    await job.handle(change("d", 300))
    assert names(job) == ["RegisterDataset", "ArchiveDataset"]
    with pytest.raises(Poison, match="archived"):
        await job.handle(change("u", 400, {**ROW, "status": "active", "name": "Back"}))


async def test_an_unchanged_toasted_value_keeps_what_the_dataset_has(job: Recorder) -> None:
    await job.handle(change("c", 100, ROW))
    await job.handle(
        change("u", 200, {**ROW, "description": UNAVAILABLE, "metadata": UNAVAILABLE, "name": "N"})
    )
    assert names(job) == ["RegisterDataset", "DescribeDataset"]
    assert job.sent[1][2]["description"] is None


@pytest.mark.parametrize(
    ("after", "reason"),
    [
        ({**ROW, "name": "  "}, "the name is blank"),
        ({**ROW, "metadata": "[1, 2]"}, "metadata is a JSON list, not an object"),
        ({**ROW, "metadata": '"text"'}, "metadata is a JSON str, not an object"),
    ],
)
async def test_a_row_that_cannot_be_mapped_is_poison_and_sends_nothing(
    job: Recorder, after: dict[str, Any], reason: str
) -> None:
    with pytest.raises(Poison, match=reason):
        await job.handle(change("c", 100, after))
    assert job.sent == []


async def test_a_lost_mapped_column_halts_without_marking_the_change_applied(job: Recorder) -> None:
    await job.handle(change("c", 100, ROW))
    renamed = {k: v for k, v in ROW.items() if k != "description"} | {"summary": "s"}
    with pytest.raises(Halt, match=r"no column description .*APP_CDC_SOURCE_COLUMNS"):
        await job.handle(change("u", 200, renamed))
    assert job.table["r1"]["lsn"] == 100  # the change comes again after the restart
    mapped = Recorder(job.settings.model_copy(update={"cdc_source_columns": {"description": "summary"}}))
    mapped.table = job.table
    await mapped.handle(change("u", 200, renamed))
    assert names(mapped) == ["DescribeDataset"]


async def test_a_new_column_is_ignored(job: Recorder) -> None:
    await job.handle(change("c", 100, {**ROW, "region": "eu"}))
    await job.handle(change("u", 200, {**ROW, "region": "us"}))
    assert names(job) == ["RegisterDataset"]


@pytest.mark.parametrize(
    ("value", "error"),
    [
        (b"not json", "not JSON"),
        (b'{"op": "x"}', "not a Debezium change event"),
        (b'{"op": "c", "after": {}, "source": {}}', "no source LSN"),
        (b'{"op": "c", "source": {"lsn": 1}}', "without the row after it"),
    ],
)
def test_what_is_not_a_change_event_is_refused(value: bytes, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        Change.parse(b'{"id": "r1"}', value)


def test_the_names_the_project_gives_a_source_are_valid_and_its_own() -> None:
    source = Source.of(Settings(topic_prefix="t1a.b", cdc_source_table="legacy_schema.datasets"))
    assert source.slot == "t1a_b_legacy"
    assert source.topic == "t1a.b.cdc.legacy.legacy_schema.datasets"
    config = source.connector_config()
    assert config["slot.name"] == config["publication.name"] == source.slot
    assert config["publication.autocreate.mode"] == "disabled"
    assert config["table.include.list"] == "legacy_schema\\.datasets"
    assert (config["database.user"], config["database.dbname"]) == ("legacy", "legacy")
    assert lsn_int("0/24B4C58") == 0x24B4C58
    assert lsn_int("1/0") == 1 << 32
