"""OpenTelemetry metrics of sagas, exported by OTLP and on a Prometheus endpoint.

:class:`MetricsHooks` counts what the runtime reports through its hooks; the
instruments below are what an operator graphs and alerts on (Prometheus names):

==========================================  =========  =================================
``sagaflow_sagas_started_total``            counter    saga (counted where it starts)
``sagaflow_sagas_completed_total``          counter    saga
``sagaflow_sagas_compensated_total``        counter    saga
``sagaflow_sagas_failed_total``             counter    saga (FAILED: an operator is needed)
``sagaflow_sagas_cancelled_total``          counter    saga
``sagaflow_saga_duration_seconds``         histogram  saga, status (start to terminal state)
``sagaflow_step_duration_seconds``         histogram  saga, step, kind, outcome (command
                                                       sent to reply processed, or timeout)
``sagaflow_step_retries_total``             counter    saga, step, kind
``sagaflow_step_timeouts_total``            counter    saga, step, kind
``sagaflow_outbox_backlog``                 gauge      (due outbox rows, coordinator)
``sagaflow_outbox_oldest_age_seconds``      gauge      (age of the oldest due row)
``sagaflow_messages_dead_lettered_total``   counter    queue, reason (its code: ``invalid``...)
``sagaflow_replies_ignored_total``          counter    saga, reason (``finished``: the saga is
                                                       terminal; ``stale``: it has moved on)
``sagaflow_commands_handled_total``         counter    type, outcome (workers)
``sagaflow_command_duration_seconds``       histogram  type, outcome (workers, handler + inbox)
``sagaflow_handler_reruns_total``           counter    type, why (``deadlock``, ``store``: run
                                                       again after a rollback; ``redelivered``)
==========================================  =========  =================================

Durations measured by the coordinator come from its clock (``Clock.now``), so
they hold across a restart; they are wall-clock differences, not CPU time.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    ConsoleMetricExporter,
    MetricReader,
    PeriodicExportingMetricReader,
)

from sagaflow import __version__
from sagaflow.core.definition import Step
from sagaflow.core.errors import ConfigurationError
from sagaflow.core.messages import Envelope, Outcome
from sagaflow.core.ports import Clock, SagaStore
from sagaflow.core.state import LogEvent
from sagaflow.runtime.clock import SystemClock
from sagaflow.runtime.hooks import Hooks

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from sagaflow.core.definition import Saga
    from sagaflow.core.engine import Decision
    from sagaflow.core.state import LogEntry, SagaState

__all__ = [
    "MetricsHooks",
    "OutboxMonitor",
    "configure_metrics",
    "metrics_configured",
    "shutdown_metrics",
]

log = logging.getLogger("sagaflow.metrics")

# seconds: a step answers in milliseconds, a saga may wait minutes for retries
STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
SAGA_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)
_MAX_REASON = 40  # a dead-letter reason's code; the full text is in the logs

_ENDED = {
    LogEvent.COMPLETED: "completed",
    LogEvent.COMPENSATED: "compensated",
    LogEvent.FAILED: "failed",
    LogEvent.CANCELLED: "cancelled",
}


def reason_code(reason: str) -> str:
    """The low-cardinality code of a dead-letter reason (``"invalid: ..."`` -> ``invalid``)."""
    code = reason.split(":", 1)[0].strip().lower()
    return code[:_MAX_REASON] if code and " " not in code else "other"


class MetricsHooks(Hooks):
    """Records saga, step, outbox and worker metrics from the runtime's hooks.

    Args:
        meter_provider: Where the instruments live; the global provider by
            default (what :func:`configure_metrics` installs).
    """

    def __init__(self, meter_provider: metrics.MeterProvider | None = None) -> None:
        meter = (meter_provider or metrics.get_meter_provider()).get_meter("sagaflow", __version__)
        self.sagas: dict[str, metrics.Counter] = {
            state: meter.create_counter(
                f"sagaflow.sagas.{state}", unit="{saga}", description=f"Sagas {state}"
            )
            for state in ("started", "completed", "compensated", "failed", "cancelled")
        }
        self.overdue = meter.create_counter(
            "sagaflow.sagas.overdue",
            unit="{saga}",
            description="Sagas whose deadline passed (compensating: before their pivot)",
        )
        self.saga_duration = meter.create_histogram(
            "sagaflow.saga.duration",
            unit="s",
            description="From a saga's start to its terminal state",
            explicit_bucket_boundaries_advisory=SAGA_BUCKETS,
        )
        self.step_duration = meter.create_histogram(
            "sagaflow.step.duration",
            unit="s",
            description="From a step's command (or compensation) sent to its reply or timeout",
            explicit_bucket_boundaries_advisory=STEP_BUCKETS,
        )
        self.retries = meter.create_counter(
            "sagaflow.step.retries", unit="{retry}", description="Retries scheduled after errors"
        )
        self.timeouts = meter.create_counter(
            "sagaflow.step.timeouts",
            unit="{timeout}",
            description="Steps that got no reply in time",
        )
        self.dead_lettered_messages = meter.create_counter(
            "sagaflow.messages.dead_lettered",
            unit="{message}",
            description="Messages dead-lettered, by queue and reason code",
        )
        self.ignored_replies = meter.create_counter(
            "sagaflow.replies.ignored",
            unit="{message}",
            description="Duplicate or stale replies the coordinator acked without effect",
        )
        self.handler_reruns = meter.create_counter(
            "sagaflow.handler.reruns",
            unit="{run}",
            description="Handlers run again for one delivery, or for a redelivered command",
        )
        self.commands_handled = meter.create_counter(
            "sagaflow.commands.handled",
            unit="{command}",
            description="Commands and compensations a worker handled, by type and outcome",
        )
        self.command_duration = meter.create_histogram(
            "sagaflow.command.duration",
            unit="s",
            description="A worker's handling of one command: inbox claim, handler, reply",
            explicit_bucket_boundaries_advisory=STEP_BUCKETS,
        )
        self._outbox: tuple[int, float] | None = None
        meter.create_observable_gauge(
            "sagaflow.outbox.backlog",
            callbacks=[self._observe_backlog],
            unit="{message}",
            description="Outbox rows due for publishing (known to the coordinator's monitor)",
        )
        meter.create_observable_gauge(
            "sagaflow.outbox.oldest_age",
            callbacks=[self._observe_age],
            unit="s",
            description="Age of the oldest due outbox row",
        )

    # ------------------------------------------------------------------ outbox

    def observe_outbox(self, backlog: int, oldest_age: float) -> None:
        """Record the latest outbox figures (what :class:`OutboxMonitor` reads)."""
        self._outbox = (backlog, oldest_age)

    def _observe_backlog(self, options: CallbackOptions) -> Iterable[Observation]:
        return [] if self._outbox is None else [Observation(self._outbox[0])]

    def _observe_age(self, options: CallbackOptions) -> Iterable[Observation]:
        return [] if self._outbox is None else [Observation(self._outbox[1])]

    # ------------------------------------------------------------------ Hooks

    def decided(self, saga: Saga[Any], before: SagaState | None, decision: Decision) -> None:
        state = decision.state
        name = {"saga": saga.name}
        if decision.ignored is not None:
            reason = "finished" if decision.state.status.terminal else "stale"
            self.ignored_replies.add(1, {**name, "reason": reason})
        for entry in decision.log:
            event = entry.event
            if event is LogEvent.STARTED:
                self.sagas["started"].add(1, name)
            elif event is LogEvent.REPLY_RECEIVED or event is LogEvent.TIMED_OUT:
                sent_at = None if before is None else _sent_at(saga, before, entry)
                if sent_at is not None and entry.step is not None and entry.kind is not None:
                    outcome = (
                        "timeout"
                        if event is LogEvent.TIMED_OUT
                        else str(entry.detail.get("outcome") or "unknown")
                    )
                    kind = entry.kind.value
                    self.step_duration.record(
                        max(0.0, entry.at - sent_at),
                        {**name, "step": entry.step, "kind": kind, "outcome": outcome},
                    )
                if event is LogEvent.TIMED_OUT:
                    self.timeouts.add(1, _step_labels(saga, entry.step, entry.kind))
            elif event is LogEvent.RETRY_SCHEDULED:
                self.retries.add(1, _step_labels(saga, entry.step, entry.kind))
            elif event is LogEvent.DEADLINE_PASSED:
                compensates = "true" if entry.detail.get("compensates") else "false"
                self.overdue.add(1, {**name, "compensates": compensates})
            elif event in _ENDED:
                status = _ENDED[event]
                self.sagas[status].add(1, name)
                self.saga_duration.record(
                    max(0.0, entry.at - state.created_at), {**name, "status": status}
                )

    def dead_lettered(self, queue: str, reason: str) -> None:
        self.dead_lettered_messages.add(1, {"queue": queue, "reason": reason_code(reason)})

    def handled(self, envelope: Envelope, reply: Envelope | None, seconds: float) -> None:
        # no reply: compensated before it ran, nothing to answer
        outcome = "skipped" if reply is None else (reply.outcome or Outcome.SUCCESS).value
        labels = {"type": envelope.type, "outcome": outcome}
        self.commands_handled.add(1, labels)
        self.command_duration.record(seconds, labels)

    def rerun(self, envelope: Envelope, why: str) -> None:
        self.handler_reruns.add(1, {"type": envelope.type, "why": why})


def _sent_at(saga: Saga[Any], before: SagaState, entry: LogEntry) -> float | None:
    """When the message ``entry`` answers (or timed out) was sent, if known.

    ``before`` is the state that was waiting for it. Waiting on one step, its
    last change was the send. A parallel group's branches are answered one at
    a time, so the state changed since: a branch's send is its timeout timer's
    start.
    """
    branch = before.branches.get(str(entry.step_index))
    if branch is None:
        return before.updated_at if before.awaiting else None
    timer = branch.timer
    if not branch.awaiting or timer is None or timer.purpose != "timeout":
        return None
    step = saga.steps[timer.step_index]
    return timer.due_at - step.timeout if isinstance(step, Step) else None


def _step_labels(saga: Saga[Any], step: str | None, kind: Any) -> dict[str, str]:
    return {"saga": saga.name, "step": step or "", "kind": getattr(kind, "value", "") or ""}


class OutboxMonitor:
    """Keeps :class:`MetricsHooks`' outbox gauges fresh from ``store.outbox_stats``.

    The gauges are read from a synchronous callback (the exporter's thread), where
    an async store cannot be queried; a small task refreshes the figures instead.

    Args:
        hooks: Whose gauges to feed.
        store: The coordinator's store.
        clock: ``now`` for "due" and "age".
        interval: Seconds between queries.
    """

    def __init__(
        self,
        hooks: MetricsHooks,
        store: SagaStore,
        *,
        clock: Clock | None = None,
        interval: float = 5.0,
    ) -> None:
        self.hooks = hooks
        self.store = store
        self.clock: Clock = clock or SystemClock()
        self.interval = interval
        self._task: asyncio.Task[None] | None = None

    async def refresh(self) -> None:
        """Query the store once and record the figures."""
        backlog, age = await self.store.outbox_stats(self.clock.now())
        self.hooks.observe_outbox(backlog, age)

    async def _run(self) -> None:
        while True:
            try:
                await self.refresh()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the store is down: the gauges keep their last value
                log.debug("outbox stats failed: %r", exc)
            await asyncio.sleep(self.interval)

    def start(self) -> None:
        """Start refreshing in the background (needs a running event loop)."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="outbox-monitor")

    async def stop(self) -> None:
        """Stop refreshing."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


# --------------------------------------------------------------------------- configuration

_provider: MeterProvider | None = None
_server: WSGIServer | None = None

EXTRA = "sagaflow[metrics]"
"""The extra that installs the Prometheus endpoint and the OTLP metric exporter."""


def _otlp_exporters(environ: Mapping[str, str]) -> list[str]:
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return []
    names = environ.get("OTEL_METRICS_EXPORTER")
    if names is None:
        endpoint = environ.get("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT") or environ.get(
            "OTEL_EXPORTER_OTLP_ENDPOINT"
        )
        return ["otlp"] if endpoint else []
    chosen = [n.strip().lower() for n in names.split(",") if n.strip()]
    return [n for n in chosen if n in ("otlp", "console")]


def metrics_configured(port: int | None, environ: Mapping[str, str] | None = None) -> bool:
    """True when metrics go anywhere: a Prometheus ``port``, or ``OTEL_*`` export."""
    return port is not None or bool(_otlp_exporters(os.environ if environ is None else environ))


def configure_metrics(
    port: int | None, *, service_name: str = "sagaflow", host: str = "127.0.0.1"
) -> MeterProvider | None:
    """Install the global meter provider: Prometheus on ``port``, OTLP per ``OTEL_*``.

    The Prometheus endpoint (``http://<host>:<port>/metrics``) serves the
    process's default registry, so Python's process and GC metrics come along.
    OTLP export follows ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or
    ``OTEL_EXPORTER_OTLP_METRICS_ENDPOINT``), every ``OTEL_METRIC_EXPORT_INTERVAL``
    milliseconds; ``OTEL_METRICS_EXPORTER`` may say ``otlp``, ``console`` or ``none``.
    Idempotent: a second call returns the first provider.

    Args:
        port: The Prometheus port (``SAGAFLOW_METRICS_PORT``); ``None`` for none.
        service_name: ``service.name`` unless ``OTEL_SERVICE_NAME`` names one.
        host: The address the endpoint binds (``SAGAFLOW_METRICS_HOST``):
            loopback by default, so only this machine can read it.

    Returns:
        The provider, or ``None`` when metrics go nowhere.

    Raises:
        OSError: the port cannot be bound.
        ConfigurationError: the exporter asked for is not installed
            (``pip install 'sagaflow[metrics]'``).
    """
    global _provider, _server
    if _provider is not None:
        return _provider
    readers: list[MetricReader] = []
    for name in _otlp_exporters(os.environ):
        if name == "otlp":
            try:
                from opentelemetry.exporter.otlp.proto.http.metric_exporter import (
                    OTLPMetricExporter,
                )
            except ImportError as exc:
                raise _missing("OTLP metrics export", exc) from exc
            readers.append(PeriodicExportingMetricReader(OTLPMetricExporter()))
        else:
            readers.append(PeriodicExportingMetricReader(ConsoleMetricExporter()))
    if port is not None:
        try:
            from opentelemetry.exporter.prometheus import PrometheusMetricReader
            from prometheus_client import start_http_server
        except ImportError as exc:
            raise _missing("the Prometheus endpoint (SAGAFLOW_METRICS_PORT)", exc) from exc
        readers.append(PrometheusMetricReader())
        _server, _ = start_http_server(port, addr=host)
        log.info("metrics on http://%s:%d/metrics", host, port)
    if not readers:
        return None
    from sagaflow.tracing_setup import resource

    _provider = MeterProvider(metric_readers=readers, resource=resource(service_name))
    metrics.set_meter_provider(_provider)
    return _provider


def _missing(what: str, exc: ImportError) -> ConfigurationError:
    return ConfigurationError(f"{what} needs the metrics extra: pip install '{EXTRA}' ({exc})")


def shutdown_metrics(timeout_millis: int = 5_000) -> None:
    """Export what is pending, stop the readers and close the Prometheus endpoint."""
    global _server
    if _provider is not None:
        _provider.force_flush(timeout_millis)
        _provider.shutdown(timeout_millis)
    if _server is not None:
        _server.shutdown()
        _server.server_close()
        _server = None
