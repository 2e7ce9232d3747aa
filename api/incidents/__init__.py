"""The incidents context over HTTP: its commands, queries, search and subscriptions."""

from __future__ import annotations

from api.auth import permissions
from api.context import ApiContext
from api.incidents import alerts, commands, queries, search, subscriptions

CONTEXT = ApiContext(
    name="incidents",
    routers=(commands.router, queries.router, search.router, subscriptions.router, alerts.router),
    read_permission=permissions.INCIDENTS_VIEW,
    cached={"/api/v1/incidents/": "incidents"},
)
