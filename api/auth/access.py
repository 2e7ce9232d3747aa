"""What each route may be called by: `dependencies=[requires(<permission>)]` on every
route (or `public()`), the caller as `PrincipalDep`, and the permission written into
the OpenAPI document (`x-permission`, with the security schemes), which is where the
authorization tests find every route and what it needs."""

from __future__ import annotations

import hmac
from typing import Annotated, Any

import fastapi.routing
from fastapi import Depends, FastAPI, WebSocketException
from fastapi.dependencies.models import Dependant
from fastapi.openapi.utils import get_openapi
from fastapi.routing import APIRoute
from starlette.requests import HTTPConnection

from api.auth.principal import Principal
from api.errors import RequestProblem
from shared_kernel.credentials import CLUSTER_HEADER, cluster_secret

PUBLIC = "public"
CLUSTER = "cluster"  # the cluster secret (instances forwarding commands), no user credential
SECURITY: list[dict[str, list[str]]] = [{"bearer": []}, {"apiKey": []}]


def principal_of(connection: HTTPConnection) -> Principal:
    principal: Principal | None = connection.scope.get("state", {}).get("principal")
    if principal is None:  # the edge lets only public paths through without one
        raise RequestProblem(401, "unauthenticated", "a credential is required")
    return principal


async def _principal(connection: HTTPConnection) -> Principal:
    # async: FastAPI runs a plain function dependency in its thread pool (two thread
    # hand-offs per request for these two; they only read the request's scope)
    return principal_of(connection)


class Require:
    def __init__(self, permission: str) -> None:
        self.permission = permission

    async def __call__(self, connection: HTTPConnection) -> Principal | None:
        if self.permission == PUBLIC:
            return None
        if self.permission == CLUSTER:
            shown = connection.headers.get(CLUSTER_HEADER, "")
            secret = cluster_secret(connection.app.state.settings)
            if not hmac.compare_digest(shown.encode(), secret.encode()):
                raise RequestProblem(
                    401, "unauthenticated", "this endpoint is for the cluster's own instances"
                )
            return None
        principal = principal_of(connection)
        if principal.can(self.permission):
            return principal
        detail = f"the role {principal.role or '(none)'} lacks the permission {self.permission}"
        identity = getattr(connection.app.state, "identity", None)
        if identity is not None:
            identity.audit.record(connection.scope, principal, "forbidden", 403, detail)
        if connection.scope["type"] == "websocket":
            raise WebSocketException(1008, detail[:120])
        raise RequestProblem(403, "forbidden", detail, missing_permission=self.permission)


def requires(permission: str) -> Any:
    return Depends(Require(permission))


def public() -> Any:
    return Depends(Require(PUBLIC))


PRINCIPAL = _principal  # the dependency PrincipalDep names (api.command_path looks for it)
PrincipalDep = Annotated[Principal, Depends(PRINCIPAL)]


def permission_of(dependant: Dependant) -> str | None:
    for dep in dependant.dependencies:
        if isinstance(dep.call, Require):
            return dep.call.permission
        found = permission_of(dep)
        if found is not None:
            return found
    return None


def api_routes(app: FastAPI) -> list[APIRoute]:
    """Every API route of the app, inside included routers too (FastAPI may keep them
    nested rather than flattened)."""
    contexts = getattr(fastapi.routing, "iter_route_contexts", None)
    if contexts is None:
        return [r for r in app.routes if isinstance(r, APIRoute)]
    return [c.original_route for c in contexts(app.routes) if isinstance(c.original_route, APIRoute)]


def document(app: FastAPI) -> None:
    """Write each route's permission into the OpenAPI document (`x-permission`, by
    operation id), with the security schemes."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        declared = {r.operation_id: permission_of(r.dependant) for r in api_routes(app) if r.operation_id}
        schema = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
        for operations in schema.get("paths", {}).values():
            for operation in operations.values():
                permission = declared.get(operation.get("operationId"))
                operation["x-permission"] = permission or "undeclared"
                if permission not in (None, PUBLIC):
                    operation["security"] = SECURITY
        schema.setdefault("components", {})["securitySchemes"] = {
            "bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"},
            "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
        }
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
