"""`cqrs`: one console script for every process and admin task.

cqrs serve api                 the HTTP API (uvicorn)
cqrs run command-processor     the write side's single writer per partition
cqrs topics create             create the contract topics (idempotent)
cqrs schemas check             every event has a schema; every schema reads its history
"""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import Coroutine
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from shared_kernel.settings import get_settings
from shared_kernel.telemetry import configure_logging

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Kafka-native event-sourced CQRS backend.")
serve = typer.Typer(no_args_is_help=True, help="Serve HTTP.")
run = typer.Typer(no_args_is_help=True, help="Run a long-lived processor.")
topics = typer.Typer(no_args_is_help=True, help="Kafka topics of the contract.")
schemas = typer.Typer(no_args_is_help=True, help="Avro schemas.")
app.add_typer(serve, name="serve")
app.add_typer(run, name="run")
app.add_typer(topics, name="topics")
app.add_typer(schemas, name="schemas")
console = Console(stderr=True)


def _logging() -> None:
    s = get_settings()
    configure_logging(s.log_level, s.log_json)


async def _until_signalled(main: object) -> None:
    """Run `main(stop)` until SIGINT/SIGTERM sets `stop`."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await main(stop)  # type: ignore[operator]


@serve.command("api")
def serve_api(
    host: Annotated[str, typer.Option(help="Bind address.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port.")] = 8000,
    workers: Annotated[int, typer.Option(help="Worker processes.")] = 1,
) -> None:
    """Serve the HTTP API."""
    import uvicorn

    _logging()
    uvicorn.run(
        "api.app:create_app",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        log_config=None,
        access_log=False,
        lifespan="on",
    )


@run.command("command-processor")
def run_command_processor() -> None:
    """Decide commands and append their events, exactly once (Ctrl-C to stop)."""
    from commands.processor import CommandProcessor

    _logging()
    processor = CommandProcessor(get_settings())
    _run_fast(_until_signalled(processor.run))


@run.command("projector")
def run_projector(
    name: Annotated[
        str,
        typer.Argument(help="the projection, e.g. datasets, events or datasets_search"),
    ],
) -> None:
    """Keep one read model up to date from the events topics (a Faust worker)."""
    from projections.registry import PROJECTIONS
    from streams.app import ProjectionApp

    if name not in PROJECTIONS:
        console.print(f"[red]unknown projection {name!r}[/]; known: {', '.join(PROJECTIONS)}")
        raise typer.Exit(2)
    _logging()
    ProjectionApp(get_settings(), PROJECTIONS[name]).run()


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
