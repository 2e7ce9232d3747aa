"""Prometheus metrics of every process (prometheus-client), named by Prometheus's
conventions: `cqrs_` first, a unit last, `_total` on counters.

Labels stay bounded: route templates (never paths), context and command type names,
outcome codes, projection names and versions, consumer and job names, transports. No
aggregate, command, tenant or user id is ever a label.

The API serves them at `/metrics`; every other process (`cqrs run projectors|jobs|
command-processor|...`) on `APP_METRICS_PORT` when it is set (`serve`). Where uvicorn
forks workers, `PROMETHEUS_MULTIPROC_DIR` names a folder the workers share and
`/metrics` adds them up (prometheus-client's multi-process mode).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    start_http_server,
)
from prometheus_client import multiprocess as _multiprocess

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)

HTTP_DURATION = Histogram(
    "cqrs_http_request_duration_seconds",
    "HTTP requests by route template, method and status, from the first byte in to the last out",
    ["route", "method", "status"],
    buckets=LATENCY_BUCKETS,
)
COMMANDS = Counter(
    "cqrs_commands_total",
    "Commands decided by their partition's owner, by context, command and outcome "
    "(accepted, or the refusal's code)",
    ["context", "command", "outcome"],
)
TRANSACTION_DURATION = Histogram(
    "cqrs_processor_transaction_duration_seconds",
    "One command batch of a partition: decided and committed in one Kafka transaction",
    buckets=LATENCY_BUCKETS,
)
COMMANDS_PER_TRANSACTION = Histogram(
    "cqrs_processor_commands_per_transaction",
    "Commands decided in one transaction (group commit)",
    buckets=SIZE_BUCKETS,
)
PROJECTION_LAG_EVENTS = Gauge(
    "cqrs_projection_lag_events",
    "Events of the projection's topics it has not applied yet",
    ["projection", "version"],
    multiprocess_mode="max",
)
PROJECTION_LAG_SECONDS = Gauge(
    "cqrs_projection_lag_seconds",
    "Age of the oldest event the projection has not applied yet (0 when caught up)",
    ["projection", "version"],
    multiprocess_mode="max",
)
PROJECTION_APPLIED = Counter(
    "cqrs_projection_applied_events_total", "Events applied to a projection's read model", ["projection"]
)
DEAD_LETTERS = Counter(
    "cqrs_dead_letters_total",
    "Records sent to a consumer's dead-letter topic (the processor, a projection, a job)",
    ["consumer"],
)
SUBSCRIPTION_CLIENTS = Gauge(
    "cqrs_subscription_clients",
    "Live subscriptions open now, by transport",
    ["transport"],
    multiprocess_mode="livesum",
)
REREAD = Counter(
    "cqrs_consumer_rereads_total",
    "Records a Faust worker reads again instead of committing over them unhandled "
    "(streams.skipped): a fetch's jump over records, an ack of a record its stream skipped, "
    "or a fetch let go unhanded",
    ["reason"],
)
SUBSCRIPTION_DROPS = Counter(
    "cqrs_subscription_slow_consumer_drops_total",
    "Subscriptions ended because the client read too slowly (its buffer filled)",
    ["transport"],
)
READ_CACHE = Counter(
    "cqrs_read_cache_requests_total",
    "Single reads the read cache was asked for, by result (hit, miss)",
    ["result"],
)
CONSUMER_GROUP_LAG = Gauge(
    "cqrs_consumer_group_lag_records",
    "Records of a consumer group's topics not committed by it yet",
    ["group"],
    multiprocess_mode="max",
)
JOB_EVENTS = Counter(
    "cqrs_job_records_total", "Records a stream-processing job handled, by outcome", ["job", "outcome"]
)


def known_consumers(names: Iterable[str]) -> None:
    """Start the dead-letter counters of these consumers at 0, so that the first dead
    letter is an increase Prometheus sees (a series born at 1 has no `increase`)."""
    for name in names:
        DEAD_LETTERS.labels(name)


def exposition() -> tuple[bytes, str]:
    """The text format of this process's metrics (all workers' in multi-process mode)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        _multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(), CONTENT_TYPE_LATEST


def serve(port: int | None, host: str = "127.0.0.1") -> None:
    """Expose `/metrics` on `port` from a thread of this process (nothing when None or 0)."""
    if not port:
        return
    start_http_server(port, addr=host)
    log.info("metrics served", extra={"url": f"http://{host}:{port}/metrics"})
