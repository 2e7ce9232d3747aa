"""S6, rebuilds: `cqrs projections rebuild` over a million events, beside the pipelined
limit (raw consume -> COPY / `_bulk`) and the `eventsourcing` library's projection
runner rebuilding an equivalent read model from the same events on PostgreSQL.

Under an isolated prefix, `BENCH_S6_EVENTS` (default 1,000,000) realistic dataset events
are produced to `<prefix>.events.datasets` (6 partitions) by `bench.generator`: made by
the real aggregate, 20 per dataset, 500 datasets changing at any time, so each
dataset's events are spread over the log as they are in production.

- **ours**: `cqrs projections rebuild NAME` for `events` (the archive, one row per
  event), `datasets` (one row per dataset, folded) and `datasets_search` (OpenSearch),
  each as a process of its own, timed from its spawn to its exit: registering the new
  version, the bulk replays (`APP_REBUILD_LANES`), the Faust worker that takes over, the
  swap and the hand-over all count. Its CPU (the CLI, its replays and its worker) is
  read with `getrusage` of the waited children.
- **limit (PostgreSQL)**: in this process, a consumer (read_committed, no group) reads
  every partition from offset 0, decodes each record as the projector does (Avro and
  headers) into the archive's row, and `COPY`s batches of `rebuild_batch_max` rows into
  a table like `events_v1` (same keys and indexes). Pipelined: the next batch is fetched
  and decoded while the previous one is copied.
- **limit (OpenSearch)**: the same reader; each batch is indexed by one `_bulk` (no
  refresh, external versioning) into an index with the projection's settings, one
  document per aggregate of the batch (its last event's payload: a fold writes as many
  documents), pipelined the same way.
- **peer**: the events, read back from Kafka and turned into the aggregate's own domain
  events, are first stored in the `eventsourcing` PostgreSQL application recorder
  (untimed). Then its `ProjectionRunner` runs a `Projection` whose view (a
  `PostgresTrackingRecorder`) keeps a `datasets` table of the same columns, one SQL
  statement per event and its tracking record in the same transaction: what the
  library's documentation shows. It is timed until its tracking id reaches the last
  notification id, or for `BENCH_S6_PEER_S` seconds (default 300; 0: to the end, which
  for a million events takes it many times as long as ours), its time for the rest then
  extrapolated from its rate over the second half of that window (said in the result).

`ratio_vs_limit` = limit time / our time (goal >= 0.5), for the archive against the
PostgreSQL limit and for the search index against the OpenSearch limit (the folded
`datasets` against the PostgreSQL limit is reported too); `ratio_vs_peer` = peer time /
our time for `datasets` (goal >= 3.0).
"""

from __future__ import annotations

import asyncio
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from functools import singledispatchmethod
from pathlib import Path
from typing import Any
from uuid import UUID

import asyncpg
import orjson
from aiokafka import TopicPartition

from bench.common import (
    Progress,
    backends,
    cpu_seconds,
    drop_prefix,
    end_offsets,
    host_cpu,
    isolated,
    peer_environment,
    steal_pct,
)
from bench.generator import produce_dataset_events
from bench.results import show, write
from commands import CONTEXTS
from commands.datasets import CONTEXT as DATASETS
from commands.serialization import to_domain_event
from projections.archive import EventsArchiveProjection
from projections.datasets.rows import DatasetsProjection
from projections.datasets.search import DatasetsSearch
from projections.db import init_connection, schema_name
from projections.events import Record, StoredEvent, decode
from projections.migrations import migrate
from projections.registry import PROJECTIONS
from projections.search import alias_name, search_client
from shared_kernel import kafka
from shared_kernel.avro import AvroCodec
from shared_kernel.settings import Settings
from shared_kernel.topics import Topics, contract_topics, ensure_topics
from streams.rebuild import log_path as rebuild_log

EVENTS = int(os.environ.get("BENCH_S6_EVENTS", "1000000"))
PEER_S = float(os.environ.get("BENCH_S6_PEER_S", "300"))
PER_DATASET = 20
LIVE_DATASETS = 500
PARTITIONS = 6
GOAL_VS_LIMIT = 0.5
GOAL_VS_PEER = 3.0
NAMES = ("events", "datasets", "datasets_search")
LIMIT_TABLE = "s6_limit_events"


# ---- the limits: a pipelined reader, then COPY or _bulk ---------------------------------


async def _read_decoded(
    settings: Settings,
    ends: dict[int, int],
    out: asyncio.Queue[Any],
    make: Callable[[list[StoredEvent]], Any],
) -> None:
    """Every record from offset 0, decoded, as `make(batch)` per fetched batch, into `out`."""
    topic = Topics(settings.topic_prefix).events("datasets")
    codec = AvroCodec.from_directory()
    consumer = kafka.consumer(
        settings,
        max_poll_records=settings.rebuild_batch_max,
        max_partition_fetch_bytes=8 << 20,
        fetch_max_bytes=64 << 20,
    )
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in ends]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        left = sum(ends.values())
        while left > 0:
            fetched = await consumer.getmany(timeout_ms=1000)
            events: list[StoredEvent] = []
            for records in fetched.values():
                for i, r in enumerate(records):
                    events.append(
                        decode(
                            codec,
                            Record(
                                r.topic, r.partition, r.offset, r.key, r.value, list(r.headers), r.timestamp
                            ),
                        )
                    )
                    if i % 500 == 499:
                        await asyncio.sleep(0)  # the writer's round trips go on meanwhile
            if events:
                left -= len(events)
                await out.put(make(events))
    finally:
        await consumer.stop()
        await out.put(None)


async def _limit_postgres(settings: Settings, ends: dict[int, int]) -> dict[str, Any]:
    total = sum(ends.values())
    conn = await asyncpg.connect(
        settings.postgres_dsn,
        server_settings={"search_path": schema_name(settings), "application_name": "bench-s6-limit"},
    )
    await init_connection(conn)  # the JSON codecs of the projections' pool
    archive = PROJECTIONS["events"]  # as the registry has it: following every context
    assert isinstance(archive, EventsArchiveProjection)
    backend = [int(await conn.fetchval("SELECT pg_backend_pid()"))]
    await conn.execute(f"CREATE TABLE {LIMIT_TABLE} (LIKE events_v1 INCLUDING ALL)")
    queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=2)
    progress = Progress("limit (COPY)", total)
    cpu0, db0, host0 = time.process_time(), cpu_seconds(backend), host_cpu()
    started = time.monotonic()
    reader = asyncio.create_task(_read_decoded(settings, ends, queue, archive.rows))
    done = 0
    try:
        while (rows := await queue.get()) is not None:
            await conn.copy_records_to_table(
                LIMIT_TABLE, records=rows, columns=EventsArchiveProjection.columns
            )
            done += len(rows)
            progress.tick(done)
        await reader
        seconds = time.monotonic() - started
        count = int(await conn.fetchval(f"SELECT count(*) FROM {LIMIT_TABLE}"))
        return {
            "seconds": round(seconds, 2),
            "events_per_s": round(total / seconds),
            "rows": count,
            "python_cpu_us_per_event": round((time.process_time() - cpu0) * 1e6 / total, 1),
            "postgres_cpu_us_per_event": round((cpu_seconds(backend) - db0) * 1e6 / total, 1),
            "host_steal_pct": steal_pct(host0, host_cpu()),
        }
    finally:
        reader.cancel()
        await conn.close()


async def _limit_opensearch(settings: Settings, ends: dict[int, int]) -> dict[str, Any]:
    total = sum(ends.values())
    index = f"{alias_name(settings, 'limit')}-s6"
    client = search_client(settings)
    await client.indices.create(index=index, body={"settings": DatasetsSearch.mapping["settings"]})

    def bulk_body(events: list[StoredEvent]) -> tuple[bytes, int]:
        last: dict[str, StoredEvent] = {}
        for e in events:
            last[e.meta.aggregate_id] = e
        lines: list[bytes] = []
        for key, e in last.items():
            lines.append(
                orjson.dumps({"index": {"_id": key, "version": e.version, "version_type": "external"}})
            )
            lines.append(orjson.dumps({"type": e.type_name, "version": e.version, **e.payload}))
        return b"\n".join(lines) + b"\n", len(events)

    queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=2)
    progress = Progress("limit (_bulk)", total)
    cpu0, host0 = time.process_time(), host_cpu()
    started = time.monotonic()
    reader = asyncio.create_task(_read_decoded(settings, ends, queue, bulk_body))
    done = docs = errors = 0
    try:
        while (item := await queue.get()) is not None:
            body, n = item
            result = await client.bulk(body=body, index=index, refresh="false")
            docs += len(result["items"])
            errors += sum(1 for it in result["items"] if it["index"].get("status", 200) >= 300)
            done += n
            progress.tick(done)
        await reader
        seconds = time.monotonic() - started
        return {
            "seconds": round(seconds, 2),
            "events_per_s": round(total / seconds),
            "documents_written": docs,
            "refused": errors,
            "python_cpu_us_per_event": round((time.process_time() - cpu0) * 1e6 / total, 1),
            "host_steal_pct": steal_pct(host0, host_cpu()),
        }
    finally:
        reader.cancel()
        await client.indices.delete(index=index, ignore_unavailable=True)
        await client.close()


# ---- ours: cqrs projections rebuild ------------------------------------------------------


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _phases(log_path: Path) -> dict[str, Any]:
    """What the rebuild's log says of its bulk replays."""
    lanes = []
    if log_path.exists():
        for line in log_path.read_text(errors="replace").splitlines():
            if '"replay caught up"' in line:
                entry = orjson.loads(line)
                lanes.append({k: entry.get(k) for k in ("lane", "records", "seconds")})
    return {"replays": lanes, "loading_s": max((lane["seconds"] or 0 for lane in lanes), default=None)}


async def _ours(
    settings: Settings, env: dict[str, str], name: str, total: int, workdir: Path
) -> dict[str, Any]:
    cqrs = str(Path(sys.executable).parent / "cqrs")
    out = workdir / f"rebuild-{name}.out"
    db_pids_before = set(await backends(settings, f"{env['APP_SERVICE_NAME']}%"))
    db_cpu: dict[int, float] = {}
    cpu0, host0 = _children_cpu(), host_cpu()
    started = time.monotonic()
    with out.open("wb") as sink:
        proc = subprocess.Popen(  # noqa: ASYNC220
            [cqrs, "projections", "rebuild", name], env=env, stdout=sink, stderr=subprocess.STDOUT
        )
    conn = await asyncpg.connect(
        settings.postgres_dsn, server_settings={"search_path": schema_name(settings)}
    )
    swapped: float | None = None
    sampled = 0.0
    try:
        while proc.poll() is None:
            now = time.monotonic()
            if swapped is None and await conn.fetchval(
                "SELECT count(*) FROM projection_versions WHERE projection = $1 AND version > 1 "
                "AND state = 'live'",
                name,
            ):
                swapped = now  # readers see the new version from here on
            if now - sampled > 1:
                sampled = now
                # the PostgreSQL backends of the rebuild's processes, sampled while they live
                for pid in set(await backends(settings, f"{env['APP_SERVICE_NAME']}%")) - db_pids_before:
                    db_cpu[pid] = max(db_cpu.get(pid, 0.0), cpu_seconds([pid]))
            await asyncio.sleep(0.1)
    finally:
        await conn.close()
    wall = time.monotonic() - started
    if proc.returncode != 0 or swapped is None:
        raise RuntimeError(f"the rebuild of {name} failed; see {out}:\n{out.read_text()[-3000:]}")
    seconds = swapped - started
    cpu = _children_cpu() - cpu0
    conn = await asyncpg.connect(
        settings.postgres_dsn, server_settings={"search_path": schema_name(settings)}
    )
    try:
        version = await conn.fetchrow(
            "SELECT version, extract(epoch FROM live_since - created_at) AS build_s FROM projection_versions "
            "WHERE projection = $1 AND state = 'live'",
            name,
        )
        stats = await conn.fetchrow(
            "SELECT applied, dead_lettered FROM projection_stats WHERE projection = $1 AND version = $2",
            name,
            version["version"],
        )
        if name == "datasets_search":
            async with search_client(settings) as client:
                index = alias_name(settings, "datasets")
                await client.indices.refresh(index=index)
                rows = int((await client.count(index=index))["count"])
                lo_hi = None
        else:
            table = {"events": "events", "datasets": "datasets"}[name]
            check = await conn.fetchrow(
                f"SELECT count(*) AS n, min(version) AS lo, max(version) AS hi FROM {table}"
            )
            rows, lo_hi = int(check["n"]), [check["lo"], check["hi"]]
    finally:
        await conn.close()
    log = rebuild_log(settings, name, version["version"])
    return {
        "seconds": round(seconds, 2),
        "seconds_is": "from spawning `cqrs projections rebuild` to the swap (readers see the new version)",
        "events_per_s": round(total / seconds),
        "wall_s_with_hand_over": round(wall, 2),
        "version": version["version"],
        "build_s_registered_to_live": round(float(version["build_s"]), 2),
        **_phases(log),
        "applied": stats["applied"] if stats else None,
        "dead_lettered": stats["dead_lettered"] if stats else None,
        "rows_or_documents": rows,
        "row_versions": lo_hi,
        "python_cpu_us_per_event": round(cpu * 1e6 / total, 1),
        "postgres_cpu_us_per_event": round(sum(db_cpu.values()) * 1e6 / total, 1),
        "host_steal_pct": steal_pct(host0, host_cpu()),
        "last_output_line": (out.read_text(errors="replace").strip().splitlines() or [""])[-1][:300],
    }


# ---- peer: the eventsourcing library's ProjectionRunner on PostgreSQL ------------------


def _peer_env(settings: Settings, schema: str) -> dict[str, str]:
    return {**peer_environment(settings, pool=2), "POSTGRES_SCHEMA": schema}


def _peer_classes(app_name: str, view_name: str, schema: str) -> tuple[type[Any], type[Any], type[Any]]:
    """What a user of the library writes for this read model (see its projection docs)."""
    from eventsourcing.application import Application
    from eventsourcing.persistence import Tracking
    from eventsourcing.postgres import PostgresTrackingRecorder
    from eventsourcing.projection import Projection
    from psycopg.sql import SQL, Identifier

    class PeerApp(Application[UUID]):
        name = app_name

    class DatasetsView(PostgresTrackingRecorder):
        """The datasets table, changed by one statement per event with its tracking."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.table = SQL("{0}.{1}").format(Identifier(self.datastore.schema), Identifier(view_name))
            # the same table and indexes as ours (`datasets_vN`), in the peer's schema
            self.sql_create_statements.append(SQL("SET LOCAL search_path TO {0}").format(Identifier(schema)))
            for statement in DatasetsProjection.ddl.format(table=view_name).split(";"):
                if statement.strip():
                    self.sql_create_statements.append(SQL(statement))  # type: ignore[arg-type]

        def change(self, statement: str, params: dict[str, Any], tracking: Tracking) -> None:
            with self.datastore.transaction(commit=True) as curs:
                curs.execute(SQL(statement).format(t=self.table), params, prepare=True)
                self._insert_tracking(curs, tracking)

    def jsonb(value: Any) -> str:
        return orjson.dumps(value).decode()

    class DatasetsProjection_(Projection[DatasetsView]):
        name = view_name

        @singledispatchmethod
        def process_event(self, event: Any, tracking: Tracking) -> None:
            self.view.insert_tracking(tracking)

        @process_event.register(DATASETS.events["datasets.DatasetRegistered"])
        def _(self, e: Any, tracking: Tracking) -> None:
            self.view.change(
                "INSERT INTO {t} (id, version, name, description, owner, status, tags, metadata, "
                "latest_version, versions, quality, archived_reason, created_at, updated_at) "
                "VALUES (%(id)s, %(v)s, %(name)s, %(description)s, %(owner)s, 'active', "
                '%(tags)s, %(metadata)s::jsonb, NULL, 0, \'{{"checks": 0, "passed": 0, "metrics": {{}}}}\', '
                "NULL, %(at)s, %(at)s) ON CONFLICT DO NOTHING",
                {
                    "id": e.originator_id,
                    "v": e.originator_version,
                    "name": e.name,
                    "description": e.description,
                    "owner": e.owner,
                    "tags": list(e.tags),
                    "metadata": jsonb({k: orjson.loads(v) for k, v in e.metadata.items()}),
                    "at": e.timestamp,
                },
                tracking,
            )

        def _update(self, sets: str, e: Any, tracking: Tracking, **params: Any) -> None:
            self.view.change(
                f"UPDATE {{t}} SET {sets}, version = %(v)s, updated_at = %(at)s "
                "WHERE id = %(id)s AND version < %(v)s",
                {"id": e.originator_id, "v": e.originator_version, "at": e.timestamp, **params},
                tracking,
            )

        @process_event.register(DATASETS.events["datasets.DatasetDescribed"])
        def _(self, e: Any, tracking: Tracking) -> None:
            self._update("name = %(name)s, description = %(d)s", e, tracking, name=e.name, d=e.description)

        @process_event.register(DATASETS.events["datasets.MetadataSet"])
        def _(self, e: Any, tracking: Tracking) -> None:
            self._update(
                "metadata = metadata || jsonb_build_object(%(k)s::text, %(val)s::jsonb)",
                e,
                tracking,
                k=e.key,
                val=e.value_json,
            )

        @process_event.register(DATASETS.events["datasets.MetadataRemoved"])
        def _(self, e: Any, tracking: Tracking) -> None:
            self._update("metadata = metadata - %(k)s::text", e, tracking, k=e.key)

        @process_event.register(DATASETS.events["datasets.VersionPublished"])
        def _(self, e: Any, tracking: Tracking) -> None:
            self._update("latest_version = %(lv)s, versions = versions + 1", e, tracking, lv=e.version)

        @process_event.register(DATASETS.events["datasets.QualityCheckRecorded"])
        def _(self, e: Any, tracking: Tracking) -> None:
            metric = {
                "value": e.value,
                "threshold": e.threshold,
                "comparator": e.comparator,
                "passed": e.passed,
                "recorded_at": e.timestamp.isoformat(),
            }
            self._update(
                "quality = jsonb_build_object('checks', (quality->>'checks')::int + 1, "
                "'passed', (quality->>'passed')::int + %(p)s, "
                "'metrics', (quality->'metrics') || jsonb_build_object(%(m)s::text, %(mv)s::jsonb))",
                e,
                tracking,
                p=1 if e.passed else 0,
                m=e.metric,
                mv=jsonb(metric),
            )

        @process_event.register(DATASETS.events["datasets.DatasetArchived"])
        def _(self, e: Any, tracking: Tracking) -> None:
            self._update("status = 'archived', archived_reason = %(r)s", e, tracking, r=e.reason)

    return PeerApp, DatasetsProjection_, DatasetsView


async def _peer(settings: Settings, ends: dict[int, int], schema: str) -> dict[str, Any]:
    from eventsourcing.projection import ProjectionRunner

    total = sum(ends.values())
    suffix = uuid.uuid4().hex[:6]
    app_class, projection_class, view_class = _peer_classes(
        f"s6peer{suffix}", f"s6peer{suffix}_datasets", schema
    )
    env = _peer_env(settings, schema)
    app = app_class(env=env)
    progress = Progress("peer: storing the events in its recorder (untimed)", total)
    stored = 0

    def store(events: list[StoredEvent]) -> list[Any]:
        return [app.mapper.to_stored_event(to_domain_event(DATASETS, e.meta, e.payload)) for e in events]

    queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=2)
    reader = asyncio.create_task(_read_decoded(settings, ends, queue, store))
    try:
        while (batch := await queue.get()) is not None:
            await asyncio.to_thread(app.recorder.insert_events, batch)
            stored += len(batch)
            progress.tick(stored)
        await reader
    finally:
        reader.cancel()
    last_id = app.recorder.max_notification_id()
    app.close()
    print(f"  peer: {stored:,} events stored (last notification id {last_id}); projecting", flush=True)

    def project() -> tuple[int, float, float]:
        started = time.monotonic()
        done = 0
        halfway: tuple[float, int] | None = None  # the rate after it has warmed up
        with ProjectionRunner(
            application_class=app_class, projection_class=projection_class, view_class=view_class, env=env
        ) as runner:
            view = runner.projection.view
            ticker = Progress("peer: projecting", total)
            while True:
                done = view.max_tracking_id(runner.app_name) or 0
                ticker.tick(done)
                if done >= last_id:
                    break
                if PEER_S and halfway is None and time.monotonic() - started > PEER_S / 2:
                    halfway = (time.monotonic(), done)
                if PEER_S and time.monotonic() - started > PEER_S:
                    break
                runner.run_forever(timeout=0.5)  # raises the projection's error, if any
        now = time.monotonic()
        recent = (done - halfway[1]) / (now - halfway[0]) if halfway else done / (now - started)
        return done, now - started, recent

    cpu_before = time.process_time()  # the runner's threads are this process's
    done, seconds, recent_rate = await asyncio.to_thread(project)
    python_cpu = time.process_time() - cpu_before
    conn = await asyncpg.connect(settings.postgres_dsn)
    try:
        table = f'"{schema}".s6peer{suffix}_datasets'
        rows = await conn.fetchrow(
            f"SELECT count(*) AS n, min(version) AS lo, max(version) AS hi FROM {table}"
        )
    finally:
        await conn.close()
    complete = done >= last_id
    return {
        "events_projected": done,
        "seconds_measured": round(seconds, 2),
        "events_per_s": round(done / seconds),
        "events_per_s_second_half": round(recent_rate),
        # the rest at the rate of the second half of the window (warmed up): linear, since
        # every event costs the peer the same (one transaction)
        "seconds": round(seconds if complete else seconds + (total - done) / recent_rate, 2),
        "extrapolated": not complete,
        "rows": int(rows["n"]),
        "row_versions": [rows["lo"], rows["hi"]],
        "python_cpu_us_per_event": round(python_cpu * 1e6 / max(done, 1), 1),
        "how": "eventsourcing ProjectionRunner, a PostgresTrackingRecorder view: one transaction per event",
    }


# ---- the run -----------------------------------------------------------------------------


async def _cleanup(settings: Settings) -> None:
    groups = [f"{settings.topic_prefix}.projection.{n}.v{v}" for n in NAMES for v in (1, 2)]
    await drop_prefix(settings, schema_name(settings), groups)  # topics, groups, schema, Faust's folders
    async with search_client(settings) as client:
        await client.indices.delete(index=f"{alias_name(settings, 'datasets')}-*", ignore_unavailable=True)
    for name in NAMES:
        for version in (1, 2):
            rebuild_log(settings, name, version).unlink(missing_ok=True)


async def run(base: Settings) -> dict[str, Any]:
    settings, env = isolated(base, "s6", PARTITIONS, log_level="info")  # the rebuild logs tell its phases
    prefix = settings.topic_prefix
    workdir = Path(tempfile.mkdtemp(prefix="bench-s6-"))
    ours: dict[str, dict[str, Any]] = {}
    try:
        await ensure_topics(settings, contract_topics(settings, [c.name for c in CONTEXTS], []))
        await migrate(settings)
        print(f"S6: producing {EVENTS:,} dataset events to {prefix}.events.datasets", flush=True)
        t0 = time.monotonic()
        produced = await produce_dataset_events(settings, EVENTS, PER_DATASET, live=LIVE_DATASETS)
        produce_s = time.monotonic() - t0
        ends = await end_offsets(settings)
        total = sum(ends.values())
        print("S6: limit, PostgreSQL (consume -> COPY, pipelined)", flush=True)
        limit_pg = await _limit_postgres(settings, ends)
        print("S6: limit, OpenSearch (consume -> _bulk, pipelined)", flush=True)
        limit_os = await _limit_opensearch(settings, ends)
        for name in NAMES:
            print(f"S6: ours (cqrs projections rebuild {name})", flush=True)
            ours[name] = await _ours(settings, env, name, total, workdir)
        print("S6: peer (eventsourcing ProjectionRunner on PostgreSQL)", flush=True)
        peer = await _peer(settings, ends, schema_name(settings))
    finally:
        await _cleanup(settings)
        shutil.rmtree(workdir, ignore_errors=True)

    def ratio(limit: dict[str, Any], name: str) -> float:
        return round(float(limit["seconds"]) / float(ours[name]["seconds"]), 3)

    datasets = produced // PER_DATASET
    ratios = {
        "events": ratio(limit_pg, "events"),
        "datasets": ratio(limit_pg, "datasets"),
        "datasets_search": ratio(limit_os, "datasets_search"),
    }
    vs_peer = round(float(peer["seconds"]) / float(ours["datasets"]["seconds"]), 2)
    checks = (
        ours["events"]["rows_or_documents"] == total
        and ours["datasets"]["rows_or_documents"] == datasets
        and ours["datasets"]["row_versions"] == [PER_DATASET, PER_DATASET]
        and ours["datasets_search"]["rows_or_documents"] == datasets
        and limit_pg["rows"] == total
        and not any(o["dead_lettered"] for o in ours.values())
        and (peer["extrapolated"] or peer["row_versions"] == [PER_DATASET, PER_DATASET])
    )
    result: dict[str, Any] = {
        "what": "rebuild from offset 0: cqrs projections rebuild vs pipelined consume -> COPY / _bulk, "
        "and vs the eventsourcing ProjectionRunner on PostgreSQL, same events",
        "events": produced,
        "datasets": datasets,
        "partitions": PARTITIONS,
        "lanes": settings.rebuild_lanes,
        "batch_max": settings.rebuild_batch_max,
        "produce_s": round(produce_s, 1),
        "ours": ours,
        "limit_postgres_copy": limit_pg,
        "limit_opensearch_bulk": limit_os,
        "peer_eventsourcing": peer,
        "ratio_vs_limit": ratios["events"],
        "ratio_vs_limit_search": ratios["datasets_search"],
        "ratio_vs_limit_datasets": ratios["datasets"],
        "ratio_vs_limit_goal": GOAL_VS_LIMIT,
        "ratio_vs_peer": vs_peer,
        "ratio_vs_peer_goal": GOAL_VS_PEER,
        "goal_met": ratios["events"] >= GOAL_VS_LIMIT
        and ratios["datasets_search"] >= GOAL_VS_LIMIT
        and vs_peer >= GOAL_VS_PEER,
        "checks_passed": checks,
    }
    write("S6", result)
    rows = [
        (
            f"ours: rebuild {name}",
            f"{o['seconds']} s",
            f"{o['events_per_s']:,} events/s; bulk {o['loading_s']} s; {o['rows_or_documents']:,} rows/docs",
        )
        for name, o in ours.items()
    ]
    rows += [
        ("limit: consume -> COPY", f"{limit_pg['seconds']} s", f"{limit_pg['events_per_s']:,} events/s"),
        ("limit: consume -> _bulk", f"{limit_os['seconds']} s", f"{limit_os['events_per_s']:,} events/s"),
        (
            "peer: eventsourcing runner",
            f"{peer['seconds']} s",
            f"{peer['events_per_s']:,} events/s" + (" (extrapolated)" if peer["extrapolated"] else ""),
        ),
        ("ratio_vs_limit (events archive)", f"{ratios['events']:.2f}", f"goal >= {GOAL_VS_LIMIT}"),
        ("ratio_vs_limit (datasets_search)", f"{ratios['datasets_search']:.2f}", f"goal >= {GOAL_VS_LIMIT}"),
        ("ratio_vs_limit (datasets)", f"{ratios['datasets']:.2f}", "reported"),
        ("ratio_vs_peer (datasets)", f"{vs_peer:.2f}", f"goal >= {GOAL_VS_PEER}"),
        ("checks", "passed" if checks else "FAILED", "rows, versions, documents, no dead letters"),
    ]
    show("S6", "rebuilds from offset 0", rows)
    return result
