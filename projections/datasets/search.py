"""Full-text search over datasets: name, description, tags, archive reason; the
document is the catalogue row's fold (its evolvers), in OpenSearch."""

from __future__ import annotations

from projections.datasets.rows import DatasetsProjection
from projections.search import INDEX_SETTINGS, TEXT_WITH_KEYWORD, SearchProjection


class DatasetsSearch(SearchProjection):
    name = "datasets_search"
    contexts = ("datasets",)
    rows = DatasetsProjection()
    index = "datasets"
    mapping = {
        "settings": INDEX_SETTINGS,
        "mappings": {
            "dynamic": False,
            "properties": {
                "id": {"type": "keyword"},
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
