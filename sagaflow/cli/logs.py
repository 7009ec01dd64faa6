"""Logging of the processes the CLI runs: one JSON object per line, or console text.

Everything goes to stderr, so stdout stays clean for ``--json`` output. All
log configuration lives in :func:`configure_logging`: add fields (trace ids...)
there.
"""

from __future__ import annotations

import logging
import sys
import traceback
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import orjson

from sagaflow.logs import install as install_saga_fields

if TYPE_CHECKING:
    from sagaflow.config import Settings

__all__ = ["ConsoleFormatter", "JsonFormatter", "configure_logging"]

# attributes every LogRecord has; anything else was passed with ``extra=``
_STANDARD = frozenset(
    vars(logging.LogRecord("", 0, "", 0, "", None, None)).keys() | {"message", "asctime"}
)
_CONSOLE_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
# noisy at INFO, and they say nothing the sagaflow loggers do not
_QUIET = ("aio_pika", "aiormq", "asyncio")


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON object: time, level, logger, message, extras."""

    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        payload.update(_extras(record))
        if record.exc_info:
            payload["exception"] = "".join(traceback.format_exception(*record.exc_info))
        return orjson.dumps(payload, default=repr).decode()


class ConsoleFormatter(logging.Formatter):
    """``time level logger: message key=value...``, the extras appended for people."""

    def __init__(self) -> None:
        super().__init__(_CONSOLE_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        extras = _extras(record)
        if not extras:
            return text
        fields = " ".join(f"{key}={_console_value(value)}" for key, value in extras.items())
        head, newline, rest = text.partition("\n")  # keep a traceback below the fields
        return f"{head} {fields}{newline}{rest}"


def _console_value(value: Any) -> str:
    if isinstance(value, str):
        return value if value and " " not in value else repr(value)
    return orjson.dumps(value, default=repr).decode()


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {
        key: value
        for key, value in vars(record).items()
        if key not in _STANDARD and not key.startswith("_")
    }


class _StderrHandler(logging.Handler):
    """Writes to whatever ``sys.stderr`` is now (test runners replace it)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            stream = sys.stderr
            stream.write(self.format(record) + "\n")
            stream.flush()
        except Exception:
            self.handleError(record)


def configure_logging(settings: Settings, *, debug: bool = False) -> None:
    """Send logs to stderr in ``settings.log_format`` at ``settings.log_level``.

    Idempotent: a second call replaces the handler the first one installed and
    leaves handlers installed by others (pytest's, an application's) alone.

    Args:
        settings: ``log_format`` and ``log_level`` are used.
        debug: Log at DEBUG whatever ``log_level`` says.
    """
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, _StderrHandler):
            root.removeHandler(handler)
    handler = _StderrHandler()
    if settings.log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(ConsoleFormatter())
    install_saga_fields(handler)  # saga_id, step, attempt, trace_id on lines about a saga
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if debug else settings.log_level)
    for name in _QUIET:
        logging.getLogger(name).setLevel(logging.DEBUG if debug else logging.WARNING)
