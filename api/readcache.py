"""Rendered single-resource reads kept in memory, dropped when a projector changes them.

`GET /api/v1/datasets/{id}` and `GET /api/v1/incidents/{id}` are the hot reads of a
CQRS read side. This module keeps their answers (status 200, headers, body, exactly as
the route rendered them) in a bounded LRU, and answers repeated reads from it without
FastAPI's routing, validation and the PostgreSQL round trip.

Correctness rests on the projectors' change notifications (`projections.changes`):

- every batch transaction notifies the aggregates it touched (or "anything"), and
  PostgreSQL delivers that notification after the commit, in commit order;
- `ChangeFollower` listens on a connection of its own and drops what each notification
  names; a swap of versions drops the whole projection;
- a read that misses takes a *lease* on its key before it queries. A notification for
  the key breaks the lease, and a broken lease's answer is not kept: an answer read
  before a commit can never outlive that commit's notification;
- a read with a position token is answered from memory only once the notifications of
  the live version have reached the token's positions (every batch up to the token has
  committed and invalidated what it changed); otherwise it goes to the route, which
  waits in PostgreSQL;
- while the listening connection is down nothing is answered from memory, and the
  cache is emptied, since notifications may have been missed.

The same follower serves read-your-writes everywhere (`api.readmodels.wait_for`): a
query with a token returns as soon as the notifications show the token applied, with no
query of the positions, and a waiting one wakes on the notification of its batch
instead of polling.

Any other read (another route, `as_of`, `as_of_version`, an unknown query parameter,
a malformed id or token) goes to the route untouched, so errors keep their one shape.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl
from uuid import UUID

import asyncpg
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.deps import etag_named
from projections.changes import Change, channel
from projections.db import schema_name
from projections.registry import PROJECTIONS
from shared_kernel.position import InvalidToken, PositionToken
from shared_kernel.settings import Settings
from shared_kernel.topics import Topics

log = logging.getLogger(__name__)

# path prefix -> the projection whose row, keyed by the id that follows, it renders
CACHED_ROUTES = {"/api/v1/datasets/": "datasets", "/api/v1/incidents/": "incidents"}
HIT = [(b"x-read-cache", b"hit")]
MISS = (b"x-read-cache", b"miss")
Key = tuple[str, str]  # (projection, aggregate id)


@dataclass(frozen=True, slots=True)
class Rendered:
    headers: list[tuple[bytes, bytes]]
    body: bytes
    etag: bytes
    generation: int
    size: int


class Lease:
    """A read's claim to keep its answer; broken when the key changes meanwhile."""

    __slots__ = ("generation",)

    def __init__(self, generation: int) -> None:
        self.generation = generation


class RenderedReads:
    """A bounded LRU of rendered answers per (projection, id), with leases: at most
    `capacity` answers and `max_bytes` of bodies and headers (one answer bigger than a
    sixteenth of that is never kept)."""

    def __init__(self, capacity: int, max_bytes: int = 64 << 20) -> None:
        self.capacity = capacity
        self.max_bytes = max_bytes
        self.bytes = 0
        self._entries: OrderedDict[Key, Rendered] = OrderedDict()
        self._leases: dict[Key, Lease] = {}
        self._generation: dict[str, int] = {}  # bumped to drop a whole projection at once
        self.hits = self.misses = self.kept = 0

    def get(self, key: Key) -> Rendered | None:
        entry = self._entries.get(key)
        if entry is None or entry.generation != self._generation.get(key[0], 0):
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return entry

    def lease(self, key: Key) -> Lease:
        lease = Lease(self._generation.get(key[0], 0))
        self._leases[key] = lease  # a newer read of the key supersedes an older one
        return lease

    def keep(self, key: Key, lease: Lease, headers: list[tuple[bytes, bytes]], body: bytes) -> bool:
        """Keep an answer if its lease still holds (nothing changed the key meanwhile)."""
        if self._leases.get(key) is not lease:
            return False
        del self._leases[key]
        size = len(body) + sum(len(k) + len(v) for k, v in headers)
        if lease.generation != self._generation.get(key[0], 0) or size > self.max_bytes // 16:
            return False
        etag = next((v for k, v in headers if k == b"etag"), b"")
        self._drop(key)
        self._entries[key] = Rendered(headers, body, etag, lease.generation, size)
        self.bytes += size
        while len(self._entries) > self.capacity or self.bytes > self.max_bytes:
            self.bytes -= self._entries.popitem(last=False)[1].size
        self.kept += 1
        return True

    def release(self, key: Key, lease: Lease) -> None:
        if self._leases.get(key) is lease:
            del self._leases[key]

    def invalidate(self, projection: str, aggregates: frozenset[str] | None) -> None:
        """Drop what a batch changed: these aggregates of `projection`, or all of it."""
        if aggregates is None:
            self._generation[projection] = self._generation.get(projection, 0) + 1
            return
        for aggregate in aggregates:
            key = (projection, aggregate)
            self._drop(key)
            self._leases.pop(key, None)

    def _drop(self, key: Key) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self.bytes -= entry.size

    def clear(self) -> None:
        """Forget everything; reads in flight keep nothing (their leases are gone)."""
        self._entries.clear()
        self._leases.clear()
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def stats(self) -> dict[str, int]:
        return {
            "entries": len(self._entries),
            "bytes": self.bytes,
            "max_entries": self.capacity,
            "max_bytes": self.max_bytes,
            "hits": self.hits,
            "misses": self.misses,
            "kept": self.kept,
        }


def _canonical(aggregate: str) -> str:
    try:
        return str(UUID(aggregate))
    except ValueError:
        return aggregate


class ChangeFollower:
    """Follows the projectors' change notifications: what the live versions have
    committed (per partition), and which cached answers that makes stale."""

    RETRY_MAX_S = 5.0
    PING_S = 2.0  # a half-open connection is noticed within two of these

    def __init__(self, settings: Settings, reads: RenderedReads | None = None) -> None:
        self.settings = settings
        self.reads = reads if reads is not None else RenderedReads(0)
        self.channel = channel(schema_name(settings))
        self.topics = Topics(settings.topic_prefix)
        self.live: dict[str, int] = {}
        self.positions: dict[str, dict[tuple[str, int], int]] = {}
        self.connected = False
        self._lost = asyncio.Event()
        self._changed = asyncio.Event()
        self._held: list[Change] | None = None  # notifications delivered while loading

    def reached(self, projection: str, token: PositionToken) -> bool:
        """Has every batch of `projection` up to the token's positions committed?"""
        known = self.positions.get(projection, {})
        for context in PROJECTIONS[projection].contexts:
            topic = self.topics.events(context)
            for partition, offset in token.offsets.get(topic, {}).items():
                if known.get((topic, partition), 0) < offset:
                    return False
        return True

    def reached_all(self, projections: tuple[str, ...], token: PositionToken) -> bool:
        """Connected, and every projection named has committed up to the token."""
        return self.connected and all(self.reached(p, token) for p in projections)

    async def changed(self, seconds: float) -> None:
        """Until the next change notification arrives, or `seconds`."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._changed.wait(), max(seconds, 0.0))

    def on_change(self, change: Change) -> None:
        try:
            self._apply(change)
        finally:
            self._changed.set()  # wake the readers waiting for a position
            self._changed = asyncio.Event()

    def _apply(self, change: Change) -> None:
        if change.live is not None:
            # Another version is live (a rebuild, or a rollback to one behind): what the
            # previous one had reached says nothing about it.
            self.live[change.projection] = change.live
            self.positions.pop(change.projection, None)
            self.reads.invalidate(change.projection, None)
            return
        if change.version != self.live.get(change.projection, 1):
            return  # a version being built: readers do not see it
        known = self.positions.setdefault(change.projection, {})
        for topic, partition, offset in change.positions:
            if known.get((topic, partition), 0) < offset:
                known[(topic, partition)] = offset
        aggregates = change.aggregates
        self.reads.invalidate(
            change.projection, None if aggregates is None else frozenset(map(_canonical, aggregates))
        )

    def _notified(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        try:
            change = Change.parse(payload)
            if self._held is not None:
                self._held.append(change)
            else:
                self.on_change(change)
        except Exception as exc:  # e.g. a payload of another writer: forget everything, to be safe
            log.warning("unreadable change notification", extra={"error": repr(exc)})
            self.reads.clear()

    def _terminated(self, _conn: Any) -> None:
        self._lost.set()

    async def run(self) -> None:
        """Follow until cancelled; reconnect (with backoff) whenever the connection is lost."""
        delay = 0.5
        while True:
            try:
                await self._follow()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # any failure: answer nothing from memory until back
                log.warning(
                    "read model changes not followed; reads go to PostgreSQL", extra={"error": repr(exc)}
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.RETRY_MAX_S)
            else:
                delay = 0.5

    async def _follow(self) -> None:
        conn = await asyncpg.connect(
            self.settings.postgres_dsn,
            server_settings={
                "search_path": schema_name(self.settings),
                "application_name": f"{self.settings.service_name}:changes"[:63],
            },
        )
        try:
            self._lost.clear()
            conn.add_termination_listener(self._terminated)
            self._held = []
            await conn.add_listener(self.channel, self._notified)
            await self._load(conn)
            self.reads.clear()
            self.connected = True
            log.info("following read model changes", extra={"channel": self.channel})
            while not self._lost.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._lost.wait(), self.PING_S)
                if not self._lost.is_set():
                    await asyncio.wait_for(conn.fetchval("SELECT 1"), self.PING_S)
            log.warning("the connection following read model changes was lost; reconnecting")
        finally:
            self.connected = False
            self._held = None
            self.reads.clear()  # notifications may be missed from here on
            if not conn.is_closed():
                conn.terminate()

    async def _load(self, conn: asyncpg.Connection) -> None:
        """The live versions and their positions, read after LISTEN in one snapshot.
        Notifications delivered meanwhile are held and applied after it, in order: those
        of commits the snapshot saw change nothing (positions only grow, a swap only
        forgets), those of later commits (PostgreSQL sends them as the snapshot's
        transaction ends, before its COMMIT returns) bring it up to date."""
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            live = await conn.fetch(
                "SELECT projection, version FROM projection_versions WHERE state = 'live'"
            )
            rows = await conn.fetch(
                "SELECT p.projection, p.topic, p.partition, p.next_offset FROM projection_positions p "
                "LEFT JOIN projection_versions v ON v.projection = p.projection AND v.state = 'live' "
                "WHERE p.version = coalesce(v.version, 1)"
            )
        self.live = {r["projection"]: r["version"] for r in live}
        positions: dict[str, dict[tuple[str, int], int]] = {}
        for r in rows:
            positions.setdefault(r["projection"], {})[(r["topic"], r["partition"])] = r["next_offset"]
        self.positions = positions
        held, self._held = self._held or [], None
        for change in held:
            self.on_change(change)


def _request(scope: Scope) -> tuple[Key, str | None, bytes | None] | None:
    """(key, token, If-None-Match) of a read this cache may answer, else None."""
    if scope["type"] != "http" or scope["method"] != "GET":
        return None
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    if root and path.startswith(root):  # served under a prefix (--root-path): the route's path
        path = path[len(root) :]
    prefix = next((p for p in CACHED_ROUTES if path.startswith(p)), None)
    if prefix is None:
        return None
    projection, ident = CACHED_ROUTES[prefix], path[len(prefix) :]
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
    It finds its cache and follower on `app.state.reads` / `app.state.changes`."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = _request(scope)
        state = getattr(scope.get("app"), "state", None)
        reads: RenderedReads | None = getattr(state, "reads", None)
        follower: ChangeFollower | None = getattr(state, "changes", None)
        if request is None or reads is None or follower is None or not follower.connected:
            await self.app(scope, receive, send)
            return
        key, raw_token, if_none_match = request
        if raw_token is not None:
            try:
                token = PositionToken.decode(raw_token)
            except InvalidToken:
                await self.app(scope, receive, send)  # the route answers 422
                return
            if not follower.reached(key[0], token):
                await self.app(scope, receive, send)  # the route waits in PostgreSQL
                return
        entry = reads.get(key)
        if entry is not None:
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
        lease = reads.lease(key)
        try:
            await self.app(scope, receive, _capture(send, reads, key, lease))
        finally:
            reads.release(key, lease)


def _capture(send: Send, reads: RenderedReads, key: Key, lease: Lease) -> Callable[[Message], Any]:
    """A `send` that passes the route's answer on and keeps it when it is a whole 200."""
    start: dict[str, Any] = {}

    async def capture(message: Message) -> None:
        if message["type"] == "http.response.start":
            start.update(message)
            message = {**message, "headers": [*message.get("headers", ()), MISS]}
        elif message["type"] == "http.response.body" and start.get("status") == 200:
            if not message.get("more_body", False):
                reads.keep(key, lease, list(start.get("headers", ())), message.get("body", b""))
            start["status"] = None  # a streamed body is not kept
        await send(message)

    return capture
