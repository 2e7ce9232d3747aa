"""`cqrs`: one console script for every process and admin task.

cqrs serve api                 the HTTP API (uvicorn), owning a share of the command partitions
cqrs run command-processor     a single writer of a share of the partitions, nothing else
cqrs run projector NAME        keep a read model up to date (follows rebuilds)
cqrs run projectors [NAME...]  every read model (and the audit sink) in one process
cqrs auth token --sub --role --tenant   a token of the local issuer (the local API accepts it)
cqrs projections list|status|rebuild|rollback   the read models and their versions
cqrs cdc status|apply|pause|resume|restart|remove   the change data capture's connector
cqrs demo                      demo datasets and incidents, through the API
cqrs topics create             create the contract topics (idempotent)
cqrs schemas check             every event has a schema; every schema reads its history
cqrs schemas asyncapi          the AsyncAPI 3.0 document of the topics (also GET /asyncapi.json)
cqrs dlq list|show|parked       what the consumers dead-lettered, and the keys parked behind it
cqrs dlq retry|skip|actions    retry (after a fix) or skip a dead letter; what operators did
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator, Coroutine
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.table import Column, Table

from shared_kernel.settings import get_settings
from shared_kernel.telemetry import configure_logging

if TYPE_CHECKING:
    from projections.projection import Projection

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Kafka-native event-sourced CQRS backend.")
serve = typer.Typer(no_args_is_help=True, help="Serve HTTP.")
run = typer.Typer(no_args_is_help=True, help="Run a long-lived processor.")
topics = typer.Typer(no_args_is_help=True, help="Kafka topics of the contract.")
schemas = typer.Typer(no_args_is_help=True, help="Avro schemas.")
projections = typer.Typer(no_args_is_help=True, help="Read models: list, status, rebuild, rollback.")
auth = typer.Typer(no_args_is_help=True, help="The local stack's credentials: tokens the local API accepts.")
cdc = typer.Typer(no_args_is_help=True, help="Change data capture: the Debezium connector of the CDC job.")
dlq = typer.Typer(no_args_is_help=True, help="Dead letters: what each consumer could not handle.")
app.add_typer(serve, name="serve")
app.add_typer(run, name="run")
app.add_typer(topics, name="topics")
app.add_typer(schemas, name="schemas")
app.add_typer(projections, name="projections")
app.add_typer(auth, name="auth")
app.add_typer(cdc, name="cdc")
app.add_typer(dlq, name="dlq")
console = Console(stderr=True)


def _logging(process: str = "") -> None:
    from shared_kernel import tracing

    s = get_settings()
    configure_logging(s.log_level, s.log_json)
    tracing.configure(f"{s.service_name}-{process}" if process else s.service_name)


def _observed(process: str) -> None:
    """Logging, tracing, and /metrics on `APP_METRICS_PORT` when it is set (a process the
    API does not serve: projectors, jobs, the audit sink)."""
    from shared_kernel import metrics

    _logging(process)
    port = get_settings().metrics_port
    try:
        metrics.serve(port)
    except OSError as exc:  # a worker this process started shares its environment
        console.print(f"[yellow]metrics not served on port {port}: {exc}[/]")


async def _until_signalled(main: object) -> None:
    """Run `main(stop)` until SIGINT/SIGTERM sets `stop`."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    from shared_kernel import heap

    settling = asyncio.create_task(heap.freeze_when_settled())
    try:
        await main(stop)  # type: ignore[operator]
    finally:
        settling.cancel()


def _serve(factory: str, host: str, port: int, workers: int = 1, process: str = "api") -> None:
    """uvicorn on `factory`, having set where this process takes forwarded commands and
    its static member id (unless the environment says otherwise)."""
    import uvicorn

    reachable = socket.gethostname() if host in ("0.0.0.0", "::", "") else host
    os.environ.setdefault("APP_ADVERTISED_URL", f"http://{reachable}:{port}")
    os.environ.setdefault("APP_INSTANCE_ID", f"{reachable}:{port}")
    _logging(process)
    uvicorn.run(
        factory,
        factory=True,
        host=host,
        port=port,
        workers=workers,
        log_config=None,
        access_log=False,
        lifespan="on",
    )


@serve.command("api")
def serve_api(
    host: Annotated[str, typer.Option(help="Bind address.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port.")] = 8000,
    workers: Annotated[
        int,
        typer.Option(help="Worker processes; with more than one they forward commands to processors."),
    ] = 1,
) -> None:
    """Serve the HTTP API (and, unless APP_API_OWNS_PARTITIONS=false, own a share of the
    command partitions)."""
    if workers > 1:  # one port, one member id: the workers cannot each be an owner
        os.environ["APP_API_OWNS_PARTITIONS"] = "false"
        if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):  # /metrics adds up every worker's
            import tempfile

            os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="cqrs-metrics-")
    _serve("api.app:create_app", host, port, workers)


@run.command("command-processor")
def run_command_processor(
    host: Annotated[str, typer.Option(help="Bind address of its internal endpoint.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port of its internal endpoint.")] = 8100,
) -> None:
    """Own a share of the command partitions: decide commands forwarded by API instances
    (and those of the commands topic) and append their events, exactly once."""
    _serve("api.internal:create_owner_app", host, port, process="command-processor")


@run.command("projector")
def run_projector(
    name: Annotated[str, typer.Argument(help="the projection (`cqrs projections list`)")],
    version: Annotated[
        int | None, typer.Option(help="run this version's worker alone (what the supervisor starts)")
    ] = None,
) -> None:
    """Keep a projection up to date from the events topics: a supervisor that runs a Faust
    worker for the live version and follows swaps (Ctrl-C to stop)."""
    projection = _projection(name)
    if version is None:
        _observed(f"projector-{name}")
        from streams.supervisor import supervise

        settings = get_settings()
        _run_fast(_until_signalled(lambda stop: supervise(settings, name, stop)))
        return
    from streams.app import ProjectionApp

    _logging(f"projector-{name}")
    ProjectionApp(get_settings(), projection.at(version)).run()


@run.command("projectors")
def run_projectors(
    names: Annotated[
        list[str] | None, typer.Argument(help="the projections (default: all; `cqrs projections list`)")
    ] = None,
) -> None:
    """Keep several projections up to date in one process: each its own consumer group,
    supervisor, rebuilds and swaps, their Faust workers sharing this process (Ctrl-C to
    stop). One process per projection is `cqrs run projector NAME`."""
    from projections.registry import PROJECTIONS
    from streams.group import supervise_group

    chosen = list(dict.fromkeys(names or PROJECTIONS))
    for name in chosen:
        _projection(name)
    _observed("projectors")

    settings = get_settings()

    async def main(stop: asyncio.Event) -> None:
        from streams.audit import AuditSink

        await asyncio.gather(supervise_group(settings, chosen, stop), AuditSink(settings).run(stop))

    _run_fast(_until_signalled(main))


@run.command("jobs")
def run_jobs(
    names: Annotated[list[str] | None, typer.Argument(help="the jobs (default: all)")] = None,
) -> None:
    """Run the stream-processing jobs (quality monitor, quality incidents, incident
    deadlines, the legacy catalogue's CDC) in this process, each its own Faust app and
    consumer group (Ctrl-C to stop)."""
    from streams.jobs import run_jobs as run
    from streams.registry import JOBS

    unknown = [n for n in names or [] if n not in JOBS]
    if unknown:
        raise typer.BadParameter(f"unknown job(s) {unknown}; known: {sorted(JOBS)}")
    chosen = [JOBS[n] for n in dict.fromkeys(names or JOBS)]
    _observed("jobs")
    settings = get_settings()
    _run_fast(_until_signalled(lambda stop: run(settings, chosen, stop)))


@run.command("job")
def run_job(name: Annotated[str, typer.Argument(help="the job")]) -> None:
    """Run one stream-processing job alone in this process (a Faust worker)."""
    from streams.jobs import JobApp
    from streams.registry import JOBS

    if name not in JOBS:
        raise typer.BadParameter(f"unknown job {name!r}; known: {sorted(JOBS)}")
    settings = get_settings()
    from shared_kernel import metrics, tracing

    metrics.serve(settings.metrics_port)  # Faust's worker sets up logging itself
    tracing.configure(f"{settings.service_name}-job-{name}")
    JobApp(settings, JOBS[name](settings)).run()


@run.command("audit-sink")
def run_audit_sink() -> None:
    """Write the audit topic into PostgreSQL, where `GET /api/v1/admin/audit` reads it
    (`cqrs run projectors` runs it too)."""
    from streams.audit import AuditSink

    _observed("audit-sink")
    settings = get_settings()
    _run_fast(_until_signalled(AuditSink(settings).run))


@auth.command("token")
def auth_token(
    sub: Annotated[str, typer.Option(help="the subject: the actor of what the token does")],
    role: Annotated[
        list[str] | None,
        typer.Option(
            help="admin, operator, viewer, or platform (projections); repeat for several; default viewer"
        ),
    ] = None,
    tenant: Annotated[str, typer.Option(help="the tenant the token acts in")] = "default",
    ttl: Annotated[int, typer.Option(help="seconds until it expires", min=1, max=366 * 86400)] = 3600,
) -> None:
    """Print a token of the local stack's issuer that the local API accepts (the signing
    key is made on first use; `make up` makes it too). Not for production: there the
    tokens come from your OIDC provider, and the local issuer is refused."""
    from api.auth.local import issue_token
    from api.auth.permissions import ROLES

    settings = get_settings()
    role = role or ["viewer"]
    unknown = [r for r in role if r not in ROLES]
    if unknown:
        raise typer.BadParameter(f"unknown role(s) {unknown}; known: {', '.join(ROLES)}", param_hint="--role")
    if settings.environment == "production":
        raise typer.BadParameter("the local issuer is not for production", param_hint="APP_ENVIRONMENT")
    typer.echo(issue_token(settings, sub, role, tenant, ttl))


@auth.command("init")
def auth_init() -> None:
    """Make the local stack's signing key, JWKS and cluster secret if missing (idempotent)."""
    from api.auth.local import ensure_keys
    from shared_kernel.credentials import cluster_secret

    settings = get_settings()
    folder = ensure_keys(settings)
    cluster_secret(settings)
    typer.echo(str(folder))


@run.command("replay")
def run_replay(
    name: Annotated[str, typer.Argument(help="the projection")],
    version: Annotated[int, typer.Option(help="the version being built")],
    lane: Annotated[int, typer.Option(help="which share of the partitions")] = 0,
    lanes: Annotated[int, typer.Option(help="how many shares")] = 1,
) -> None:
    """Replay a version being built by the bulk path until it is close to the head (what
    a rebuild starts before its Faust worker; see `cqrs projections rebuild`)."""
    if not 0 <= lane < lanes:
        console.print(f"[red]--lane must be in 0..{lanes - 1}[/]")
        raise typer.Exit(2)
    projection = _projection(name)
    _logging()
    from streams.replay import Replay

    _run_fast(Replay(get_settings(), projection.at(version), lane, lanes).run())


def _projection(name: str) -> Projection:
    from projections.registry import PROJECTIONS

    if name not in PROJECTIONS:
        console.print(f"[red]unknown projection {name!r}[/]; known: {', '.join(PROJECTIONS)}")
        raise typer.Exit(2)
    return PROJECTIONS[name]


@projections.command("list")
def projections_list() -> None:
    """Every projection: live version, rebuild in progress, lag, dead letters."""
    from projections.status import overview

    settings = get_settings()
    rows = asyncio.run(overview(settings))
    table = Table(
        "projection", "store", "live", "building", "events behind", "seconds behind", "applied", "dead"
    )
    for name, p in rows.items():
        building = p["building"]
        table.add_row(
            name,
            p["store"],
            f"v{p['live_version']}",
            f"v{building['version']} {_percent(building)}" if building else "-",
            str(p["events_behind"]),
            f"{p['seconds_behind']:.1f}",
            str(p["applied"]),
            str(p["dead_lettered"]),
        )
    Console().print(table)


@cdc.command("status")
def cdc_status(
    as_json: Annotated[bool, typer.Option("--json", help="the whole status as JSON")] = False,
) -> None:
    """The connector's and its task's state, its lag behind the source, the CDC job's lag,
    and the errors (exit status 1 when there is any)."""
    import orjson
    from redis.asyncio import Redis

    from streams import cdc as capture

    settings = get_settings()

    async def read() -> dict[str, Any]:
        redis = Redis.from_url(settings.redis_url, socket_timeout=5, socket_connect_timeout=2)
        try:
            return await capture.status(settings, redis)
        finally:
            await redis.aclose()

    found = asyncio.run(read())
    if as_json:
        typer.echo(orjson.dumps(found, option=orjson.OPT_INDENT_2).decode())
    else:
        c, lag, job = found["connector"], found["lag"], found["job"]
        table = Table("", "")
        table.add_row(
            "source",
            f"{found['source']['database']} {found['source']['table']} -> {found['source']['topic']}",
        )
        table.add_row("tenant", found["source"]["tenant"])
        table.add_row("connector", f"{c['name']} {c['state']}")
        for t in c.get("tasks", []):
            table.add_row(f"task {t['id']}", f"{t['state']} on {t.get('worker_id', '-')}")
        table.add_row("source LSN", str(lag["source_lsn"]))
        table.add_row("confirmed LSN", f"{lag['confirmed_lsn']} ({lag['bytes_behind']} bytes behind)")
        table.add_row("job", f"{job['group']}: {job['events_behind']} change events behind")
        for error in found["errors"]:
            table.add_row("[red]error[/]", error)
        Console().print(table)
    if found["errors"]:
        raise typer.Exit(1)


def _connector(action: str) -> None:
    from streams import cdc as capture

    settings = get_settings()
    connect = capture.connect_of(settings)
    try:
        if action == "apply":
            changed = asyncio.run(capture.ensure(settings))
            typer.echo(f"{connect.connector}: {'configured' if changed else 'already as configured'}")
            return
        if action == "remove":
            asyncio.run(capture.remove(settings))
        else:
            asyncio.run(getattr(connect, action)())
    except (capture.ConnectUnavailable, capture.ConnectRefused) as exc:
        console.print(f"[red]{exc}[/]")
        raise typer.Exit(1) from exc
    typer.echo(f"{connect.connector}: {action} done")


@cdc.command("apply")
def cdc_apply() -> None:
    """Create or update the change topic, the publication and the connector from the settings
    (the CDC job does this when it starts)."""
    _connector("apply")


@cdc.command("pause")
def cdc_pause() -> None:
    """Pause the connector: changes wait in the source's WAL (the slot keeps them)."""
    _connector("pause")


@cdc.command("resume")
def cdc_resume() -> None:
    """Resume a paused connector where it stopped."""
    _connector("resume")


@cdc.command("restart")
def cdc_restart() -> None:
    """Restart the connector and its task (after a failure is mended); it resumes from its
    committed offset."""
    _connector("restart")


@cdc.command("remove")
def cdc_remove() -> None:
    """Delete the connector, drop its replication slot and publication (the change topic
    and the datasets stay; a later `apply` snapshots the table again)."""
    _connector("remove")


def _percent(v: dict[str, Any]) -> str:
    return f"{100 * (v['done'] or 0) / v['total']:.0f}%" if v.get("total") else ""


@projections.command("status")
def projections_status(name: Annotated[str, typer.Argument(help="the projection")]) -> None:
    """The versions of one projection: state, progress of a rebuild, workers."""
    from projections.status import describe

    _projection(name)
    info = asyncio.run(describe(get_settings(), name))
    table = Table(
        "version", "state", Column("since", no_wrap=True), "progress", "rate/s", "workers", "detail"
    )
    for v in info["versions"]:
        table.add_row(
            f"v{v['version']}",
            v["state"],
            f"{v['live_since'] or v['created_at']:%Y-%m-%d %H:%M:%S}",
            f"{v['done']}/{v['total']} {_percent(v)}" if v["total"] else "-",
            f"{v['rate']:.0f}" if v["rate"] else "-",
            ", ".join(v["workers"]) or "-",
            (v["detail"] or "")[:60],
        )
    Console().print(table)


@projections.command("rebuild")
def projections_rebuild(
    name: Annotated[str, typer.Argument(help="the projection")],
    swap: Annotated[bool, typer.Option(help="swap the new version in once it has caught up")] = True,
) -> None:
    """Replay the projection from offset 0 into a new version beside the live one, then
    swap it in atomically (readers see the old version until then)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from streams.rebuild import Progress as Step
    from streams.rebuild import Rebuild

    projection = _projection(name)
    _logging()
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]:>8.0f} offsets/s  ETA {task.fields[eta]}"),
        TimeElapsedColumn(),
        console=console,
    ) as bar:
        task = bar.add_task(f"{name}: starting", total=None, rate=0.0, eta="-")

        def report(p: Step) -> None:
            eta = f"{p.eta_s:.0f} s" if p.eta_s is not None else "-"
            bar.update(
                task,
                description=f"{name} v{p.version}: {p.phase}",
                completed=p.done,
                total=max(p.total, 1),
                rate=p.rate,
                eta=eta,
            )

        try:
            result = asyncio.run(Rebuild(get_settings(), projection, report).run(swap=swap))
        except Exception as exc:
            console.print(f"[red]rebuild failed:[/] {exc}")
            raise typer.Exit(1) from exc
    verb = "is live" if swap else "is built (not swapped in)"
    Console().print(
        f"[green]✓[/] {name} v{result.version} {verb}: {result.done} offsets in {result.elapsed_s:.1f} s"
    )


@projections.command("rollback")
def projections_rollback(name: Annotated[str, typer.Argument(help="the projection")]) -> None:
    """Swap the previous (retired) version back in; it catches up from where it stopped."""
    from projections import versions
    from projections.db import create_pool

    projection = _projection(name)
    settings = get_settings()

    async def rollback() -> tuple[int, int]:
        pool = await create_pool(settings, min_size=1, max_size=1)
        try:
            target = await versions.previous(pool, name)
            return target, await versions.swap(pool, settings, projection, target)
        finally:
            await pool.close()

    try:
        live, retired = asyncio.run(rollback())
    except versions.VersionError as exc:
        console.print(f"[red]{exc}[/]")
        raise typer.Exit(1) from exc
    Console().print(f"[green]✓[/] {name}: v{live} is live again (v{retired} retired)")


@app.command("demo")
def demo(
    url: Annotated[str, typer.Option(help="the API")] = "http://127.0.0.1:8000",
    tenant: Annotated[str, typer.Option(help="the tenant that owns the demo data")] = "acme",
) -> None:
    """Create demo datasets and incidents through the API (idempotent), as `demo`, an
    operator of `tenant`, with a token of the local issuer (as `cqrs auth token` makes)."""
    from api.auth.local import issue_token
    from cli.demo import seed

    try:
        sent = seed(url, issue_token(get_settings(), "demo", ["operator"], tenant, 600))
    except Exception as exc:  # the API's answer says what is wrong
        console.print(f"[red]demo data not created:[/] {exc}")
        raise typer.Exit(1) from exc
    Console().print(f"[green]✓[/] demo data in place ({sent} commands answered)")


@topics.command("create")
def topics_create() -> None:
    """Create the topics of the contract with their configurations (existing ones are kept)."""
    from commands import CONTEXTS
    from commands.processor import CONSUMER_NAME
    from shared_kernel.topics import contract_topics, ensure_topics

    settings = get_settings()
    wanted = contract_topics(settings, [c.name for c in CONTEXTS], [CONSUMER_NAME])
    created = asyncio.run(ensure_topics(settings, wanted))
    table = Table("topic", "partitions", "config", "state")
    for t in wanted:
        config = ", ".join(f"{k}={v}" for k, v in (t.topic_configs or {}).items())
        table.add_row(t.name, str(t.num_partitions), config, "created" if t.name in created else "exists")
    Console().print(table)


@schemas.command("asyncapi")
def schemas_asyncapi() -> None:
    """Print the AsyncAPI 3.0 document of the topics (as served at /asyncapi.json)."""
    import orjson

    from api.asyncapi import document

    sys.stdout.write(orjson.dumps(document(get_settings()), option=orjson.OPT_INDENT_2).decode() + "\n")


@dlq.command("list")
def dlq_list(
    consumer: Annotated[
        str | None, typer.Option(help="one consumer (e.g. incidents, job-quality-monitor)")
    ] = None,
    key: Annotated[str | None, typer.Option(help="only this record key (an aggregate id)")] = None,
    state: Annotated[str, typer.Option(help="all, unresolved, parked, open, retried or skipped")] = "all",
    limit: Annotated[int, typer.Option(min=1, max=500)] = 50,
) -> None:
    """The newest dead letters, newest first, with their state."""
    from projections import parking
    from streams import dead_letters

    _known_consumer(consumer)

    async def main() -> dict[str, Any]:
        found = await dead_letters.listing(get_settings(), consumer, key, limit, scan=state != "all")
        async with _pool() as pool:
            found["items"] = await parking.with_states(pool, found["items"], state, limit)
        return found

    found = asyncio.run(main())
    table = Table("at", "consumer", "position", "key", "state", "event", "error")
    for d in found["items"]:
        table.add_row(
            d["at"][:19], d["consumer"], f"{d['partition']}:{d['offset']}", d["key"] or "", d["state"],
            d["event_type"] or "", d["error"][:80],
        )  # fmt: skip
    console.print(table)
    console.print(f"{len(found['items'])} dead letters of {len(found['consumers'])} consumers")


def _known_consumer(consumer: str | None) -> None:
    from streams import dead_letters

    if consumer is not None and consumer not in dead_letters.consumers():
        console.print(f"[red]no consumer named {consumer!r}[/]; known: {', '.join(dead_letters.consumers())}")
        raise typer.Exit(1)


@contextlib.asynccontextmanager
async def _pool() -> AsyncIterator[Any]:
    from projections.db import create_pool
    from projections.migrations import migrate

    settings = get_settings()
    await migrate(settings)
    pool = await create_pool(settings, "cli", min_size=1, max_size=2)
    try:
        yield pool
    finally:
        await pool.close()


@dlq.command("parked")
def dlq_parked(
    consumer: Annotated[str | None, typer.Option(help="one projection")] = None,
    key: Annotated[str | None, typer.Option(help="only this key")] = None,
) -> None:
    """The keys parked behind a dead letter: which one, why, how many records held."""
    from projections import parking

    _known_consumer(consumer)

    async def main() -> list[dict[str, Any]]:
        async with _pool() as pool:
            return await parking.parked_listing(pool, consumer, key, 500)

    items = asyncio.run(main())
    table = Table("since", "consumer", "key", "dead letter", "held", "request", "error")
    for d in items:
        at = d["dead_letter"]
        table.add_row(
            d["parked_at"][:19], f"{d['consumer']} v{d['version']}", d["key"],
            f"{at['partition']}:{at['offset']}", str(d["held"]), str(d["request_id"] or ""), d["error"][:80],
        )  # fmt: skip
    console.print(table)
    console.print(f"{len(items)} keys parked")


@dlq.command("retry")
def dlq_retry(
    consumer: Annotated[str, typer.Argument(help="the projection or job-<name> that dead-lettered it")],
    partition: Annotated[int | None, typer.Argument(help="the dead letter's partition")] = None,
    offset: Annotated[int | None, typer.Argument(help="the dead letter's offset")] = None,
    every: Annotated[
        bool, typer.Option("--all", help="every dead letter of CONSUMER that parks a key")
    ] = False,
    key: Annotated[str | None, typer.Option(help="with --all: only this key's")] = None,
) -> None:
    """Apply a dead letter again after a fix, then its key's held records in order (or,
    with --all, every parked key's), with a progress bar; exits 1 if any failed again."""
    if every == (partition is not None):
        console.print("[red]give PARTITION OFFSET of one dead letter, or --all[/]")
        raise typer.Exit(2)
    _act_on_dead_letters(consumer, "retry", None if every else (partition or 0, offset or 0), key)


@dlq.command("skip")
def dlq_skip(
    consumer: Annotated[str, typer.Argument(help="the projection or job-<name> that dead-lettered it")],
    partition: Annotated[int, typer.Argument(help="the dead letter's partition")],
    offset: Annotated[int, typer.Argument(help="the dead letter's offset")],
) -> None:
    """Leave a dead letter unapplied and apply its key's held records in order."""
    _act_on_dead_letters(consumer, "skip", (partition, offset), None)


def _act_on_dead_letters(consumer: str, action: str, one: tuple[int, int] | None, key: str | None) -> None:
    import getpass

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from projections import parking

    _known_consumer(consumer)
    if not parking.parks(consumer):
        console.print(f"[red]{consumer} does not park keys behind its dead letters[/]")
        raise typer.Exit(1)
    actor = f"cli:{getpass.getuser()}"

    async def main() -> list[dict[str, Any]]:
        async with _pool() as pool:
            if one is None:
                asked = await parking.request_all(pool, consumer, key, actor)
            else:
                asked = [await parking.request(pool, consumer, one[0], one[1], action, actor)]
            with Progress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                console=console,
            ) as bar:  # fmt: skip
                task = bar.add_task(f"{consumer}: {action}", total=len(asked))
                done: dict[int, dict[str, Any]] = {}
                while len(done) < len(asked):
                    for a in asked:
                        if a["id"] not in done:
                            now = await parking.action(pool, a["id"])
                            if now is not None and now["outcome"] != "pending":
                                done[a["id"]] = now
                    bar.update(task, completed=len(done))
                    if len(done) < len(asked):
                        await asyncio.sleep(0.2)
            return [done[a["id"]] for a in asked]

    try:
        results = asyncio.run(main())
    except parking.NotParked as exc:
        console.print(f"[red]{exc}[/]")
        raise typer.Exit(1) from exc
    failed = [r for r in results if r["outcome"] != "applied"]
    for r in results:
        mark = "[green]✓[/]" if r["outcome"] == "applied" else "[red]✗[/]"
        at = r["dead_letter"]
        console.print(
            f"{mark} {r['action']} {at['partition']}:{at['offset']} key {r['key']}: {r['outcome']}, "
            f"{r['applied']} applied" + (f" ({r['error'][:120]})" if r["error"] else "")
        )
    if failed:
        raise typer.Exit(1)


@dlq.command("actions")
def dlq_actions(
    consumer: Annotated[str | None, typer.Option(help="one consumer")] = None,
    limit: Annotated[int, typer.Option(min=1, max=500)] = 50,
) -> None:
    """What operators did to dead letters, newest first."""
    from projections import parking

    _known_consumer(consumer)

    async def main() -> list[dict[str, Any]]:
        async with _pool() as pool:
            return await parking.actions(pool, consumer, limit)

    table = Table("asked", "actor", "action", "consumer", "dead letter", "key", "outcome", "applied")
    for a in asyncio.run(main()):
        at = a["dead_letter"]
        table.add_row(
            a["requested_at"][:19], a["actor"], a["action"], a["consumer"],
            f"{at['partition']}:{at['offset']}", a["key"] or "", a["outcome"], str(a["applied"]),
        )  # fmt: skip
    console.print(table)


@dlq.command("show")
def dlq_show(consumer: str, partition: int, offset: int) -> None:
    """One dead letter: headers, error, source, and its value decoded where it can be."""
    import orjson

    from streams import dead_letters

    found = asyncio.run(dead_letters.one(get_settings(), consumer, partition, offset))
    if found is None:
        console.print(f"[red]no dead letter of {consumer} at {partition}:{offset}[/]")
        raise typer.Exit(1)
    sys.stdout.write(orjson.dumps(found, option=orjson.OPT_INDENT_2, default=str).decode() + "\n")


@schemas.command("check")
def schemas_check() -> None:
    """Check the schemas: every event type has one, every older version is readable."""
    from commands import CONTEXTS
    from shared_kernel.avro import AvroCodec, SchemaError
    from shared_kernel.schema_check import check

    try:
        codec = AvroCodec.from_directory()
    except SchemaError as exc:
        console.print(f"[red]schema error:[/] {exc}")
        raise typer.Exit(1) from exc
    problems = check(codec, {name for ctx in CONTEXTS for name in ctx.events})
    for p in problems:
        console.print(f"[red]✗[/] {p}")
    if problems:
        raise typer.Exit(1)
    console.print(f"[green]✓[/] {len(codec.type_names)} event types, {len(codec.versions)} schema versions")


def _run_fast(main: Coroutine[Any, Any, None]) -> None:
    """Run a long-lived service on uvloop (as uvicorn does for the API): the processor's
    transaction round trips are hops between tasks, and uvloop makes each hop cheaper."""
    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main)


def main() -> None:
    sys.exit(app())
