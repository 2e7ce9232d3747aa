"""What every projection is: a read model fed by the events of some contexts, kept in
versions (`<table>_v<N>`) that readers reach through one stable name.

This base is storage-neutral: the PostgreSQL shapes (`projections.folded`,
`projections.append_only`) and the OpenSearch one (`projections.search`) implement it.
"""

from __future__ import annotations

from typing import Any, ClassVar, Self

import asyncpg

from projections.events import StoredEvent
from shared_kernel.settings import Settings

Row = dict[str, Any]


class Projection:
    """A read model fed by the events of some contexts, kept in versions.

    Readers see the live version through a stable name (a view, an alias); a rebuild
    fills the next version beside it (`<table>_v<N>`) and swaps it in.
    """

    name: ClassVar[str]
    contexts: ClassVar[tuple[str, ...]]
    store: ClassVar[str] = "postgresql"
    table: ClassVar[str]  # what readers query; each version is a table `<table>_v<N>`
    ddl: ClassVar[str]  # creates one version's table and indexes; `{table}` is its name

    def __init__(self, version: int = 1) -> None:
        self.version = version
        # Readers may see what this version writes (it is live): a bulk load must leave
        # each batch readable when it records its positions (read-your-writes).
        self.visible = True

    def at(self, version: int) -> Self:
        """This projection at another version (a fresh instance, not opened)."""
        return type(self)(version)

    @property
    def physical(self) -> str:
        return f"{self.table}_v{self.version}"

    async def open(self, settings: Settings) -> None:
        """Acquire what `apply` needs besides the PostgreSQL connection it is given."""

    def committed(self) -> None:
        """The transaction of the last `apply` committed."""

    def rolled_back(self) -> None:
        """The transaction of the last `apply` did not commit."""

    async def close(self) -> None:
        """Release what `open` acquired."""

    async def apply(self, conn: asyncpg.Connection, events: list[StoredEvent]) -> None:
        raise NotImplementedError

    async def load(self, conn: asyncpg.Connection, events: list[StoredEvent]) -> None:
        """`apply` by the bulk path, for a replay far behind the head (a rebuild): big
        batches, `COPY` where the rows are new. Used only by a replay that starts from
        the version's own positions, so no event of `events` is applied yet; should one
        be (a conflict), the replay applies the batch again with `apply`."""
        await self.apply(conn, events)

    def remember(self, rows: int) -> None:
        """How many rows to keep in memory between batches (a replay keeps more)."""

    def touched(self, events: list[StoredEvent]) -> set[str] | None:
        """The ids of the rows readers see that applying `events` may change, or None for
        "any": told to readers with the batch (`projections.changes`), so what they keep
        of these rows is dropped. A projection keyed otherwise than by aggregate id, or
        one denormalising other aggregates, says so here."""
        return None

    async def begin_load(self, settings: Settings) -> None:
        """A replay starts loading this version (e.g. pause an index's refreshes)."""

    async def end_load(self, settings: Settings) -> None:
        """The replay is done: what it loaded is visible to readers of this version."""

    async def create_storage(self, conn: asyncpg.Connection, settings: Settings) -> None:
        """Create this version's storage, empty, as the projection's code defines it now
        (a rebuild after a change of columns or mapping builds the new shape)."""
        await conn.execute(self.ddl.format(table=self.physical))

    async def drop_storage(self, conn: asyncpg.Connection, settings: Settings) -> None:
        await conn.execute(f"DROP TABLE IF EXISTS {self.physical}")

    async def make_live(self, conn: asyncpg.Connection, settings: Settings) -> None:
        """Point readers at this version (inside the caller's transaction; the view is
        replaced, not altered, so the new version may have other columns)."""
        await conn.execute(f"DROP VIEW IF EXISTS {self.table}")
        await conn.execute(f"CREATE VIEW {self.table} AS SELECT * FROM {self.physical}")


def column_list(columns: tuple[str, ...]) -> str:
    """`"a", "b"`: columns quoted for SQL (some, like "offset", are keywords)."""
    return ", ".join(f'"{c}"' for c in columns)


def placeholders(columns: tuple[str, ...]) -> str:
    """`$1, $2`: one parameter per column."""
    return ", ".join(f"${i + 1}" for i in range(len(columns)))
