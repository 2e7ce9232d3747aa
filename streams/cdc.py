"""Change data capture: Debezium's PostgreSQL connector on Kafka Connect reads the changes
of a database we do not own, and a CDC job (a stream-processing job, `streams.jobs`)
turns them into commands.

The source (`Source`, from the `APP_CDC_*` settings) is one table of one database. The
project keeps what the connector needs there and in Connect (`ensure`):

- the topic the change events go to, `<prefix>.cdc.<source>.<schema>.<table>`, with the
  events topics' partition count (Connect's default partitioner hashes the row's key, so
  every change of a row is in one partition, in commit order);
- the publication `<prefix>_<source>` for the table (made as the source's role, which
  owns the table: Debezium is told not to make one);
- the connector `<prefix>.<source>` (pgoutput, JSON without schemas, an initial snapshot
  of the rows already there, a heartbeat so a quiet source still confirms its position).
  Debezium creates the replication slot `<prefix>_<source>` on its first start and keeps
  it (it is dropped only by `remove`): a restarted connector resumes from its committed
  offset, and the source keeps the WAL it has not confirmed yet.

`status` is what `cqrs cdc status` and `GET /api/v1/admin/cdc` show: the connector's and
its task's state (with the error trace of a failed task), how far it is behind the
source (the source's current LSN against the slot's confirmed one and the offset
Connect committed), the CDC job's consumer lag, and whether the job halted.

A change event (`Change`) is the JSON value Debezium writes: `before`, `after`, `op`
(`r` read by the snapshot, `c` create, `u` update, `d` delete), and `source` with the
change's LSN. Values of unchanged TOASTed columns arrive as a placeholder
(`UNAVAILABLE`): a consumer keeps what it had for them.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

import aiohttp
import asyncpg
import orjson
from aiokafka.admin import NewTopic
from aiokafka.structs import TopicPartition
from redis.asyncio import Redis
from redis.exceptions import RedisError

from shared_kernel import kafka
from shared_kernel.settings import Settings
from shared_kernel.topics import DAY_MS, ensure_topics

log = logging.getLogger(__name__)

UNAVAILABLE = "__debezium_unavailable_value"  # an unchanged TOASTed column's value
CONNECT_TIMEOUT_S = 5
JOB = "legacy-catalog"  # the job that consumes the source (streams.datasets.legacy_catalog)


class ConnectUnavailable(RuntimeError):
    """Kafka Connect's REST API does not answer (or answers with a server error)."""


class ConnectRefused(RuntimeError):
    """Kafka Connect refused a request (a bad connector config, an unknown connector)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"Kafka Connect answered {status}: {message}")
        self.status = status


@dataclass(frozen=True)
class Source:
    """One captured table and the names the project gives what captures it."""

    name: str
    dsn: str
    schema: str
    table: str
    tenant: str
    prefix: str
    heartbeat_ms: int

    @classmethod
    def of(cls, settings: Settings, name: str = "legacy") -> Source:
        schema, table = settings.cdc_source_table.split(".")
        return cls(
            name=name,
            dsn=settings.cdc_source_dsn,
            schema=schema,
            table=table,
            tenant=settings.cdc_tenant,
            prefix=settings.topic_prefix,
            heartbeat_ms=settings.cdc_heartbeat_ms,
        )

    @property
    def qualified_table(self) -> str:
        return f"{self.schema}.{self.table}"

    @property
    def connector(self) -> str:
        return f"{self.prefix}.{self.name}"

    @property
    def slot(self) -> str:
        """The replication slot's and the publication's name (PostgreSQL: [a-z0-9_], 63)."""
        return re.sub(r"[^a-z0-9_]", "_", f"{self.prefix}_{self.name}".lower())[:63]

    @property
    def topic_prefix(self) -> str:
        return f"{self.prefix}.cdc.{self.name}"

    @property
    def topic(self) -> str:
        return f"{self.topic_prefix}.{self.schema}.{self.table}"

    def connector_config(self) -> dict[str, str]:
        dsn = urlsplit(self.dsn)
        return {
            "connector.class": "io.debezium.connector.postgresql.PostgresConnector",
            "tasks.max": "1",
            "plugin.name": "pgoutput",
            "database.hostname": dsn.hostname or "127.0.0.1",
            "database.port": str(dsn.port or 5432),
            "database.user": unquote(dsn.username or ""),
            "database.password": unquote(dsn.password or ""),
            "database.dbname": dsn.path.lstrip("/"),
            "topic.prefix": self.topic_prefix,
            "table.include.list": self.qualified_table.replace(".", "\\."),
            "publication.name": self.slot,
            "publication.autocreate.mode": "disabled",
            "slot.name": self.slot,
            "slot.drop.on.stop": "false",
            "snapshot.mode": "initial",
            "tombstones.on.delete": "false",
            "decimal.handling.mode": "string",
            # Debezium hands its queue to Connect every poll interval (500 ms by default):
            # a change waited for it half the time, on average 250 ms of its latency
            "poll.interval.ms": "50",
            "heartbeat.interval.ms": str(self.heartbeat_ms),
            "topic.heartbeat.prefix": f"{self.prefix}.cdc-heartbeat",
            # a failed task retries its connection for a while before it gives up
            "errors.max.retries": "-1",
        }


@dataclass(frozen=True)
class Change:
    """One Debezium change event of a row."""

    op: str  # r, c, u, d
    key: str  # the row's primary key (several columns: joined by "/")
    before: dict[str, Any] | None
    after: dict[str, Any] | None
    lsn: int
    snapshot: bool
    committed_ms: int  # when the source committed it (the snapshot's time for a read)

    @classmethod
    def parse(cls, key: bytes | None, value: bytes) -> Change:
        """A change event's record; ValueError when it is not one."""
        try:
            body, ident = orjson.loads(value), orjson.loads(key) if key else None
        except orjson.JSONDecodeError as exc:
            raise ValueError(f"not JSON: {exc}") from exc
        if not isinstance(body, dict) or body.get("op") not in ("r", "c", "u", "d"):
            raise ValueError("not a Debezium change event (no op r, c, u or d)")
        source = body.get("source")
        if not isinstance(source, dict) or not isinstance(source.get("lsn"), int):
            raise ValueError("the change event has no source LSN")
        if not isinstance(ident, dict) or not ident:
            raise ValueError("the change event has no row key")
        before, after = body.get("before"), body.get("after")
        if body["op"] == "d" and not isinstance(before, dict):
            raise ValueError("a delete without its row's key columns")
        if body["op"] != "d" and not isinstance(after, dict):
            raise ValueError(f"a change (op {body['op']}) without the row after it")
        return cls(
            op=body["op"],
            key="/".join(str(v) for v in ident.values()),
            before=before,
            after=after,
            lsn=source["lsn"],
            snapshot=source.get("snapshot") not in (None, "false", False),
            committed_ms=int(source.get("ts_ms") or 0),
        )


def lsn_int(text: str | None) -> int | None:
    """PostgreSQL's `X/Y` LSN as the integer Debezium writes."""
    if not text:
        return None
    high, _, low = text.partition("/")
    return (int(high, 16) << 32) + int(low, 16)


class Connect:
    """Kafka Connect's REST API, for one connector."""

    def __init__(self, url: str, connector: str) -> None:
        self.url = url.rstrip("/")
        self.connector = connector

    async def _call(self, method: str, path: str, body: Any = None) -> Any:
        timeout = aiohttp.ClientTimeout(total=CONNECT_TIMEOUT_S)
        try:
            async with (
                aiohttp.ClientSession(timeout=timeout) as session,
                session.request(
                    method,
                    f"{self.url}{path}",
                    data=b"" if body is None else orjson.dumps(body),
                    headers={"Content-Type": "application/json", "Accept": "application/json"},
                ) as resp,
            ):
                text = await resp.text()
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise ConnectUnavailable(f"Kafka Connect at {self.url} does not answer: {exc!r}") from exc
        if resp.status >= 500:
            raise ConnectUnavailable(f"Kafka Connect answered {resp.status}: {text[:500]}")
        if resp.status >= 400:
            try:
                message = orjson.loads(text).get("message", text)
            except (orjson.JSONDecodeError, AttributeError):
                message = text
            raise ConnectRefused(resp.status, str(message)[:2000])
        return orjson.loads(text) if text.strip() else None

    async def _get(self, what: str) -> Any:
        """GET /connectors/<name>/<what>; None when there is no such connector."""
        try:
            return await self._call("GET", f"/connectors/{self.connector}/{what}")
        except ConnectRefused as exc:
            if exc.status == 404:
                return None
            raise

    async def status(self) -> dict[str, Any] | None:
        """The connector's and its tasks' states; None when there is no such connector."""
        found: dict[str, Any] | None = await self._get("status")
        return found

    async def config(self) -> dict[str, str] | None:
        found: dict[str, str] | None = await self._get("config")
        return found

    async def put_config(self, config: dict[str, str]) -> None:
        await self._call("PUT", f"/connectors/{self.connector}/config", config)

    async def offsets(self) -> list[dict[str, Any]]:
        try:
            found = await self._call("GET", f"/connectors/{self.connector}/offsets")
        except ConnectRefused:
            return []
        return list((found or {}).get("offsets") or [])

    async def pause(self) -> None:
        await self._call("PUT", f"/connectors/{self.connector}/pause")

    async def resume(self) -> None:
        await self._call("PUT", f"/connectors/{self.connector}/resume")

    async def restart(self) -> None:
        await self._call("POST", f"/connectors/{self.connector}/restart?includeTasks=true&onlyFailed=false")

    async def delete(self) -> None:
        try:
            await self._call("DELETE", f"/connectors/{self.connector}")
        except ConnectRefused as exc:
            if exc.status != 404:
                raise


def connect_of(settings: Settings, source: Source | None = None) -> Connect:
    return Connect(settings.cdc_connect_url, (source or Source.of(settings)).connector)


def change_topic(settings: Settings, source: Source) -> NewTopic:
    """The change events' topic: as many partitions as the events topics; a week kept."""
    return NewTopic(
        source.topic,
        settings.partitions,
        settings.replication_factor,
        topic_configs={
            "cleanup.policy": "delete",
            "retention.ms": str(7 * DAY_MS),
            "max.message.bytes": str(settings.kafka_max_message_bytes),
        },
    )


async def ensure_publication(source: Source) -> None:
    """The publication of the table, made (or given the table) as the source's role."""
    conn = await asyncpg.connect(source.dsn, timeout=10)
    try:
        found = await conn.fetchval("SELECT 1 FROM pg_publication WHERE pubname = $1", source.slot)
        table = f'"{source.schema}"."{source.table}"'
        if not found:
            await conn.execute(f'CREATE PUBLICATION "{source.slot}" FOR TABLE {table}')
            log.info("publication created", extra={"publication": source.slot, "table": table})
            return
        has = await conn.fetchval(
            "SELECT 1 FROM pg_publication_tables WHERE pubname = $1 AND schemaname = $2 AND tablename = $3",
            source.slot,
            source.schema,
            source.table,
        )
        if not has:
            await conn.execute(f'ALTER PUBLICATION "{source.slot}" ADD TABLE {table}')
    finally:
        await conn.close()


async def ensure(settings: Settings, source: Source | None = None) -> bool:
    """The topic, the publication and the connector, as the settings say; True when the
    connector's config was (re)written."""
    source = source or Source.of(settings)
    await ensure_topics(settings, [change_topic(settings, source)])
    await ensure_publication(source)
    connect = connect_of(settings, source)
    wanted = {**source.connector_config(), "name": source.connector}
    current = await connect.config()
    if current == wanted:
        return False
    await connect.put_config(wanted)
    log.info(
        "CDC connector configured",
        extra={"connector": source.connector, "table": source.qualified_table, "topic": source.topic},
    )
    return True


async def remove(settings: Settings, source: Source | None = None) -> None:
    """The connector, its slot and its publication, gone (the change topic is kept)."""
    source = source or Source.of(settings)
    await connect_of(settings, source).delete()
    conn = await asyncpg.connect(source.dsn, timeout=10)
    try:
        deadline = time.monotonic() + 30
        while True:  # the slot is dropped once the connector's task let go of it
            active = await conn.fetchval(
                "SELECT active FROM pg_replication_slots WHERE slot_name = $1", source.slot
            )
            if active is None:
                break
            if not active:
                await conn.execute("SELECT pg_drop_replication_slot($1)", source.slot)
                break
            if time.monotonic() > deadline:
                raise ConnectUnavailable(f"the replication slot {source.slot} is still in use")
            await asyncio.sleep(0.2)
        await conn.execute(f'DROP PUBLICATION IF EXISTS "{source.slot}"')
    finally:
        await conn.close()


async def source_position(source: Source) -> dict[str, Any]:
    """The source's current LSN and the slot's: what the connector confirmed."""
    conn = await asyncpg.connect(source.dsn, timeout=5)
    try:
        current = await conn.fetchval("SELECT pg_current_wal_lsn()::text")
        slot = await conn.fetchrow(
            "SELECT active, confirmed_flush_lsn::text AS confirmed FROM pg_replication_slots "
            "WHERE slot_name = $1",
            source.slot,
        )
    finally:
        await conn.close()
    return {
        "current_lsn": current,
        "slot": None if slot is None else {"name": source.slot, "active": slot["active"]},
        "confirmed_lsn": None if slot is None else slot["confirmed"],
    }


async def job_lag(settings: Settings, source: Source) -> dict[str, Any]:
    """The CDC job's consumer group against the change topic's ends."""
    group = f"{settings.topic_prefix}.job.{JOB}"
    admin = kafka.admin(settings)
    consumer = kafka.consumer(settings)
    await admin.start()
    await consumer.start()
    try:
        committed = await admin.list_consumer_group_offsets(group)
        parts = sorted(consumer.partitions_for_topic(source.topic) or [])
        if not parts:
            await consumer._client.force_metadata_update()
            parts = sorted(consumer.partitions_for_topic(source.topic) or [])
        tps = [TopicPartition(source.topic, p) for p in parts]
        ends = await consumer.end_offsets(tps) if tps else {}
    finally:
        await consumer.stop()
        await admin.close()
    behind = 0
    for tp, end in ends.items():
        meta = committed.get(tp)
        behind += max(0, end - (meta.offset if meta is not None and meta.offset >= 0 else 0))
    return {"group": group, "topic": source.topic, "events_behind": behind}


def _first_line(trace: Any) -> str:
    """A Java stack trace's first line: the exception and its message."""
    lines = str(trace or "").splitlines()
    return lines[0] if lines else ""


async def status(settings: Settings, redis: Redis | None = None) -> dict[str, Any]:
    """Everything an operator asks of the capture, each part answered on its own (a part
    that cannot be read says why instead)."""
    from streams.jobs import halted as halted_of

    source = Source.of(settings)
    connect = connect_of(settings, source)
    out: dict[str, Any] = {
        "source": {
            "name": source.name,
            "table": source.qualified_table,
            "database": urlsplit(source.dsn).path.lstrip("/"),
            "tenant": source.tenant,
            "topic": source.topic,
        },
        "errors": [],
    }
    try:
        found = await connect.status()
        if found is None:
            out["connector"] = {"name": source.connector, "state": "MISSING"}
            out["errors"].append(f"no connector {source.connector} (the CDC job's start creates it)")
        else:
            tasks = [
                {k: t.get(k) for k in ("id", "state", "worker_id", "trace") if t.get(k) is not None}
                for t in found.get("tasks", [])
            ]
            out["connector"] = {
                "name": source.connector,
                "state": found["connector"]["state"],
                "worker": found["connector"].get("worker_id"),
                "tasks": tasks,
            }
            out["errors"] += [
                f"task {t['id']} FAILED: {_first_line(t.get('trace'))}"
                for t in tasks
                if t["state"] == "FAILED"
            ]
            if found["connector"].get("trace"):
                out["errors"].append(_first_line(found["connector"]["trace"]))
        committed = None
        for entry in await connect.offsets():
            lsn = (entry.get("offset") or {}).get("lsn")
            if isinstance(lsn, int):
                committed = max(committed or 0, lsn)
    except ConnectUnavailable as exc:
        out["connector"] = {"name": source.connector, "state": "UNREACHABLE"}
        out["errors"].append(str(exc))
        committed = None
    try:
        position = await source_position(source)
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        out["errors"].append(f"the source database does not answer: {exc!r}")
        position = {"current_lsn": None, "slot": None, "confirmed_lsn": None}
    current, confirmed = lsn_int(position["current_lsn"]), lsn_int(position["confirmed_lsn"])
    out["lag"] = {
        "source_lsn": position["current_lsn"],
        "confirmed_lsn": position["confirmed_lsn"],
        "committed_lsn": committed,
        "bytes_behind": None if current is None or confirmed is None else max(0, current - confirmed),
    }
    out["slot"] = position["slot"]
    try:
        out["job"] = await job_lag(settings, source)
    except Exception as exc:  # Kafka away: the rest still answers
        out["job"] = {"group": f"{settings.topic_prefix}.job.{JOB}", "events_behind": None}
        out["errors"].append(f"the CDC job's lag is unknown: {exc!r}")
    halted = None
    if redis is not None:
        try:
            halted = await halted_of(redis, settings.topic_prefix, JOB)
        except (RedisError, OSError) as exc:
            out["errors"].append(f"whether the CDC job halted is unknown: {exc!r}")
    out["job"]["halted"] = halted
    if halted:
        out["errors"].append(f"the CDC job halted: {halted.get('error')}")
    return out
