"""OpenSearch projections: full-text search documents, one per aggregate.

Each projection writes one document per aggregate into a versioned index
(`<schema>-<name>-v<N>`) that readers reach through an alias (`<schema>-<name>`); a
rebuild fills the next version and swaps the alias. A document is the same fold of
the aggregate's events as its PostgreSQL row (the same evolvers), written with
external versioning: OpenSearch itself refuses a document whose aggregate version is
not above the stored one, so a redelivered batch changes nothing.

A batch is folded in memory over the documents it touches (one `mget`), then written
with one `_bulk` that refreshes the index before it returns: when the projection
records its position, what it wrote is searchable, so read-your-writes holds for
search too.
"""

from __future__ import annotations

from typing import Any, ClassVar

import asyncpg
import orjson
from opensearchpy import AsyncOpenSearch

from projections.db import schema_name
from projections.events import StoredEvent
from projections.folded import KNOWN_ROWS, Evolver, FoldedRows, KnownRows, fold
from projections.projection import Projection, Row
from shared_kernel.settings import Settings


class BulkItemFailed(Exception):
    """OpenSearch refused a document for a reason other than its version. `busy`: every
    refusal was OpenSearch being too busy or not ready (429, 503): the batch comes again."""

    def __init__(self, message: str, busy: bool = False) -> None:
        super().__init__(message)
        self.busy = busy


def search_client(settings: Settings) -> AsyncOpenSearch:
    return AsyncOpenSearch(
        hosts=[settings.opensearch_url],
        timeout=settings.opensearch_timeout_s,
        max_retries=0,
        http_compress=False,
    )


def alias_name(settings: Settings, name: str) -> str:
    """What readers query: it points at the live version of the index."""
    return f"{schema_name(settings)}-{name}".replace("_", "-")


def index_name(settings: Settings, name: str, version: int) -> str:
    return f"{alias_name(settings, name)}-v{version}"


class SearchProjection(Projection):
    """Documents evolved like the rows of `rows`, indexed with external versioning."""

    store = "opensearch"
    rows: ClassVar[FoldedRows]  # whose evolvers build the document
    extra: ClassVar[dict[str, Evolver]] = {}  # fields only the search document has
    index: ClassVar[str]  # the alias name without the deployment's prefix
    mapping: ClassVar[dict[str, Any]]

    def __init__(self, version: int = 1) -> None:
        super().__init__(version)
        self.client: AsyncOpenSearch | None = None
        self._index = ""  # known once opened: it is named after the deployment
        self.known: KnownRows[str] = KnownRows(KNOWN_ROWS)
        self.evolvers: dict[str, Evolver] = {}
        for name, evolve in self.rows.evolvers.items():
            self.evolvers[name] = _chain(evolve, self.extra.get(name))
        for name, evolve in self.extra.items():
            self.evolvers.setdefault(name, evolve)

    @property
    def physical(self) -> str:
        return self._index or f"{self.index}-v{self.version}"

    async def open(self, settings: Settings) -> None:
        self.client = search_client(settings)
        self._index = index_name(settings, self.index, self.version)
        await ensure_index(self.client, self._index, alias_name(settings, self.index), self.mapping)

    async def close(self) -> None:
        if self.client is not None:
            await self.client.close()

    def committed(self) -> None:
        self.known.commit()

    def rolled_back(self) -> None:
        self.known.discard()

    async def create_storage(self, conn: asyncpg.Connection, settings: Settings) -> None:
        async with search_client(settings) as client:
            await ensure_index(client, index_name(settings, self.index, self.version), None, self.mapping)

    async def drop_storage(self, conn: asyncpg.Connection, settings: Settings) -> None:
        async with search_client(settings) as client:
            await client.indices.delete(
                index=index_name(settings, self.index, self.version), ignore_unavailable=True
            )

    async def make_live(self, conn: asyncpg.Connection, settings: Settings) -> None:
        """Move the alias to this version's index in one atomic alias update (it is not
        part of the caller's PostgreSQL transaction: OpenSearch has its own)."""
        alias = alias_name(settings, self.index)
        async with search_client(settings) as client:
            current = (
                await client.indices.get_alias(name=alias)
                if await client.indices.exists_alias(name=alias)
                else {}
            )
            actions: list[dict[str, Any]] = [{"remove": {"index": old, "alias": alias}} for old in current]
            actions.append({"add": {"index": index_name(settings, self.index, self.version), "alias": alias}})
            await client.indices.update_aliases(body={"actions": actions})

    def remember(self, rows: int) -> None:
        self.known.size = rows

    async def begin_load(self, settings: Settings) -> None:
        """No periodic refreshes while a replay loads: each one makes a segment to merge."""
        async with search_client(settings) as client:
            await client.indices.put_settings(
                index=index_name(settings, self.index, self.version),
                body={"index": {"refresh_interval": "-1"}},
            )

    async def end_load(self, settings: Settings) -> None:
        index = index_name(settings, self.index, self.version)
        async with search_client(settings) as client:
            await client.indices.put_settings(index=index, body={"index": {"refresh_interval": None}})
            await client.indices.refresh(index=index)

    async def apply(self, conn: asyncpg.Connection, events: list[StoredEvent]) -> None:
        await self._index_documents(events, refresh=True)

    async def load(self, conn: asyncpg.Connection, events: list[StoredEvent]) -> None:
        """As `apply`, without the refresh unless readers search this version."""
        await self._index_documents(events, refresh=self.visible)

    async def _index_documents(self, events: list[StoredEvent], refresh: bool) -> None:
        assert self.client is not None, "open() first"
        relevant = [e for e in events if e.name in self.evolvers]
        if not relevant:
            return
        docs, unknown = self.known.split(relevant, _str_key)
        if unknown:
            found = await self.client.mget(index=self.physical, body={"ids": unknown}, realtime=True)
            failed = [d for d in found["docs"] if "error" in d]
            if failed:  # not "not found": folding this batch alone would overwrite the document
                raise BulkItemFailed(
                    f"{len(failed)} document(s) not readable: {failed[0]['error']}", busy=True
                )
            docs.update({d["_id"]: d["_source"] for d in found["docs"] if d.get("found")})
        changed = fold(self.evolvers, docs, relevant, _str_key)
        self.known.stage(changed)
        if not changed:
            return
        lines: list[bytes] = []
        for key, doc in changed.items():
            action = {"index": {"_id": key, "version": doc["version"], "version_type": "external"}}
            lines += [orjson.dumps(action), orjson.dumps(doc)]
        body = b"\n".join(lines) + b"\n"
        result = await self.client.bulk(
            body=body, index=self.physical, refresh="true" if refresh else "false"
        )
        if result.get("errors"):
            refused = [
                item["index"]
                for item in result["items"]
                if item["index"].get("status", 200) >= 300 and item["index"].get("status") != 409
            ]
            if refused:  # 409: a newer version is there already (redelivery); anything else is bad
                busy = all(item.get("status") in (429, 503) for item in refused)
                raise BulkItemFailed(f"{len(refused)} document(s) refused: {refused[0].get('error')}", busy)


def _str_key(e: StoredEvent) -> str:
    return e.meta.aggregate_id


def _chain(first: Evolver, then: Evolver | None) -> Evolver:
    if then is None:
        return first

    def evolve(doc: Row | None, e: StoredEvent) -> Row | None:
        new = first(doc, e)
        return None if new is None else then(new, e)

    return evolve


async def ensure_index(
    client: AsyncOpenSearch, index: str, alias: str | None, mapping: dict[str, Any]
) -> None:
    """Create `index` if missing and point `alias` at it if the alias points nowhere yet."""
    if not await client.indices.exists(index=index):
        try:
            await client.indices.create(index=index, body=mapping)
        except Exception as exc:  # created concurrently by another worker
            if "resource_already_exists_exception" not in str(exc):
                raise
    else:  # fields added since it was made (its documents lack them until a rebuild)
        await client.indices.put_mapping(index=index, body={"properties": mapping["mappings"]["properties"]})
    if alias is not None and not await client.indices.exists_alias(name=alias):
        await client.indices.update_aliases(body={"actions": [{"add": {"index": index, "alias": alias}}]})


INDEX_SETTINGS = {"number_of_shards": 1, "number_of_replicas": 0}
TEXT_WITH_KEYWORD = {"type": "text", "fields": {"raw": {"type": "keyword", "ignore_above": 256}}}
