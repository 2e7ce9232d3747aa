"""S2, projections: events/s into PostgreSQL by our projection workers, beside a plain
aiokafka `getmany` + `COPY` loop over the same events.

Under an isolated prefix, `BENCH_S2_EVENTS` realistic dataset events are produced to
`<prefix>.events.datasets` (6 partitions) by `bench.generator`: made by the real
aggregate (a `DatasetRegistered`, then metadata, versions, quality checks and
descriptions with increasing versions, 20 events per dataset), Avro single-object
encoded with the real headers, by an idempotent producer.

- **ours**: the real supervisor `cqrs run projector events` (the events archive, one
  row per event), then `cqrs run projector datasets` (one row per dataset, folded) as a
  separate run, each on the events from offset 0. Starting that far behind (more than
  `projection_catch_up_behind` events), the supervisor first catches up by bulk replays
  (`streams.replay`: `COPY`, big batches, `rebuild_lanes` processes), then hands the
  last events to its Faust worker; its figure is that product behaviour.
- **ours, Faust worker alone**: the same projections' worker (`--version 2`, its own
  table and group) with no catch-up, which is how live events are applied: reported
  beside, so the steady path's speed is on record too. The figure excludes the worker's
  start-up (spawning, joining the group, migrations): `projection_positions` is polled
  every 20 ms, the clock starts at the first poll that sees a position (that first
  batch is left out of the count) and stops when the positions reach the end offsets.
  So the rate is (N - events of the first observed batch) / (last - first observation).
- **limit**: in this process, an aiokafka consumer (read_committed, no group, assign
  and seek to the beginning) `getmany`s up to `projection_batch_max` records at a
  time, decodes each exactly as the projector does (`projections.events.decode`: Avro
  and headers) and `COPY`s the rows (`copy_records_to_table`) into a table made
  `LIKE events_v1 INCLUDING ALL` (same columns, keys and indexes). Its rate is taken
  the same way: from the end of its first batch to the end of its last.

`ratio_vs_limit` is the events archive's rate over the limit's (goal >= 0.8); the
datasets projection's ratio is reported beside it.

`BENCH_PROFILE=1` samples the Faust-worker-alone runs by py-spy from
its first batch to its last (`bench/results/s2-<projection>.speedscope.json`), and puts
a breakdown of where the worker's time goes into the result (and its `notes`). Both
sides also report the CPU they spent per event (the Python process(es) and their
PostgreSQL backends, from /proc), which CPU steal on a shared machine does not skew.

Findings of the run on 2026-12-01 (100,000 events): the supervisor, catching up by bulk
replays, applied 28,524 events/s into the archive and 42,904 into datasets, the limit
16,156: ratios 1.77 and 2.66 (goal 0.8 met). The Faust worker alone: 4,436 and 5,257
events/s, ratios 0.28 and 0.33 (binary JSON codecs and the record's own headers took it
from about 2,000-2,500).

Findings before the catch-up existed (the supervisor's figure was then the Faust
worker's), two runs on 2026-11-22 (100,000 events; 2 vCPUs shared with another
user, 0-23% CPU steal): events archive 2,486 and 1,893 events/s, datasets 2,263 and
2,761 events/s, limit 8,296 and 6,539 events/s: ratios 0.30 and 0.29 for the archive
(goal 0.8 missed), 0.27 and 0.42 for datasets. Rows, versions and counters check out.
Per event the worker burns 304-369 us of CPU against the limit's 61-70 us, while
PostgreSQL spends about the same on both (31-32 us for the archive's executemany, 31-37
us for COPY), and the worker runs at 70-84% of one core: it is bound by its own Python
CPU. py-spy on the events worker (run 1, 11,090 samples; run 2 within 2 points):
`Projector.handle` (decode, apply, commit) is only 18% of the samples; Faust and mode
own 40-42% (the consumer's `_drain_messages` 17-19% inclusive, per-message
`on_message`/Event creation 9-10%, `Service.wait_first` 13%, stream iteration 6%), the
event loop 15-16% (asyncio's default loop: the worker does not run on uvloop) plus
11.7% idle, aiokafka 7.4-7.8%, Faust message -> `Record` 4-5%, decode 8-9% (headers
3.7-4%, Avro 2.6-3%), encoding the headers again for the archive row 3.2-3.4%,
asyncpg 5.5%. The datasets worker looks the same (Faust 40-44%, loop 16-20%, handle
18-19%).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import orjson
from aiokafka import TopicPartition

from bench.generator import produce_dataset_events
from bench.results import RESULTS, show, write
from bench.s4_queries import (
    backends,
    cpu_seconds,
    host_cpu,
    process_tree,
    profile_notes,
    profile_summary,
    start_profiler,
    steal_pct,
    stop_profiler,
)
from projections.db import migrate, schema_name
from projections.events import Record, decode
from projections.postgres import EventsArchiveProjection
from projections.registry import PROJECTIONS
from shared_kernel import kafka
from shared_kernel.avro import AvroCodec
from shared_kernel.settings import Settings
from shared_kernel.topics import Topics, contract_topics, ensure_topics

EVENTS = int(os.environ.get("BENCH_S2_EVENTS", "100000"))
PROFILE = os.environ.get("BENCH_PROFILE", "") not in ("", "0")
GOAL_VS_LIMIT = 0.8
PARTITIONS = 6
POLL_S = 0.02
PROGRESS_S = 5.0
EVENTS_PER_DATASET = 20  # bench.generator's default
LIMIT_TABLE = "s2_limit_events"
COLUMNS = EventsArchiveProjection.columns

# Who owns a worker's time (see bench.s4_queries.profile_summary): the innermost frame
# matching (file marker, function-name prefix or "") gets the sample.
WORKER_OWNERS: list[tuple[str, str, str]] = [
    (
        "archive row: headers encoded again (to_headers, _headers)",
        "shared_kernel/envelope.py",
        "EventMetadata.to_",
    ),
    ("archive row: headers encoded again (to_headers, _headers)", "projections/postgres.py", "_headers"),
    ("decode: headers -> EventMetadata", "shared_kernel/envelope.py", ""),
    ("decode: Avro (AvroCodec, fastavro)", "shared_kernel/avro.py", ""),
    ("decode: Avro (AvroCodec, fastavro)", "/fastavro/", ""),
    ("decode: rest (projections/events.py)", "projections/events.py", ""),
    ("projection: rows, fold (projections/postgres.py)", "projections/postgres.py", ""),
    ("projector: transaction, positions, stats", "projections/projector.py", ""),
    ("JSON codec (projections/db.py)", "projections/db.py", ""),
    ("asyncpg (executemany, protocol)", "/asyncpg/", ""),
    ("Faust message -> Record (streams/app.py)", "streams/app.py", ""),
    ("faust + mode (consumer, streams, agents, acks)", "/faust/", ""),
    ("faust + mode (consumer, streams, agents, acks)", "/mode/", ""),
    ("aiokafka (fetch, record batches)", "/aiokafka/", ""),
]
WORKER_SPANS: list[tuple[str, str, str]] = [
    ("Projector.handle (decode + apply + commit)", "projections/projector.py", "Projector.handle"),
    ("decode (Avro + headers)", "projections/events.py", "decode"),
    ("Projection.apply (rows + SQL)", "projections/postgres.py", "EventsArchiveProjection.apply"),
    ("Projection.apply (rows + SQL)", "projections/postgres.py", "FoldedRows.apply"),
    ("asyncpg executemany", "/asyncpg/", "Connection.executemany"),
    ("asyncpg fetch (rows read back)", "/asyncpg/", "Connection.fetch"),
    ("positions + stats", "projections/projector.py", "Projector._record_positions"),
    ("Faust message -> Record", "streams/app.py", "_record"),
    ("Faust on_message (per-message Event, queue)", "/faust/", "Conductor._compile_message_handler"),
    ("Faust consumer fetcher (_drain_messages)", "/faust/", "Consumer._drain_messages"),
    ("Faust take_events", "/faust/", "Stream.take_events"),
]


# ---- the events -------------------------------------------------------------------------


async def _ends(settings: Settings) -> dict[int, int]:
    topic = Topics(settings.topic_prefix).events("datasets")
    consumer = kafka.consumer(settings)
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(settings.partitions)]
        return {tp.partition: end for tp, end in (await consumer.end_offsets(tps)).items()}
    finally:
        await consumer.stop()


class Progress:
    """Prints how far a long step got, every PROGRESS_S seconds."""

    def __init__(self, what: str, total: int) -> None:
        self.what, self.total = what, total
        self.started = self.last = time.monotonic()

    def tick(self, done: int) -> None:
        now = time.monotonic()
        if now - self.last >= PROGRESS_S:
            self.last = now
            rate = done / (now - self.started)
            print(f"  {self.what}: {done:,}/{self.total:,} ({rate:,.0f}/s since start)", flush=True)


def _rate(
    total: int, first: tuple[float, int], last: float, python_cpu_s: float, postgres_cpu_s: float
) -> dict[str, Any]:
    """Events/s after the first batch, (total - first batch) / (last - first), and the
    CPU spent per event meanwhile by the Python process(es) and their PostgreSQL
    backends (from /proc: not depressed by CPU steal the way a rate is)."""
    seconds = max(last - first[0], 1e-6)
    events = max(total - first[1], 1)
    return {
        "events_timed": total - first[1],
        "seconds": round(seconds, 3),
        "events_per_s": round((total - first[1]) / seconds),
        "first_batch_events": first[1],
        "python_cpu_us_per_event": round(python_cpu_s * 1e6 / events, 1),
        "postgres_cpu_us_per_event": round(postgres_cpu_s * 1e6 / events, 1),
        "python_cpu_pct_of_one_core": round(100 * python_cpu_s / seconds, 1),
    }


# ---- limit: getmany + COPY ------------------------------------------------------------


async def _limit(settings: Settings, ends: dict[int, int]) -> dict[str, Any]:
    topic = Topics(settings.topic_prefix).events("datasets")
    codec = AvroCodec.from_directory()
    conn = await asyncpg.connect(
        settings.postgres_dsn,
        server_settings={"search_path": schema_name(settings), "application_name": "bench-s2-limit"},
    )
    backend = [int(await conn.fetchval("SELECT pg_backend_pid()"))]
    consumer = kafka.consumer(settings, max_poll_records=settings.projection_batch_max)
    total = sum(ends.values())
    progress = Progress("limit", total)
    await conn.execute(f"CREATE TABLE {LIMIT_TABLE} (LIKE events_v1 INCLUDING ALL)")
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in ends]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        host0 = host_cpu()
        started = time.monotonic()
        first: tuple[float, int] | None = None
        done = batches = 0
        cpu0 = db0 = 0.0
        while done < total:
            fetched = await consumer.getmany(timeout_ms=1000)
            rows = []
            for records in fetched.values():
                for r in records:
                    e = decode(
                        codec,
                        Record(r.topic, r.partition, r.offset, r.key, r.value, list(r.headers), r.timestamp),
                    )
                    rows.append(
                        (
                            e.meta.event_id,
                            e.topic,
                            e.partition,
                            e.offset,
                            e.context,
                            e.meta.aggregate_type,
                            e.meta.aggregate_id,
                            e.version,
                            e.type_name,
                            e.meta.occurred_at,
                            orjson.dumps({k: v.decode() for k, v in r.headers}).decode(),
                            orjson.dumps(e.payload).decode(),
                        )
                    )
            if not rows:
                continue
            await conn.copy_records_to_table(LIMIT_TABLE, records=rows, columns=COLUMNS)
            done += len(rows)
            batches += 1
            if first is None:
                first = (time.monotonic(), done)
                cpu0, db0 = time.process_time(), cpu_seconds(backend)
            progress.tick(done)
        last = time.monotonic()
        assert first is not None
        cpu, db = time.process_time() - cpu0, cpu_seconds(backend) - db0
        rows_in_table = int(await conn.fetchval(f"SELECT count(*) FROM {LIMIT_TABLE}"))
        return {
            **_rate(total, first, last, cpu, db),
            "events_per_s_from_start": round(total / (last - started)),
            "batches": batches,
            "batch_max": settings.projection_batch_max,
            "rows": rows_in_table,
            "host_steal_pct": steal_pct(host0, host_cpu()),
        }
    finally:
        await consumer.stop()
        await conn.close()


# ---- ours: the projection workers --------------------------------------------------------


async def _ours(
    settings: Settings,
    env: dict[str, str],
    name: str,
    total: int,
    workdir: Path,
    version: int = 1,
    profile_to: Path | None = None,
) -> dict[str, Any]:
    """Run a projection from offset 0 until its positions reach `total` offsets.

    Version 1 runs under the supervisor (`cqrs run projector NAME`, which starts the
    live version's worker); another version runs its worker alone, as the supervisor
    would, so that py-spy samples the worker itself."""
    topic = Topics(settings.topic_prefix).events("datasets")
    conn = await asyncpg.connect(
        settings.postgres_dsn, server_settings={"search_path": schema_name(settings)}
    )
    if version == 1:
        cmd = [str(Path(sys.executable).parent / "cqrs"), "run", "projector", name]
    else:
        await PROJECTIONS[name].at(version).create_storage(conn, settings)
        cmd = [sys.executable, "-m", "cli", "run", "projector", name, "--version", str(version)]
    log_path = workdir / f"projector-{name}-v{version}.log"
    progress = Progress(f"{name} v{version}", total)
    spy: subprocess.Popen[bytes] | None = None
    pids: list[int] = []
    db_pids: list[int] = []
    cpu0 = db0 = 0.0
    with log_path.open("ab") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)  # noqa: ASYNC220
    started = time.monotonic()
    first: tuple[float, int] | None = None
    host0 = host_cpu()
    try:
        deadline = started + 1800
        while True:
            done = int(
                await conn.fetchval(
                    "SELECT coalesce(sum(next_offset), 0) FROM projection_positions "
                    "WHERE projection = $1 AND version = $2 AND topic = $3",
                    name,
                    version,
                    topic,
                )
            )
            now = time.monotonic()
            if done and first is None:
                first = (now, done)
                host0 = host_cpu()
                pids = process_tree(proc.pid)
                db_pids = await backends(settings, f"{env['APP_SERVICE_NAME']}:projection:%")
                cpu0, db0 = cpu_seconds(pids), cpu_seconds(db_pids)
                if profile_to is not None:
                    spy = start_profiler(proc.pid, profile_to)
            if done >= total:
                break
            if first is not None:
                progress.tick(done)
            if proc.poll() is not None:
                raise RuntimeError(f"the projector exited; see {log_path}:\n{log_path.read_text()[-3000:]}")
            if now > deadline:
                raise RuntimeError(f"the projector did not finish in time; see {log_path}")
            await asyncio.sleep(POLL_S)
        assert first is not None
        cpu, db = cpu_seconds(pids) - cpu0, cpu_seconds(db_pids) - db0
        steal = steal_pct(host0, host_cpu())
        if spy is not None:
            await asyncio.to_thread(stop_profiler, spy)
            spy = None
        stats = await conn.fetchrow(
            "SELECT applied, dead_lettered FROM projection_stats WHERE projection = $1 AND version = $2",
            name,
            version,
        )
        table = PROJECTIONS[name].at(version).physical
        check = await conn.fetchrow(
            f"SELECT count(*) AS n, min(version) AS lo, max(version) AS hi FROM {table}"
        )
        return {
            **_rate(total, first, now, cpu, db),
            "startup_s": round(first[0] - started, 2),
            "wall_s_from_spawn": round(now - started, 2),
            "applied": stats["applied"],
            "dead_lettered": stats["dead_lettered"],
            "rows": check["n"],
            "row_versions": [check["lo"], check["hi"]],
            "host_steal_pct": steal,
        }
    finally:
        if spy is not None:
            await asyncio.to_thread(stop_profiler, spy)
        if proc.poll() is None:
            proc.terminate()
            try:
                await asyncio.to_thread(proc.wait, 60)
            except subprocess.TimeoutExpired:
                proc.kill()
                await asyncio.to_thread(proc.wait, 10)
        await conn.close()


# ---- clean-up ----------------------------------------------------------------------------


async def _cleanup(settings: Settings, groups: list[str]) -> None:
    from aiokafka.protocol.admin import DeleteGroupsRequest

    admin = kafka.admin(settings)
    await admin.start()
    try:
        prefix = settings.topic_prefix + "."
        mine = [t for t in await admin.list_topics() if t.startswith(prefix)]
        if mine:
            await admin.delete_topics(mine)
        for group in groups:  # the workers' consumer groups (aiokafka's admin has no call for it)
            try:
                node = await admin.find_coordinator(group)
                await admin._send_request(DeleteGroupsRequest([group]), node)
            except Exception as exc:
                print(f"  could not delete consumer group {group}: {exc!r}", flush=True)
    finally:
        await admin.close()
    conn = await asyncpg.connect(settings.postgres_dsn)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema_name(settings)}" CASCADE')
    finally:
        await conn.close()
    for group in groups:  # Faust's data directories (streams.app.ProjectionApp)
        shutil.rmtree(Path(tempfile.gettempdir()) / "cqrs-faust" / group, ignore_errors=True)


# ---- the run -----------------------------------------------------------------------------


def _notes(
    ours: dict[str, dict[str, Any]],
    limit: dict[str, Any],
    ratios: dict[str, float],
    profiles: dict[str, Any],
) -> list[str]:
    py, pg = limit["python_cpu_us_per_event"], limit["postgres_cpu_us_per_event"]
    notes = [
        f"limit: {py} us of Python CPU and {pg} us of PostgreSQL CPU per event "
        f"({limit['python_cpu_pct_of_one_core']}% of one core in Python)"
    ]
    for name, o in ours.items():
        notes.append(
            f"{name}: {o['python_cpu_us_per_event']} us of worker CPU "
            f"({o['python_cpu_us_per_event'] / max(py, 1e-9):.1f}x the limit's) and "
            f"{o['postgres_cpu_us_per_event']} us of PostgreSQL CPU per event; the worker ran at "
            f"{o['python_cpu_pct_of_one_core']}% of one core (CPU-bound near 100: one Python thread "
            f"does the work), ratio {ratios[name]:.2f}"
        )
    notes.append(
        "host CPU steal: "
        + ", ".join(f"{n} {o['host_steal_pct']}%" for n, o in [*ours.items(), ("limit", limit)])
    )
    if ratios["events"] < GOAL_VS_LIMIT:
        notes.append(f"goal missed: {ratios['events']:.2f} < {GOAL_VS_LIMIT} (events archive)")
    for name, profile in profiles.items():
        notes += [f"{name} worker: {line}" for line in profile_notes(profile)]
    return notes


def isolated(base: Settings, scenario: str, log_level: str = "warning") -> tuple[Settings, dict[str, str]]:
    """Settings under a prefix of their own (topics, schema, indexes, groups), and the
    environment that gives the same to the processes a scenario starts."""
    prefix = f"bench{uuid.uuid4().hex[:6]}"
    settings = base.model_copy(update={"topic_prefix": prefix, "partitions": PARTITIONS})
    env = {
        **os.environ,
        "APP_TOPIC_PREFIX": prefix,
        "APP_PARTITIONS": str(PARTITIONS),
        "APP_LOG_LEVEL": log_level,
        "APP_SERVICE_NAME": f"bench-{scenario}-{prefix}",  # names its PostgreSQL backends (CPU)
        "APP_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
        "APP_POSTGRES_DSN": settings.postgres_dsn,
        "APP_OPENSEARCH_URL": settings.opensearch_url,
    }
    return settings, env


async def run(base: Settings) -> dict[str, Any]:
    settings, env = isolated(base, "s2")
    prefix = settings.topic_prefix
    workdir = Path(tempfile.mkdtemp(prefix="bench-s2-"))
    names = ("events", "datasets")
    versions = (1, 2)
    groups = [f"{prefix}.projection.{n}.v{v}" for n in names for v in versions]
    ours: dict[str, dict[str, Any]] = {}
    faust: dict[str, dict[str, Any]] = {}
    profiles: dict[str, Any] = {}
    try:
        await ensure_topics(settings, contract_topics(settings, ["datasets", "incidents"], []))
        await migrate(settings)
        print(f"S2: producing {EVENTS:,} dataset events to {prefix}.events.datasets", flush=True)
        produced = await produce_dataset_events(settings, EVENTS, EVENTS_PER_DATASET)
        ends = await _ends(settings)
        total = sum(ends.values())
        print("S2: limit (getmany + COPY)", flush=True)
        limit = await _limit(settings, ends)
        for name in names:
            print(f"S2: ours (cqrs run projector {name})", flush=True)
            ours[name] = await _ours(settings, env, name, total, workdir)
        for name in names:
            # the Faust worker alone (no catch-up): how fast the live path applies events
            print(f"S2: {name} v2, its Faust worker alone" + (" under py-spy" if PROFILE else ""), flush=True)
            target = RESULTS.parent / f"s2-{name}.speedscope.json"
            faust[name] = await _ours(
                settings, env, name, total, workdir, version=2, profile_to=target if PROFILE else None
            )
            if PROFILE:
                profiles[name] = {
                    "file": str(target.relative_to(RESULTS.parent.parent.parent)),
                    "events_per_s_while_profiled": faust[name]["events_per_s"],
                    "profiled_s": faust[name]["seconds"],
                    **profile_summary(target, WORKER_OWNERS, WORKER_SPANS),
                }
    finally:
        await _cleanup(settings, groups)
        shutil.rmtree(workdir, ignore_errors=True)

    def ratio(of: dict[str, Any]) -> float:
        return round(float(of["events_per_s"]) / max(float(limit["events_per_s"]), 1.0), 3)

    ratios = {name: ratio(ours[name]) for name in names}
    faust_ratios = {name: ratio(faust[name]) for name in names}
    datasets = produced // EVENTS_PER_DATASET
    result: dict[str, Any] = {
        "what": "events/s into PostgreSQL: projection workers vs aiokafka getmany + COPY, same events",
        "events": produced,
        "datasets": datasets,
        "partitions": PARTITIONS,
        "batch_max": settings.projection_batch_max,
        "timing": "from the first applied batch to the last (start-up and first batch excluded), both sides",
        "ours_events_archive": ours["events"],
        "ours_datasets": ours["datasets"],
        "limit_getmany_copy": limit,
        "ratio_vs_limit": ratios["events"],
        "ratio_vs_limit_datasets": ratios["datasets"],
        "ours_faust_worker_alone": faust,
        "ratio_vs_limit_faust_worker_alone": faust_ratios,
        "ratio_vs_limit_goal": GOAL_VS_LIMIT,
        "goal_met": ratios["events"] >= GOAL_VS_LIMIT,
        "checks_passed": (
            ours["events"]["rows"] == total
            and ours["datasets"]["rows"] == datasets
            and ours["datasets"]["row_versions"] == [EVENTS_PER_DATASET, EVENTS_PER_DATASET]
            and limit["rows"] == total
            and not ours["events"]["dead_lettered"]
            and not ours["datasets"]["dead_lettered"]
        ),
        "notes": _notes(ours, limit, ratios, profiles),
        **({"profiles": profiles} if profiles else {}),
    }
    write("S2", result)
    e, d = ours["events"], ours["datasets"]
    show(
        "S2",
        "projections into PostgreSQL",
        [
            (
                "ours: events archive",
                f"{e['events_per_s']:,} events/s",
                f"{e['events_timed']:,} events in {e['seconds']} s; start-up {e['startup_s']} s",
            ),
            (
                "ours: datasets",
                f"{d['events_per_s']:,} events/s",
                f"{d['events_timed']:,} events in {d['seconds']} s; {d['rows']:,} rows",
            ),
            (
                "limit: getmany + COPY",
                f"{limit['events_per_s']:,} events/s",
                f"{limit['events_timed']:,} events in {limit['seconds']} s; batch {limit['batch_max']}",
            ),
            ("ratio_vs_limit (events)", f"{ratios['events']:.2f}", f"goal >= {GOAL_VS_LIMIT}"),
            ("ratio_vs_limit (datasets)", f"{ratios['datasets']:.2f}", "reported"),
            (
                "Faust worker alone (no catch-up)",
                f"{faust['events']['events_per_s']:,} / {faust['datasets']['events_per_s']:,} events/s",
                f"ratios {faust_ratios['events']:.2f} / {faust_ratios['datasets']:.2f} (events / datasets)",
            ),
            ("checks", "passed" if result["checks_passed"] else "FAILED", "rows, versions, no dead letters"),
        ],
    )
    return result
