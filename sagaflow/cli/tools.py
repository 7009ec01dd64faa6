"""``sagaflow db migrate``, ``sagaflow graph`` and ``sagaflow demo``."""

from __future__ import annotations

import inspect
import logging
import os
from typing import Annotated, Any

import typer

from sagaflow.cli.common import (
    CliError,
    UsageProblem,
    current_settings,
    echo_json,
    guarded,
    run_async,
)
from sagaflow.cli.resolve import import_module, load_sagas
from sagaflow.core.definition import to_mermaid

__all__ = ["db_app", "demo", "graph", "migrate"]

log = logging.getLogger("sagaflow.cli")

db_app = typer.Typer(name="db", help="Manage the database schema.", no_args_is_help=True)


@db_app.command("migrate")
@guarded
def migrate(
    schema: Annotated[
        str | None,
        typer.Option("--schema", help="The schema to migrate (default: SAGAFLOW_SCHEMA)."),
    ] = None,
    participant: Annotated[
        str | None,
        typer.Option(
            "--participant",
            metavar="SERVICE",
            help="Migrate this participant's inbox instead (workers also do it at start).",
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
) -> None:
    """Create or update the tables; safe to run again and from several processes at once."""
    from sagaflow.store.migrate import migrate as migrate_coordinator
    from sagaflow.store.migrate import migrate_participant

    settings = current_settings()
    if participant is not None:
        target = schema or settings.participant_schema_for(participant)
        applied = run_async(migrate_participant(settings.database_url, target))
    else:
        target = schema or settings.db_schema
        applied = run_async(migrate_coordinator(settings.database_url, target))
    log.info("migrated", extra={"schema": target, "applied": applied})
    if as_json:
        echo_json({"schema": target, "applied": applied})
    elif applied:
        for version in applied:
            typer.echo(f"applied {version}")
    else:
        typer.echo(f"schema {target!r} is up to date")


@guarded
def graph(
    spec: Annotated[str, typer.Argument(metavar="MODULE:ATTR", help="A Saga or a list of Sagas.")],
) -> None:
    """Print a saga definition as a Mermaid flowchart."""
    sagas = load_sagas([spec])
    typer.echo("\n".join(to_mermaid(saga) for saga in sagas), nl=False)


@guarded
def demo(
    real: Annotated[
        bool,
        typer.Option(
            "--real",
            help="Run real processes on RabbitMQ and PostgreSQL (needs the repository's "
            "services/; also chosen when SAGAFLOW_AMQP_URL or SAGAFLOW_DATABASE_URL is set).",
        ),
    ] = False,
    orders: Annotated[int, typer.Option("--orders", min=1, help="How many orders.")] = 200,
) -> None:
    """Run the example shop: sagas that complete and sagas that compensate.

    By default in this process, over the in-memory transport and stores (no
    servers needed); ``--real`` runs it as separate processes.
    """
    current_settings()  # logging as configured
    by_environment = [name for name in _REAL_DEMO_SETTINGS if os.environ.get(name)]
    if real or by_environment:
        entry: Any = getattr(_real_demo(by_environment if not real else []), "main", None)
        if not callable(entry):
            raise CliError("services.demo has no main() function")
        result = entry(real=True, orders=orders)
    else:
        from sagaflow.examples.shop import demo as shop

        result = shop.main(orders=orders)
    if inspect.isawaitable(result):
        result = run_async(_awaited(result))
    if isinstance(result, int) and not isinstance(result, bool) and result != 0:
        raise typer.Exit(result)


_REAL_DEMO_SETTINGS = ("SAGAFLOW_AMQP_URL", "SAGAFLOW_DATABASE_URL")


def _real_demo(chosen_by: list[str]) -> Any:
    """The repository's ``services.demo``: the real demo starts the example services
    as processes, and they are not part of the installed package."""
    why = f" ({' and '.join(chosen_by)} set: unset to run it embedded)" if chosen_by else ""
    try:
        return import_module("services.demo")
    except UsageProblem as exc:
        raise UsageProblem(
            f"the real demo{why} runs the example services of the sagaflow repository, "
            "which are not installed with the package: run it from a checkout's root "
            "(with pip install -e '.[services]'); `sagaflow demo` without --real runs "
            f"in memory anywhere ({exc.message})"
        ) from exc
    except CliError as exc:
        raise CliError(
            f"the real demo{why} needs the services extra (pip install -e '.[services]' "
            f"in a checkout): {exc.message}"
        ) from exc


async def _awaited(awaitable: Any) -> Any:
    return await awaitable
