"""OpenTelemetry tracing: one saga is one trace, across every process it touches.

The runtime calls :class:`TracingHooks` at each transition (``sagaflow.runtime.hooks``);
nothing here keeps a span open longer than one step of work, so a trace survives
any process dying. The shape of a saga's trace::

    POST /orders                                SERVER    (the caller's span, if any)
    └─ saga start create-order                  INTERNAL  context stored with the saga
       ├─ send sagaflow.commands:inventory      PRODUCER  coordinator (or its outbox relay)
       │  └─ process sagaflow.commands:inventory:sagaflow.service.inventory
       │     │                                  CONSUMER  worker; the handler's SQL beneath
       │     └─ send sagaflow.replies:reply     PRODUCER  worker
       │        └─ process sagaflow.replies:reply:sagaflow.replies
       │                                        CONSUMER  coordinator, with saga.outcome
       ├─ saga retry / timeout ...              INTERNAL  short spans from the timer loop
       ├─ saga compensate create-order/reserve  INTERNAL  linked to the step it undoes
       └─ saga compensated create-order         INTERNAL  the end

Every span beneath the start span is parented on the context stored with the
saga (``SagaState.trace``), which travels in each command's ``traceparent``
header: a coordinator restarted mid-saga, or a timer firing an hour later,
continues the same trace. A compensation's messages carry ``sagaflow-link``,
the ``traceparent`` of the reply of the step it undoes; its spans link there.

Configuration is the standard ``OTEL_*`` environment only (see
:func:`configure_tracing`); with none, nothing is installed and tracing costs
nothing.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from functools import lru_cache, partial
from typing import TYPE_CHECKING, Any, NamedTuple

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import _SUPPRESS_INSTRUMENTATION_KEY, Context
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_OFF,
    Decision,
    ParentBased,
    Sampler,
    SamplingResult,
)
from opentelemetry.trace import (
    Link,
    NonRecordingSpan,
    Span,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
)
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.util.types import Attributes

from sagaflow import __version__
from sagaflow.core.engine import LINK, TRACEPARENT
from sagaflow.core.messages import Envelope, MessageKind, Outcome
from sagaflow.core.ports import Topology
from sagaflow.core.state import LogEvent
from sagaflow.logs import trace_id_of
from sagaflow.runtime.hooks import Hooks
from sagaflow.transport.wire import route

if TYPE_CHECKING:
    from opentelemetry.trace import TraceState

    from sagaflow.core.definition import Saga
    from sagaflow.core.engine import Decision as SagaDecision
    from sagaflow.core.state import LogEntry, SagaState

__all__ = ["TracingHooks", "trace_id_of"]

log = logging.getLogger("sagaflow.tracing")

TRACESTATE = "tracestate"
SCOPE = "sagaflow"
_PROPAGATOR = TraceContextTextMapPropagator()
_PENDING_LIMIT = 10_000  # worker spans awaiting their outcome (a safety bound, never reached)
_CONTEXTS = 4_096  # parent contexts kept parsed: about the sagas in flight


# --------------------------------------------------------------------------- helpers


def _span_context(traceparent: str | None) -> SpanContext | None:
    parent = _remote(traceparent, None) if traceparent else None
    return parent.span_context if parent is not None else None


class _Parent(NamedTuple):
    """A span's parent: the context, and what spans beneath it need to know."""

    context: Context
    span_context: SpanContext
    sampled: bool


def _parent_of(context: Context) -> _Parent:
    span_context = trace.get_current_span(context).get_span_context()
    return _Parent(context, span_context, span_context.trace_flags.sampled)


@lru_cache(maxsize=_CONTEXTS)
def _remote(traceparent: str, tracestate: str | None) -> _Parent | None:
    """The parent a message's W3C headers carry (``None`` when they are invalid).

    Cached: a saga's messages keep carrying the context of its start, and a
    saga sampled out carries it unchanged to every hop, so most lookups hit
    and skip the header parsing. A context is immutable, so sharing it is safe.
    """
    carrier = {TRACEPARENT: traceparent}
    if tracestate is not None:
        carrier[TRACESTATE] = tracestate
    parent = _parent_of(_PROPAGATOR.extract(carrier))
    return parent if parent.span_context.is_valid else None


@lru_cache(maxsize=_CONTEXTS)
def _derived(saga_id: str) -> _Parent:
    """A stand-in parent for a saga started without tracing: the same trace id for
    every span of the saga, derived from its id, so its spans still form one trace
    (Jaeger shows the root as missing)."""
    digest = hashlib.sha256(f"sagaflow:{saga_id}".encode()).digest()
    trace_id = int.from_bytes(digest[:16], "big") or 1
    span_id = int.from_bytes(digest[16:24], "big") or 1
    span_context = SpanContext(
        trace_id, span_id, is_remote=True, trace_flags=TraceFlags(TraceFlags.SAMPLED)
    )
    return _parent_of(trace.set_span_in_context(NonRecordingSpan(span_context)))


def _parent(carrier: Mapping[str, str], saga_id: str) -> _Parent:
    traceparent = carrier.get(TRACEPARENT)
    parent = _remote(traceparent, carrier.get(TRACESTATE)) if traceparent else None
    return parent if parent is not None else _derived(saga_id)


def _inject(span: Span, keep: Mapping[str, str] | None = None) -> dict[str, str]:
    """The W3C headers of ``span``, plus ``keep``'s non-trace-context entries."""
    carrier = {k: v for k, v in (keep or {}).items() if k not in (TRACEPARENT, TRACESTATE)}
    _PROPAGATOR.inject(carrier, context=trace.set_span_in_context(span))
    return carrier


def _links(carrier: Mapping[str, str]) -> list[Link]:
    undone = _span_context(carrier.get(LINK))
    return [Link(undone, {"saga.link": "compensates"})] if undone is not None else []


# --------------------------------------------------------------------------- hooks


class TracingHooks(Hooks):
    """Emits the spans of a saga's trace; plug into a Coordinator, SagaClient or Worker.

    Args:
        tracer_provider: Where spans go; the global provider by default (what
            :func:`configure_tracing` installs).
        topology: The broker names, for span names and destinations; it must
            match the transport's.

    Example::

        provider = configure_tracing("sagaflow-coordinator")
        hooks = TracingHooks(provider, topology=settings.topology()) if provider else None
    """

    def __init__(
        self,
        tracer_provider: trace.TracerProvider | None = None,
        *,
        topology: Topology | None = None,
    ) -> None:
        provider = tracer_provider or trace.get_tracer_provider()
        self.tracer = provider.get_tracer(SCOPE, __version__)
        # With the SDK's default kind of sampler the children of a span sampled
        # out are dropped too: for those sagas no span is even started.
        self._skips_sampled_out = _drops_sampled_out(getattr(provider, "sampler", None))
        self.topology = topology or Topology()
        # a worker's CONSUMER span ends in handled(), once the reply's outcome is known
        self._pending: dict[str, list[Span]] = {}
        self._pending_count = 0

    # ------------------------------------------------------------------ attributes

    def _message_attributes(
        self, envelope: Envelope, destination: str, routing_key: str, operation: str
    ) -> dict[str, Any]:
        attributes: dict[str, Any] = {
            "messaging.system": "rabbitmq",
            "messaging.operation.type": operation,
            "messaging.operation.name": "publish" if operation == "send" else "process",
            "messaging.destination.name": destination,
            "messaging.rabbitmq.destination.routing_key": routing_key,
            "messaging.message.id": envelope.message_id,
            "messaging.message.conversation_id": envelope.saga_id,
            "saga.id": envelope.saga_id,
            "saga.name": envelope.saga_name,
            "saga.version": envelope.saga_version,
            "saga.step": envelope.step,
            "saga.step_index": envelope.step_index,
            "saga.attempt": envelope.attempt,
            "saga.kind": envelope.kind.value,
            "saga.action": envelope.type,
        }
        if envelope.for_kind is not None:
            attributes["saga.reply_to"] = envelope.for_kind.value
        if envelope.outcome is not None:
            attributes["saga.outcome"] = envelope.outcome.value
        return attributes

    def _dropped(self, parent: _Parent) -> bool:
        """Whether every span under ``parent`` is dropped: a saga sampled out."""
        return self._skips_sampled_out and not parent.sampled

    def _start(
        self,
        name: str,
        parent: _Parent,
        kind: SpanKind,
        attributes: Callable[[], dict[str, Any]],
        links: Callable[[], list[Link]],
    ) -> Span:
        """Start a span under ``parent``. Under a parent sampled out (a ratio
        sampler's decision, carried in ``traceparent``) the span is all but
        certainly not recorded, so its attributes and links are built only if
        the sampler records it after all: with 10% of sagas traced, the other
        90% cost the SDK's no-op span and the context propagation only."""
        if parent.sampled:
            return self.tracer.start_span(
                name, context=parent.context, kind=kind, attributes=attributes(), links=links()
            )
        span = self.tracer.start_span(name, context=parent.context, kind=kind)
        if span.is_recording():
            span.set_attributes(attributes())
            for link in links():
                span.add_link(link.context, link.attributes)
        return span

    # ------------------------------------------------------------------ Hooks

    def saga_started(self, saga: Saga[Any], saga_id: str) -> dict[str, str]:
        """The short start span, child of the current span (an HTTP request's...)."""
        span = self.tracer.start_span(
            f"saga start {saga.name}",
            kind=SpanKind.INTERNAL,
            attributes={"saga.id": saga_id, "saga.name": saga.name, "saga.version": saga.version},
        )
        try:
            return _inject(span)
        finally:
            span.end()

    @contextmanager
    def publishing(self, envelopes: Sequence[Envelope]) -> Iterator[Sequence[Envelope]]:
        """A PRODUCER span per message; each message carries its own span's context."""
        spans: list[Span] = []
        outgoing: list[Envelope] = []
        for envelope in envelopes:
            parent = _parent(envelope.trace, envelope.saga_id)
            if self._dropped(parent):
                outgoing.append(envelope)  # its trace context travels on as it came
                continue
            exchange, routing_key = route(self.topology, envelope)
            destination = f"{exchange}:{routing_key}"
            span = self._start(
                f"send {destination}",
                parent,
                SpanKind.PRODUCER,
                partial(self._message_attributes, envelope, destination, routing_key, "send"),
                partial(_links, envelope.trace),
            )
            spans.append(span)
            outgoing.append(envelope.model_copy(update={"trace": _inject(span, envelope.trace)}))
        try:
            yield outgoing
        except BaseException as exc:
            for span in spans:
                span.record_exception(exc)
                span.set_status(Status(StatusCode.ERROR, f"publish failed: {exc!r}"))
            raise
        finally:
            for span in spans:
                span.end()

    @contextmanager
    def queries(self, *, own: bool) -> Iterator[None]:
        """Leave the worker's own statements (transaction, inbox, savepoints) out of
        the database instrumentation: it does not even build their spans. They
        were a third of all spans and cost their instrumentation's overhead on
        every statement; a handler's queries (``own=False``) are traced."""
        token = otel_context.attach(otel_context.set_value(_SUPPRESS_INSTRUMENTATION_KEY, own))
        try:
            yield
        finally:
            otel_context.detach(token)

    @contextmanager
    def processing(self, envelope: Envelope, queue: str) -> Iterator[dict[str, str]]:
        """The CONSUMER span of one received message, current while it is handled."""
        parent = _parent(envelope.trace, envelope.saga_id)
        if self._dropped(parent):
            # no span; the message's context is current (log lines keep its trace
            # id, a handler's queries are dropped with it) and travels on as it came
            token = otel_context.attach(parent.context)
            try:
                yield envelope.trace
            finally:
                otel_context.detach(token)
            return
        exchange, routing_key = route(self.topology, envelope)
        destination = f"{exchange}:{routing_key}:{queue}"
        span = self._start(
            f"process {destination}",
            parent,
            SpanKind.CONSUMER,
            partial(self._message_attributes, envelope, destination, routing_key, "process"),
            partial(_links, envelope.trace),
        )
        deferred = False
        try:
            with trace.use_span(span, end_on_exit=False, record_exception=True):
                yield _inject(span)
            # a command's outcome is its reply, known in handled(): end the span there
            if not envelope.is_reply and self._pending_count < _PENDING_LIMIT:
                self._pending.setdefault(envelope.message_id, []).append(span)
                self._pending_count += 1
                deferred = True
        finally:
            if not deferred:
                span.end()

    def handled(self, envelope: Envelope, reply: Envelope | None, seconds: float) -> None:
        waiting = self._pending.get(envelope.message_id)
        if not waiting:
            return
        span = waiting.pop(0)  # a redelivery handled meanwhile waits its turn
        if not waiting:
            del self._pending[envelope.message_id]
        self._pending_count -= 1
        if reply is None:
            span.set_attribute("saga.outcome", "skipped")  # compensated before it ran
        else:
            outcome = reply.outcome or Outcome.SUCCESS
            span.set_attribute("saga.outcome", outcome.value)
            if reply.reason:
                span.set_attribute("saga.reason", reply.reason)
            if outcome is Outcome.ERROR:
                span.set_status(Status(StatusCode.ERROR, reply.reason or "handler failed"))
        span.end()

    def rolled_back(self, envelope: Envelope) -> None:
        """End the span of a handling undone with its batch, in error, without outcome."""
        waiting = self._pending.get(envelope.message_id)
        if not waiting:
            return
        span = waiting.pop(0)
        if not waiting:
            del self._pending[envelope.message_id]
        self._pending_count -= 1
        span.set_status(Status(StatusCode.ERROR, "rolled back with its batch; handled again"))
        span.end()

    def decided(self, saga: Saga[Any], before: SagaState | None, decision: SagaDecision) -> None:
        """Short INTERNAL spans for retries, timeouts, compensations and the end."""
        traced = [(e, _TRANSITIONS[e.event]) for e in decision.log if e.event in _TRANSITIONS]
        if not traced:
            return  # a step's progress: its messages' spans tell it
        state = decision.state
        parent = _parent(state.trace, state.saga_id)
        if self._dropped(parent):
            return
        for entry, (name, needs_step) in traced:
            target = f"{saga.name}/{entry.step}" if needs_step and entry.step else saga.name
            span = self._start(
                f"saga {name} {target}",
                parent,
                SpanKind.INTERNAL,
                partial(_transition_attributes, saga, state, entry),
                partial(_transition_links, decision, entry),
            )
            if entry.event is LogEvent.FAILED:
                reason = state.failure.reason if state.failure else "failed"
                span.set_status(Status(StatusCode.ERROR, reason))
            span.end()

    def dead_lettered(self, queue: str, reason: str) -> None:
        span = trace.get_current_span()
        if span.is_recording():
            span.add_event("dead_lettered", {"messaging.destination.name": queue, "reason": reason})


# event -> (span verb, whether the span name includes the step)
_TRANSITIONS: dict[LogEvent, tuple[str, bool]] = {
    LogEvent.RETRY_SCHEDULED: ("retry", True),
    LogEvent.TIMED_OUT: ("timeout", True),
    LogEvent.STEP_SKIPPED: ("skip", True),
    LogEvent.WAITING: ("wait", True),
    LogEvent.SIGNAL_RECEIVED: ("signal", True),
    LogEvent.WAIT_TIMED_OUT: ("timeout", True),
    LogEvent.DEADLINE_PASSED: ("deadline", False),
    LogEvent.COMPENSATION_STARTED: ("rollback", True),
    LogEvent.COMPENSATION_SENT: ("compensate", True),
    LogEvent.CANCEL_REQUESTED: ("cancel", False),
    LogEvent.RETRY_REQUESTED: ("resume", True),
    LogEvent.COMPLETED: ("completed", False),
    LogEvent.COMPENSATED: ("compensated", False),
    LogEvent.FAILED: ("failed", False),
    LogEvent.CANCELLED: ("cancelled", False),
}
_TERMINAL = frozenset(
    {LogEvent.COMPLETED, LogEvent.COMPENSATED, LogEvent.FAILED, LogEvent.CANCELLED}
)


def _transition_attributes(saga: Saga[Any], state: SagaState, entry: LogEntry) -> dict[str, Any]:
    attributes: dict[str, Any] = {
        "saga.id": state.saga_id,
        "saga.name": saga.name,
        "saga.version": saga.version,
        "saga.event": entry.event.value,
        **_entry_attributes(entry),
    }
    if entry.event in _TERMINAL:
        attributes["saga.outcome"] = state.status.value
    return attributes


def _transition_links(decision: SagaDecision, entry: LogEntry) -> list[Link]:
    if entry.event is LogEvent.COMPENSATION_SENT:
        return _links(_message_trace(decision, entry))
    return []


def _entry_attributes(entry: LogEntry) -> dict[str, Any]:
    attributes: dict[str, Any] = {}
    if entry.step is not None:
        attributes["saga.step"] = entry.step
    if entry.step_index is not None:
        attributes["saga.step_index"] = entry.step_index
    if entry.attempt is not None:
        attributes["saga.attempt"] = entry.attempt
    if entry.kind is not None:
        attributes["saga.kind"] = entry.kind.value
    for key in ("reason", "cause", "delay", "timeout", "by", "type", "message_id", "signal"):
        value = entry.detail.get(key)
        if isinstance(value, str | int | float) and not isinstance(value, bool):
            attributes[f"saga.{key}"] = value
    undo = entry.detail.get("undo")
    if isinstance(undo, list):
        attributes["saga.undo"] = [str(step) for step in undo]
    return attributes


def _message_trace(decision: SagaDecision, entry: LogEntry) -> Mapping[str, str]:
    for message in decision.messages:
        if (
            message.kind is MessageKind.COMPENSATION
            and message.step == entry.step
            and message.attempt == entry.attempt
        ):
            return message.trace
    return {}


# --------------------------------------------------------------------------- configuration


def _drops_sampled_out(sampler: Sampler | None) -> bool:
    """Whether ``sampler`` drops every span whose parent was sampled out: a
    ``ParentBased`` one with its default for such parents (what every
    ``OTEL_TRACES_SAMPLER=parentbased_*`` setting, the SDK's default, builds)."""
    if isinstance(sampler, DropOrphanQueries):
        sampler = sampler.delegate
    return isinstance(sampler, ParentBased) and all(
        getattr(sampler, name, None) is ALWAYS_OFF
        for name in ("_remote_parent_not_sampled", "_local_parent_not_sampled")
    )


class DropOrphanQueries(Sampler):
    """Drops database spans that have no parent span, then asks the configured sampler.

    The store's polling (outbox relay, timers, commits) runs outside any saga
    span; traced, each query would be a one-span trace of its own. Queries a
    handler runs beneath its CONSUMER span have a parent and are kept. (The
    worker's own statements are not even offered: see ``TracingHooks.queries``.)
    """

    def __init__(self, delegate: Sampler) -> None:
        self.delegate = delegate

    def should_sample(
        self,
        parent_context: Context | None,
        trace_id: int,
        name: str,
        kind: SpanKind | None = None,
        attributes: Attributes = None,
        links: Sequence[Link] | None = None,
        trace_state: TraceState | None = None,
    ) -> SamplingResult:
        if (
            kind is SpanKind.CLIENT
            and attributes
            and ("db.system" in attributes or "db.system.name" in attributes)
            and not trace.get_current_span(parent_context).get_span_context().is_valid
        ):
            return SamplingResult(Decision.DROP)
        return self.delegate.should_sample(
            parent_context, trace_id, name, kind, attributes, links, trace_state
        )

    def get_description(self) -> str:
        return f"DropOrphanQueries{{{self.delegate.get_description()}}}"
