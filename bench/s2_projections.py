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
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

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
    process_tree,
    profile_notes,
    profile_summary,
    start_profiler,
    steal_pct,
    stop_profiler,
)
from bench.generator import produce_dataset_events
from bench.results import RESULTS, show, write
from commands import CONTEXTS
from projections.archive import EventsArchiveProjection
from projections.db import schema_name
from projections.events import Record, decode
from projections.migrations import migrate
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
EVENTS_PER_DATASET = 20  # bench.generator's default
LIMIT_TABLE = "s2_limit_events"
COLUMNS = EventsArchiveProjection.columns

# Who owns a worker's time (see bench.common.profile_summary): the innermost frame
# matching (file marker, function-name prefix or "") gets the sample.
WORKER_OWNERS: list[tuple[str, str, str]] = [
    (
        "archive row: headers encoded again (to_headers, _headers)",
        "shared_kernel/envelope.py",
        "EventMetadata.to_",
    ),
    ("archive row: headers encoded again (to_headers, _headers)", "projections/archive.py", "_headers"),
    ("decode: headers -> EventMetadata", "shared_kernel/envelope.py", ""),
    ("decode: Avro (AvroCodec, fastavro)", "shared_kernel/avro.py", ""),
    ("decode: Avro (AvroCodec, fastavro)", "/fastavro/", ""),
    ("decode: rest (projections/events.py)", "projections/events.py", ""),
    ("projection: rows, fold (projections/folded.py)", "projections/folded.py", ""),
    ("projection: rows (projections/archive.py)", "projections/archive.py", ""),
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
    ("Projection.apply (rows + SQL)", "projections/append_only.py", "AppendOnly.apply"),
    ("Projection.apply (rows + SQL)", "projections/folded.py", "FoldedRows.apply"),
    ("asyncpg executemany", "/asyncpg/", "Connection.executemany"),
    ("asyncpg fetch (rows read back)", "/asyncpg/", "Connection.fetch"),
    ("positions + stats", "projections/projector.py", "Projector._record_positions"),
    ("Faust message -> Record", "streams/app.py", "_record"),
    ("Faust on_message (per-message Event, queue)", "/faust/", "Conductor._compile_message_handler"),
    ("Faust consumer fetcher (_drain_messages)", "/faust/", "Consumer._drain_messages"),
    ("batches (streams.batches.take_batches)", "streams/batches.py", "take_batches"),
]


# ---- the figures ------------------------------------------------------------------------


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


async def run(base: Settings) -> dict[str, Any]:
    settings, env = isolated(base, "s2", PARTITIONS)
    prefix = settings.topic_prefix
    workdir = Path(tempfile.mkdtemp(prefix="bench-s2-"))
    names = ("events", "datasets")
    versions = (1, 2)
    groups = [f"{prefix}.projection.{n}.v{v}" for n in names for v in versions]
    ours: dict[str, dict[str, Any]] = {}
    faust: dict[str, dict[str, Any]] = {}
    profiles: dict[str, Any] = {}
    try:
        await ensure_topics(settings, contract_topics(settings, [c.name for c in CONTEXTS], []))
        await migrate(settings)
        print(f"S2: producing {EVENTS:,} dataset events to {prefix}.events.datasets", flush=True)
        produced = await produce_dataset_events(settings, EVENTS, EVENTS_PER_DATASET)
        ends = await end_offsets(settings)
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
        await drop_prefix(settings, schema_name(settings), groups)
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
