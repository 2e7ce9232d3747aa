"""Where the integration tests find their real services.

In order: services named by environment variables (all four `APP_*` endpoints set),
testcontainers when a Docker engine answers, otherwise the local stack started by
`infra/stack.py` (idempotent: already-running services are reused).
"""

from __future__ import annotations

import os
import subprocess
import sys
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ENDPOINT_VARS = ("APP_KAFKA_BOOTSTRAP", "APP_POSTGRES_DSN", "APP_OPENSEARCH_URL", "APP_REDIS_URL")


@dataclass(frozen=True)
class Endpoints:
    """Connection strings of the four services."""

    kafka_bootstrap: str
    postgres_dsn: str
    opensearch_url: str
    redis_url: str
    origin: str

    def export(self) -> None:
        """Make the application's settings point at these services."""
        values = (self.kafka_bootstrap, self.postgres_dsn, self.opensearch_url, self.redis_url)
        os.environ.update(dict(zip(ENDPOINT_VARS, values, strict=True)))


def from_environment() -> Endpoints | None:
    if not all(os.environ.get(v) for v in ENDPOINT_VARS):
        return None
    kafka_bootstrap, postgres_dsn, opensearch_url, redis_url = (os.environ[v] for v in ENDPOINT_VARS)
    return Endpoints(kafka_bootstrap, postgres_dsn, opensearch_url, redis_url, origin="environment")


def docker_answers() -> bool:
    try:
        import docker  # installed with testcontainers

        client = docker.from_env(timeout=3)
        return bool(client.ping())
    except Exception:  # any failure means: no usable engine here
        return False


def from_testcontainers(stack: ExitStack) -> Endpoints:
    from testcontainers.core.container import DockerContainer
    from testcontainers.core.waiting_utils import wait_for_logs
    from testcontainers.kafka import KafkaContainer
    from testcontainers.postgres import PostgresContainer
    from testcontainers.redis import RedisContainer

    kafka = stack.enter_context(KafkaContainer("apache/kafka:3.9.1").with_kraft())
    pg = stack.enter_context(
        PostgresContainer("postgres:15", username="app", password="app", dbname="app").with_command(
            "postgres -c wal_level=logical"
        )
    )
    redis = stack.enter_context(RedisContainer("redis:7"))
    os_container = (
        DockerContainer("opensearchproject/opensearch:2.19.3")
        .with_env("discovery.type", "single-node")
        .with_env("DISABLE_SECURITY_PLUGIN", "true")
        .with_env("OPENSEARCH_JAVA_OPTS", "-Xms512m -Xmx512m")
        .with_exposed_ports(9200)
    )
    stack.enter_context(os_container)
    wait_for_logs(os_container, "started", timeout=180)
    os_url = f"http://{os_container.get_container_host_ip()}:{os_container.get_exposed_port(9200)}"
    pg_url = pg.get_connection_url().replace("postgresql+psycopg2://", "postgresql://")
    redis_url = f"redis://{redis.get_container_host_ip()}:{redis.get_exposed_port(6379)}/0"
    return Endpoints(kafka.get_bootstrap_server(), pg_url, os_url, redis_url, origin="testcontainers")


def from_local_stack() -> Endpoints:
    subprocess.run([sys.executable, str(REPO / "infra" / "stack.py"), "up"], check=True)
    out = subprocess.run(
        [sys.executable, str(REPO / "infra" / "stack.py"), "env"], check=True, capture_output=True, text=True
    ).stdout
    env = dict(line.removeprefix("export ").split("=", 1) for line in out.splitlines() if line)
    kafka_bootstrap, postgres_dsn, opensearch_url, redis_url = (env[v] for v in ENDPOINT_VARS)
    return Endpoints(kafka_bootstrap, postgres_dsn, opensearch_url, redis_url, origin="local stack")


def acquire(stack: ExitStack) -> Endpoints:
    found = from_environment()
    if found is None:
        found = from_testcontainers(stack) if docker_answers() else from_local_stack()
    found.export()
    return found
