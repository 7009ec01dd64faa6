"""Structured logs about sagas: every line carries saga_id, step, attempt and trace_id.

sagaflow logs with the standard :mod:`logging` module and passes its fields
with ``extra=``; a JSON formatter (``sagaflow.cli.logs.JsonFormatter``, or any
that prints record attributes) turns them into one object per line::

    {"time": "...", "level": "warning", "logger": "sagaflow.worker",
     "message": "payment.charge failed transiently ...", "saga_id": "6c1e...",
     "saga_name": "create-order", "step": "charge", "attempt": 2,
     "trace_id": "4bf92f3577b34da6a3ce929d0e0e4736", "span_id": "00f067aa0ba902b7"}

Three pieces make "every line about a saga" true:

- :func:`saga_fields` builds the ``extra`` of a line the runtime logs itself;
- :class:`LoggingHooks` logs the transitions worth an operator's attention
  (retries, timeouts, compensations, failures) and, while a worker handles a
  message, makes the saga's fields current, so that
- :class:`SagaLogFilter`, installed on the handler, adds them (and the current
  span's ``trace_id``/``span_id``) to every line: a participant's own
  ``log.info(...)`` in a handler carries the saga it works for.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

from opentelemetry import trace

from sagaflow.core.engine import TRACEPARENT
from sagaflow.core.messages import Envelope
from sagaflow.core.state import LogEntry, LogEvent, SagaState
from sagaflow.runtime.hooks import Hooks

if TYPE_CHECKING:
    from sagaflow.core.definition import Saga
    from sagaflow.core.engine import Decision

__all__ = [
    "LoggingHooks",
    "SagaLogFilter",
    "current_saga_fields",
    "install",
    "saga_fields",
    "trace_id_of",
]

log = logging.getLogger("sagaflow.saga")

# the message being handled in this task and its queue; fields are built only when a line is logged
_CURRENT: ContextVar[tuple[Envelope, str] | None] = ContextVar("sagaflow_handling", default=None)

# what an operator wants to see at INFO; everything else in a saga's log is DEBUG
_NOTABLE = frozenset(
    {
        LogEvent.RETRY_SCHEDULED,
        LogEvent.TIMED_OUT,
        LogEvent.COMPENSATION_STARTED,
        LogEvent.CANCEL_REQUESTED,
        LogEvent.RETRY_REQUESTED,
        LogEvent.COMPENSATED,
        LogEvent.CANCELLED,
    }
)


def trace_id_of(carrier: Mapping[str, str]) -> str | None:
    """The 32-hex-digit trace id in a W3C ``traceparent`` header, or None.

    Example:
        ``trace_id_of(state.trace)`` is the id to look the saga up in Jaeger.
    """
    parent = carrier.get(TRACEPARENT)
    if not parent:
        return None
    parts = parent.split("-")
    if len(parts) < 4 or len(parts[1]) != 32 or parts[1] == "0" * 32:
        return None
    try:
        int(parts[1], 16)
    except ValueError:
        return None
    return parts[1].lower()


def saga_fields(
    source: Envelope | SagaState | LogEntry,
    *,
    trace: Mapping[str, str] | None = None,
    **more: Any,
) -> dict[str, Any]:
    """The ``extra=`` of a log line about a saga.

    Args:
        source: The message, state or log entry the line is about.
        trace: The saga's trace context, when ``source`` does not carry it (a
            log entry).
        more: Further fields.

    Example::

        log.warning("retrying", extra=saga_fields(envelope, reason=reason))
    """
    fields: dict[str, Any] = {"saga_id": source.saga_id}
    if isinstance(source, Envelope):
        fields.update(
            saga_name=source.saga_name,
            step=source.step,
            attempt=source.attempt,
            kind=source.kind.value,
            message_id=source.message_id,
        )
        trace = source.trace if trace is None else trace
    elif isinstance(source, SagaState):
        fields.update(
            saga_name=source.saga_name,
            status=source.status.value,
            step_index=source.step_index,
            attempt=source.attempt,
        )
        trace = source.trace if trace is None else trace
    else:
        fields.update(event=source.event.value, step=source.step, attempt=source.attempt)
    trace_id = trace_id_of(trace or {})
    if trace_id is not None:
        fields["trace_id"] = trace_id
    fields.update(more)
    return {k: v for k, v in fields.items() if v is not None}


def current_saga_fields() -> dict[str, Any] | None:
    """The fields of the saga whose message is being handled in this task, if any."""
    handling = _CURRENT.get()
    return None if handling is None else saga_fields(handling[0], queue=handling[1])


class SagaLogFilter(logging.Filter):
    """Adds the current saga's fields and the current span's ids to each record.

    Fields a record already has (passed with ``extra=``) win. Install it on a
    handler (:func:`install`), so it sees the records of every logger.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        fields = current_saga_fields()
        if fields:
            for key, value in fields.items():
                if not hasattr(record, key):
                    setattr(record, key, value)
        span_context = trace.get_current_span().get_span_context()
        if span_context.is_valid:
            if not hasattr(record, "trace_id"):
                record.trace_id = format(span_context.trace_id, "032x")
            if not hasattr(record, "span_id"):
                record.span_id = format(span_context.span_id, "016x")
        return True


def install(handler: logging.Handler) -> None:
    """Put a :class:`SagaLogFilter` on ``handler`` (once)."""
    if not any(isinstance(f, SagaLogFilter) for f in handler.filters):
        handler.addFilter(SagaLogFilter())


class LoggingHooks(Hooks):
    """Logs a saga's notable transitions, and scopes its fields to its handling.

    Retries, timeouts, compensations, cancels, operator retries and the
    compensated/cancelled ends are logged at INFO, a FAILED saga at ERROR (it
    needs an operator), every other entry of the saga's log at DEBUG.
    """

    def __init__(self, logger: logging.Logger | None = None) -> None:
        self.log = logger or log

    @contextmanager
    def processing(self, envelope: Envelope, queue: str) -> Iterator[dict[str, str]]:
        token = _CURRENT.set((envelope, queue))
        try:
            yield envelope.trace
        finally:
            _CURRENT.reset(token)

    def decided(self, saga: Saga[Any], before: SagaState | None, decision: Decision) -> None:
        state = decision.state
        for entry in decision.log:
            if entry.event is LogEvent.FAILED:
                level = logging.ERROR
            elif entry.event in _NOTABLE:
                level = logging.INFO
            else:
                level = logging.DEBUG
            if not self.log.isEnabledFor(level):
                continue
            detail = ", ".join(f"{k}={v}" for k, v in entry.detail.items() if k != "data")
            where = f" {entry.step}" if entry.step else ""
            attempt = f" attempt {entry.attempt}" if entry.attempt is not None else ""
            self.log.log(
                level,
                "saga %s %s: %s%s%s%s",
                saga.name,
                state.saga_id,
                entry.event.value,
                where,
                attempt,
                f" ({detail})" if detail else "",
                extra=saga_fields(entry, trace=state.trace, saga_name=saga.name),
            )

    def dead_lettered(self, queue: str, reason: str) -> None:
        # the runtime logs the dead-lettering itself; nothing to add here
        return
