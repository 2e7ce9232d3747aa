"""A store that goes away for a while loses no event and makes no dead letter: the
projection waits, retries and catches up once the store is back.

OpenSearch is reached by the search projector through a TCP relay in this process,
which the test closes (every connection cut, new ones refused) and opens again: the
real OpenSearch, a real outage on the wire."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from urllib.parse import urlparse

import pytest

from shared_kernel.position import PositionToken
from shared_kernel.settings import Settings
from streams.app import RETRY_S
from tests.auth import api_client
from tests.integration.harness import WriteSide, free_port

pytestmark = pytest.mark.asyncio(loop_scope="session")


class Relay:
    """127.0.0.1:`port` forwarded to `upstream`, until `cut`; `restore` opens it again."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.port = free_port()
        self.server: asyncio.Server | None = None
        self.writers: set[asyncio.StreamWriter] = set()

    async def restore(self) -> None:
        self.server = await asyncio.start_server(self._pipe, "127.0.0.1", self.port, reuse_address=True)

    async def cut(self) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()
        for w in list(self.writers):
            w.close()
        self.writers.clear()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            writer.close()
            return
        self.writers |= {writer, up_writer}

        async def copy(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, asyncio.CancelledError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(copy(reader, up_writer), copy(up_reader, writer))


@pytest.fixture(scope="module")
async def relay(settings: Settings) -> AsyncIterator[Relay]:
    url = urlparse(settings.opensearch_url)
    r = Relay((url.hostname or "127.0.0.1", url.port or 9200))
    await r.restore()
    yield r
    if r.server is not None:
        r.server.close()


@pytest.fixture(scope="module")
async def side(
    settings: Settings, relay: Relay, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[WriteSide]:
    ws = WriteSide.create(settings, tmp_path_factory.mktemp("store-outage"))
    await ws.start_serving()
    ws.start_projectors(
        "datasets_search", env={**ws.env, "APP_OPENSEARCH_URL": f"http://127.0.0.1:{relay.port}"}
    )
    await ws.wait_until_projected()
    yield ws
    ws.stop()


async def test_search_events_of_an_opensearch_outage_are_indexed_once_it_is_back(
    side: WriteSide, relay: Relay
) -> None:
    word = f"outage{time.monotonic_ns()}"
    async with api_client(base_url=side.api_url, timeout=30) as client:
        await relay.cut()
        tokens = []
        for i in range(3):
            r = await client.post("/api/v1/datasets", json={"name": f"{word} {i}"})
            assert r.status_code == 201, r.text
            tokens.append(PositionToken.decode(r.json()["position"]))
        # the worker retries the batch, gives up, is stopped and started again
        log = side.projectors[-1].log
        deadline = time.monotonic() + sum(RETRY_S) + 60
        while "worker exited; starting it again" not in log.read_text():
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            await asyncio.sleep(0.2)
        r = await client.get(
            "/api/v1/search/datasets", params={"q": word, "consistent_with": tokens[0].encode()}
        )
        assert r.status_code == 504, r.text  # not indexed while OpenSearch is away
        await relay.restore()

        merged = tokens[0].merge(tokens[1]).merge(tokens[2]).encode()
        deadline = time.monotonic() + 90
        while (
            r := await client.get("/api/v1/search/datasets", params={"q": word, "consistent_with": merged})
        ).status_code != 200:
            assert r.status_code == 504, r.text
            assert time.monotonic() < deadline, "the search projection did not catch up"
        assert sorted(hit["name"] for hit in r.json()["items"]) == [f"{word} {i}" for i in range(3)]
        listed = (await client.get("/api/v1/admin/projections")).json()["projections"]
        assert listed["datasets_search"]["dead_lettered"] == 0, listed["datasets_search"]
