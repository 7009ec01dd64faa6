"""``sagaflow db migrate``, ``db prune``, ``graph``, ``schema`` and ``demo``."""

from __future__ import annotations

import inspect
import logging
import os
import time
from datetime import UTC, datetime
from typing import Annotated, Any

import typer

from sagaflow.cli import common
from sagaflow.cli.common import (
    CliError,
    UsageProblem,
    current_settings,
    echo_json,
    guarded,
    run_async,
)
from sagaflow.cli.resolve import import_module, load_sagas
from sagaflow.config import MIN_INBOX_RETENTION, Settings, parse_duration
from sagaflow.core.definition import to_mermaid
from sagaflow.core.export import definition_document
from sagaflow.core.ports import Pruned

__all__ = ["db_app", "demo", "graph", "migrate", "prune", "schema"]

log = logging.getLogger("sagaflow.cli")

db_app = typer.Typer(
    name="db", help="Manage the database: schema and retention.", no_args_is_help=True
)


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
        run_async(_advise_on_vacuum(settings.database_url, target))
    log.info("migrated", extra={"schema": target, "applied": applied})
    if as_json:
        echo_json({"schema": target, "applied": applied})
    elif applied:
        for version in applied:
            typer.echo(f"applied {version}")
    else:
        typer.echo(f"schema {target!r} is up to date")


async def _advise_on_vacuum(dsn: str, schema: str) -> None:
    """The autovacuum warning, once, where the tables are set up (not on every read)."""
    from sagaflow.store.postgres import PostgresSagaStore

    store = PostgresSagaStore(dsn, schema=schema, min_size=1, max_size=1)
    await store.start()
    try:
        await store.warn_if_unvacuumed()
    finally:
        await store.close()


@db_app.command("prune")
@guarded
def prune(
    participant: Annotated[
        str | None,
        typer.Option(
            "--participant",
            metavar="SERVICE",
            help="Prune this participant's inbox instead (its workers also do it on their own).",
        ),
    ] = None,
    older_than: Annotated[
        str | None,
        typer.Option(
            "--older-than",
            metavar="DURATION",
            help="Keep what is younger (30d, 12h...); default: SAGAFLOW_RETENTION, or "
            "SAGAFLOW_INBOX_RETENTION with --participant.",
        ),
    ] = None,
    failed_older_than: Annotated[
        str | None,
        typer.Option(
            "--failed-older-than",
            metavar="DURATION",
            help="Also delete FAILED sagas this old; default: SAGAFLOW_FAILED_RETENTION "
            "(unset: FAILED sagas are kept).",
        ),
    ] = None,
    batch: Annotated[
        int | None,
        typer.Option(
            "--batch", min=1, max=100_000, help="Rows per transaction (SAGAFLOW_PRUNE_BATCH)."
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
) -> None:
    """Delete finished sagas (and their log) past their retention, or a participant's
    old inbox rows, in short batches; safe while coordinators and workers run.

    COMPLETED, COMPENSATED and CANCELLED sagas are deleted once their last change
    is older than the retention; FAILED ones only with --failed-older-than (or
    SAGAFLOW_FAILED_RETENTION). The coordinator runs the same prune every
    SAGAFLOW_PRUNE_INTERVAL.
    """
    settings = current_settings()
    size = batch or settings.prune_batch
    started = time.monotonic()
    if participant is not None:
        keep = _duration(older_than, "--older-than") if older_than else settings.inbox_retention
        report = _prune_inbox(settings, participant, keep, size)
    else:
        finished = _duration(older_than, "--older-than") if older_than else settings.retention
        failed = (
            _duration(failed_older_than, "--failed-older-than")
            if failed_older_than
            else settings.failed_retention
        )
        report = _prune_sagas(settings, finished, failed, size)
    if report is None:
        return
    said = report.pop("said")
    report["seconds"] = round(time.monotonic() - started, 3)
    log.info("pruned", extra=report)
    if as_json:
        echo_json(report)
    else:
        typer.echo(f"{said} in {report['seconds']:.1f}s")


def _prune_inbox(
    settings: Settings, service: str, keep: float | None, batch: int
) -> dict[str, Any] | None:
    from sagaflow.runtime.retention import prune_inbox

    if keep is None:
        typer.echo("inbox rows are kept forever (SAGAFLOW_INBOX_RETENTION): nothing to do")
        return None
    if keep < MIN_INBOX_RETENTION:
        raise UsageProblem(
            "--older-than must be at least 1d for an inbox: a command redelivered after"
            " its row is gone runs again (docs/operations.md)"
        )
    now = time.time()

    async def go() -> int:
        store = common.participant_store(settings, service)
        await store.start()
        try:
            return await prune_inbox(store, keep, now, batch=batch)
        finally:
            await store.close()

    deleted = run_async(go())
    before = _iso(now - keep)
    return {
        "participant": service,
        "schema": settings.participant_schema_for(service),
        "before": before,
        "inbox_rows": deleted,
        "said": f"deleted {deleted} inbox rows of {service} written before {before}",
    }


def _prune_sagas(
    settings: Settings, finished: float | None, failed: float | None, batch: int
) -> dict[str, Any] | None:
    from sagaflow.runtime.retention import Retention, prune_sagas

    retention = Retention(finished=finished, failed=failed, batch=batch)
    if not retention.prunes_sagas:
        typer.echo("sagas are kept forever (SAGAFLOW_RETENTION): nothing to do")
        return None
    now = time.time()

    async def go() -> Pruned:
        async with common.opened_store(settings) as store:
            return await prune_sagas(store, retention, now)

    pruned = run_async(go())
    before = None if finished is None else _iso(now - finished)
    failed_before = None if failed is None else _iso(now - failed)
    cutoffs = [f"finished before {before}"] if before else []
    cutoffs += [f"FAILED before {failed_before}"] if failed_before else []
    return {
        "schema": settings.db_schema,
        "before": before,
        "failed_before": failed_before,
        "sagas": pruned.sagas,
        "log_entries": pruned.log_entries,
        "said": f"deleted {pruned.sagas} sagas and {pruned.log_entries} log entries"
        f" ({', '.join(cutoffs)})",
    }


def _duration(text: str, option: str) -> float:
    try:
        seconds = parse_duration(text)
    except ValueError as exc:
        raise UsageProblem(f"{option}: {exc}") from None
    if seconds is None or seconds <= 0:
        raise UsageProblem(f"{option} needs a positive duration (30d, 12h...), not {text!r}")
    return seconds


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="seconds")


@guarded
def graph(
    spec: Annotated[str, typer.Argument(metavar="MODULE:ATTR", help="A Saga or a list of Sagas.")],
    output: Annotated[
        str,
        typer.Option(
            "--format",
            "-f",
            help="mermaid (a flowchart) or json (the whole definition, with each "
            "action's command and reply JSON Schema).",
        ),
    ] = "mermaid",
) -> None:
    """Print a saga definition as a Mermaid flowchart, or as JSON."""
    if output not in ("mermaid", "json"):
        raise UsageProblem(f"--format must be mermaid or json, not {output!r}")
    sagas = load_sagas([spec])
    if output == "json":
        strict = current_settings().strict_payloads  # the schemas `sagaflow schema` prints
        documents = [definition_document(saga, strict=strict) for saga in sagas]
        echo_json(documents[0] if len(documents) == 1 else documents)
        return
    typer.echo("\n".join(to_mermaid(saga) for saga in sagas), nl=False)


@guarded
def schema(
    specs: Annotated[
        list[str],
        typer.Argument(metavar="MODULE:ATTR...", help="Sagas (or lists of them) whose actions."),
    ],
    service: Annotated[
        str | None, typer.Option("--service", help="Only this service's actions.")
    ] = None,
    strict: Annotated[
        bool | None,
        typer.Option(
            "--strict/--lax",
            help="Schemas for strict or lax payload validation (default: "
            "SAGAFLOW_STRICT_PAYLOADS, true).",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Print the JSON Schema of every action's command and reply, as JSON.

    For participants in other languages: the schemas are draft 2020-12, like
    the envelope's in docs/protocol.md, and each action lists the steps that
    send it with their timeout and retry policy.
    """
    from sagaflow.core.schema import action_schemas

    chosen = current_settings().strict_payloads if strict is None else strict
    exported = action_schemas(load_sagas(specs), strict=chosen, service=service)
    if service is not None and not exported["actions"]:
        raise UsageProblem(f"no action of service {service!r} in {' '.join(specs)}")
    echo_json(exported)


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
