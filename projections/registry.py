"""Every projection by name: the PostgreSQL read models and the OpenSearch indexes.

A deployment may add projections, or replace one with a changed version of its code,
from modules of its own (`APP_PROJECTION_MODULES=pkg.mod,...`): each module calls
`register()` when imported. A replaced projection keeps its name; `cqrs projections
rebuild NAME` then builds its new shape beside the live one.
"""

from __future__ import annotations

import importlib

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


def register(projection: Projection) -> None:
    """Add a projection, or replace the one of the same name."""
    PROJECTIONS[projection.name] = projection


def _load_plugins() -> None:
    from shared_kernel.settings import get_settings

    for module in get_settings().projection_modules:
        importlib.import_module(module)


_load_plugins()
