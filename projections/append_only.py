"""Append-only tables: one row per event (of some types), never changed."""

from __future__ import annotations

from typing import Any, ClassVar

import asyncpg

from projections.events import StoredEvent
from projections.projection import Projection, column_list, placeholders


class AppendOnly(Projection):
    """One row per event (of some types), never changed: the key of a row is its event's,
    so an event delivered again is skipped by the key (`ON CONFLICT DO NOTHING`)."""

    columns: ClassVar[tuple[str, ...]]

    def rows(self, events: list[StoredEvent]) -> list[tuple[Any, ...]]:
        raise NotImplementedError

    async def apply(self, conn: asyncpg.Connection, events: list[StoredEvent]) -> None:
        rows = self.rows(events)
        if rows:
            columns = self.columns
            await conn.executemany(
                f"INSERT INTO {self.physical} ({column_list(columns)}) VALUES ({placeholders(columns)}) "
                "ON CONFLICT DO NOTHING",
                rows,
            )

    async def load(self, conn: asyncpg.Connection, events: list[StoredEvent]) -> None:
        rows = self.rows(events)
        if rows:
            await conn.copy_records_to_table(self.physical, records=rows, columns=self.columns)
