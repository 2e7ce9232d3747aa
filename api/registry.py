"""Every context the API serves. `CONTEXTS` is the one list to change when a context is
added (its package under `api/<context>/` holds its routes)."""

from __future__ import annotations

from api import datasets, incidents, webhooks
from api.context import ApiContext

CONTEXTS: tuple[ApiContext, ...] = (datasets.CONTEXT, incidents.CONTEXT, webhooks.CONTEXT)


def cached_routes() -> dict[str, tuple[str, str]]:
    """path prefix -> (projection, the permission its reads need)"""
    return {
        prefix: (projection, c.read_permission) for c in CONTEXTS for prefix, projection in c.cached.items()
    }
