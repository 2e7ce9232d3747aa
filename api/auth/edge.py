"""Authentication at the edge: every request but the public ones carries a credential.

`Authenticate` is an ASGI middleware ahead of the read cache and of every route. It
takes, in this order of precedence, `Authorization: Bearer <JWT>`, `X-API-Key`, or (on
the stream routes only, for EventSource which cannot set headers) `?ticket=`, a
single-use stream ticket of `POST /api/v1/stream-tickets`. Without a credential, or with
one that does not hold: 401 with `WWW-Authenticate`. Then the caller's rate limit: 429.
Both refusals are audited. The principal goes into the request's state, where
`requires(...)` checks the route's permission and the routes take actor and tenant.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
from typing import Any
from urllib.parse import parse_qsl

import asyncpg
import orjson
from redis.asyncio import Redis
from redis.exceptions import RedisError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.auth.audit import AuditLog
from api.auth.keys import ApiKeys
from api.auth.principal import Principal, Unauthenticated
from api.auth.ratelimit import RateLimiter, Verdict
from api.auth.tokens import TokenVerifier
from shared_kernel.settings import Settings

log = logging.getLogger(__name__)

PUBLIC_PATHS = frozenset(
    {
        "/health",
        "/ready",
        "/metrics",
        "/openapi.json",
        "/asyncapi.json",
        "/docs",
        "/docs/oauth2-redirect",
        "/redoc",
        "/console",  # the operator's console: the page and its assets (its data needs a token)
    }
)
REALM = 'Bearer realm="kafka-cqrs"'


def is_stream_path(path: str) -> bool:
    return path.startswith("/ws/") or path.endswith("/stream")


class Identity:
    """What authenticates, limits and audits: one per API process (`app.state.identity`)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.tokens = TokenVerifier(settings)
        self.keys = ApiKeys(settings.auth_key_cache_s, settings.auth_key_ttl_days)
        self.limiter = RateLimiter(settings)
        self.audit = AuditLog(settings)
        self.redis: Redis | None = None
        self.pool: asyncpg.Pool | None = None

    def attach(self, redis: Redis) -> None:
        self.redis = redis
        self.limiter.attach(redis)

    async def authenticate(self, scope: Scope) -> Principal:
        bearer = api_key = None
        for name, value in scope["headers"]:
            if name == b"authorization" and bearer is None:
                bearer = value.decode("latin-1")
            elif name == b"x-api-key" and api_key is None:
                api_key = value.decode("latin-1")
        if bearer is not None:
            scheme, _, token = bearer.partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                raise Unauthenticated("Authorization must be `Bearer <token>`", "invalid_request")
            return await self.tokens.verify(token.strip())
        if api_key is not None:
            if self.pool is None:
                raise Unauthenticated("API keys cannot be checked now", "temporarily_unavailable")
            try:
                return await self.keys.authenticate(self.pool, api_key.strip())
            except (OSError, asyncpg.PostgresError):
                raise Unauthenticated("API keys cannot be checked now", "temporarily_unavailable") from None
        path = _route_path(scope)
        if is_stream_path(path) and scope.get("query_string"):
            for name, value in parse_qsl(scope["query_string"].decode("latin-1"), keep_blank_values=True):
                if name == "ticket":
                    return await self.redeem_ticket(value)
        raise Unauthenticated("a credential is required: `Authorization: Bearer <token>` or `X-API-Key`", "")

    # ------------------------------------------------------------------ stream tickets

    def _ticket_key(self, ticket: str) -> str:
        return f"{self.settings.topic_prefix}:ticket:{hashlib.sha256(ticket.encode()).hexdigest()}"

    async def issue_ticket(self, principal: Principal) -> str:
        """A single-use ticket standing for `principal` on one stream request."""
        if self.redis is None:
            raise RedisError("no Redis client")
        ticket = secrets.token_urlsafe(32)
        await self.redis.set(
            self._ticket_key(ticket), orjson.dumps(principal.as_dict()), ex=self.settings.auth_ticket_ttl_s
        )
        return ticket

    async def redeem_ticket(self, ticket: str) -> Principal:
        if self.redis is None or not ticket or len(ticket) > 100:
            raise Unauthenticated("unknown or used stream ticket")
        try:
            raw = await self.redis.getdel(self._ticket_key(ticket))
        except (RedisError, OSError):
            raise Unauthenticated("stream tickets cannot be checked now", "temporarily_unavailable") from None
        if raw is None:
            raise Unauthenticated("unknown, expired or used stream ticket")
        return Principal.from_dict(orjson.loads(raw))


def _route_path(scope: Scope) -> str:
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    return path[len(root) :] if root and path.startswith(root) else path


class Authenticate:
    def __init__(self, app: ASGIApp, identity: Identity) -> None:
        self.app = app
        self.identity = identity

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        path = _route_path(scope)
        if path in PUBLIC_PATHS or path.startswith(("/internal/", "/console/assets/")):
            # public, or the cluster's own endpoints (their route checks the cluster secret)
            await self.app(scope, receive, send)
            return
        if scope["type"] == "http" and scope["method"] == "OPTIONS":
            await self.app(scope, receive, send)  # a CORS preflight carries no credential
            return
        identity = self.identity
        try:
            principal = await identity.authenticate(scope)
        except Unauthenticated as exc:
            identity.audit.record(scope, None, "unauthenticated", 401, exc.detail)
            if exc.code == "temporarily_unavailable":
                await _answer(scope, receive, send, 503, "unavailable", exc.detail, _retry(identity))
                return
            challenge = REALM + (f', error="{exc.code}"' if exc.code else "")
            await _answer(
                scope,
                receive,
                send,
                401,
                "unauthenticated",
                exc.detail,
                [(b"www-authenticate", challenge.encode())],
            )
            return
        verdict = await identity.limiter.hit(principal)
        window = identity.settings.rate_limit_window_s
        if not verdict.allowed:
            if verdict.unavailable:
                detail = "rate limits cannot be counted now"
                identity.audit.record(scope, principal, "rate_limited", 503, detail)
                await _answer(scope, receive, send, 503, "unavailable", detail, _retry(identity))
                return
            detail = f"more than {verdict.limit} requests in {window} s"
            identity.audit.record(scope, principal, "rate_limited", 429, detail)
            headers = [(b"retry-after", str(verdict.reset_s).encode()), *verdict.headers(window)]
            await _answer(scope, receive, send, 429, "rate_limited", detail, headers)
            return
        scope.setdefault("state", {})["principal"] = principal
        if scope["type"] == "http" and verdict.limit:
            await self.app(scope, receive, _with_headers(send, verdict, window))
        else:
            await self.app(scope, receive, send)


def _retry(identity: Identity) -> list[tuple[bytes, bytes]]:
    return [(b"retry-after", str(identity.settings.retry_after_s).encode())]


def _with_headers(send: Send, verdict: Verdict, window: int) -> Send:
    extra = verdict.headers(window)

    async def sending(message: Message) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", ()), *extra]}
        await send(message)

    return sending


async def _answer(
    scope: Scope,
    receive: Receive,
    send: Send,
    status: int,
    code: str,
    detail: str,
    headers: list[tuple[bytes, bytes]],
) -> None:
    body = orjson.dumps({"error": code, "detail": detail})
    start: dict[str, Any] = {
        "status": status,
        "headers": [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            *headers,
        ],
    }
    if scope["type"] == "http":
        await send({"type": "http.response.start", **start})
        await send({"type": "http.response.body", "body": body})
        return
    # a WebSocket handshake: refused with the HTTP answer where the server can send one
    message = await receive()
    if message["type"] != "websocket.connect":
        return
    if "websocket.http.response" in scope.get("extensions", {}):
        await send({"type": "websocket.http.response.start", **start})
        await send({"type": "websocket.http.response.body", "body": body})
    else:
        await send({"type": "websocket.close", "code": 1008, "reason": detail[:120]})
