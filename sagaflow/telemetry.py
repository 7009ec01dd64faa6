"""Tracing, metrics and logs of one process, set up from its settings in one call.

A coordinator, a worker, or an application that starts sagas does::

    telemetry = setup_telemetry(settings, "coordinator")
    coordinator = Coordinator(sagas, store=store, transport=broker, hooks=telemetry.hooks)
    telemetry.watch_outbox(store)        # coordinators: the outbox gauges
    ...
    await telemetry.aclose()             # on SIGTERM: flush spans and metrics

Tracing is on only when the ``OTEL_*`` environment configures an exporter
(:func:`sagaflow.tracing_setup.configure_tracing`); metrics when
``SAGAFLOW_METRICS_PORT`` is set (served on ``SAGAFLOW_METRICS_HOST``,
127.0.0.1 unless set) or ``OTEL_*`` configures OTLP; the saga log lines of
:class:`sagaflow.logs.LoggingHooks` always. Exporting needs the
``tracing`` or ``metrics`` extra; with neither configured the core suffices.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sagaflow.logs import LoggingHooks
from sagaflow.metrics import MetricsHooks, OutboxMonitor, configure_metrics, shutdown_metrics
from sagaflow.runtime.hooks import CompositeHooks, Hooks
from sagaflow.tracing import TracingHooks
from sagaflow.tracing_setup import configure_tracing, default_service_name, shutdown_tracing

if TYPE_CHECKING:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.trace import TracerProvider

    from sagaflow.config import Settings
    from sagaflow.core.ports import Clock, SagaStore

__all__ = ["Telemetry", "setup_telemetry"]


class Telemetry:
    """What :func:`setup_telemetry` set up: the hooks to pass, and how to stop.

    Attributes:
        hooks: For ``Coordinator``, ``SagaClient`` or ``Worker``.
        tracer_provider: ``None`` when tracing is off.
        meter_provider: ``None`` when metrics go nowhere.
        metrics: The metrics hooks (``None`` when metrics are off).
    """

    def __init__(
        self,
        hooks: Hooks,
        *,
        tracer_provider: TracerProvider | None = None,
        meter_provider: MeterProvider | None = None,
        metrics: MetricsHooks | None = None,
    ) -> None:
        self.hooks = hooks
        self.tracer_provider = tracer_provider
        self.meter_provider = meter_provider
        self.metrics = metrics
        self._monitor: OutboxMonitor | None = None

    @property
    def tracing(self) -> bool:
        return self.tracer_provider is not None

    def watch_outbox(
        self, store: SagaStore, *, clock: Clock | None = None, interval: float = 5.0
    ) -> None:
        """Feed the outbox gauges from ``store`` (a coordinator's); needs a running loop."""
        if self.metrics is None or self._monitor is not None:
            return
        self._monitor = OutboxMonitor(self.metrics, store, clock=clock, interval=interval)
        self._monitor.start()

    async def aclose(self) -> None:
        """Stop the outbox monitor, flush spans and metrics, close the endpoint."""
        if self._monitor is not None:
            await self._monitor.stop()
            self._monitor = None
        self.shutdown()

    def shutdown(self) -> None:
        """Flush spans and metrics and close the endpoint (synchronous part of ``aclose``)."""
        if self.tracer_provider is not None:
            shutdown_tracing()
        if self.meter_provider is not None:
            shutdown_metrics()


def setup_telemetry(
    settings: Settings, component: str, *, database: bool = True, prometheus: bool = True
) -> Telemetry:
    """Configure tracing, metrics and saga logs for a process; returns its hooks.

    Args:
        settings: ``metrics_port``, ``metrics_host`` and the broker ``prefix``
            are used.
        component: ``"coordinator"``, ``"cli"``, or a participant's service name:
            the default ``service.name`` (``OTEL_SERVICE_NAME`` wins).
        database: Trace the handlers' asyncpg queries (workers); coordinators
            pass ``False``: their queries run outside any saga span.
        prometheus: Serve ``settings.metrics_port``; short-lived commands (the
            CLI's ``start``) pass ``False``, they would take a daemon's port.

    Raises:
        OSError: the metrics port cannot be bound.
        ConfigurationError: the environment asks for an exporter that is not
            installed; the message names the extra (``sagaflow[tracing]``,
            ``sagaflow[metrics]``).
    """
    service_name = default_service_name(component)
    tracer_provider = configure_tracing(service_name, database=database)
    port = settings.metrics_port if prometheus else None
    meter_provider = configure_metrics(port, service_name=service_name, host=settings.metrics_host)
    chain: list[Hooks] = []
    if tracer_provider is not None:
        chain.append(TracingHooks(tracer_provider, topology=settings.topology()))
    metrics_hooks = MetricsHooks(meter_provider) if meter_provider is not None else None
    if metrics_hooks is not None:
        chain.append(metrics_hooks)
    chain.append(LoggingHooks())
    return Telemetry(
        CompositeHooks(chain),
        tracer_provider=tracer_provider,
        meter_provider=meter_provider,
        metrics=metrics_hooks,
    )
