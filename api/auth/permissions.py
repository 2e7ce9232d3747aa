"""Roles and what each may do: the one table every route's permission is checked against.

A role is an admin, operator or viewer *of its own tenant*; nothing here reaches across
tenants (there is no platform-wide role: a deployment that needs one adds it here, and
explicitly). Each route declares the permission it needs with `requires(...)` (or
`public()`), and `api.auth.openapi` writes it into the OpenAPI document, where the
authorization tests read it.
"""

from __future__ import annotations

from typing import Final

DATASETS_READ: Final = "datasets:read"
DATASETS_WRITE: Final = "datasets:write"
INCIDENTS_VIEW: Final = "incidents:view"
INCIDENTS_CREATE: Final = "incidents:create"
INCIDENTS_UPDATE: Final = "incidents:update"
INCIDENTS_ASSIGN: Final = "incidents:assign"
SEARCH_READ: Final = "search:read"
EVENTS_SUBSCRIBE: Final = "events:subscribe"
COMMANDS_READ: Final = "commands:read"  # the status of one's own tenant's commands
ADMIN_PROJECTIONS: Final = "admin:projections"
ADMIN_KEYS: Final = "admin:keys"
ADMIN_AUDIT: Final = "admin:audit"

VIEWER: Final = frozenset({DATASETS_READ, INCIDENTS_VIEW, SEARCH_READ, EVENTS_SUBSCRIBE, COMMANDS_READ})
OPERATOR: Final = VIEWER | {DATASETS_WRITE, INCIDENTS_CREATE, INCIDENTS_UPDATE, INCIDENTS_ASSIGN}
ADMIN: Final = OPERATOR | {ADMIN_PROJECTIONS, ADMIN_KEYS, ADMIN_AUDIT}

# role -> its permissions: the one table
ROLES: Final[dict[str, frozenset[str]]] = {"admin": ADMIN, "operator": OPERATOR, "viewer": VIEWER}
PERMISSIONS: Final = sorted(ADMIN)


def permissions_of(roles: list[str] | tuple[str, ...]) -> frozenset[str]:
    """Everything the roles allow together; unknown role names allow nothing."""
    granted: frozenset[str] = frozenset()
    for role in roles:
        granted |= ROLES.get(role, frozenset())
    return granted


def main_role(roles: list[str] | tuple[str, ...]) -> str:
    """The strongest known role (the rate limit's class), or "" for none."""
    for role in ("admin", "operator", "viewer"):
        if role in roles:
            return role
    return ""
