"""`cqrs`: the composition root's command line (Typer)."""

from __future__ import annotations

import typer

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__)


@app.callback()
def _root() -> None:
    """Kafka-native event-sourced CQRS backend."""


def main() -> None:
    app()
