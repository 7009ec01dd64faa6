"""What every command shares: exit codes, error reporting, settings, adapters, output.

Exit codes: ``0`` ok, ``1`` an operational failure (the database is down, no
such saga...), ``2`` a usage error (bad arguments, bad settings, a
``MODULE:ATTR`` that does not resolve) or a process that cannot start: the
database or the broker refused it (credentials, a missing database or vhost,
an unmigrated schema) or did not answer within ``SAGAFLOW_CONNECT_TIMEOUT``.
An error is one line on stderr; the traceback only with ``sagaflow --debug``.

Tests swap the adapters by monkeypatching the public functions
:func:`load_settings`, :func:`saga_store` and :func:`transport` of this module:
every command builds its adapters through them.
"""

from __future__ import annotations

import asyncio
import functools
import getpass
import os
import sys
import traceback
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, ParamSpec, TypeVar

import orjson
import typer
from pydantic import ValidationError
from rich.console import Console

from sagaflow.cli.logs import configure_logging
from sagaflow.config import Settings
from sagaflow.core.errors import ConfigurationError, NotReachable, SagaflowError
from sagaflow.core.ports import ParticipantStore, SagaStore, Transport
from sagaflow.runtime.hooks import Hooks
from sagaflow.telemetry import Telemetry, setup_telemetry

__all__ = [
    "EXIT_FAILURE",
    "EXIT_OK",
    "EXIT_USAGE",
    "CliError",
    "Invocation",
    "UsageProblem",
    "begin_invocation",
    "current_settings",
    "debugging",
    "default_user",
    "echo_json",
    "guarded",
    "hooks",
    "iso",
    "load_settings",
    "opened_store",
    "opened_transport",
    "participant_store",
    "run_async",
    "saga_store",
    "stdout_console",
    "summarize_validation",
    "telemetry",
    "transport",
]

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2

P = ParamSpec("P")
T = TypeVar("T")


class CliError(Exception):
    """A failure to report as one line on stderr, with an exit code (1 by default)."""

    exit_code = EXIT_FAILURE

    def __init__(self, message: str, *, exit_code: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        if exit_code is not None:
            self.exit_code = exit_code


class UsageProblem(CliError):
    """The invocation is wrong (arguments, settings): exit code 2."""

    exit_code = EXIT_USAGE


# --------------------------------------------------------------------------- seams


# Signals received before a long-running command's event loop was up (see app.main).
EARLY_SIGNALS: list[int] = []


def load_settings() -> Settings:
    """Build the settings from the environment (tests may monkeypatch this)."""
    return Settings()


def saga_store(settings: Settings) -> SagaStore:
    """The coordinator's store for a command (tests may monkeypatch this)."""
    return settings.saga_store()


def participant_store(settings: Settings, service: str) -> ParticipantStore:
    """A participant's store for ``sagaflow worker`` (tests may monkeypatch this)."""
    return settings.participant_store(service)


def telemetry(settings: Settings, component: str) -> Telemetry:
    """Tracing, metrics and saga logs of this process (tests may monkeypatch this).

    Tracing follows the ``OTEL_*`` environment (off when unset); metrics go to
    ``SAGAFLOW_METRICS_PORT`` (not for ``"cli"``: a short command must not take
    a daemon's port) and to OTLP when configured.

    Args:
        settings: The process settings.
        component: ``"coordinator"``, ``"cli"`` (start/cancel/retry) or a service name.
    """
    return setup_telemetry(
        settings,
        component,
        # a coordinator's queries all run outside saga spans: nothing to trace there
        database=component not in ("coordinator", "cli"),
        prometheus=component != "cli",
    )


def hooks(settings: Settings, component: str) -> Hooks | None:
    """The runtime hooks (tracing, metrics, saga logs) of a process; see :func:`telemetry`.

    Args:
        settings: The process settings.
        component: ``"coordinator"``, ``"cli"`` (start/cancel/retry) or a service name.
    """
    return telemetry(settings, component).hooks


def transport(settings: Settings, *, name: str) -> Transport:
    """The broker transport for a command (tests may monkeypatch this).

    Args:
        settings: Where the broker is.
        name: The connection name shown by RabbitMQ.
    """
    return settings.transport(connection_name=name)


# --------------------------------------------------------------------------- per invocation


@dataclass
class Invocation:
    """What one run of the command knows: ``--debug`` and the settings, once loaded."""

    debug: bool = False
    settings: Settings | None = None


# A context variable, not a module global: each invocation (and each test
# runner call) starts a fresh one from the root callback.
_invocation: ContextVar[Invocation | None] = ContextVar("sagaflow_cli_invocation", default=None)


def begin_invocation(*, debug: bool) -> Invocation:
    """Start this run's state (called by the root callback before any command)."""
    invocation = Invocation(debug=debug)
    _invocation.set(invocation)
    return invocation


def _current() -> Invocation:
    invocation = _invocation.get()
    if invocation is None:
        invocation = begin_invocation(debug=False)
    return invocation


def debugging() -> bool:
    """True when this invocation runs with ``--debug``."""
    return _current().debug


def current_settings() -> Settings:
    """This invocation's settings, loaded once; configures logging on first use.

    Raises:
        UsageProblem: an environment variable holds an invalid value.
    """
    invocation = _current()
    if invocation.settings is not None:
        return invocation.settings
    try:
        settings = load_settings()
    except ValidationError as exc:
        raise UsageProblem(f"invalid settings: {summarize_validation(exc, env=True)}") from exc
    invocation.settings = settings
    configure_logging(settings, debug=invocation.debug)
    return settings


def summarize_validation(exc: ValidationError, *, env: bool = False) -> str:
    """A pydantic error as one line; with ``env`` field names become variable names."""
    parts = []
    for error in exc.errors()[:5]:
        loc = ".".join(str(p) for p in error["loc"]) or "<value>"
        if env and not loc.upper().startswith("SAGAFLOW_"):
            loc = f"SAGAFLOW_{loc.upper()}"
        parts.append(f"{loc}: {error['msg']}")
    return "; ".join(parts)


# --------------------------------------------------------------------------- errors


def _describe(exc: Exception) -> tuple[int, str]:
    if isinstance(exc, CliError):
        return exc.exit_code, exc.message
    if isinstance(exc, NotReachable):
        return EXIT_USAGE, f"{exc} (SAGAFLOW_CONNECT_TIMEOUT)"
    if isinstance(exc, ConfigurationError):
        return EXIT_USAGE, str(exc)
    if isinstance(exc, SagaflowError):
        return EXIT_FAILURE, str(exc) or type(exc).__name__
    if isinstance(exc, ValidationError):
        return EXIT_FAILURE, f"invalid: {summarize_validation(exc)}"
    if isinstance(exc, OSError):
        return EXIT_FAILURE, f"{type(exc).__name__}: {exc}"
    return EXIT_FAILURE, f"unexpected {type(exc).__name__}: {exc} (--debug shows the traceback)"


def _scrub(message: str) -> str:
    settings = _current().settings
    if settings is not None:
        for secret in settings.secrets():
            message = message.replace(secret, "******")
    return message


def fail(message: str, exit_code: int = EXIT_FAILURE) -> typer.Exit:
    """Print ``error: <message>`` on stderr and return the ``Exit`` to raise."""
    typer.echo(f"error: {_scrub(message)}", err=True)
    return typer.Exit(exit_code)


def guarded(fn: Callable[P, T]) -> Callable[P, T]:
    """Turn any exception a command raises into one line on stderr and an exit code."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort):
            raise
        except Exception as exc:
            code, message = _describe(exc)
            if debugging():
                traceback.print_exception(exc, file=sys.stderr)
            raise fail(message, code) from exc

    return wrapper


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    """Run a command's coroutine to completion."""
    return asyncio.run(coro)


# --------------------------------------------------------------------------- adapters


@asynccontextmanager
async def opened_store(settings: Settings) -> AsyncIterator[SagaStore]:
    """The coordinator's store, started, closed on exit."""
    store = saga_store(settings)
    await store.start()
    try:
        yield store
    finally:
        await store.close()


@asynccontextmanager
async def opened_transport(settings: Settings, *, name: str) -> AsyncIterator[Transport]:
    """The transport, started with the shared topology (no service queues), closed on exit."""
    broker = transport(settings, name=name)
    try:
        await broker.start([])
        yield broker
    finally:
        await broker.close()


# --------------------------------------------------------------------------- output


def stdout_console() -> Console:
    """A rich console on the current stdout (created per call: tests swap stdout).

    Markup and emoji codes are off: every string printed is user data (ids such
    as ``vb-1:hotel:command:1:reply``, reasons, step names) and must come out
    exactly as stored, never with ``:hotel:`` turned into an emoji or
    ``[red]`` into a style. Styles are given as :class:`rich.text.Text` instead.
    """
    width = None
    if not sys.stdout.isatty():
        # piped output is grepped and parsed: never cut ids at 80 columns
        columns = os.environ.get("COLUMNS", "")
        width = int(columns) if columns.isdigit() else 200
    return Console(
        file=sys.stdout,
        highlight=False,
        markup=False,
        emoji=False,
        soft_wrap=False,
        width=width,
    )


def echo_json(value: Any) -> None:
    """Print ``value`` as indented JSON on stdout: the stable shape scripts read."""
    typer.echo(orjson.dumps(value, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS).decode())


def iso(timestamp: float | None) -> str | None:
    """Seconds since the epoch as ISO 8601 UTC with milliseconds."""
    if timestamp is None:
        return None
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="milliseconds")


def default_user() -> str:
    """The OS user, recorded as who cancelled, retried or replayed."""
    try:
        return getpass.getuser()
    except Exception:  # no user database entry (some containers): still act, say so
        return "unknown"
