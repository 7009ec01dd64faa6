"""``sagaflow participant-check``: the conformance kit (:mod:`sagaflow.conformance`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import orjson
import typer

from sagaflow.cli.common import UsageProblem, current_settings, echo_json, guarded, run_async
from sagaflow.cli.resolve import load_sagas

__all__ = ["participant_check"]


@guarded
def participant_check(
    specs: Annotated[
        list[str],
        typer.Argument(metavar="MODULE:ATTR...", help="The sagas the coordinator runs."),
    ],
    service: Annotated[str, typer.Option("--service", help="The participant's service name.")],
    samples: Annotated[
        Path,
        typer.Option(
            "--samples",
            exists=True,
            dir_okay=False,
            help='JSON: a valid command per action type, {"inventory.reserve": {...}, ...}, '
            'and under "refusals" commands to refuse, {"inventory.reserve": [{"command": {...}, '
            '"reason": "out_of_stock"}]}; "{key}" in a string becomes a key unique to each check.',
        ),
    ],
    effects_query: Annotated[
        str | None,
        typer.Option(
            "--effects-query",
            help="SQL counting the effects of the command whose key is $1 "
            '(effects-once and tombstone checks); "effects" in --samples gives one per action.',
        ),
    ] = None,
    prepare_sql: Annotated[
        str | None,
        typer.Option(
            "--prepare-sql",
            help="SQL run with each fresh key as $1 before its commands are sent "
            "(rows the actions expect to exist).",
        ),
    ] = None,
    effects_database: Annotated[
        str | None,
        typer.Option(
            "--effects-database",
            help="Where --effects-query and --prepare-sql run (default SAGAFLOW_DATABASE_URL).",
        ),
    ] = None,
    timeout: Annotated[
        float, typer.Option("--timeout", min=0.1, help="Seconds to wait for each answer.")
    ] = 10.0,
    quiet: Annotated[
        float,
        typer.Option("--quiet", min=0.1, help="Seconds of silence that show no reply was sent."),
    ] = 1.5,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
) -> None:
    """Check a running participant, in any language, against docs/protocol.md.

    Black-box, through the broker: replies, duplicates, redelivery, effects once,
    compensations, tombstones, and the dead-letter reason of each kind of hostile
    message. Run it where no coordinator consumes the replies queue. Exit code 0
    when every obligation passes, 1 otherwise.
    """
    from sagaflow.conformance import Check, run_checks, steps_of  # the broker client: when used

    settings = current_settings()
    steps = steps_of(load_sagas(specs), service)
    if not steps:
        raise UsageProblem(f"no step of {' '.join(specs)} is served by {service!r}")
    try:
        sample_commands = orjson.loads(samples.read_bytes())
    except orjson.JSONDecodeError as exc:
        raise UsageProblem(f"{samples}: not JSON: {exc}") from None
    if not isinstance(sample_commands, dict):
        raise UsageProblem(f"{samples}: must be an object of action type to command")
    refusals = sample_commands.pop("refusals", {})
    effects_queries = sample_commands.pop("effects", {})
    if not isinstance(effects_queries, dict) or not all(
        isinstance(q, str) for q in effects_queries.values()
    ):
        raise UsageProblem(f'{samples}: "effects" must map action types to SQL')
    if not isinstance(refusals, dict) or not all(
        isinstance(r, dict)
        and isinstance(r.get("command"), dict)
        and isinstance(r.get("reason"), str)
        for cases in refusals.values()
        for r in (cases if isinstance(cases, list) else [None])
    ):
        raise UsageProblem(
            f'{samples}: "refusals" must map action types to lists of {{"command", "reason"}}'
        )
    check = Check(
        amqp_url=settings.amqp_url,
        service=service,
        steps=steps,
        samples=sample_commands,
        topology=settings.topology(),
        keys=settings.keys(),
        strict=settings.strict_payloads,
        effects_query=effects_query,
        effects_queries=effects_queries,
        prepare_sql=prepare_sql,
        refusals=refusals,
        database_url=effects_database or settings.database_url,
        timeout=timeout,
        quiet=quiet,
        max_message_bytes=settings.max_message_bytes,
    )
    try:
        results = run_async(run_checks(check))
    except ValueError as exc:
        raise UsageProblem(str(exc)) from None
    failed = [r for r in results if not r.passed]
    if as_json:
        echo_json([{**vars(r)} for r in results])
    else:
        for result in results:
            typer.echo(result.line())
        typer.echo(
            f"{len(results) - len(failed)} passed, {len(failed)} failed "
            f"(obligations: docs/protocol.md#participant-obligations)"
        )
    if failed:
        raise typer.Exit(1)
