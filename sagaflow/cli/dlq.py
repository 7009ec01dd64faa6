"""``sagaflow dlq list/replay``: the dead-letter queue, seen and emptied by an operator."""

from __future__ import annotations

import base64
import logging
import time
from typing import Annotated, Any

import orjson
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
from sagaflow.config import Settings
from sagaflow.core.errors import SagaflowError
from sagaflow.core.ports import DeadLetter, UnitOfWork
from sagaflow.core.state import LogEntry, LogEvent

__all__ = ["app", "dead_letter_document"]

log = logging.getLogger("sagaflow.cli")

app = typer.Typer(
    name="dlq",
    help="Inspect and replay dead-lettered messages.",
    no_args_is_help=True,
)

_CONNECTION = "sagaflow-cli"
_MAX_LETTERS = 10_000


def dead_letter_document(letter: DeadLetter) -> dict[str, Any]:
    """A dead letter as ``dlq list --json`` prints it.

    When the body is a sagaflow envelope, its saga id, type and step are lifted
    out; the body is given as text when it is UTF-8, else base64.
    """
    envelope: dict[str, Any] = {}
    try:
        parsed = orjson.loads(letter.body)
        if isinstance(parsed, dict):
            envelope = parsed
    except orjson.JSONDecodeError:
        pass
    document: dict[str, Any] = {
        "id": letter.id,
        "reason": letter.reason,
        "source_queue": letter.source_queue,
        "saga_id": envelope.get("saga_id"),
        "type": envelope.get("type"),
        "step": envelope.get("step"),
        "kind": envelope.get("kind"),
        "headers": dict(letter.headers),
    }
    try:
        document["body"] = letter.body.decode("utf-8")
    except UnicodeDecodeError:
        document["body_base64"] = base64.b64encode(letter.body).decode("ascii")
    return document


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

    async def go() -> tuple[int, int]:
        async with common.opened_transport(settings, name=_CONNECTION) as broker:
            # what is about to go back, to record it in each saga's log afterwards
            present = await broker.dead_letters(_MAX_LETTERS)
            replayed = set(await broker.replay_dead_letters(wanted))
        chosen = [letter for letter in present if letter.id in replayed]
        return len(replayed), await _record(settings, chosen, by=who, reason=reason)

    count, recorded = run_async(go())
    log.info(
        "dead letters replayed",
        extra={"by": who, "reason": reason, "ids": wanted or "all", "count": count},
    )
    typer.echo(f"replayed {count} dead letter{'s' if count != 1 else ''}")
    if recorded:
        typer.echo(f"recorded in the log of {recorded} saga{'s' if recorded != 1 else ''}")
    if wanted is not None and count < len(wanted):
        raise CliError(
            f"{len(wanted) - count} of {len(wanted)} ids were not in the dead-letter queue"
        )


async def _record(settings: Settings, letters: list[DeadLetter], *, by: str, reason: str) -> int:
    """Append a ``dead_letter_replayed`` entry (who, why) to the log of each replayed
    letter's saga, when its body names a saga the store knows; returns how many.

    Best effort: the messages are already back in their queues, so a store that
    cannot be reached is reported, not fatal.
    """
    now = time.time()
    try:
        async with common.opened_store(settings) as store:
            entries = []
            for letter in letters:
                doc = dead_letter_document(letter)
                saga_id = doc["saga_id"]
                if not isinstance(saga_id, str) or await store.get(saga_id) is None:
                    continue
                entries.append(
                    LogEntry(
                        saga_id=saga_id,
                        at=now,
                        event=LogEvent.DEAD_LETTER_REPLAYED,
                        step=doc["step"] if isinstance(doc["step"], str) else None,
                        detail={
                            "by": by,
                            "reason": reason,
                            "dead_letter_id": letter.id,
                            "dead_letter_reason": letter.reason,
                            "type": doc["type"],
                            "kind": doc["kind"],
                        },
                    )
                )
            if entries:
                async with store.transaction() as tx:
                    await tx.write(UnitOfWork(log=entries))
            return len(entries)
    except SagaflowError as exc:
        log.warning("replayed, but not recorded in the saga logs: %s", exc)
        typer.echo(f"warning: not recorded in the saga logs: {exc}", err=True)
        return 0
