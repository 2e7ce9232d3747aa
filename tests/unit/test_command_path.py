"""The command routes' own path (`api.command_path`) answers every request exactly as
FastAPI's route does, with no services.

Two copies of the real app (`api.app.create_app`, never started): one as it runs, one
without the `CommandPath` middleware, so FastAPI answers every command itself. For each
command route of the OpenAPI document, hypothesis draws requests, valid ones and nasty
ones (bodies and path parameters from the route's own schema, `tests/unit/strategies`;
headers good, bad and repeated; other content types; a caller lacking the permission),
and a bus outcome (accepted, refused with the current version, queued, unavailable).
Both apps get the same request: the status, the headers, the body bytes and the command
each put on its bus must be the same.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from fastapi import FastAPI
from hypothesis import HealthCheck, Phase, event, given, settings
from hypothesis import strategies as st

from api.app import create_app
from api.auth.access import api_routes
from api.command_path import CommandPath, plans_of
from api.deps import command_meta
from commands.bus import BusUnavailable
from shared_kernel.envelope import CommandEnvelope, CommandResult
from shared_kernel.settings import Settings
from tests.auth import bearer
from tests.unit.strategies import from_schema, json_bytes, resolve

SETTINGS = Settings(environment="test")
MAX_EXAMPLES = int(os.environ.get("COMMAND_PATH_EXAMPLES", "40"))  # per route
OUTCOMES = ("accepted", "created", "conflict", "unavailable")


class Bus:
    """Keeps what it is given; answers the outcome the test chose."""

    def __init__(self) -> None:
        self.outcome = "accepted"
        self.got: list[tuple[str, bytes]] = []

    async def send(self, envelope: CommandEnvelope) -> CommandResult:
        self.got.append(("send", kept(envelope)))
        if self.outcome == "unavailable":
            raise BusUnavailable("no owner in time")
        if self.outcome == "conflict":
            return CommandResult(
                envelope.command_id,
                "rejected",
                envelope.aggregate_id,
                code="concurrency_conflict",
                reason="expected version 3, current 4",
                current_version=4,
            )
        version = 1 if self.outcome == "created" else 7
        return CommandResult(envelope.command_id, "accepted", envelope.aggregate_id, version, "e30")

    async def enqueue(self, envelope: CommandEnvelope) -> None:
        self.got.append(("enqueue", kept(envelope)))


def kept(envelope: CommandEnvelope) -> bytes:
    """The command as produced, but for its traceparent: the request's own span (a new
    span id each request, whichever path serves it)."""
    return dataclasses.replace(envelope, traceparent="").to_bytes()


def app_and_bus(fast: bool) -> tuple[FastAPI, Bus]:
    app = create_app(SETTINGS)
    if not fast:
        app.user_middleware = [m for m in app.user_middleware if m.cls is not CommandPath]  # type: ignore[comparison-overlap]
    bus = Bus()
    app.state.settings, app.state.bus = SETTINGS, bus
    return app, bus


FAST, FAST_BUS = app_and_bus(True)
ROUTED, ROUTED_BUS = app_and_bus(False)
OPENAPI: dict[str, Any] = FAST.openapi()
COMPONENTS: dict[str, Any] = OPENAPI.get("components", {}).get("schemas", {})


def command_routes(app: FastAPI) -> set[str]:
    """The operation ids of the routes that send a command (their endpoint takes the
    command metadata)."""
    return {
        r.operation_id
        for r in api_routes(app)
        if r.operation_id and any(d.call is command_meta for d in r.dependant.dependencies)
    }


OPERATIONS = [
    (path, method.upper(), op)
    for path, methods in OPENAPI["paths"].items()
    for method, op in methods.items()
    if op.get("operationId") in command_routes(FAST)
]


@pytest.fixture(scope="module")
async def clients() -> AsyncIterator[tuple[httpx.AsyncClient, httpx.AsyncClient]]:
    def client(app: FastAPI) -> httpx.AsyncClient:
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        return httpx.AsyncClient(transport=transport, base_url="http://api")

    async with client(FAST) as fast, client(ROUTED) as routed:
        yield fast, routed


def test_every_command_route_takes_the_path() -> None:
    """A command route declared as the others are is answered here; one that is not
    (another dependency, a query parameter) would silently lose the path: this says so."""
    taken = {plan.route.operation_id for plan in plans_of(FAST)}
    assert command_routes(FAST) == taken
    assert {"openIncident", "commentOnIncident", "registerDataset", "deleteWebhook"} <= taken
    assert len(OPERATIONS) == len(taken)


HEADER_VALUES = {
    "idempotency-key": st.one_of(st.just("key-1"), st.sampled_from(["", " ", "a\x00b", "k" * 300])),
    "if-match": st.sampled_from(['"3"', "*", "W/3", "three", "", '"99999999999999999999"']),
    "x-correlation-id": st.sampled_from(["corr-1", "", "c" * 300]),
    "traceparent": st.sampled_from(["00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01", "junk"]),
    "prefer": st.sampled_from(["respond-async", "return=minimal", "respond-async, wait=5"]),
    "content-type": st.sampled_from(
        ["application/json", "application/json; charset=utf-8", "text/plain", "application/merge-patch+json"]
    ),
}


@pytest.mark.parametrize(
    ("path", "method", "operation"), OPERATIONS, ids=[op["operationId"] for _, _, op in OPERATIONS]
)
@settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    derandomize=True,
    phases=[Phase.explicit, Phase.generate, Phase.shrink],
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
@given(data=st.data())
async def test_the_path_answers_as_the_route_does(
    path: str,
    method: str,
    operation: dict[str, Any],
    data: st.DataObject,
    clients: tuple[httpx.AsyncClient, httpx.AsyncClient],
) -> None:
    for parameter in operation.get("parameters", ()):
        if parameter["in"] != "path":
            continue
        name = parameter["name"]
        value = data.draw(
            st.one_of(st.uuids().map(str), from_schema(parameter.get("schema", {}), COMPONENTS)), label=name
        )
        path = path.replace("{" + name + "}", quote(str(value).encode("utf-8", "surrogatepass"), safe=""))
    content = b""
    body_schema = (
        operation.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema")
    )
    if body_schema is not None:
        body = data.draw(from_schema(resolve(body_schema, COMPONENTS), COMPONENTS), label="body")
        content = data.draw(json_bytes(body), label="bytes")
    headers: list[tuple[str, str]] = [("idempotency-key", "key-1"), ("content-type", "application/json")]
    for name in data.draw(st.lists(st.sampled_from(sorted(HEADER_VALUES)), max_size=3), label="headers"):
        if data.draw(st.booleans(), label=f"replace {name}"):
            headers = [(k, v) for k, v in headers if k != name]
        headers.append((name, data.draw(HEADER_VALUES[name], label=name)))
    role = data.draw(st.sampled_from(["admin+platform", "viewer"]), label="role")
    outcome = data.draw(st.sampled_from(OUTCOMES), label="outcome")
    answers = []
    path_before = the_path().answered
    for client, bus in zip(clients, (FAST_BUS, ROUTED_BUS), strict=True):
        bus.outcome, bus.got = outcome, []
        r = await client.request(method, path, content=content, headers=[*bearer(role).items(), *headers])
        answers.append((r.status_code, r.headers.multi_items(), r.content, bus.got))
    fast, routed = answers
    assert fast[0] != 500, fast
    assert fast == routed
    answered_here = the_path().answered > path_before
    repeated = len({name for name, _ in headers}) < len(headers)
    other_json = any(k == "content-type" and not v.startswith("application/json") for k, v in headers)
    if routed[3] and not repeated and not other_json:  # it reached the bus: not refused by its rules
        # (a repeated header, or JSON of another media type, is left to the route)
        assert answered_here, "a command the route sent was not answered by the path"
    event("answered by the path" if answered_here else "handed to the route")


def the_path() -> CommandPath:
    """The app's CommandPath middleware (built with the app's stack on its first request)."""
    if FAST.middleware_stack is None:
        FAST.middleware_stack = FAST.build_middleware_stack()  # as Starlette does on a first request
    layer: Any = FAST.middleware_stack
    while not isinstance(layer, CommandPath):
        layer = layer.app
    return layer
