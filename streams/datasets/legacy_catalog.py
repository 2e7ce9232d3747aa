"""The CDC job of the datasets context: every change of the legacy catalogue's table
(Debezium's change events, `streams.cdc`) becomes commands on the datasets context,
sent through the normal command path.

- A new row (or one read by the initial snapshot) registers a dataset; its aggregate id
  derives from (tenant, source, table, primary key), so a replay targets the same one.
- A changed row: a new name or description describes it; metadata keys added or
  changed are set, keys gone are removed; `status = 'archived'` archives it.
- A deleted row archives the dataset.

Each command id derives from (source, table, key, LSN, step), so a change delivered
again (a connector restart re-reads what it had not committed, a job restart re-reads
what it had not acked) sends the same ids, which the owner answers with their first
outcome. State, in the Faust table `rows` (keyed by the row's key, co-partitioned with
the change topic): the last LSN applied (a change at or below it is skipped) and the
row's mapped fields as the dataset has them, to tell what a change changed (the source
need not keep old row images). Changes of one row are handled in order; different rows
at once (`APP_CDC_CONCURRENCY`).

A change that cannot be mapped (a blank name, `metadata` that is not a JSON object, a
change to a row whose dataset is archived) is dead-lettered with the reason and the
rest flows. A source column the job does not map is logged once and ignored; a mapped
column missing from a row (renamed or dropped) halts the job with an error naming it:
map it with `APP_CDC_SOURCE_COLUMNS` and restart the job. Owner changes are logged:
the datasets context has no command that changes an owner.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from dataclasses import dataclass
from typing import Any
from uuid import UUID, uuid5

import asyncpg
import faust
import orjson

from commands.datasets import CONTEXT as DATASETS
from commands.datasets import commands as c
from shared_kernel.avro import AvroCodec
from shared_kernel.settings import Settings
from shared_kernel.topics import Topics
from streams import cdc
from streams.cdc import UNAVAILABLE, Change, Source
from streams.jobs import RETRY_S, Halt, Job, JsonTable, Poison, derived_id

log = logging.getLogger(__name__)

CDC_DATASETS = UUID("0e6f7a52-9c1d-4b3e-8f2a-6d5c4b3a2e1f")  # namespace of the datasets' ids
FIELDS = ("id", "name", "description", "status", "owner_id", "metadata")  # what the job maps
HELD = {"name": "name", "description": "description", "status": "status", "owner_id": "owner"}  # in `rows`
KNOWN = {*FIELDS, "created_at", "updated_at"}  # the table's columns that are read or expected


def dataset_of(source: Source, key: str) -> UUID:
    """The dataset a source row is: the same on every replay and in every process."""
    return uuid5(CDC_DATASETS, f"{source.tenant}/{source.name}/{source.qualified_table}/{key}")


@dataclass(frozen=True)
class Row:
    """A source row as the dataset holds it."""

    name: str
    description: str
    status: str
    owner: str
    metadata: dict[str, Any]

    def state(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "status": self.status,
            "owner": self.owner,
            "metadata": self.metadata,
        }


class LegacyCatalog(Job):
    name = cdc.JOB
    concurrency = 64

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.source = Source.of(settings)
        self.columns = {f: settings.cdc_source_columns.get(f, f) for f in FIELDS}
        self.expected = set(self.columns.values()) | (KNOWN - set(FIELDS))
        self.warned: set[str] = set()
        self.table: Any = None
        self.concurrency = settings.cdc_concurrency

    def source_topics(self, topics: Topics) -> list[str]:
        return [self.source.topic]

    def tables(self, app: faust.App) -> None:
        self.table = JsonTable(app, "rows", self.settings.partitions)

    async def prepare(self) -> None:
        """The topic, the publication and the connector, as the settings say; while Kafka
        Connect or the source is away, tried again with a growing pause. A connector
        config Connect refuses halts the job."""
        for attempt in itertools.count():
            try:
                await cdc.ensure(self.settings, self.source)
                return
            except cdc.ConnectRefused as exc:
                raise Halt(f"Kafka Connect refused the connector {self.source.connector}: {exc}") from exc
            except (cdc.ConnectUnavailable, OSError, asyncpg.PostgresError, TimeoutError) as exc:
                pause = RETRY_S[min(attempt, len(RETRY_S) - 1)]
                log.warning(
                    "the CDC source is not ready yet; trying again",
                    extra={"job": self.name, "error": repr(exc), "pause_s": pause},
                )
                await asyncio.sleep(pause)

    def decode(self, codec: AvroCodec, record: Any) -> Change | None:
        if record.value is None:
            return None  # a tombstone (none are asked for): nothing to do
        return Change.parse(record.key, record.value)

    async def handle(self, change: Change) -> None:
        state: dict[str, Any] = self.table.get(change.key) or {"lsn": 0, "row": None, "archived": False}
        if change.lsn <= state["lsn"]:
            return  # applied already (a redelivery)
        steps = Steps(self, change, dataset_of(self.source, change.key), state)
        try:  # a halt leaves the state as it was: the change comes again after the restart
            row = None if change.op == "d" else self._row(change, state)
        except Poison:
            self.table[change.key] = {**state, "lsn": change.lsn}  # dead-lettered once
            raise
        try:
            if row is None:
                await steps.deleted()
            else:
                await steps.changed(row)
        finally:  # what was applied is kept, also when a later step is refused
            self.table[change.key] = {**steps.state, "lsn": change.lsn}

    def _row(self, change: Change, state: dict[str, Any]) -> Row:
        after = change.after or {}
        missing = [f"{self.columns[f]} ({f})" for f in FIELDS if self.columns[f] not in after]
        if missing:
            raise Halt(
                f"the source table {self.source.qualified_table} has no column {', '.join(missing)}: "
                "renamed or dropped? Map the field to its new column with APP_CDC_SOURCE_COLUMNS "
                '(e.g. {"description": "summary"}) and restart the job; nothing of this change was applied'
            )
        for column in sorted(set(after) - self.expected - self.warned):
            self.warned.add(column)
            log.warning(
                "the source has a column the CDC job does not map: ignored",
                extra={"job": self.name, "table": self.source.qualified_table, "column": column},
            )
        before = state["row"] or {}

        def value(f: str) -> Any:
            v = after[self.columns[f]]
            return before.get(HELD[f]) if v == UNAVAILABLE else v  # an unchanged TOASTed value

        name = value("name")
        if not isinstance(name, str) or not name.strip():
            raise Poison(f"row {change.key!r}: the name is blank; a dataset needs one")
        raw = after[self.columns["metadata"]]
        if raw == UNAVAILABLE:
            metadata = dict(before.get("metadata") or {})
        else:
            try:
                metadata = orjson.loads(raw) if isinstance(raw, str) else raw
            except orjson.JSONDecodeError as exc:
                raise Poison(f"row {change.key!r}: metadata is not JSON: {exc}") from exc
            if metadata is None:
                metadata = {}
            if not isinstance(metadata, dict):
                raise Poison(
                    f"row {change.key!r}: metadata is a JSON {type(metadata).__name__}, not an object"
                )
        return Row(
            name=name,
            description=str(value("description") or ""),
            status=str(value("status") or ""),
            owner=str(value("owner_id") or ""),
            metadata=metadata,
        )


class Steps:
    """The commands one change calls for, sent in order; `state` follows what was applied."""

    def __init__(self, job: LegacyCatalog, change: Change, dataset: UUID, state: dict[str, Any]) -> None:
        self.job = job
        self.change = change
        self.dataset = dataset
        self.state = dict(state)
        self.n = 0

    async def send(self, command: Any) -> bool:
        """True when the command is accepted (or was, the first time it was sent)."""
        source, change = self.job.source, self.change
        command_id = derived_id("cdc", source.name, source.qualified_table, change.key, change.lsn, self.n)
        self.n += 1
        result = await self.job.send(
            DATASETS,
            command,
            command_id,
            source.tenant,
            None,
            correlation_id=f"cdc:{source.name}:{change.key}:{change.lsn}",
        )
        return result.accepted

    async def deleted(self) -> None:
        if self.state["row"] is None or self.state["archived"]:
            return
        if await self.send(c.ArchiveDataset(self.dataset, "deleted in the source")):
            self.state["archived"] = True

    async def changed(self, row: Row) -> None:
        before: dict[str, Any] | None = self.state["row"]
        if before is None:
            await self.register(row)
            return
        if self.state["archived"]:
            if row.state() != before:
                raise Poison(
                    f"row {self.change.key!r} changed after its dataset was archived (the row was deleted "
                    "or archived in the source); an archived dataset takes no change"
                )
            return
        now = dict(before)
        try:
            await self._describe(row, now)
            await self._metadata(row, now)
            if row.owner != before["owner"]:
                log.warning(
                    "the source changed a row's owner: the datasets context has no command for that",
                    extra={"job": self.job.name, "key": self.change.key, "dataset_id": str(self.dataset)},
                )
                now["owner"] = row.owner
            now["status"] = row.status
            archives = row.status == "archived" and before["status"] != "archived"
            if archives and await self.send(c.ArchiveDataset(self.dataset, "archived in the source")):
                self.state["archived"] = True
        finally:
            self.state["row"] = now

    async def register(self, row: Row) -> None:
        registered = c.RegisterDataset(
            self.dataset,
            name=row.name,
            description=row.description,
            owner=row.owner,
            metadata=row.metadata,
        )
        await self.send(registered)  # refused as already there: the replay of a row we had
        self.state["row"] = row.state()
        if row.status == "archived" and await self.send(
            c.ArchiveDataset(self.dataset, "archived in the source")
        ):
            self.state["archived"] = True

    async def _describe(self, row: Row, now: dict[str, Any]) -> None:
        name = row.name if row.name.strip() != now["name"].strip() else None
        description = row.description if row.description.strip() != now["description"].strip() else None
        if name is None and description is None:
            return
        await self.send(c.DescribeDataset(self.dataset, name=name, description=description))
        now["name"], now["description"] = row.name, row.description

    async def _metadata(self, row: Row, now: dict[str, Any]) -> None:
        had: dict[str, Any] = dict(now["metadata"])
        for key, value in row.metadata.items():
            if key not in had or had[key] != value:
                await self.send(c.SetMetadataEntry(self.dataset, key, value))
                had[key] = value
                now["metadata"] = dict(had)
        for key in [k for k in had if k not in row.metadata]:
            await self.send(c.RemoveMetadataEntry(self.dataset, key))
            del had[key]
            now["metadata"] = dict(had)
