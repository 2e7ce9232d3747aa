"""Fixtures shared by the integration tests: each module provides its own `side`."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest

from tests.integration.harness import WriteSide


@pytest.fixture
async def client(side: WriteSide) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client of the module's API."""
    async with httpx.AsyncClient(base_url=side.api_url, timeout=30) as c:
        yield c
