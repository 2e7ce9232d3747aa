"""Fixtures shared by the integration tests: each module provides its own `side`."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest

from tests.auth import api_client
from tests.integration.harness import WriteSide


@pytest.fixture
async def client(side: WriteSide) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client of the module's API."""
    # idle connections are dropped before uvicorn's keep-alive timeout (5 s) closes them:
    # at httpx's default (5 s, the same) a request may go out on a socket being closed
    limits = httpx.Limits(keepalive_expiry=2.0)
    async with api_client(base_url=side.api_url, timeout=30, limits=limits) as c:
        yield c
