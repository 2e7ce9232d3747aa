"""Subscriptions on real Kafka: SSE and WebSocket streams served by the real API process."""

from __future__ import annotations

import asyncio
import contextlib
import random
import signal
import socket
import time
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from shared_kernel.position import PositionToken
from shared_kernel.settings import Settings
from tests.auth import api_client, bearer
from tests.integration.harness import WriteSide, covers, free_port, read_events, until

pytestmark = pytest.mark.asyncio(loop_scope="session")

HEARTBEAT_S = 1.0
DEADLINE_S = 60.0  # a failing test fails after this, instead of hanging


@pytest.fixture(scope="module")
async def side(settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[WriteSide]:
    ws = WriteSide.create(settings, tmp_path_factory.mktemp("subscriptions"))
    ws.env["APP_SUBSCRIPTION_HEARTBEAT_S"] = str(HEARTBEAT_S)
    await ws.start_serving()
    ws.start_projector("datasets")  # for a message id used as a read-your-writes token
    await ws.wait_until_projected()
    yield ws
    ws.stop()


# ---- clients ------------------------------------------------------------------------------


@dataclass
class Frame:
    """One message of a stream, whichever the transport."""

    kind: str  # subscribed, event, heartbeat, error
    id: str
    data: dict[str, Any]

    @property
    def version(self) -> int:
        return int(self.data["aggregate_version"])

    @property
    def aggregate(self) -> str:
        return str(self.data["aggregate_id"])


class Stream:
    """A subscription as a client sees it: frames in order, None once it has ended."""

    first: Frame

    async def frame(self) -> Frame | None:
        raise NotImplementedError

    async def events(self, done: Callable[[list[Frame]], bool]) -> list[Frame]:
        """Events (heartbeats skipped) until `done(events)`; fails on an error or the end."""
        got: list[Frame] = []
        async with asyncio.timeout(DEADLINE_S):
            while not done(got):
                f = await self.frame()
                assert f is not None, f"the stream ended after {len(got)} events"
                assert f.kind != "error", f.data
                if f.kind == "event":
                    got.append(f)
        return got


class SseStream(Stream):
    def __init__(self, response: httpx.Response) -> None:
        self.lines = response.aiter_lines()

    async def frame(self) -> Frame | None:
        return await parse_sse(self.lines)


class WsStream(Stream):
    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws

    async def frame(self) -> Frame | None:
        try:
            data = orjson.loads(await self.ws.recv())
        except ConnectionClosed:
            return None
        return Frame(data["type"], data["id"], data)


async def parse_sse(lines: AsyncIterator[str]) -> Frame | None:
    fields: dict[str, str] = {}
    async for line in lines:
        if line == "":
            if "data" in fields:
                return _frame(fields)
            continue
        name, _, value = line.partition(":")
        fields[name] = value.removeprefix(" ")
    return None


def _frame(fields: dict[str, str]) -> Frame:
    data = orjson.loads(fields["data"])
    assert data["id"] == fields["id"], "the SSE id and the message id agree"
    return Frame(fields.get("event", "event"), fields["id"], data)


async def _subscribed(stream: Stream) -> Frame:
    first = await stream.frame()
    assert first is not None, "the stream ended at once"
    assert first.kind == "subscribed", first
    return first


@contextlib.asynccontextmanager
async def sse(
    client: httpx.AsyncClient,
    path: str = "/api/v1/events/stream",
    params: dict[str, Any] | None = None,
    last_event_id: str | None = None,
) -> AsyncIterator[SseStream]:
    headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
    async with client.stream("GET", path, params=params, headers=headers) as r:
        assert r.status_code == 200, (await r.aread()).decode()
        assert r.headers["content-type"].startswith("text/event-stream")
        stream = SseStream(r)
        stream.first = await _subscribed(stream)
        yield stream


@contextlib.asynccontextmanager
async def ws(side: WriteSide, params: dict[str, Any] | None = None) -> AsyncIterator[WsStream]:
    url = httpx.URL(side.api_url.replace("http", "ws", 1) + "/ws/v1/events", params=params)
    async with connect(str(url), compression=None, additional_headers=bearer()) as conn:
        stream = WsStream(conn)
        stream.first = await _subscribed(stream)
        yield stream


# ---- commands -----------------------------------------------------------------------------


async def open_incident(
    client: httpx.AsyncClient, incident_id: str, title: str = "disk full"
) -> dict[str, Any]:
    r = await client.post("/api/v1/incidents", json={"id": incident_id, "title": title})
    assert r.status_code == 201, r.text
    return dict(r.json())


async def comment(client: httpx.AsyncClient, incident_id: str, body: str) -> dict[str, Any]:
    r = await client.post(
        f"/api/v1/incidents/{incident_id}/comments",
        json={"author": "alice", "body": body},
        headers=bearer("operator", sub="alice"),  # the actor is the token's subject
    )
    assert r.status_code == 200, r.text
    return dict(r.json())


def _differences(got: dict[str, list[int]], wanted: dict[str, list[int]], *context: object) -> str:
    """Which versions of which aggregate a stream missed or repeated (for the failure)."""
    lines = []
    for aggregate in sorted(set(got) | set(wanted)):
        have, want = got.get(aggregate, []), wanted.get(aggregate, [])
        missing = sorted(set(want) - set(have))
        repeated = sorted({v for v in have if have.count(v) > 1})
        extra = sorted(set(have) - set(want))
        if missing or repeated or extra or have != want:
            lines.append(f"{aggregate}: missing {missing}, repeated {repeated}, extra {extra}, got {have}")
    return "; ".join(lines) + f" (context: {context})"


def new_ids(n: int) -> list[str]:
    return [str(uuid.uuid4()) for _ in range(n)]


def by_aggregate(frames: list[Frame]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = defaultdict(list)
    for f in frames:
        out[f.aggregate].append(f.version)
    return dict(out)


def has_versions(wanted: dict[str, int]) -> Callable[[list[Frame]], bool]:
    """Done once every aggregate named has reached its version."""
    return lambda got: all(any(f.aggregate == a and f.version >= v for f in got) for a, v in wanted.items())


# ---- tests --------------------------------------------------------------------------------


async def test_subscribers_receive_their_commands_events_in_order_and_only_those_they_asked_for(
    side: WriteSide, client: httpx.AsyncClient
) -> None:
    a, b, c = new_ids(3)
    wanted = {
        "context": "incidents",
        "aggregate_id": f"{a},{b}",
        "event_type": ["IncidentOpened", "incidents.IncidentCommented"],
    }
    async with (
        sse(client, params=wanted) as filtered,
        ws(side, params=wanted) as filtered_ws,
        sse(client, params={"context": "incidents"}) as everything,
    ):
        for i in (a, b, c):
            await open_incident(client, i)
        r = await client.post(
            f"/api/v1/incidents/{a}/assign", json={"assignee": "bob"}
        )  # filtered out: its type
        assert r.status_code == 200, r.text
        await comment(client, c, "filtered out: its aggregate")
        r = await client.post("/api/v1/datasets", json={"name": "filtered out: its context"})
        assert r.status_code == 201, r.text
        for n in range(2):
            await comment(client, a, f"a{n}")
            await comment(client, b, f"b{n}")

        for stream in (filtered, filtered_ws):
            got = await stream.events(has_versions({a: 4, b: 3}))
            assert by_aggregate(got) == {a: [1, 3, 4], b: [1, 2, 3]}
            assert {f.data["event_type"] for f in got} == {
                "incidents.IncidentOpened",
                "incidents.IncidentCommented",
            }
            last = got[-1].data
            assert last["context"] == "incidents"
            assert last["payload"]["body"] in ("a1", "b1")
            assert last["metadata"]["actor"] == "alice"
            assert uuid.UUID(last["metadata"]["event_id"])
            assert last["record"]["topic"] == f"{side.settings.topic_prefix}.events.incidents"
            PositionToken.decode(got[-1].id)  # every id is a position token
        seen = await everything.events(has_versions({a: 4, b: 3, c: 2}))
        assert by_aggregate(seen)[c] == [1, 2]  # what the filters left out was there to be seen
        assert by_aggregate(seen)[a] == [1, 2, 3, 4]


async def test_events_of_each_aggregate_arrive_in_version_order(client: httpx.AsyncClient) -> None:
    ids = new_ids(6)
    async with sse(client, params={"aggregate_id": ids}) as stream:

        async def history(i: str) -> None:
            await open_incident(client, i)
            for n in range(9):
                await comment(client, i, f"note {n}")

        await asyncio.gather(*(history(i) for i in ids))
        got = await stream.events(has_versions(dict.fromkeys(ids, 10)))
    assert by_aggregate(got) == {i: list(range(1, 11)) for i in ids}


async def test_a_client_that_reconnects_with_its_last_id_gets_exactly_what_it_missed_once(
    side: WriteSide, client: httpx.AsyncClient
) -> None:
    a, b = new_ids(2)
    params = {"aggregate_id": a}
    async with sse(client, params=params) as stream:
        await open_incident(client, a)
        await comment(client, a, "seen 1")
        await comment(client, a, "seen 2")
        seen = await stream.events(has_versions({a: 3}))
    last = seen[-1].id
    await open_incident(client, b)  # on another aggregate: not for this client
    for n in range(4):
        await comment(client, a, f"missed {n}")

    async with sse(client, params=params, last_event_id=last) as resumed:
        missed = await resumed.events(has_versions({a: 7}))
        assert [f.version for f in missed] == [4, 5, 6, 7]
        await comment(client, a, "live again")  # the hand-over to the live feed
        live = await resumed.events(lambda got: len(got) == 1)
        assert [f.version for f in live] == [8]

    # The same over a WebSocket, with ?from=
    await comment(client, a, "missed over ws")
    async with ws(side, params={**params, "from": live[-1].id}) as resumed_ws:
        assert [f.version for f in await resumed_ws.events(lambda got: len(got) == 1)] == [9]
        await comment(client, a, "live over ws")
        assert [f.version for f in await resumed_ws.events(lambda got: len(got) == 1)] == [10]


async def test_clients_that_resume_while_commands_flow_miss_nothing_and_see_nothing_twice(
    side: WriteSide, client: httpx.AsyncClient
) -> None:
    ids = new_ids(4)
    for i in ids:
        await open_incident(client, i)
    params = {"aggregate_id": ids}
    rounds = 25
    rng = random.Random(7)
    async with sse(client, params=params) as reference:
        start = reference.first.id

        async def traffic() -> None:
            for n in range(rounds):
                await asyncio.gather(*(comment(client, i, f"round {n}") for i in ids))

        writer = asyncio.create_task(traffic())

        def hop_done(take: int, before: list[Frame]) -> Callable[[list[Frame]], bool]:
            return lambda got: len(got) >= take or (writer.done() and _complete(before + got, ids, rounds))

        resumed: list[Frame] = []
        position, hops = start, 0
        while not writer.done() or hops < 4:
            opener: contextlib.AbstractAsyncContextManager[Stream] = (
                ws(side, params={**params, "from": position})
                if hops % 2
                else sse(client, params=params, last_event_id=position)
            )
            async with opener as stream:
                got = await stream.events(hop_done(rng.randint(1, 12), resumed))
            resumed += got
            if got:
                position = got[-1].id
            hops += 1
            if writer.done() and _complete(resumed, ids, rounds):
                break
        await writer
        everything = await reference.events(lambda got: _complete(got, ids, rounds))

    # "now" is the live feed's position, which the opening events may not have passed
    # yet: what comes after it is exactly what the subscribed message's id says
    after = PositionToken.decode(start).offsets[f"{side.settings.topic_prefix}.events.incidents"]
    log = [
        e
        for e in await read_events(side.settings, ["incidents"])
        if e["meta"].aggregate_id in ids and e["offset"] >= after[e["partition"]]
    ]
    expected = by_aggregate(
        [
            Frame(
                "event",
                "",
                {"aggregate_id": e["meta"].aggregate_id, "aggregate_version": e["meta"].aggregate_version},
            )
            for e in log
        ]
    )
    assert all(v[-rounds:] == list(range(2, rounds + 2)) for v in expected.values())
    assert by_aggregate(everything) == expected, _differences(by_aggregate(everything), expected, start)
    # no gap, no duplicate, across every reconnection
    assert by_aggregate(resumed) == expected, _differences(by_aggregate(resumed), expected, start, hops)
    ids_seen = [f.data["metadata"]["event_id"] for f in resumed]
    assert sorted(ids_seen) == sorted(str(e["meta"].event_id) for e in log)
    assert hops >= 4


def _complete(frames: list[Frame], ids: list[str], rounds: int) -> bool:
    return all(any(f.aggregate == i and f.version == rounds + 1 for f in frames) for i in ids)


async def test_two_hundred_concurrent_clients_all_receive_every_event(side: WriteSide) -> None:
    ids = new_ids(5)
    params = {"context": "incidents", "aggregate_id": ids}
    limits = httpx.Limits(max_connections=300, max_keepalive_connections=300)
    async with (
        api_client(base_url=side.api_url, timeout=60, limits=limits) as client,
        contextlib.AsyncExitStack() as stack,
    ):
        opening: list[contextlib.AbstractAsyncContextManager[Stream]] = [
            *(sse(client, params=params) for _ in range(150)),
            *(ws(side, params=params) for _ in range(50)),
        ]
        streams = await asyncio.gather(*(stack.enter_async_context(o) for o in opening))
        for i in ids:
            await open_incident(client, i)
            for n in range(3):
                await comment(client, i, f"note {n}")
        received = await asyncio.gather(*(s.events(has_versions(dict.fromkeys(ids, 4))) for s in streams))
    expected = {i: [1, 2, 3, 4] for i in ids}
    assert len(received) == 200
    for got in received:
        assert by_aggregate(got) == expected
    assert len({tuple(f.data["metadata"]["event_id"] for f in got) for got in received}) == 1


@contextlib.asynccontextmanager
async def second_api(side: WriteSide, workdir: Path, **env: str) -> AsyncIterator[WriteSide]:
    """A second API process on the same topics, with `env` on top of the first's."""
    api = WriteSide(settings=side.settings, workdir=workdir, env={**side.env, **env})
    await api.start_api()
    try:
        yield api
    finally:
        api.stop()


@pytest.fixture(scope="module")
async def small(side: WriteSide, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[WriteSide]:
    """A second API process whose subscribers have room for 16 events."""
    async with second_api(side, tmp_path_factory.mktemp("small-buffer"), APP_SUBSCRIPTION_BUFFER="16") as api:
        yield api


async def _big_event(api: httpx.AsyncClient, dataset: str, n: int) -> int:
    """An event of about 150 kB: a few fill the kernel's socket buffers (megabytes on loopback)."""
    blob = {"revision": n, "rows": "x" * 150_000}
    r = await api.put(f"/api/v1/datasets/{dataset}/metadata/sample", json={"value": blob})
    assert r.status_code == 200, r.text
    return int(r.json()["version"])


async def test_a_slow_client_is_told_its_position_and_dropped_while_a_fast_one_keeps_up(
    small: WriteSide,
) -> None:
    dataset = str(uuid.uuid4())
    path = f"/api/v1/datasets/{dataset}/stream"
    async with api_client(base_url=small.api_url, timeout=30) as api:
        slow = await RawSseClient.open(small.api_url, path)  # reads nothing more for now
        posted: dict[int, float] = {}
        received: dict[int, float] = {}
        commands = 100
        async with sse(api, path) as fast:
            r = await api.post("/api/v1/datasets", json={"id": dataset, "name": "big events"})
            assert r.status_code == 201, r.text

            async def post(n: int) -> None:
                version = await _big_event(api, dataset, n)
                posted[version] = time.monotonic()

            async def reader() -> None:
                async with asyncio.timeout(DEADLINE_S):
                    while len(received) < commands + 1:
                        f = await fast.frame()
                        assert f is not None
                        assert f.kind != "error", f
                        if f.kind == "event":
                            assert f.version == len(received) + 1  # in order, none missing
                            received[f.version] = time.monotonic()

            reading = asyncio.create_task(reader())
            queue = list(range(commands))
            await asyncio.gather(*(_drain(queue, post) for _ in range(4)))
            await reading
        lateness = [received[v] - posted[v] for v in posted]  # (negative: before the answer)
        assert max(lateness) < 2.0, f"the fast client waited {max(lateness):.2f} s for an event"

        frames = []
        async with asyncio.timeout(DEADLINE_S):
            while (f := await slow.frame()) is not None:
                frames.append(f)
        events = [f for f in frames if f.kind == "event"]
        assert frames[-1].kind == "error", [f.kind for f in frames[-3:]]
        assert frames[-1].data["error"] == "slow_consumer"
        assert 0 < len(events) < commands
        assert frames[-1].id == events[-1].id  # the last position it was given
        assert [f.version for f in events] == list(range(1, 1 + len(events)))

        async with sse(api, path, last_event_id=frames[-1].id) as resumed:
            rest = await resumed.events(has_versions({dataset: commands + 1}))
        assert [f.version for f in rest] == list(range(1 + len(events), commands + 2))


async def test_a_catch_up_outrun_by_live_events_reads_on_and_misses_nothing(small: WriteSide) -> None:
    async with api_client(base_url=small.api_url, timeout=30) as api:
        r = await api.post("/api/v1/datasets", json={"name": "long history"})
        dataset = r.json()["id"]
        for n in range(80):  # 12 MB: more than the socket's buffers and the mailbox hold
            await _big_event(api, dataset, n)
        path = f"/api/v1/datasets/{dataset}/stream?from=beginning"
        # The catch-up fills the socket and the mailbox, then waits for this client...
        stream = await RawSseClient.open(small.api_url, path)
        # ...while more live events than its buffer holds arrive: they cannot all wait
        # for the hand-over, so the catch-up will read them from the log too
        for n in range(80, 110):
            await _big_event(api, dataset, n)
        got = await stream.events(has_versions({dataset: 111}))
        last = await _big_event(api, dataset, 110)  # and it is live in the end
        got += await stream.events(lambda more: len(more) == 1)
    assert [f.version for f in got] == list(range(1, last + 1))
    ids = [f.data["metadata"]["event_id"] for f in got]
    assert len(set(ids)) == len(ids)
    log = small.api.log.read_text() if small.api else ""
    assert "live events outran a catch-up; reading on" in log


async def _drain(queue: list[int], work: Callable[[int], Any]) -> None:
    while queue:
        await work(queue.pop(0))


class RawSseClient(Stream):
    """An SSE client on a plain socket with a tiny receive buffer, which reads only when
    asked: until then the server sees a client that cannot keep up."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.raw = b""
        self.body = b""
        self.head: bytes | None = None
        self.ready: list[Frame] = []
        self.ended = False

    @classmethod
    async def open(cls, base_url: str, path: str, last_event_id: str = "") -> RawSseClient:
        url = httpx.URL(base_url)
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        await loop.sock_connect(sock, (url.host, url.port))
        resume = f"Last-Event-ID: {last_event_id}\r\n" if last_event_id else ""
        request = (
            f"GET {path} HTTP/1.1\r\nHost: {url.host}\r\nAccept: text/event-stream\r\n{resume}"
            f"Authorization: {bearer()['Authorization']}\r\n"
            "Connection: close\r\n\r\n"
        )
        await loop.sock_sendall(sock, request.encode())
        self = cls(sock)
        async with asyncio.timeout(DEADLINE_S):
            self.first = await _subscribed(self)
        return self

    async def frame(self) -> Frame | None:
        loop = asyncio.get_running_loop()
        while not self.ready:
            if self.ended:
                self.sock.close()
                return None
            chunk = await loop.sock_recv(self.sock, 1 << 20)
            if chunk:
                self.raw += chunk
                self._decode()
            else:
                self.ended = True
        return self.ready.pop(0)

    def _decode(self) -> None:
        if self.head is None:
            head, sep, rest = self.raw.partition(b"\r\n\r\n")
            if not sep:
                return
            assert head.startswith(b"HTTP/1.1 200"), head
            self.head, self.raw = head, rest
        while True:  # chunked transfer encoding
            size_line, sep, rest = self.raw.partition(b"\r\n")
            if not sep or len(rest) < int(size_line, 16) + 2:
                break
            size = int(size_line, 16)
            self.body, self.raw = self.body + rest[:size], rest[size + 2 :]
            if size == 0:
                break
        while b"\n\n" in self.body:
            block, _, self.body = self.body.partition(b"\n\n")
            fields = dict(line.partition(": ")[::2] for line in block.decode().split("\n"))
            if "data" in fields:
                self.ready.append(_frame(fields))


async def test_resuming_from_the_beginning_replays_the_history_then_follows_live(
    client: httpx.AsyncClient,
) -> None:
    (a,) = new_ids(1)
    await open_incident(client, a)
    for n in range(4):
        await comment(client, a, f"before {n}")
    async with sse(client, f"/api/v1/incidents/{a}/stream", params={"from": "beginning"}) as stream:
        history = await stream.events(has_versions({a: 5}))
        assert [f.version for f in history] == [1, 2, 3, 4, 5]
        assert history[0].data["event_type"] == "incidents.IncidentOpened"
        await comment(client, a, "after")
        assert [f.version for f in await stream.events(lambda got: len(got) == 1)] == [6]

    r = await client.post("/api/v1/datasets", json={"name": "Rain"})
    dataset = r.json()["id"]
    await client.post(f"/api/v1/datasets/{dataset}/versions", json={"version": "1.0.0"})
    async with sse(client, f"/api/v1/datasets/{dataset}/stream", params={"from": "beginning"}) as stream:
        types = [f.data["event_type"] for f in await stream.events(has_versions({dataset: 2}))]
        assert types == ["datasets.DatasetRegistered", "datasets.VersionPublished"]


async def test_heartbeats_carry_a_position_past_the_events_the_filters_left_out(
    side: WriteSide, client: httpx.AsyncClient
) -> None:
    quiet, busy = new_ids(2)
    async with sse(client, params={"aggregate_id": quiet}) as stream:
        opened = await open_incident(client, busy)
        beat = None
        async with asyncio.timeout(DEADLINE_S):
            while beat is None or not covers(beat.id, opened["position"]):
                beat = await stream.frame()
                assert beat is not None
                assert beat.kind == "heartbeat", beat
    # resuming from the heartbeat replays nothing, and goes on live
    async with ws(side, params={"aggregate_id": quiet, "from": beat.id}) as resumed:
        await open_incident(client, quiet)
        got = await resumed.events(lambda got: len(got) == 1)
        assert [(f.aggregate, f.version) for f in got] == [(quiet, 1)]


async def test_a_message_id_is_a_read_your_writes_token(client: httpx.AsyncClient) -> None:
    dataset = str(uuid.uuid4())
    async with sse(client, f"/api/v1/datasets/{dataset}/stream") as stream:
        r = await client.post("/api/v1/datasets", json={"id": dataset, "name": "Snow depth"})
        assert r.status_code == 201, r.text
        (event,) = await stream.events(lambda got: len(got) == 1)
    r = await client.get(f"/api/v1/datasets/{dataset}", params={"consistent_with": event.id})
    assert r.status_code == 200, r.text
    assert r.json()["name"] == "Snow depth"


@pytest.fixture(scope="module")
async def idle(side: WriteSide, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[WriteSide]:
    """A second API process whose live feed pauses after 1 s without a subscriber (30 s
    by default)."""
    async with second_api(side, tmp_path_factory.mktemp("idle-feed"), APP_SUBSCRIPTION_IDLE_S="1") as api:
        yield api


def feed_said(api: WriteSide, message: str) -> int:
    """How many times the API's live feed logged `message`."""
    assert api.api is not None
    lines = api.api.output().decode(errors="replace").splitlines()
    return sum(1 for line in lines if '"api.subscriptions.feed"' in line and f'"{message}"' in line)


async def test_a_feed_without_subscribers_pauses_and_its_next_ones_miss_nothing_of_theirs(
    idle: WriteSide,
) -> None:
    a = new_ids(1)[0]
    async with api_client(base_url=idle.api_url, timeout=30) as client:
        async with sse(client, params={"aggregate_id": a}) as stream:
            await open_incident(client, a)
            seen = await stream.events(has_versions({a: 1}))

        async def paused() -> bool | None:  # the last subscriber left: it pauses after 1 s
            return feed_said(idle, "live feed paused: no subscriber") > 0 or None

        await until(paused, DEADLINE_S, "the idle feed paused")
        await comment(client, a, "while nobody listens")  # version 2, read by no one now
        awake = feed_said(idle, "live feed reading again")

        # live from now: what follows the subscription, not what came before it
        async with sse(client, params={"aggregate_id": a}) as live:
            assert feed_said(idle, "live feed reading again") == awake + 1
            await comment(client, a, "after")
            assert [f.version for f in await live.events(lambda got: len(got) == 1)] == [3]

            # resuming from before the pause: exactly what it missed, then live
            async with sse(client, params={"aggregate_id": a}, last_event_id=seen[-1].id) as resumed:
                assert [f.version for f in await resumed.events(has_versions({a: 3}))] == [2, 3]
                await comment(client, a, "both")
                assert [f.version for f in await resumed.events(lambda got: len(got) == 1)] == [4]
            assert [f.version for f in await live.events(lambda got: len(got) == 1)] == [4]


@pytest.mark.parametrize(
    ("params", "headers", "where"),
    [
        ({"context": "payments"}, {}, ["query", "context"]),
        ({"event_type": "IncidentExploded"}, {}, ["query", "event_type"]),
        ({"context": "datasets", "event_type": "IncidentOpened"}, {}, ["query", "event_type"]),
        ({"aggregate_id": "not-an-id"}, {}, ["query", "aggregate_id"]),
        ({"from": "not-a-token"}, {}, ["query", "from"]),
        ({"from": PositionToken({"elsewhere.events.x": {0: 1}}).encode()}, {}, ["query", "from"]),
        ({}, {"Last-Event-ID": "garbage!"}, ["header", "last-event-id"]),
    ],
)
async def test_unknown_filters_and_malformed_positions_are_422_naming_the_field(
    side: WriteSide,
    client: httpx.AsyncClient,
    params: dict[str, str],
    headers: dict[str, str],
    where: list[str],
) -> None:
    r = await client.get("/api/v1/events/stream", params=params, headers=headers)
    assert r.status_code == 422, r.text
    assert r.json()["detail"][0]["loc"] == where
    if not headers:
        url = httpx.URL(side.api_url.replace("http", "ws", 1) + "/ws/v1/events", params=params)
        with pytest.raises(InvalidStatus) as refused:
            async with connect(str(url), additional_headers=bearer()):
                pass
        assert refused.value.response.status_code == 422
        assert orjson.loads(refused.value.response.body)["detail"][0]["loc"] == where


async def test_subscriptions_get_503_with_retry_after_when_kafka_is_unreachable(
    settings: Settings, tmp_path: Path
) -> None:
    down = WriteSide.create(settings, tmp_path, kafka_bootstrap=f"127.0.0.1:{free_port()}")
    await down.start_api(
        env={**down.env, "APP_KAFKA_BOOTSTRAP": down.settings.kafka_bootstrap}, wait_ready=False
    )
    try:
        async with api_client(base_url=down.api_url, timeout=30) as client:
            r = await client.get("/api/v1/events/stream")
            assert r.status_code == 503
            assert r.headers["retry-after"] == "1"
            assert r.json()["error"] == "unavailable"
        with pytest.raises(InvalidStatus) as refused:
            async with connect(
                down.api_url.replace("http", "ws", 1) + "/ws/v1/events", additional_headers=bearer()
            ):
                pass
        assert refused.value.response.status_code == 503
        assert refused.value.response.headers["Retry-After"] == "1"
    finally:
        down.stop()


async def test_a_shutdown_ends_every_stream_cleanly_and_the_process_exits(
    side: WriteSide, tmp_path: Path
) -> None:
    other = WriteSide(settings=side.settings, workdir=tmp_path, env=side.env)
    await other.start_api()
    assert other.api is not None
    try:
        async with (
            api_client(base_url=other.api_url, timeout=30) as client,
            sse(client) as stream,
            ws(other) as socket_stream,
        ):
            started = time.monotonic()
            other.api.popen.terminate()
            async with asyncio.timeout(DEADLINE_S):
                while (f := await stream.frame()) is not None:
                    assert f.kind == "heartbeat", f  # then the stream ends, without an error
                closed = await _closing(socket_stream.ws)
            assert closed.rcvd is not None
            assert closed.rcvd.code == 1012  # service restart: reconnect elsewhere
        code = await asyncio.to_thread(other.api.popen.wait, DEADLINE_S)
        assert time.monotonic() - started < 10
        # uvicorn re-raises SIGTERM once it has shut down gracefully
        assert code in (0, -signal.SIGTERM)
        assert "Application shutdown complete" in other.api.log.read_text()
    finally:
        other.stop()


async def _closing(conn: ClientConnection) -> ConnectionClosed:
    while True:
        try:
            await conn.recv()
        except ConnectionClosed as closed:
            return closed
