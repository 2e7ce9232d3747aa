"""Every projection by name: the PostgreSQL read models and the OpenSearch indexes."""

from __future__ import annotations

from projections.postgres import (
    DatasetsProjection,
    EventsArchiveProjection,
    IncidentsProjection,
    Projection,
    QualityMetricsProjection,
)
from projections.search import DatasetsSearch, IncidentsSearch

PROJECTIONS: dict[str, Projection] = {
    p.name: p
    for p in (
        DatasetsProjection(),
        QualityMetricsProjection(),
        IncidentsProjection(),
        EventsArchiveProjection(),
        DatasetsSearch(),
        IncidentsSearch(),
    )
}
