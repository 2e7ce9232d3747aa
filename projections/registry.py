"""Every projection by name: each context's read models, and the events archive.

`CONTEXTS` is the one list to change when a context is added (its package under
`projections/<context>/` says which read models it has).

A deployment may add projections, or replace one with a changed version of its code,
from modules of its own (`APP_PROJECTION_MODULES=pkg.mod,...`): each module calls
`register()` when imported. A replaced projection keeps its name; `cqrs projections
rebuild NAME` then builds its new shape beside the live one.
"""

from __future__ import annotations

import importlib

from projections import datasets, incidents, webhooks
from projections.archive import EventsArchiveProjection
from projections.context import ReadContext
from projections.projection import Projection

CONTEXTS: tuple[ReadContext, ...] = (datasets.CONTEXT, incidents.CONTEXT, webhooks.CONTEXT)

EventsArchiveProjection.contexts = tuple(c.name for c in CONTEXTS)  # it keeps every event

PROJECTIONS: dict[str, Projection] = {
    p.name: p for p in (*(p for c in CONTEXTS for p in c.projections), EventsArchiveProjection())
}


def register(projection: Projection) -> None:
    """Add a projection, or replace the one of the same name."""
    PROJECTIONS[projection.name] = projection


def _load_plugins() -> None:
    from shared_kernel.settings import get_settings

    for module in get_settings().projection_modules:
        importlib.import_module(module)


_load_plugins()
