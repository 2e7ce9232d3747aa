"""Roles and what each may do: the one table every route's permission is checked against.

admin, operator and viewer are roles *of the caller's tenant*: everything they reach is
that tenant's (its aggregates, rows, streams, keys, audit trail). What is shared by
every tenant is the platform's: the projections (their versions, lag, dead letters,
rebuilds and rollbacks, which serve all tenants at once) need `platform`, a role of its
own that a tenant's admin does not have; a token names it explicitly. Each route
declares the permission it needs with `requires(...)` (or `public()`), and
`api.auth.access` writes it into the OpenAPI document, where the authorization tests
read it.
"""

from __future__ import annotations

from typing import Final

DATASETS_READ: Final = "datasets:read"
DATASETS_WRITE: Final = "datasets:write"
INCIDENTS_VIEW: Final = "incidents:view"
INCIDENTS_CREATE: Final = "incidents:create"
INCIDENTS_UPDATE: Final = "incidents:update"
INCIDENTS_ASSIGN: Final = "incidents:assign"
WEBHOOKS_VIEW: Final = "webhooks:view"  # subscriptions and their delivery logs
WEBHOOKS_MANAGE: Final = "webhooks:manage"  # register, pause, rotate, delete, redeliver
SEARCH_READ: Final = "search:read"
EVENTS_SUBSCRIBE: Final = "events:subscribe"
COMMANDS_READ: Final = "commands:read"  # the status of one's own tenant's commands
ADMIN_PROJECTIONS: Final = "admin:projections"
ADMIN_CDC: Final = "admin:cdc"  # the change data capture's connector and job (the platform's)
ADMIN_DEAD_LETTERS: Final = "admin:dead-letters"  # what every consumer dead-lettered (all tenants')
ADMIN_RUNTIME: Final = "admin:runtime"  # the command partitions' owners, the stream jobs' state
ADMIN_KEYS: Final = "admin:keys"
ADMIN_AUDIT: Final = "admin:audit"

VIEWER: Final = frozenset({DATASETS_READ, INCIDENTS_VIEW, SEARCH_READ, EVENTS_SUBSCRIBE, COMMANDS_READ})
OPERATOR: Final = VIEWER | {DATASETS_WRITE, INCIDENTS_CREATE, INCIDENTS_UPDATE, INCIDENTS_ASSIGN}
# webhooks push the tenant's events out of the system: only an admin says where
ADMIN: Final = OPERATOR | {ADMIN_KEYS, ADMIN_AUDIT, WEBHOOKS_VIEW, WEBHOOKS_MANAGE}
# across tenants: shared read models, CDC, the dead letters of every consumer
PLATFORM: Final = frozenset({ADMIN_PROJECTIONS, ADMIN_CDC, ADMIN_DEAD_LETTERS, ADMIN_RUNTIME})

# role -> its permissions: the one table
ROLES: Final[dict[str, frozenset[str]]] = {
    "admin": ADMIN,
    "operator": OPERATOR,
    "viewer": VIEWER,
    "platform": PLATFORM,
}
PERMISSIONS: Final = sorted(ADMIN | PLATFORM)


def permissions_of(roles: list[str] | tuple[str, ...]) -> frozenset[str]:
    """Everything the roles allow together; unknown role names allow nothing."""
    granted: frozenset[str] = frozenset()
    for role in roles:
        granted |= ROLES.get(role, frozenset())
    return granted


def main_role(roles: list[str] | tuple[str, ...]) -> str:
    """The strongest known role (the rate limit's class), or "" for none."""
    for role in ("platform", "admin", "operator", "viewer"):
        if role in roles:
            return role
    return ""
