"""Shared fixtures. Unit tests need none of them; integration tests ask for `endpoints`."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack

import pytest

from shared_kernel.settings import Settings
from tests.services import Endpoints, acquire


@pytest.fixture(scope="session")
def endpoints() -> Iterator[Endpoints]:
    """The four real services, started if needed (see tests/services.py)."""
    with ExitStack() as stack:
        yield acquire(stack)


@pytest.fixture(scope="session")
def settings(endpoints: Endpoints) -> Settings:
    return Settings(
        environment="test",
        kafka_bootstrap=endpoints.kafka_bootstrap,
        postgres_dsn=endpoints.postgres_dsn,
        opensearch_url=endpoints.opensearch_url,
        redis_url=endpoints.redis_url,
    )
