"""Folded rows: one row (or document) per aggregate, evolved by pure functions of
(row, event), one per event type.

Applying is idempotent and order-safe. A row keeps the version of the last event it
reflects; an event at or below it is skipped, so a batch delivered twice (after a crash
between the database commit and the Kafka offset commit) changes nothing. Per batch a
projection reads the rows the batch touches once (or not at all when it wrote them
last: `KnownRows`), folds the events in memory, and writes the changed rows back with
one statement.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any, ClassVar, Generic, TypeVar
from uuid import UUID

import asyncpg

from projections.events import StoredEvent
from projections.projection import Projection, Row, column_list, placeholders

Evolver = Callable[[Row | None, StoredEvent], Row | None]
K = TypeVar("K")
KNOWN_ROWS = 20_000  # rows a worker remembers per projection (see KnownRows)


def _uuid_key(e: StoredEvent) -> UUID:
    return UUID(e.meta.aggregate_id)


def fold(
    evolvers: dict[str, Evolver],
    current: dict[K, Row],
    events: list[StoredEvent],
    key: Callable[[StoredEvent], K],
) -> dict[K, Row]:
    """Evolve the rows of `current` (updated in place) by `events`; return those changed.
    An event at or below its row's version is skipped: it is there already."""
    changed: dict[K, Row] = {}
    for e in events:
        k = key(e)
        row = current.get(k)
        if row is not None and e.version <= row["version"]:
            continue
        new = evolvers[e.name](None if row is None else dict(row), e)
        if new is None:
            continue
        new["version"] = e.version
        current[k] = changed[k] = new
    return changed


class KnownRows(Generic[K]):
    """The rows this worker wrote last, so a batch need not read them back.

    A batch needs, for each aggregate, the row as of the version before its first event
    there: none at all when that event is version 1 (the creation), or a known row of
    exactly the previous version. Only other aggregates are read from the store. Rows
    become known when the transaction that wrote them commits; at most `size` are kept.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self.rows: OrderedDict[K, Row] = OrderedDict()
        self.staged: dict[K, Row] = {}

    def split(
        self, events: list[StoredEvent], key: Callable[[StoredEvent], K]
    ) -> tuple[dict[K, Row], list[K]]:
        """(rows known before the batch, keys to read from the store)."""
        known: dict[K, Row] = {}
        unknown: list[K] = []
        seen: set[K] = set()
        for e in events:
            k = key(e)
            if k in seen:
                continue
            seen.add(k)
            row = self.rows.get(k)
            if e.version == 1:
                continue  # created by this event: nothing before it
            if row is not None and row["version"] == e.version - 1:
                known[k] = row
            else:
                unknown.append(k)
        return known, unknown

    def stage(self, changed: dict[K, Row]) -> None:
        self.staged.update(changed)

    def commit(self) -> None:
        for k, row in self.staged.items():
            self.rows[k] = row
            self.rows.move_to_end(k)
        self.staged.clear()
        while len(self.rows) > self.size:
            self.rows.popitem(last=False)

    def discard(self) -> None:
        self.staged.clear()


class FoldedRows(Projection):
    """One row per aggregate, evolved by a pure function of (row, event)."""

    columns: ClassVar[tuple[str, ...]]  # the first is the key ("id"), "version" among them
    evolvers: ClassVar[dict[str, Evolver]]

    def __init__(self, version: int = 1) -> None:
        super().__init__(version)
        self.known: KnownRows[UUID] = KnownRows(KNOWN_ROWS)

    def committed(self) -> None:
        self.known.commit()

    def rolled_back(self) -> None:
        self.known.discard()

    def remember(self, rows: int) -> None:
        self.known.size = rows

    def touched(self, events: list[StoredEvent]) -> set[str] | None:
        return {str(_uuid_key(e)) for e in events if e.name in self.evolvers}

    async def apply(self, conn: asyncpg.Connection, events: list[StoredEvent]) -> None:
        changed = await self._fold(conn, events)
        if not changed:
            return
        columns = self.columns
        await conn.executemany(
            f"INSERT INTO {self.physical} ({column_list(columns)}) VALUES ({placeholders(columns)}) "
            f"{self._upsert()}",
            [tuple(r[c] for c in self.columns) for r in changed.values()],
        )

    async def load(self, conn: asyncpg.Connection, events: list[StoredEvent]) -> None:
        """The rows go to a temporary table by `COPY`, then into the version's table in
        one statement (an upsert: a row may exist from before the replay's batch)."""
        changed = await self._fold(conn, events)
        if not changed:
            return
        stage = f"load_{self.physical}"
        cols = column_list(self.columns)
        await conn.execute(
            f"CREATE TEMP TABLE IF NOT EXISTS {stage} "
            f"(LIKE {self.physical} INCLUDING DEFAULTS) ON COMMIT DELETE ROWS"
        )
        await conn.copy_records_to_table(
            stage, records=[tuple(r[c] for c in self.columns) for r in changed.values()], columns=self.columns
        )
        await conn.execute(
            f"INSERT INTO {self.physical} ({cols}) SELECT {cols} FROM {stage} {self._upsert()}"
        )

    def _upsert(self) -> str:
        updates = ", ".join(f'"{c}" = EXCLUDED."{c}"' for c in self.columns[1:])
        return f"ON CONFLICT (id) DO UPDATE SET {updates} WHERE {self.physical}.version < EXCLUDED.version"

    async def _fold(self, conn: asyncpg.Connection, events: list[StoredEvent]) -> dict[UUID, Row]:
        """The rows the events change, evolved (read once from the table when not known)."""
        relevant = [e for e in events if e.name in self.evolvers]
        if not relevant:
            return {}
        key = _uuid_key
        rows, unknown = self.known.split(relevant, key)
        if unknown:
            for r in await conn.fetch(
                f"SELECT {column_list(self.columns)} FROM {self.physical} WHERE id = ANY($1::uuid[])", unknown
            ):
                rows[r["id"]] = dict(r)
        changed = fold(self.evolvers, rows, relevant, key)
        self.known.stage(changed)
        return changed


def on_row(change: Callable[[Row, dict[str, Any], StoredEvent], None]) -> Evolver:
    """An evolver of an existing row from a change of it in place (`row`, payload,
    event); the row's `updated_at` becomes the event's time."""

    def evolve(row: Row | None, e: StoredEvent) -> Row | None:
        if row is None:
            return None  # its creation is not projected yet (cannot happen in order)
        change(row, e.payload, e)
        row["updated_at"] = e.meta.occurred_at
        return row

    return evolve
