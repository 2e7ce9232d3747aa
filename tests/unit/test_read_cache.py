"""The API's cache of rendered reads: leases, invalidation, tokens, the ASGI layer.

No services: the follower is fed decoded notifications, the route is a stub ASGI app
that counts its calls and renders the version it is told.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import MutableMapping
from typing import Any

import asyncpg
import orjson
import pytest

from api.auth.principal import Principal
from api.changes import ChangeFollower
from api.consistency import CommittedPositions
from api.errors import RequestProblem
from api.readcache import CachedReads, _request
from api.registry import cached_routes
from api.rendered import RenderedReads
from projections.changes import PAYLOAD_MAX, Change, applied_payloads
from shared_kernel.position import PositionToken
from shared_kernel.settings import Settings

SETTINGS = Settings(environment="test", topic_prefix="unit")
TOPIC = "unit.events.datasets"
HEADERS = [(b"content-type", b"application/json"), (b"etag", b'"1"')]


VIEWER = Principal("reader", "acme", ("viewer",), "token")


def follow(reads: RenderedReads | None = None, settings: Settings = SETTINGS) -> ChangeFollower:
    """A follower that tells `reads` and read-your-writes (its first listener)."""
    committed = CommittedPositions(settings.topic_prefix)
    return ChangeFollower(settings, committed, *([reads] if reads is not None else []))


def positions(follower: ChangeFollower) -> CommittedPositions:
    committed = follower.listeners[0]
    assert isinstance(committed, CommittedPositions)
    return committed


def listening(follower: ChangeFollower) -> None:
    """As when its LISTEN connection has loaded the (empty) snapshot."""
    for listener in follower.listeners:
        listener.following({}, {})


def lost(follower: ChangeFollower) -> None:
    for listener in follower.listeners:
        listener.lost()


def key(ident: str | None = None) -> tuple[str, str]:
    return ("datasets", ident or str(uuid.uuid4()))


def test_an_answer_read_before_a_change_is_not_kept() -> None:
    reads = RenderedReads(10)
    k = key()
    lease = reads.lease(k)
    reads.invalidate("datasets", frozenset({k[1]}))  # a batch committed while the read ran
    assert not reads.keep(k, lease, HEADERS, b"old")
    assert reads.get(k) is None

    lease = reads.lease(k)
    assert reads.keep(k, lease, HEADERS, b"new")
    entry = reads.get(k)
    assert entry is not None
    assert entry.body == b"new"
    assert entry.etag == b'"1"'


def test_a_batch_too_big_to_name_drops_the_whole_projection_and_only_it() -> None:
    reads = RenderedReads(10)
    a, b, other = key(), key(), ("incidents", str(uuid.uuid4()))
    for k in (a, b, other):
        assert reads.keep(k, reads.lease(k), HEADERS, b"x")
    pending = reads.lease(key())
    reads.invalidate("datasets", None)
    assert reads.get(a) is None
    assert reads.get(b) is None
    assert reads.get(other) is not None
    assert not reads.keep(("datasets", "late"), pending, HEADERS, b"x")


def test_the_newest_read_of_a_key_wins_and_the_cache_stays_bounded() -> None:
    reads = RenderedReads(3)
    k = key()
    first, second = reads.lease(k), reads.lease(k)
    assert not reads.keep(k, first, HEADERS, b"first")
    assert reads.keep(k, second, HEADERS, b"second")
    keys = [key() for _ in range(5)]
    for k2 in keys:
        reads.keep(k2, reads.lease(k2), HEADERS, b"x")
    assert len(reads) == 3
    assert reads.get(keys[0]) is None
    assert reads.get(keys[-1]) is not None


def test_the_cache_stays_within_its_memory() -> None:
    reads = RenderedReads(100, max_bytes=16_000)
    big = key()
    assert not reads.keep(big, reads.lease(big), HEADERS, b"x" * 1_001)  # over a sixteenth
    keys = [key() for _ in range(40)]
    for k in keys:
        assert reads.keep(k, reads.lease(k), HEADERS, b"x" * 900)
    assert reads.bytes <= 16_000
    assert len(reads) == 16_000 // (900 + sum(len(a) + len(b) for a, b in HEADERS))
    assert reads.get(keys[-1]) is not None
    assert reads.get(keys[0]) is None
    reads.keep(keys[-1], reads.lease(keys[-1]), HEADERS, b"y" * 10)  # replaces, counted once
    assert reads.bytes == sum(e.size for e in reads._entries.values())
    reads.invalidate("datasets", frozenset({keys[-1][1]}))
    assert reads.bytes == sum(e.size for e in reads._entries.values())


def test_requests_the_cache_may_answer() -> None:
    ident = str(uuid.uuid4())
    routes = cached_routes()  # each context registers its single reads

    def request(scope: dict[str, Any]) -> Any:
        return _request(scope, routes)

    def scope(
        path: str, query: bytes = b"", headers: list[tuple[bytes, bytes]] | None = None
    ) -> dict[str, Any]:
        return {
            "type": "http",
            "method": "GET",
            "path": path,
            "query_string": query,
            "headers": headers or [],
            "state": {"principal": VIEWER},
        }

    assert request(scope(f"/api/v1/datasets/{ident}")) == (("datasets", ident), None, None)
    # a caller without the route's permission (or none) is the route's to answer (403, 401)
    assert request({**scope(f"/api/v1/datasets/{ident}"), "state": {}}) is None
    nobody = Principal("n", "acme", ("unknown-role",), "token")
    assert request({**scope(f"/api/v1/datasets/{ident}"), "state": {"principal": nobody}}) is None
    assert request(scope(f"/api/v1/incidents/{ident}", b"consistent_with=abc")) == (
        ("incidents", ident),
        "abc",
        None,
    )
    header = scope(
        f"/api/v1/datasets/{ident}", headers=[(b"x-consistency-token", b"t"), (b"if-none-match", b'"3"')]
    )
    assert request(header) == (("datasets", ident), "t", b'"3"')
    twice = [(b"x-consistency-token", b""), (b"x-consistency-token", b"t"), (b"if-none-match", b'"1"')]
    assert request(scope(f"/api/v1/datasets/{ident}", headers=[*twice, (b"if-none-match", b'"2"')])) == (
        ("datasets", ident),
        None,  # the first header is the route's too: empty, so no token
        b'"1"',
    )
    under = {**scope(f"/svc/api/v1/datasets/{ident}"), "root_path": "/svc"}
    assert request(under) == (("datasets", ident), None, None)
    # everything else is the route's: temporal reads, other routes, ids spelled otherwise
    assert request(scope(f"/api/v1/datasets/{ident}", b"as_of_version=2")) is None
    assert request(scope(f"/api/v1/datasets/{ident}", b"consistent_with=a&consistent_with=b")) is None
    assert request(scope(f"/api/v1/datasets/{ident}/events")) is None
    assert request(scope(f"/api/v1/datasets/{ident.upper()}")) == (("datasets", ident), None, None)
    assert request(scope(f"/api/v1/datasets/{ident.replace('-', '')}")) is None
    assert request(scope("/api/v1/datasets/not-a-uuid-but-thirty-six-characters")) is None
    assert request({**scope(f"/api/v1/datasets/{ident}"), "method": "POST"}) is None


def test_the_follower_knows_what_the_live_version_committed() -> None:
    follower = follow()
    token = PositionToken({TOPIC: {0: 5, 2: 3}})
    assert not positions(follower).reached("datasets", token)
    follower.on_change(Change("datasets", 1, ((TOPIC, 0, 5),), frozenset()))
    assert not positions(follower).reached("datasets", token)
    follower.on_change(Change("datasets", 2, ((TOPIC, 2, 9),), frozenset()))  # being built
    assert not positions(follower).reached("datasets", token)
    follower.on_change(Change("datasets", 1, ((TOPIC, 2, 3),), frozenset()))
    assert positions(follower).reached("datasets", token)
    other_topic = PositionToken({"unit.events.incidents": {0: 99}})
    assert positions(follower).reached("datasets", other_topic)


def test_a_change_drops_its_aggregates_and_a_swap_forgets_positions() -> None:
    reads = RenderedReads(10)
    follower = follow(reads)
    ident = uuid.uuid4()
    k = ("datasets", str(ident))
    reads.keep(k, reads.lease(k), HEADERS, b"v1")
    follower.on_change(Change("datasets", 2, ((TOPIC, 0, 1),), frozenset({str(ident)})))  # not live
    assert reads.get(k) is not None
    follower.on_change(Change("datasets", 1, ((TOPIC, 0, 7),), frozenset({ident.hex.upper()})))
    assert reads.get(k) is None  # ids are compared in their canonical spelling

    reads.keep(k, reads.lease(k), HEADERS, b"v2")
    follower.on_change(Change("datasets", 3, live=3))  # e.g. a rollback, or a rebuild
    assert reads.get(k) is None
    assert not positions(follower).reached("datasets", PositionToken({TOPIC: {0: 1}}))
    follower.on_change(Change("datasets", 1, ((TOPIC, 0, 9),), frozenset()))  # the retired one
    assert not positions(follower).reached("datasets", PositionToken({TOPIC: {0: 1}}))


def test_a_notification_names_its_aggregates_or_says_anything_changed() -> None:
    ends = {(TOPIC, 0): 10, (TOPIC, 1): 4}
    (few,) = applied_payloads("datasets", 1, ends, ["b", "a", "a"])
    assert Change.parse(few) == Change("datasets", 1, ((TOPIC, 0, 10), (TOPIC, 1, 4)), frozenset({"a", "b"}))
    (many,) = applied_payloads("datasets", 1, ends, (str(uuid.uuid4()) for _ in range(1000)))
    assert Change.parse(many).aggregates is None
    assert orjson.loads(many)["at"] == [[TOPIC, 0, 10], [TOPIC, 1, 4]]
    (unknown,) = applied_payloads("events", 1, ends, None)
    assert Change.parse(unknown).aggregates is None


def test_a_batch_over_many_partitions_is_told_in_several_notifications() -> None:
    topic = "acme-production-eu-west-1.data-platform.events.datasets"
    ends = {(topic, p): 1_000_000 + p for p in range(300)}
    payloads = applied_payloads("datasets", 1, ends, [str(uuid.uuid4()) for _ in range(5)])
    assert len(payloads) > 1
    assert all(len(p.encode()) <= PAYLOAD_MAX for p in payloads)
    changes = [Change.parse(p) for p in payloads]
    assert sorted(at for c in changes for at in c.positions) == sorted(
        (t, p, o) for (t, p), o in ends.items()
    )
    assert changes[0].aggregates is None  # "anything": too much to name with the positions


class Route:
    """The FastAPI app behind the cache: renders `version`, counts its calls."""

    def __init__(self) -> None:
        self.calls = 0
        self.version = 1
        self.during: Any = None  # called while "querying", to interleave a change

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        self.calls += 1
        version = self.version
        if self.during:
            self.during()
        body = orjson.dumps({"version": version})
        headers = [(b"content-type", b"application/json"), (b"etag", f'"{version}"'.encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})


class State:
    pass


async def call(
    app: CachedReads,
    state: State,
    path: str,
    headers: list[tuple[bytes, bytes]] | None = None,
    query: bytes = b"",
    principal: Principal | None = None,
) -> tuple[int, dict[bytes, bytes], bytes]:
    principal = principal or VIEWER
    sent: list[dict[str, Any]] = []

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(dict(message))

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b""}

    holder = type("App", (), {"state": state})()
    scope = {
        "type": "http",
        "method": "GET",
        "path": path,
        "query_string": query,
        "headers": headers or [],
        "app": holder,
        "state": {"principal": principal},
    }
    await app(scope, receive, send)
    return sent[0]["status"], dict(sent[0]["headers"]), b"".join(m.get("body", b"") for m in sent[1:])


def cached(route: Route) -> tuple[CachedReads, State, ChangeFollower]:
    state = State()
    state.reads = RenderedReads(100)  # type: ignore[attr-defined]
    state.changes = follower = follow(state.reads)  # type: ignore[attr-defined]
    state.positions = positions(follower)  # type: ignore[attr-defined]
    listening(follower)
    return CachedReads(route, cached_routes()), state, follower


@pytest.mark.asyncio
async def test_repeated_reads_skip_the_route_until_a_change_names_them() -> None:
    route = Route()
    app, state, follower = cached(route)
    ident = str(uuid.uuid4())
    path = f"/api/v1/datasets/{ident}"
    status, headers, body = await call(app, state, path)
    assert (status, headers[b"x-read-cache"], orjson.loads(body)) == (200, b"miss", {"version": 1})
    status, headers, body = await call(app, state, path)
    assert (status, headers[b"x-read-cache"], orjson.loads(body)) == (200, b"hit", {"version": 1})
    assert headers[b"etag"] == b'"1"'
    assert route.calls == 1
    status, headers, body = await call(app, state, path, [(b"if-none-match", b'"1"')])
    assert (status, body, headers[b"etag"]) == (304, b"", b'"1"')
    # what acme's read kept is acme's: another tenant's read of the id goes to the route
    _, headers, _ = await call(app, state, path, principal=Principal("o", "other", ("viewer",), "token"))
    assert (headers[b"x-read-cache"], route.calls) == (b"miss", 2)
    route.calls = 1

    route.version = 2
    follower.on_change(Change("datasets", 1, ((TOPIC, 0, 3),), frozenset({ident})))
    status, headers, body = await call(app, state, path)
    assert orjson.loads(body) == {"version": 2}
    assert route.calls == 2


@pytest.mark.asyncio
async def test_a_change_during_the_read_is_not_kept() -> None:
    route = Route()
    app, state, follower = cached(route)
    ident = str(uuid.uuid4())
    path = f"/api/v1/datasets/{ident}"

    def commit() -> None:  # the read got version 1; version 2 commits before it answers
        route.version = 2
        follower.on_change(Change("datasets", 1, ((TOPIC, 0, 3),), frozenset({ident})))

    route.during = commit
    assert orjson.loads((await call(app, state, path))[2]) == {"version": 1}
    route.during = None
    assert orjson.loads((await call(app, state, path))[2]) == {"version": 2}
    assert orjson.loads((await call(app, state, path))[2]) == {"version": 2}
    assert route.calls == 2


@pytest.mark.asyncio
async def test_a_token_not_reached_goes_to_the_route_and_the_follower_down_answers_nothing() -> None:
    route = Route()
    app, state, follower = cached(route)
    path = f"/api/v1/datasets/{uuid.uuid4()}"
    await call(app, state, path)
    token = PositionToken({TOPIC: {0: 4}}).encode()
    await call(app, state, path, [(b"x-consistency-token", token.encode())])
    assert route.calls == 2  # not reached: the route waits for it in PostgreSQL
    follower.on_change(Change("datasets", 1, ((TOPIC, 0, 4),), frozenset()))
    _, headers, _ = await call(app, state, path, query=f"consistent_with={token}".encode())
    assert headers[b"x-read-cache"] == b"hit"
    assert route.calls == 2
    _, headers, _ = await call(app, state, path, query=b"consistent_with=garbage")
    assert b"x-read-cache" not in headers
    assert route.calls == 3

    lost(follower)
    _, headers, _ = await call(app, state, path)
    assert b"x-read-cache" not in headers
    assert route.calls == 4


class BehindPool:
    """A pool whose positions never reach any token: PostgreSQL is behind (or slow)."""

    def __init__(self) -> None:
        self.queries = 0

    async def fetch(self, *_: Any) -> list[dict[str, str]]:
        self.queries += 1
        return [{"projection": "datasets"}]


@pytest.mark.asyncio
async def test_a_token_wait_ends_with_the_notification_of_its_batch() -> None:
    from api.readmodels import wait_for

    settings = SETTINGS.model_copy(update={"query_consistency_timeout_s": 5.0})
    follower = follow(RenderedReads(10), settings)
    listening(follower)
    pool = BehindPool()
    token = PositionToken({TOPIC: {1: 8}})
    follower.on_change(Change("datasets", 1, ((TOPIC, 1, 8),), frozenset()))
    await wait_for(pool, settings, token, ("datasets",), positions(follower))
    assert pool.queries == 0  # known from the notifications: no query at all

    later = PositionToken({TOPIC: {1: 20}})
    loop = asyncio.get_running_loop()
    loop.call_later(0.05, follower.on_change, Change("datasets", 1, ((TOPIC, 1, 20),), frozenset()))
    started = loop.time()
    await wait_for(pool, settings, later, ("datasets",), positions(follower))
    assert loop.time() - started < settings.query_consistency_timeout_s  # woken, not timed out
    assert pool.queries == 1  # by the notification, before PostgreSQL was asked again

    lost(follower)  # without notifications PostgreSQL is the only source: 504
    short = settings.model_copy(update={"query_consistency_timeout_s": 0.1})
    with pytest.raises(RequestProblem) as failed:
        await wait_for(pool, short, PositionToken({TOPIC: {1: 21}}), ("datasets",), positions(follower))
    assert failed.value.status == 504


class LoadingConnection:
    """A listening connection whose snapshot of the live versions predates a swap that
    commits while it loads: PostgreSQL delivers the swap's notification mid-load."""

    def __init__(self, follower: ChangeFollower, swap: str) -> None:
        self.follower, self.swap = follower, swap

    def transaction(self, **_: Any) -> Any:
        return _NoTransaction()

    async def fetch(self, query: str) -> list[dict[str, Any]]:
        if "projection_versions" in query and "projection_positions" not in query:
            return [{"projection": "datasets", "version": 1}]
        self.follower._notified(None, 0, "", self.swap)  # delivered before the COMMIT returns
        return [{"projection": "datasets", "topic": TOPIC, "partition": 0, "next_offset": 50}]


class _NoTransaction:
    async def __aenter__(self) -> None:
        return None

    async def __aexit__(self, *_: object) -> None:
        return None


@pytest.mark.asyncio
async def test_a_swap_notified_while_the_follower_loads_is_not_lost() -> None:
    follower = follow(RenderedReads(10))
    follower._held = []  # as `_follow` does before LISTEN
    swap = orjson.dumps({"p": "datasets", "v": 2, "live": 2}).decode()
    await follower._load(LoadingConnection(follower, swap))
    assert follower.live["datasets"] == 2
    # v1's positions are forgotten
    assert not positions(follower).reached("datasets", PositionToken({TOPIC: {0: 1}}))
    follower.on_change(Change("datasets", 1, ((TOPIC, 0, 90),), frozenset()))  # the retired one
    assert not positions(follower).reached("datasets", PositionToken({TOPIC: {0: 60}}))


def test_a_full_notification_queue_is_no_fault_of_the_batch() -> None:
    from projections.projector import unavailable

    assert unavailable(asyncpg.ProgramLimitExceededError("too many notifications in the NOTIFY queue"))
    assert not unavailable(asyncpg.ProgramLimitExceededError("index row size 9000 exceeds maximum 2712"))
    assert unavailable(ConnectionResetError())
    assert not unavailable(ValueError("a poison event"))
