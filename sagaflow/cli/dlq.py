"""``sagaflow dlq list/replay``: the dead-letter queue, seen and emptied by an operator."""

from __future__ import annotations

import logging
import time
from typing import Annotated

import typer
from rich.table import Table

from sagaflow.cli import common
from sagaflow.cli.common import (
    CliError,
    UsageProblem,
    current_settings,
    default_user,
    echo_json,
    guarded,
    run_async,
    stdout_console,
)
from sagaflow.core.ports import DeadLetter
from sagaflow.runtime.dead_letters import Replayed, dead_letter_document, replay_dead_letters

__all__ = ["app", "dead_letter_document"]

log = logging.getLogger("sagaflow.cli")

app = typer.Typer(
    name="dlq",
    help="Inspect and replay dead-lettered messages.",
    no_args_is_help=True,
)

_CONNECTION = "sagaflow-cli"


@app.command("list")
@guarded
def list_letters(
    limit: Annotated[int, typer.Option("--limit", min=1, max=10_000)] = 100,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
) -> None:
    """Peek at dead letters (oldest first); they stay in the queue."""
    settings = current_settings()

    async def go() -> list[DeadLetter]:
        async with common.opened_transport(settings, name=_CONNECTION) as broker:
            return await broker.dead_letters(limit)

    documents = [dead_letter_document(letter) for letter in run_async(go())]
    if as_json:
        echo_json(documents)
        return
    if not documents:
        typer.echo("no dead letters", err=True)
        return
    table = Table(box=None, header_style="bold", pad_edge=False)
    for column in ("ID", "REASON", "QUEUE", "SAGA ID", "TYPE"):
        table.add_column(column, no_wrap=column != "REASON")
    for doc in documents:
        table.add_row(
            doc["id"], doc["reason"], doc["source_queue"], doc["saga_id"] or "", doc["type"] or ""
        )
    stdout_console().print(table)


@app.command("replay")
@guarded
def replay(
    ids: Annotated[
        list[str] | None, typer.Argument(metavar="ID...", help="Dead letters to replay.")
    ] = None,
    replay_all: Annotated[bool, typer.Option("--all", help="Replay every dead letter.")] = False,
    reason: Annotated[str, typer.Option("--reason", "-r", help="Why (logged).")] = "",
    by: Annotated[
        str | None, typer.Option("--by", help="Who asks (logged; default: the OS user).")
    ] = None,
) -> None:
    """Re-publish dead letters to the queue they came from (fix the cause first).

    Each replayed message that belongs to a known saga gets a
    ``dead_letter_replayed`` entry in that saga's log, with who and why.
    """
    settings = current_settings()
    if ids and replay_all:
        raise UsageProblem("pass either ids or --all, not both")
    if not ids and not replay_all:
        raise UsageProblem("name the dead letters to replay (ID...) or pass --all")
    if not reason.strip():
        raise UsageProblem("--reason is required: say why these messages are replayed")
    who = by or default_user()
    wanted = None if replay_all else list(dict.fromkeys(ids or []))

    async def go() -> Replayed:
        async with (
            common.opened_transport(settings, name=_CONNECTION) as broker,
            common.opened_store(settings) as store,
        ):
            return await replay_dead_letters(
                broker, store, wanted, by=who, reason=reason, now=time.time()
            )

    result = run_async(go())
    count, recorded = len(result.ids), result.recorded
    log.info(
        "dead letters replayed",
        extra={"by": who, "reason": reason, "ids": wanted or "all", "count": count},
    )
    typer.echo(f"replayed {count} dead letter{'s' if count != 1 else ''}")
    if result.record_error is not None:
        typer.echo(f"warning: not recorded in the saga logs: {result.record_error}", err=True)
    if recorded:
        typer.echo(f"recorded in the log of {recorded} saga{'s' if recorded != 1 else ''}")
    if wanted is not None and count < len(wanted):
        raise CliError(
            f"{len(wanted) - count} of {len(wanted)} ids were not in the dead-letter queue"
        )
