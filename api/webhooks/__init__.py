"""The webhooks context over HTTP: its commands, queries, delivery log and redelivery."""

from __future__ import annotations

from api.auth import permissions
from api.context import ApiContext
from api.webhooks import commands, queries

CONTEXT = ApiContext(
    name="webhooks",
    routers=(commands.router, queries.router),
    read_permission=permissions.WEBHOOKS_VIEW,
)
