"""The ``sagaflow`` command: the Typer application and its entry point."""

from __future__ import annotations

import signal
from typing import Annotated

import typer

from sagaflow.cli import broker, check, dashboard, dlq, run, sagas, tools
from sagaflow.cli.common import EARLY_SIGNALS, begin_invocation

__all__ = ["app", "main"]

app = typer.Typer(
    name="sagaflow",
    help="Orchestrated sagas over RabbitMQ and PostgreSQL: run, inspect and operate them.\n\n"
    "Settings come from SAGAFLOW_* environment variables (SAGAFLOW_AMQP_URL, "
    "SAGAFLOW_DATABASE_URL, SAGAFLOW_SCHEMA, SAGAFLOW_PREFIX...). Exit codes: 0 ok, "
    "1 operational failure, 2 usage error.",
    no_args_is_help=True,
    add_completion=False,
    # tracebacks only with --debug, and never rich's (it prints local variables: secrets)
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        from sagaflow import __version__

        typer.echo(f"sagaflow {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks and debug logs.")] = False,
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version."),
    ] = False,
) -> None:
    """Orchestrated sagas over RabbitMQ and PostgreSQL."""
    begin_invocation(debug=debug)


app.add_typer(tools.db_app, name="db")
app.command("coordinator")(run.coordinator)
app.command("worker")(run.worker)
app.command("start")(sagas.start)
app.add_typer(sagas.app, name="sagas")
app.add_typer(dlq.app, name="dlq")
app.add_typer(broker.app, name="broker")
app.command("graph")(tools.graph)
app.command("schema")(tools.schema)
app.command("participant-check")(check.participant_check)
app.command("demo")(tools.demo)
app.command("dashboard")(dashboard.dashboard)


def main() -> None:
    """The console script: run the ``sagaflow`` command."""
    # A supervisor may stop a process that is still starting (loading the
    # user's modules, connecting): note the signal now, act on it once the
    # event loop runs, instead of dying by the default handler.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _note_early_signal)
    app(prog_name="sagaflow")


def _note_early_signal(signum: int, frame: object) -> None:
    EARLY_SIGNALS.append(signum)
