"""The incidents context's read models: the incident rows and search."""

from __future__ import annotations

from projections.context import ReadContext
from projections.incidents.rows import IncidentsProjection
from projections.incidents.search import IncidentsSearch

CONTEXT = ReadContext("incidents", (IncidentsProjection(), IncidentsSearch()))
