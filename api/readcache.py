"""Single reads answered from the API's memory, without FastAPI and without PostgreSQL.

`GET /api/v1/<context>/{id}` is the hot read of a CQRS read side. Each context
registers the routes whose answers may be kept (`api.context.ApiContext.cached`); this
middleware answers a repeated read from the rendered answers kept in memory
(`api.rendered`), and lets the route answer, and keeps what it answered, otherwise.

Correctness rests on the projectors' change notifications (`api.changes`):

- the kept answers of a key are dropped when a notification names it, and a read in
  flight keeps nothing if one did meanwhile (its lease is broken);
- a read with a position token is answered from memory only once the notifications of
  the live version have reached the token's positions (`api.consistency`: every batch
  up to the token has committed and invalidated what it changed); otherwise it goes to
  the route, which waits in PostgreSQL;
- while the follower does not listen, nothing is answered from memory.

A hit is answered only to a caller with the route's permission and of the row's tenant
(the kept answer records whose it is); anyone else's read goes to the route.

Any other read (another route, `as_of`, `as_of_version`, an unknown query parameter,
a malformed id or token) goes to the route untouched, so errors keep their one shape.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import parse_qsl
from uuid import UUID

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.auth.principal import Principal
from api.consistency import CommittedPositions
from api.deps import etag_named
from api.rendered import Key, Lease, RenderedReads
from shared_kernel import metrics
from shared_kernel.position import InvalidToken, PositionToken

HIT = [(b"x-read-cache", b"hit")]
MISS = (b"x-read-cache", b"miss")


def _request(
    scope: Scope, routes: Mapping[str, tuple[str, str]]
) -> tuple[Key, str | None, bytes | None] | None:
    """(key, token, If-None-Match) of a read this cache may answer, else None: a read by a
    caller lacking the route's permission goes to the route (which answers 403)."""
    if scope["type"] != "http" or scope["method"] != "GET":
        return None
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    if root and path.startswith(root):  # served under a prefix (--root-path): the route's path
        path = path[len(root) :]
    prefix = next((p for p in routes if path.startswith(p)), None)
    if prefix is None:
        return None
    (projection, permission), ident = routes[prefix], path[len(prefix) :]
    principal: Principal | None = scope.get("state", {}).get("principal")
    if principal is None or not principal.can(permission):
        return None
    if len(ident) != 36:
        return None
    try:
        canonical = str(UUID(ident))
    except ValueError:
        return None
    if canonical != ident.lower():
        return None
    token: str | None = None
    if scope["query_string"]:
        params = parse_qsl(scope["query_string"].decode("latin-1"), keep_blank_values=True)
        if len(params) != 1 or params[0][0] != "consistent_with":
            return None
        token = params[0][1] or None
    header_token: bytes | None = None
    if_none_match: bytes | None = None
    for name, value in scope["headers"]:  # the first of each, as the route reads them
        if name == b"x-consistency-token" and header_token is None:
            header_token = value
        elif name == b"if-none-match" and if_none_match is None:
            if_none_match = value
    if token is None and header_token:
        token = header_token.decode("latin-1")
    return (projection, canonical), token, if_none_match


class CachedReads:
    """ASGI middleware answering cached single-resource reads (see the module's doc).
    `routes` maps a path prefix to the projection whose row, keyed by the id that
    follows, its route renders (each context registers its own). It finds the cache
    and the committed positions on `app.state.reads` / `app.state.positions`."""

    def __init__(self, app: ASGIApp, routes: Mapping[str, tuple[str, str]]) -> None:
        self.app = app
        self.routes = dict(routes)
        self.templates = {projection: f"{prefix}{{id}}" for prefix, (projection, _) in self.routes.items()}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = _request(scope, self.routes)
        state = getattr(scope.get("app"), "state", None)
        reads: RenderedReads | None = getattr(state, "reads", None)
        committed: CommittedPositions | None = getattr(state, "positions", None)
        if request is None or reads is None or committed is None or not committed.connected:
            await self.app(scope, receive, send)
            return
        key, raw_token, if_none_match = request
        if raw_token is not None:
            try:
                token = PositionToken.decode(raw_token)
            except InvalidToken:
                await self.app(scope, receive, send)  # the route answers 422
                return
            if not committed.reached(key[0], token):
                await self.app(scope, receive, send)  # the route waits in PostgreSQL
                return
        tenant = scope["state"]["principal"].tenant  # `_request` found one
        entry = reads.get(key)
        if entry is not None and entry.tenant == tenant:
            metrics.READ_CACHE.labels("hit").inc()
            scope["cqrs.route"] = self.templates.get(key[0], "cached")  # no route ran: the metrics template
            if (
                if_none_match is not None
                and entry.etag
                and etag_named(if_none_match.decode("latin-1"), entry.etag.decode("latin-1"))
            ):
                headers = [(b"etag", entry.etag), *HIT]
                await send({"type": "http.response.start", "status": 304, "headers": headers})
                await send({"type": "http.response.body", "body": b""})
                return
            await send({"type": "http.response.start", "status": 200, "headers": entry.headers + HIT})
            await send({"type": "http.response.body", "body": entry.body})
            return
        metrics.READ_CACHE.labels("miss").inc()
        lease = reads.lease(key)
        try:
            await self.app(scope, receive, _capture(send, reads, key, lease, tenant))
        finally:
            reads.release(key, lease)


def _capture(
    send: Send, reads: RenderedReads, key: Key, lease: Lease, tenant: str
) -> Callable[[Message], Any]:
    """A `send` that passes the route's answer on and keeps it when it is a whole 200."""
    start: dict[str, Any] = {}

    async def capture(message: Message) -> None:
        if message["type"] == "http.response.start":
            start.update(message)
            message = {**message, "headers": [*message.get("headers", ()), MISS]}
        elif message["type"] == "http.response.body" and start.get("status") == 200:
            if not message.get("more_body", False):
                reads.keep(key, lease, list(start.get("headers", ())), message.get("body", b""), tenant)
            start["status"] = None  # a streamed body is not kept
        await send(message)

    return capture
