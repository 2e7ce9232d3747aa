"""Full-text search over incidents: title, description and the text of every comment;
the document is the incident row's fold plus the comments, in OpenSearch."""

from __future__ import annotations

from projections.events import StoredEvent
from projections.incidents.rows import IncidentsProjection
from projections.projection import Row
from projections.search import INDEX_SETTINGS, TEXT_WITH_KEYWORD, SearchProjection


def _comment_text(doc: Row | None, e: StoredEvent) -> Row | None:
    if doc is not None:
        doc["comment_texts"] = [*doc.get("comment_texts", []), e.payload["body"]]
    return doc


def _no_comments(doc: Row | None, e: StoredEvent) -> Row | None:
    if doc is not None:
        doc["comment_texts"] = []
    return doc


class IncidentsSearch(SearchProjection):
    name = "incidents_search"
    contexts = ("incidents",)
    rows = IncidentsProjection()
    extra = {"IncidentOpened": _no_comments, "IncidentCommented": _comment_text}
    index = "incidents"
    mapping = {
        "settings": INDEX_SETTINGS,
        "mappings": {
            "dynamic": False,
            "properties": {
                "id": {"type": "keyword"},
                "tenant": {"type": "keyword"},
                "version": {"type": "long"},
                "title": TEXT_WITH_KEYWORD,
                "description": {"type": "text"},
                "comment_texts": {"type": "text"},
                "priority": {"type": "keyword"},
                "source": {"type": "keyword"},
                "external_id": {"type": "keyword"},
                "status": {"type": "keyword"},
                "assignee": {"type": "keyword"},
                "comments": {"type": "integer"},
                "opened_at": {"type": "date"},
                "updated_at": {"type": "date"},
                "resolved_at": {"type": "date"},
                "closed_at": {"type": "date"},
            },
        },
    }
