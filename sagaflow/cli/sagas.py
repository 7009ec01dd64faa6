"""``sagaflow start`` and ``sagaflow sagas list/show/cancel/retry``.

Starting, cancelling and retrying go through :class:`SagaClient`: the state,
the log and the first messages commit in one transaction, and a running
coordinator's outbox relay publishes the messages (it is woken on commit).
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import orjson
import typer
from pydantic import ValidationError

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
    summarize_validation,
)
from sagaflow.cli.render import (
    render_list,
    render_show,
    saga_document,
    saga_summary,
    step_name,
)
from sagaflow.cli.resolve import load_sagas, split_specs
from sagaflow.core.definition import Saga
from sagaflow.core.state import SagaState, SagaStatus
from sagaflow.runtime.client import SagaClient
from sagaflow.runtime.writer import SagaRegistry

__all__ = ["app", "start"]

log = logging.getLogger("sagaflow.cli")

app = typer.Typer(
    name="sagas",
    help="Inspect and operate saga instances.",
    no_args_is_help=True,
)

ModulesOption = Annotated[
    list[str] | None,
    typer.Option(
        "--module",
        "-m",
        metavar="MODULE:ATTR",
        envvar="SAGAFLOW_SAGAS",
        help="Saga definitions: a Saga or a list of Sagas; repeat or separate with commas "
        "(default: SAGAFLOW_SAGAS).",
        show_envvar=False,
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]
ReasonOption = Annotated[
    str, typer.Option("--reason", "-r", help="Why (recorded in the saga log).")
]
ByOption = Annotated[
    str | None,
    typer.Option("--by", help="Who asks (recorded in the saga log; default: the OS user)."),
]


def _registry(modules: list[str] | None) -> SagaRegistry:
    return SagaRegistry(load_sagas(split_specs(modules or [])))


def _parse_data(text: str) -> dict[str, Any]:
    """``--data``: inline JSON, ``@file.json``, or ``-`` for stdin."""
    if text == "-":
        text = sys.stdin.read()
    elif text.startswith("@"):
        try:
            text = Path(text[1:]).read_text("utf-8")
        except OSError as exc:
            raise UsageProblem(f"cannot read --data file {text[1:]!r}: {exc.strerror}") from exc
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise UsageProblem(f"--data is not valid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise UsageProblem("--data must be a JSON object")
    return value


def _find(registry: SagaRegistry, name: str, version: int | None) -> Saga[Any]:
    saga = registry.get(name, version)
    if saga is None:
        known = ", ".join(sorted(f"{s.name}@{s.version}" for s in registry)) or "none"
        which = name if version is None else f"{name}@{version}"
        raise UsageProblem(f"unknown saga {which!r} (known: {known})")
    return saga


@guarded
def start(
    saga_name: Annotated[str, typer.Argument(metavar="SAGA_NAME", help="The saga to start.")],
    data: Annotated[
        str,
        typer.Option("--data", "-d", help="The saga data: JSON, @file.json, or - for stdin."),
    ] = "{}",
    module: ModulesOption = None,
    saga_id: Annotated[
        str | None,
        typer.Option("--id", help="The saga id (default: a new UUID); a duplicate fails."),
    ] = None,
    version: Annotated[
        int | None, typer.Option("--saga-version", help="Default: the latest registered.")
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Start a saga; prints its id. A running coordinator takes it from there."""
    settings = current_settings()
    registry = _registry(module)
    saga = _find(registry, saga_name, version)
    payload = _parse_data(data)
    try:
        model = saga.data_model.model_validate(payload)
    except ValidationError as exc:
        raise UsageProblem(
            f"invalid --data for saga {saga.name!r}: {summarize_validation(exc)}"
        ) from exc

    async def go() -> SagaState:
        async with common.opened_store(settings) as store:
            client = SagaClient(registry, store=store, hooks=common.hooks(settings, "cli"))
            handle = await client.start_saga(saga, model, saga_id=saga_id)
            return handle.state

    state = run_async(go())
    log.info(
        "saga started",
        extra={"saga_id": state.saga_id, "saga_name": saga.name, "by": default_user()},
    )
    if as_json:
        echo_json(saga_summary(state))
    else:
        typer.echo(state.saga_id)


@app.command("list")
@guarded
def list_sagas(
    state: Annotated[
        SagaStatus | None,
        typer.Option("--state", "-s", case_sensitive=False, help="Only sagas in this state."),
    ] = None,
    name: Annotated[str | None, typer.Option("--name", "-n", help="Only this saga.")] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, max=10_000)] = 50,
    overdue: Annotated[
        bool,
        typer.Option(
            "--overdue", help="Only sagas past their deadline (running, or finished late)."
        ),
    ] = False,
    as_json: JsonOption = False,
) -> None:
    """List sagas, most recently updated first."""
    settings = current_settings()
    overdue_at = time.time() if overdue else None

    async def go() -> list[dict[str, Any]]:
        async with common.opened_store(settings) as store:
            found = await store.list(status=state, name=name, limit=limit, overdue_at=overdue_at)
            # the state knows its step by index; the log names it
            return [saga_summary(s, step=step_name(s, await store.log(s.saga_id))) for s in found]

    summaries = run_async(go())
    if as_json:
        echo_json(summaries)
    elif not summaries:
        typer.echo("no sagas", err=True)
    else:
        render_list(stdout_console(), summaries)


@app.command("show")
@guarded
def show(
    saga_id: Annotated[str, typer.Argument(metavar="ID")],
    as_json: JsonOption = False,
) -> None:
    """Show a saga: state, data, failure, trace, and every step attempt from its log."""
    settings = current_settings()

    async def go() -> dict[str, Any]:
        async with common.opened_store(settings) as store:
            found = await store.get(saga_id)
            if found is None:
                raise CliError(f"no saga with id {saga_id!r}")
            entries = await store.log(saga_id)
        return saga_document(found, entries, jaeger_url=settings.jaeger_url)

    document = run_async(go())
    if as_json:
        echo_json(document)
    else:
        render_show(stdout_console(), document)


def _operate(
    verb: str, saga_id: str, reason: str, by: str | None, module: list[str] | None
) -> SagaState:
    settings = current_settings()
    if not reason.strip():
        raise UsageProblem("--reason must not be empty")
    registry = _registry(module)
    who = by or default_user()

    async def go() -> SagaState:
        async with common.opened_store(settings) as store:
            client = SagaClient(registry, store=store, hooks=common.hooks(settings, "cli"))
            if verb == "cancel":
                return await client.cancel_saga(saga_id, by=who, reason=reason)
            return await client.retry_saga(saga_id, by=who, reason=reason)

    state = run_async(go())
    log.info(
        "saga %s requested",
        verb,
        extra={"saga_id": saga_id, "by": who, "reason": reason, "status": state.status.value},
    )
    return state


@app.command("signal")
@guarded
def signal(
    saga_id: Annotated[str, typer.Argument(metavar="ID")],
    name: Annotated[str, typer.Argument(metavar="NAME", help="The signal's name.")],
    reason: ReasonOption,
    data: Annotated[
        str,
        typer.Option("--data", "-d", help="The signal's data: JSON, @file.json, or - for stdin."),
    ] = "{}",
    by: ByOption = None,
    module: ModulesOption = None,
    as_json: JsonOption = False,
) -> None:
    """Send a signal to a saga's wait (an approval...): its data is validated and
    merged, or kept until the saga reaches the wait; sent twice, it counts once."""
    settings = current_settings()
    if not reason.strip():
        raise UsageProblem("--reason must not be empty")
    payload = _parse_data(data)
    registry = _registry(module)
    who = by or default_user()

    async def go() -> SagaState:
        async with common.opened_store(settings) as store:
            client = SagaClient(registry, store=store, hooks=common.hooks(settings, "cli"))
            return await client.signal_saga(saga_id, name, payload, by=who, reason=reason)

    state = run_async(go())
    log.info(
        "saga signalled",
        extra={"saga_id": saga_id, "signal": name, "by": who, "status": state.status.value},
    )
    if as_json:
        echo_json(saga_summary(state))
    elif state.waiting_for == name or name in state.signals:
        typer.echo(f"saga {saga_id}: signal {name} kept until the saga reaches its wait")
    else:
        typer.echo(f"saga {saga_id}: signal {name} applied: now {state.status.value}")


@app.command("cancel")
@guarded
def cancel(
    saga_id: Annotated[str, typer.Argument(metavar="ID")],
    reason: ReasonOption,
    by: ByOption = None,
    module: ModulesOption = None,
    as_json: JsonOption = False,
) -> None:
    """Cancel a running saga: it compensates the steps done and ends CANCELLED."""
    state = _operate("cancel", saga_id, reason, by, module)
    if as_json:
        echo_json(saga_summary(state))
    else:
        typer.echo(f"saga {saga_id} cancelled: now {state.status.value}")


@app.command("retry")
@guarded
def retry(
    saga_id: Annotated[str, typer.Argument(metavar="ID")],
    reason: ReasonOption,
    by: ByOption = None,
    module: ModulesOption = None,
    as_json: JsonOption = False,
) -> None:
    """Resume a FAILED saga where it stopped, with a fresh retry budget."""
    state = _operate("retry", saga_id, reason, by, module)
    if as_json:
        echo_json(saga_summary(state))
    else:
        typer.echo(f"saga {saga_id} resumed: now {state.status.value}")
