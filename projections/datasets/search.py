"""Full-text search over datasets: name, description, tags, archive reason; the
document is the catalogue row's fold (its evolvers), in OpenSearch.

Metadata is a `flat_object`: each leaf is one term, alone and with its path, and
Lucene refuses a term over 32,766 bytes (the whole document with it). A string leaf
is kept in the document up to `SEARCHED_CHARS` characters: with a path of 16 keys of
200 characters that is at most about 21,000 bytes. The catalogue row keeps it whole."""

from __future__ import annotations

from typing import Any

from projections.datasets.rows import DatasetsProjection
from projections.events import StoredEvent
from projections.projection import Row
from projections.search import INDEX_SETTINGS, TEXT_WITH_KEYWORD, SearchProjection

SEARCHED_CHARS = 2_000


def searchable(value: Any) -> Any:
    """`value` with each string cut to `SEARCHED_CHARS` characters (a JSON value: its
    depth is bounded at the edge)."""
    if isinstance(value, str):
        return value[:SEARCHED_CHARS]
    if isinstance(value, list):
        return [searchable(v) for v in value]
    if isinstance(value, dict):
        return {k: searchable(v) for k, v in value.items()}
    return value


def _searchable_metadata(doc: Row | None, e: StoredEvent) -> Row | None:
    if doc is not None:
        doc["metadata"] = searchable(doc["metadata"])
    return doc


class DatasetsSearch(SearchProjection):
    name = "datasets_search"
    contexts = ("datasets",)
    rows = DatasetsProjection()
    index = "datasets"
    extra = {"DatasetRegistered": _searchable_metadata, "MetadataSet": _searchable_metadata}
    mapping = {
        "settings": INDEX_SETTINGS,
        "mappings": {
            "dynamic": False,
            "properties": {
                "id": {"type": "keyword"},
                "tenant": {"type": "keyword"},
                "version": {"type": "long"},
                "name": TEXT_WITH_KEYWORD,
                "description": {"type": "text"},
                "owner": {"type": "keyword"},
                "status": {"type": "keyword"},
                "tags": {"type": "keyword"},
                "metadata": {"type": "flat_object"},
                "latest_version": {"type": "keyword"},
                "versions": {"type": "integer"},
                "archived_reason": {"type": "text"},
                "created_at": {"type": "date"},
                "updated_at": {"type": "date"},
            },
        },
    }
