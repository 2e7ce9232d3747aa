"""Kafka client factories: every producer, consumer and admin client is made here.

Callers start and stop the clients themselves (in a FastAPI lifespan, a processor's
run loop, a test fixture); nothing connects at import time.
"""

from __future__ import annotations

from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient

from shared_kernel.settings import Settings


def producer(settings: Settings, **overrides: Any) -> AIOKafkaProducer:
    """An idempotent producer (acks=all): no duplicates from its own retries."""
    options: dict[str, Any] = {
        "bootstrap_servers": settings.kafka_bootstrap,
        "client_id": settings.service_name,
        "enable_idempotence": True,
        "acks": "all",
        "linger_ms": 2,
        "max_batch_size": 256 * 1024,
        "request_timeout_ms": 15_000,
    }
    options.update(overrides)
    return AIOKafkaProducer(**options)


def transactional_producer(settings: Settings, transactional_id: str, **overrides: Any) -> AIOKafkaProducer:
    """A producer whose writes become visible only when its transaction commits.

    Initialising a transactional id fences every older producer that used it.
    """
    return producer(settings, transactional_id=transactional_id, **overrides)


def consumer(
    settings: Settings,
    *topics: str,
    group_id: str | None = None,
    isolation_level: str = "read_committed",
    **overrides: Any,
) -> AIOKafkaConsumer:
    """A consumer that sees committed transactional data only, unless told otherwise."""
    options: dict[str, Any] = {
        "bootstrap_servers": settings.kafka_bootstrap,
        "client_id": settings.service_name,
        "group_id": group_id,
        "isolation_level": isolation_level,
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        "max_partition_fetch_bytes": 4 * 1024 * 1024,
    }
    options.update(overrides)
    return AIOKafkaConsumer(*topics, **options)


def admin(settings: Settings) -> AIOKafkaAdminClient:
    return AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap, client_id=settings.service_name)
