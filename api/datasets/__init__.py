"""The datasets context over HTTP: its commands, queries, search and subscriptions."""

from __future__ import annotations

from api.auth import permissions
from api.context import ApiContext
from api.datasets import commands, queries, search, subscriptions

CONTEXT = ApiContext(
    name="datasets",
    routers=(commands.router, queries.router, search.router, subscriptions.router),
    read_permission=permissions.DATASETS_READ,
    cached={"/api/v1/datasets/": "datasets"},
)
