"""Commands answered without FastAPI's per-request machinery, with the same answers.

Under S1's load FastAPI's handling of a command route (routing, dependency solving,
the body's content-type parsing, serialization and their wrappers) was about a sixth of
the API process's CPU, more than deciding the command; in process, with a bus that
answers at once, a command request cost 584 us of CPU through the route and 231 us
here (the whole app, its middleware included). `CommandPath`, an ASGI
middleware innermost of the app's own, answers the command routes itself in the common
case, with what the route declares: its permission (`requires`), the command metadata
(`api.deps.command_meta`, the same function), its path parameters and body validated by
the route's own fields, its endpoint function, its response field and status code.

It answers only what it is sure of. A request it would refuse (a path parameter, header
or body that fails its rule, a body that is not JSON, a repeated header) goes on to the
route untouched, its body replayed: every refusal is FastAPI's, the same 422 naming the
field. Nothing is sent or audited before that choice. A route whose declaration it does
not recognise (another dependency, a query parameter, a form) is never taken: FastAPI
serves it. Raised errors (403, 409, 503...) are answered by the app's exception
handlers, as the route's would be. tests/unit/test_command_path.py holds both paths to
the same answers, byte for byte.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI
from fastapi.datastructures import DefaultPlaceholder
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute
from pydantic import BaseModel
from starlette.convertors import StringConvertor
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from api.auth.access import CLUSTER, PRINCIPAL, PUBLIC, Require, api_routes
from api.deps import command_meta, get_bus
from api.inputs import check_path_params, replay, text_problem

COMMAND_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


@dataclass(frozen=True)
class _Plan:
    """How one command route is answered here."""

    route: APIRoute
    method: str
    pattern: re.Pattern[str]
    permission: Require
    meta_param: str
    bus_param: str | None
    response_param: str | None
    request_param: str | None
    path_fields: tuple[Any, ...]  # FastAPI's ModelFields of the path parameters
    body_field: Any | None  # and of the body (a model, not embedded)
    headers: dict[bytes, tuple[str, Any]]  # header -> (parameter, field) of command_meta


def plan_of(route: APIRoute) -> _Plan | None:
    """The plan for a route declared as the command routes are, else None."""
    d, methods = route.dependant, route.methods or set()
    if (
        len(methods) != 1
        or not methods <= COMMAND_METHODS
        or d.query_params
        or d.header_params
        or d.cookie_params
    ):
        return None
    if d.websocket_param_name or d.background_tasks_param_name or d.security_scopes_param_name:
        return None
    if d.http_connection_param_name or not isinstance(route.response_class, DefaultPlaceholder):
        return None
    if route.response_field is None:  # FastAPI would render it with its JSON encoder
        return None
    if route.response_model_include is not None or route.response_model_exclude is not None:
        return None
    if route.response_model_exclude_unset or route.response_model_exclude_defaults:
        return None
    if route.response_model_exclude_none or not route.response_model_by_alias:
        return None
    if any(type(c) is not StringConvertor for c in route.param_convertors.values()):
        return None
    permission: Require | None = None
    meta_param = bus_param = None
    meta: Dependant | None = None
    for dep in d.dependencies:
        if isinstance(dep.call, Require) and dep.name is None and permission is None:
            permission = dep.call
        elif dep.call is command_meta and dep.name and meta_param is None:
            meta_param, meta = dep.name, dep
        elif dep.call is get_bus and dep.name and bus_param is None:
            bus_param = dep.name
        else:
            return None
    if permission is None or permission.permission in (PUBLIC, CLUSTER) or meta is None or not meta_param:
        return None
    if [dep.call for dep in meta.dependencies] != [PRINCIPAL] or meta.query_params or meta.cookie_params:
        return None
    headers = {}
    for field in meta.header_params:
        if not getattr(field.field_info, "convert_underscores", True):
            return None
        headers[field.alias.replace("_", "-").encode("latin-1")] = (field.name, field)
    body_field = None
    if d.body_params:
        (body_field,) = d.body_params
        annotation = body_field.field_info.annotation
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        if getattr(body_field.field_info, "embed", False) or route.body_field is not body_field:
            return None
    return _Plan(
        route=route,
        method=next(iter(methods)),
        pattern=route.path_regex,
        permission=permission,
        meta_param=meta_param,
        bus_param=bus_param,
        response_param=d.response_param_name,
        request_param=d.request_param_name,
        path_fields=tuple(d.path_params),
        body_field=body_field,
        headers=headers,
    )


def plans_of(app: FastAPI) -> list[_Plan]:
    """Every command route of the app this path answers; none when the app's own
    dependencies are other than the path parameters' rule (it applies that one)."""
    if [dep.dependency for dep in app.router.dependencies] != [check_path_params]:
        return []
    return [plan for route in api_routes(app) if (plan := plan_of(route)) is not None]


class CommandPath:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.plans: dict[str, list[_Plan]] | None = None  # by method
        self.answered = 0  # requests answered here rather than by the route

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in COMMAND_METHODS or scope.get("root_path"):
            await self.app(scope, receive, send)
            return
        if self.plans is None:
            self.plans = {}
            for each in plans_of(scope["app"]):
                self.plans.setdefault(each.method, []).append(each)
        path = scope["path"]
        for plan in self.plans.get(scope["method"], ()):
            match = plan.pattern.match(path)
            if match is not None:
                await self._answer(plan, match.groupdict(), scope, receive, send)
                return
        await self.app(scope, receive, send)

    async def _answer(
        self, plan: _Plan, params: dict[str, str], scope: Scope, receive: Receive, send: Send
    ) -> None:
        app: FastAPI = scope["app"]
        if app.dependency_overrides or any(text_problem(v, line=True) for v in params.values()):
            await self.app(scope, receive, send)  # overridden dependencies; check_path_params' 422
            return
        scope["path_params"], scope["route"], scope["endpoint"] = params, plan.route, plan.route.endpoint
        request = Request(scope, receive, send)
        body: bytes | None = None
        try:
            values = await _values(plan, params, request)
            if values is not None and plan.body_field is not None:
                body = await request.body()
                parsed = _body(plan, request, body)
                values = None if parsed is None else {**values, plan.body_field.name: parsed}
            response = None if values is None else await _respond(plan, values)
        except Exception as exc:  # answered by the app's handler, as the route's error would be
            handler = _handler_of(app, exc)
            if handler is None:
                raise
            response = await handler(request, exc)
        if response is None:
            await self.app(scope, receive if body is None else replay(body, receive), send)
            return
        self.answered += 1
        await response(scope, receive, send)


async def _values(plan: _Plan, params: dict[str, str], request: Request) -> dict[str, Any] | None:
    """The endpoint's arguments but its body (None: let the route answer), in FastAPI's
    order: the route's permission, then the command metadata, then the path parameters."""
    principal = await plan.permission(request)
    assert principal is not None  # a user's permission (plan_of takes no public route)
    found: dict[str, Any] = {}
    for name, raw in request.scope["headers"]:
        if (declared := plan.headers.get(name)) is None:
            continue
        param, field = declared
        if param in found:
            return None  # repeated: FastAPI's choice of one
        value, errors = field.validate(raw.decode("latin-1"), {}, loc=("header", param))
        if errors:
            return None
        found[param] = value
    values: dict[str, Any] = {plan.meta_param: await command_meta(request, principal, **found)}
    if plan.bus_param:
        values[plan.bus_param] = request.app.state.bus
    if plan.request_param:
        values[plan.request_param] = request
    if plan.response_param:
        sub = Response()
        del sub.headers["content-length"]
        sub.status_code = None  # type: ignore[assignment]  # as FastAPI's: unset until the endpoint sets it
        values[plan.response_param] = sub
    for field in plan.path_fields:
        value, errors = field.validate(params.get(field.alias), {}, loc=("path", field.alias))
        if errors:
            return None
        values[field.name] = value
    return values


def _body(plan: _Plan, request: Request, body: bytes) -> BaseModel | None:
    """The body's model, or None (let the route answer)."""
    assert plan.body_field is not None
    content_type = request.headers.get("content-type", "")
    if content_type.split(";", 1)[0].strip().lower() != "application/json" or not body:
        return None
    try:  # as Starlette's request.json() parses it (orjson reads some numbers otherwise)
        obj = json.loads(body)
    except (ValueError, RecursionError):  # not JSON, not UTF-8, nested too deep
        return None
    value, errors = plan.body_field.validate(obj, {}, loc=("body",))
    return None if errors else value


async def _respond(plan: _Plan, values: dict[str, Any]) -> Response:
    """The endpoint's answer as FastAPI renders it: its response field's JSON, the
    route's status code unless the endpoint set one, the headers it set."""
    result = await plan.route.endpoint(**values)
    if isinstance(result, Response):
        return result
    route, sub = plan.route, values.get(plan.response_param or "")
    field = route.response_field
    assert field is not None  # plan_of takes no route without one
    value, errors = field.validate(result, {}, loc=("response",))
    if errors:
        raise RuntimeError(f"the endpoint's answer does not fit its response model: {errors}")
    content = field.serialize_json(value)
    status = (sub.status_code if sub is not None else None) or route.status_code or 200
    response = Response(content, status_code=status, media_type="application/json")
    if sub is not None:
        response.headers.raw.extend(sub.headers.raw)
    return response


def _handler_of(app: FastAPI, exc: Exception) -> Callable[..., Any] | None:
    """The app's handler of `exc` as Starlette's ExceptionMiddleware finds it (an
    HTTPException by its status first, then by class), never the catch-all, which the
    server's error middleware applies itself."""
    handlers = app.exception_handlers
    if isinstance(exc, HTTPException) and exc.status_code in handlers:
        return handlers[exc.status_code]
    for cls in type(exc).__mro__:
        if cls is Exception:
            return None
        if cls in handlers:
            return handlers[cls]
    return None
