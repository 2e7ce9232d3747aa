"""Application settings, read from `APP_*` environment variables.

The defaults point at the local stack (`infra/stack.py`), so a newcomer needs no
configuration. In production (`APP_ENVIRONMENT=production`) the unsafe defaults
(the local database password, loopback addresses) are refused at start-up.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

LOCAL_ISSUER = "kafka-cqrs-local"  # the local stack's tokens (`cqrs auth token`); refused in production


class Settings(BaseSettings):
    """Every knob of the service. Field `foo_bar` is read from `APP_FOO_BAR`."""

    model_config = SettingsConfigDict(env_prefix="APP_", env_file=None, extra="ignore", frozen=True)

    environment: Literal["dev", "test", "production"] = "dev"
    service_name: str = "kafka-cqrs"

    kafka_bootstrap: str = "127.0.0.1:9092"
    topic_prefix: str = "app"
    partitions: int = Field(default=6, ge=1, le=1024)
    replication_factor: int = Field(default=1, ge=1)

    postgres_dsn: str = "postgresql://app:app@127.0.0.1:5432/app"
    opensearch_url: str = "http://127.0.0.1:9200"
    opensearch_timeout_s: float = Field(default=30.0, gt=0, description="per OpenSearch request")
    redis_url: str = "redis://127.0.0.1:6379/0"

    # Write side.
    command_timeout_s: float = Field(default=10.0, gt=0, description="how long the API waits for a result")
    command_batch_window_ms: int = Field(
        default=0,
        ge=0,
        description="extra wait before a partition's next transaction; batches already grow "
        "with the load (what queued while the last transaction committed goes into the next)",
    )
    command_batch_max: int = Field(default=500, ge=1)
    command_transaction_timeout_ms: int = Field(
        default=10_000,
        ge=1_000,
        description="the broker aborts an owner's transaction open this long (a process stopped "
        "or killed mid-transaction); a new owner of its partitions waits for that at most",
    )
    api_owns_partitions: bool = Field(
        default=True,
        description="the API process is also a command processor, owning a share of the partitions "
        "(the shortest command path); false: it forwards every command to the processors' "
        "internal endpoints (`cqrs run command-processor`), so the two scale apart",
    )
    advertised_url: str = Field(
        default="",
        description="where this process takes forwarded commands (its base URL as other API "
        "instances reach it); `cqrs serve api` and `cqrs run command-processor` set it from "
        "their --host and --port when it is not given",
    )
    instance_id: str = Field(
        default="",
        max_length=200,
        description="the processor's static member id in its consumer group (unique per running "
        "process, stable across its restarts: a restarted member takes its partitions back at once); "
        "the CLI defaults it to host:port; empty: a dynamic member",
    )
    projection_batch_max: int = Field(default=1000, ge=1, description="events per projection transaction")
    projection_batch_wait_ms: int = Field(
        default=10,
        ge=1,
        le=1000,
        description="longest a Faust worker waits to fill a batch: the latency it adds to a lone event",
    )
    projection_modules: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="modules that register projections of the deployment (comma-separated)",
    )
    projection_catch_up_behind: int = Field(
        default=50_000,
        ge=0,
        description="a projector starting, or falling, this many events behind catches up by the bulk "
        "path (replays, as a rebuild does) before its Faust worker goes on; 0: never",
    )
    projection_lag_check_s: float = Field(
        default=10.0, gt=0, description="how often a projector's supervisor checks its running worker's lag"
    )
    rebuild_swap_max_behind: int = Field(
        default=100, ge=0, description="a rebuilt version is swapped in once at most this many events behind"
    )
    rebuild_lanes: int = Field(
        default=2,
        ge=1,
        description="replays run at once (rebuild, catch-up), each on a share of the partitions",
    )
    rebuild_batch_max: int = Field(default=10_000, ge=1, description="events per transaction of a replay")
    rebuild_remember_rows: int = Field(
        default=200_000, ge=0, description="rows a replay keeps in memory (others are read back when changed)"
    )
    rebuild_bulk_until_behind: int = Field(
        default=1_000,
        ge=0,
        description="a rebuild replays in bulk until this many events behind; its Faust worker does the rest",
    )
    rebuild_handover_s: float = Field(
        default=30, gt=0, description="how long a rebuild waits for a supervised worker of the new version"
    )
    # Stream-processing jobs (streams.jobs): windowed quality, the incident process manager, deadlines.
    quality_window_tumbling_s: int = Field(default=3600, ge=1, description="tumbling windows' size")
    quality_window_hopping_s: int = Field(default=86_400, ge=1, description="hopping windows' size")
    quality_window_hop_s: int = Field(
        default=3600, ge=1, description="hopping windows' step (a divisor of their size)"
    )
    quality_window_lateness_s: int = Field(
        default=3600,
        ge=0,
        description="allowed lateness: a window takes a check until the dataset's stream time (its latest "
        "check's time) is this far past the window's end; later checks are counted as dropped",
    )
    quality_degraded_rate: float = Field(
        default=0.5,
        gt=0,
        le=1,
        description="failure rate in the current hopping window that degrades a metric",
    )
    quality_restored_rate: float = Field(
        default=0.2, ge=0, le=1, description="failure rate at or under which a degraded metric is restored"
    )
    quality_min_checks: int = Field(
        default=5, ge=1, description="checks the window needs before its rate decides anything"
    )
    incident_sla_assign_s: dict[str, float] = Field(
        default_factory=lambda: {"critical": 900.0, "high": 3600.0, "medium": 14_400.0, "low": 86_400.0},
        description="per priority, seconds from opening by which an incident must be assigned (JSON)",
    )
    incident_sla_resolve_s: dict[str, float] = Field(
        default_factory=lambda: {
            "critical": 14_400.0,
            "high": 28_800.0,
            "medium": 86_400.0,
            "low": 259_200.0,
        },
        description="per priority, seconds from opening by which an incident must be resolved (JSON)",
    )
    deadline_scan_s: float = Field(
        default=1.0, gt=0, le=60, description="how often due deadlines are looked for"
    )
    # Webhooks (the webhooks context and its delivery job, streams.webhooks.delivery)
    webhook_signing_key: str = Field(
        default="",
        description="what every webhook's signing secret is derived from (with its tenant, id and "
        "generation); required in production; empty elsewhere: one made in the local key folder. "
        "Changing it changes every secret",
    )
    webhook_allowed_networks: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="networks (CIDR, comma-separated) a webhook may target although private, loopback "
        "or link-local (refused otherwise); e.g. 127.0.0.0/8 for a receiver on this machine",
    )
    webhook_retry_s: Annotated[list[float], NoDecode] = Field(
        default_factory=lambda: [5.0, 30.0, 120.0, 600.0, 1800.0, 3600.0, 7200.0, 14400.0],
        description="the pause before each retry of a failed delivery (comma-separated seconds; "
        "each with up to 20 % jitter); after the last the delivery is parked",
    )
    webhook_timeout_s: float = Field(default=10.0, gt=0, le=120, description="one delivery attempt at most")
    webhook_per_target: int = Field(
        default=4, ge=1, le=256, description="deliveries in flight to one target host at once"
    )
    webhook_in_flight: int = Field(
        default=64, ge=1, le=4096, description="deliveries in flight at once in one delivery job"
    )
    webhook_response_bytes: int = Field(
        default=4096, ge=0, le=1_048_576, description="how much of a target's answer is read and kept"
    )
    webhook_keep_days: int = Field(
        default=30, ge=1, le=3650, description="how long delivered deliveries and their attempts are kept"
    )
    # Observability (shared_kernel.metrics): Prometheus metrics of every process.
    metrics_port: int | None = Field(
        default=None,
        ge=0,
        le=65535,
        description="where a process other than the API serves /metrics (the API serves it on its own port)",
    )
    metrics_lag_interval_s: float = Field(
        default=5.0, gt=0, description="how often the API refreshes the projections' lag gauges"
    )
    # Change data capture (streams.cdc): Debezium on Kafka Connect reads a database we do
    # not own; the CDC job turns its change events into commands.
    cdc_connect_url: str = Field(
        default="http://127.0.0.1:8083", description="the Kafka Connect worker's REST API"
    )
    cdc_source_dsn: str = Field(
        default="postgresql://legacy:legacy@127.0.0.1:5432/legacy",
        description="the source database, as a role that may replicate and owns the table",
    )
    cdc_source_table: str = Field(
        default="catalog.datasets",
        pattern=r"^[a-z_][a-z0-9_]*\.[a-z_][a-z0-9_]*$",
        description="schema.table",
    )
    cdc_source_columns: dict[str, str] = Field(
        default_factory=dict,
        description="the source's column of each mapped field where it differs (JSON, e.g. "
        '{"description": "summary"} after a rename); fields: id, name, description, status, owner_id, '
        "metadata",
    )
    cdc_tenant: str = Field(
        default="acme", min_length=1, description="the tenant the source's rows belong to"
    )
    cdc_concurrency: int = Field(
        default=64, ge=1, le=1024, description="rows the CDC job has in flight at once (in order per row)"
    )
    cdc_heartbeat_ms: int = Field(
        default=5000, ge=100, description="how often Debezium confirms its position while the source is quiet"
    )
    query_consistency_timeout_s: float = Field(
        default=5.0, gt=0, description="how long a query waits for the position it was given (then 504)"
    )
    query_cache_entries: int = Field(
        default=10_000,
        ge=0,
        description="rendered single-resource reads the API keeps in memory, dropped as projectors "
        "change them (0: every read goes to PostgreSQL); see api.readcache",
    )
    query_cache_mb: int = Field(default=64, ge=1, description="memory for those reads, bodies and headers")
    kafka_fetch_max_wait_ms: int = Field(
        default=1000,
        ge=1,
        le=10_000,
        description="longest a consumer's fetch of all its partitions waits at the broker for new data",
    )
    kafka_partial_fetch_wait_ms: int = Field(
        default=20,
        ge=1,
        le=10_000,
        description="the same for a fetch that leaves some partitions out (see kafka.consumer)",
    )
    kafka_txn_retry_backoff_ms: float = Field(
        default=2.0,
        gt=0,
        le=100,
        description="wait before retrying a transaction start the coordinator still finishes (KAFKA-5477)",
    )
    # Size limits of the whole path, enforced at the edge (see api.limits, commands.sizes).
    max_body_bytes: int = Field(
        default=1024 * 1024,
        ge=1024,
        description="largest request body the API reads: 413 above it, by Content-Length or counted, "
        "before any route reads it. 1 MiB is the largest Kafka record (a command travels as one): "
        "a larger body cannot become a command the write side takes, so it is refused unread; "
        "within it, the envelope, the events and the snapshot are measured exactly (413 too). "
        "It is also nginx's default, and far above every valid body but a dataset registered "
        "with much metadata (api.inputs bounds one JSON value to 65,536 characters)",
    )
    kafka_max_message_bytes: int = Field(
        default=1_048_588,
        ge=256 * 1024,  # the producers' batch size (shared_kernel.kafka): a batch of many records fits too
        description="`max.message.bytes` of the topics this service creates, and the largest record "
        "it produces (a command, an event, a snapshot, a dead letter); Kafka's own default. A "
        "command or event over it is refused with 413 before anything is produced",
    )
    result_ttl_s: int = Field(default=7 * 24 * 3600, ge=60, description="how long command results are kept")
    retry_after_s: int = Field(default=1, ge=1)

    log_level: str = "INFO"
    log_json: bool = True

    # Subscriptions (SSE, WebSocket): see api/subscriptions.
    subscription_buffer: int = Field(
        default=1000,
        ge=1,
        description="events queued per subscriber before it is told it is too slow and disconnected",
    )
    subscription_heartbeat_s: float = Field(
        default=15.0, gt=0, description="a subscriber idle this long gets a heartbeat with its position"
    )
    subscription_send_timeout_s: float = Field(
        default=30.0, gt=0, description="a subscriber whose socket accepts nothing for this long is dropped"
    )
    subscription_catchup_readers: int = Field(
        default=16, ge=1, description="resuming subscribers read the log concurrently, at most this many"
    )
    subscription_idle_s: float = Field(
        default=30.0,
        ge=0,
        description="how long a process's live feed reads on with no subscriber before it pauses "
        "(0: never); the first subscriber after that waits while it finds the log's end again",
    )

    # Identity (see api/auth): who calls, in which tenant, allowed to do what, how often.
    auth_issuer: str = Field(
        default=LOCAL_ISSUER,
        description="the `iss` every token must carry; an https URL is also where the OIDC "
        "discovery document is read (its `jwks_uri`) when no JWKS is given",
    )
    auth_audience: str = Field(default="kafka-cqrs", description="the `aud` every token must carry")
    auth_jwks_url: str = Field(default="", description="the JWKS of the issuer (an OIDC provider's keys)")
    auth_jwks_file: str = Field(
        default="",
        description="a JWKS in a file instead of a URL; empty outside production: the local stack's "
        "(`APP_AUTH_KEY_DIR`/jwks.json, made by `make up` or `cqrs auth token`)",
    )
    auth_key_dir: str = Field(
        default="",
        description="where the local stack's signing key and JWKS live (not for production); "
        "empty: `$XDG_CONFIG_HOME/kafka-cqrs/auth` (`~/.config/kafka-cqrs/auth`)",
    )
    cluster_secret: str = Field(
        default="",
        description="what API instances and processors show each other when forwarding a command; "
        "required in production; empty elsewhere: one made in the local key folder",
    )
    auth_leeway_s: int = Field(default=30, ge=0, le=300, description="clock skew allowed on exp and nbf")
    auth_jwks_refresh_min_s: float = Field(
        default=30.0,
        gt=0,
        description="a token with an unknown `kid` reloads the JWKS at most this often (a bound: "
        "made-up kids cannot make the API hammer the provider)",
    )
    auth_jwks_ttl_s: float = Field(default=3600.0, gt=0, description="how long a fetched JWKS is kept")
    auth_tenant_claim: str = Field(default="tenant", description="the token claim naming the caller's tenant")
    auth_roles_claim: str = Field(
        default="roles", description="the token claim listing the caller's roles (a list, or one name)"
    )
    auth_key_cache_s: float = Field(
        default=1.0,
        gt=0,
        le=60,
        description="how long an API process trusts what it read of an API key (a revoked key stops "
        "working within this, in every process; at once in the one that revoked it)",
    )
    auth_key_ttl_days: int = Field(default=90, ge=1, le=3650, description="default lifetime of an API key")
    auth_ticket_ttl_s: int = Field(
        default=30, ge=1, le=600, description="how long a stream ticket (for EventSource) may wait for use"
    )
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="origins browsers may call the API from (comma-separated)"
    )
    rate_limits: Annotated[dict[str, int], NoDecode] = Field(
        default_factory=lambda: {"platform": 0, "admin": 0, "operator": 1000, "viewer": 1000},
        description="requests per window by role, e.g. `operator=1000,viewer=1000,admin=0` (0: no "
        "limit); a principal with several roles gets the largest (seed 001: users 1,000 an hour, "
        "admins unlimited)",
    )
    rate_limit_window_s: int = Field(default=3600, ge=1, description="the window of the rate limits")
    rate_limit_when_redis_down: Literal["allow", "refuse"] = Field(
        default="allow",
        description="what a request gets while Redis (which counts) is unreachable: `allow` (default: "
        "an outage of the counter must not become an outage of the API; authentication and "
        "permissions still hold, and the outage is logged) or `refuse` (503 with Retry-After)",
    )
    audit_topic_suffix: str = Field(default="audit", description="audit records go to `<prefix>.<this>`")

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _origins(cls, value: object) -> object:
        if isinstance(value, str):
            return [o.strip() for o in value.split(",") if o.strip()]
        return value

    @field_validator("rate_limits", mode="before")
    @classmethod
    def _limits(cls, value: object) -> object:
        if isinstance(value, str):
            pairs = [p.split("=", 1) for p in value.split(",") if p.strip()]
            if any(len(p) != 2 for p in pairs):
                raise ValueError("APP_RATE_LIMITS is `role=count,...`")
            return {k.strip(): int(v) for k, v in pairs}
        return value

    @field_validator("webhook_allowed_networks", mode="before")
    @classmethod
    def _networks(cls, value: object) -> object:
        import ipaddress

        if isinstance(value, str):
            value = [n.strip() for n in value.split(",") if n.strip()]
        if isinstance(value, list):
            for n in value:
                ipaddress.ip_network(n, strict=False)  # a ValueError names the bad one
        return value

    @field_validator("webhook_retry_s", mode="before")
    @classmethod
    def _retries(cls, value: object) -> object:
        if isinstance(value, str):
            value = [float(v) for v in value.split(",") if v.strip()]
        if isinstance(value, list) and (not value or any(float(v) < 0 for v in value) or len(value) > 30):
            raise ValueError("APP_WEBHOOK_RETRY_S is 1 to 30 pauses of 0 s or more")
        return value

    @field_validator("projection_modules", mode="before")
    @classmethod
    def _comma_separated(cls, value: object) -> object:
        if isinstance(value, str):
            return [m.strip() for m in value.split(",") if m.strip()]
        return value

    @model_validator(mode="after")
    def _catch_up_beyond_the_bulk_path(self) -> Settings:
        # a catch-up hands over at rebuild_bulk_until_behind: starting one at or below
        # that would hand a worker a lag that starts the next catch-up at once
        if 0 < self.projection_catch_up_behind <= self.rebuild_bulk_until_behind:
            raise ValueError(
                "APP_PROJECTION_CATCH_UP_BEHIND must be 0 or above APP_REBUILD_BULK_UNTIL_BEHIND "
                f"({self.projection_catch_up_behind} <= {self.rebuild_bulk_until_behind})"
            )
        return self

    @model_validator(mode="after")
    def _windows_and_service_levels_are_coherent(self) -> Settings:
        if self.quality_window_hopping_s % self.quality_window_hop_s:
            raise ValueError("APP_QUALITY_WINDOW_HOP_S must divide APP_QUALITY_WINDOW_HOPPING_S")
        if self.quality_restored_rate >= self.quality_degraded_rate:
            raise ValueError("APP_QUALITY_RESTORED_RATE must be below APP_QUALITY_DEGRADED_RATE")
        priorities = {"low", "medium", "high", "critical"}
        for name, sla in (("ASSIGN", self.incident_sla_assign_s), ("RESOLVE", self.incident_sla_resolve_s)):
            if set(sla) != priorities or any(not v > 0 for v in sla.values()):
                raise ValueError(
                    f"APP_INCIDENT_SLA_{name}_S gives positive seconds for each of {sorted(priorities)}"
                )
        return self

    @model_validator(mode="after")
    def _refuse_unsafe_production_defaults(self) -> Settings:
        if self.environment != "production":
            return self
        problems = []
        if "app:app@" in self.postgres_dsn:
            problems.append("APP_POSTGRES_DSN uses the local stack's password")
        for name in ("kafka_bootstrap", "postgres_dsn", "opensearch_url", "redis_url"):
            if "127.0.0.1" in getattr(self, name) or "localhost" in getattr(self, name):
                problems.append(f"APP_{name.upper()} points at loopback")
        if self.auth_issuer == LOCAL_ISSUER:
            problems.append("APP_AUTH_ISSUER is not set (the local stack's issuer is refused)")
        if not (self.auth_jwks_url or self.auth_jwks_file or self.auth_issuer.startswith("https://")):
            problems.append("no JWKS: set APP_AUTH_JWKS_URL, APP_AUTH_JWKS_FILE or an https issuer")
        if len(self.cluster_secret) < 32:
            problems.append("APP_CLUSTER_SECRET unset or shorter than 32 characters")
        if len(self.webhook_signing_key) < 32:
            problems.append("APP_WEBHOOK_SIGNING_KEY unset or shorter than 32 characters")
        if self.replication_factor < 3:
            problems.append("APP_REPLICATION_FACTOR below 3")
        if problems:
            raise ValueError("unsafe production settings: " + "; ".join(problems))
        return self


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once."""
    return Settings()
