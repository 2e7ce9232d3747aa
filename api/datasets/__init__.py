"""The datasets context over HTTP: its commands, queries, search and streams."""

from __future__ import annotations

from api.context import ApiContext
from api.datasets import commands, queries, search, streams

CONTEXT = ApiContext(
    name="datasets",
    routers=(commands.router, queries.router, search.router, streams.router),
    cached={"/api/v1/datasets/": "datasets"},
)
