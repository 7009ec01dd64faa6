"""Configuring OpenTelemetry tracing for a sagaflow process: the tracer provider,
its exporters (chosen by OpenTelemetry's own ``OTEL_*`` variables), the sampler
and the asyncpg instrumentation. :mod:`sagaflow.tracing` has the spans.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from importlib.metadata import entry_points
from typing import Any

from opentelemetry import trace
from opentelemetry.environment_variables import OTEL_TRACES_EXPORTER
from opentelemetry.sdk import environment_variables as env
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter

from sagaflow.core.errors import ConfigurationError
from sagaflow.tracing import DropOrphanQueries

__all__ = [
    "EXTRA",
    "configure_tracing",
    "default_service_name",
    "resource",
    "shutdown_tracing",
    "tracing_configured",
]

log = logging.getLogger("sagaflow.tracing")


_configured: TracerProvider | None = None

EXTRA = "sagaflow[tracing]"
"""The extra that installs the OTLP exporter and the asyncpg instrumentation."""

# OpenTelemetry's own names for exporters: each exporter package registers its
# class under this entry-point group, the name being what OTEL_TRACES_EXPORTER says
_EXPORTER_GROUP = "opentelemetry_traces_exporter"
# ``otlp`` is the protocol's exporter: OTEL_EXPORTER_OTLP_[TRACES_]PROTOCOL picks it
_OTLP_BY_PROTOCOL = {"http/protobuf": "otlp_proto_http", "grpc": "otlp_proto_grpc"}
_DEFAULT_PROTOCOL = "http/protobuf"  # the exporter sagaflow[tracing] installs
_PACKAGES = {
    "otlp_proto_http": EXTRA,
    "otlp_proto_grpc": "opentelemetry-exporter-otlp-proto-grpc",
}


def _exporters(environ: Mapping[str, str]) -> list[str]:
    """The trace exporters the environment asks for, by their entry-point names
    (``otlp`` resolved to ``otlp_proto_http`` or ``otlp_proto_grpc``)."""
    if environ.get(env.OTEL_SDK_DISABLED, "").strip().lower() == "true":
        return []
    names = environ.get(OTEL_TRACES_EXPORTER)
    if names is None:
        # the spec's default is otlp; we export only when told where, so an
        # unconfigured process pays nothing
        endpoint = environ.get(env.OTEL_EXPORTER_OTLP_TRACES_ENDPOINT) or environ.get(
            env.OTEL_EXPORTER_OTLP_ENDPOINT
        )
        names = "otlp" if endpoint else "none"
    protocol = (
        environ.get(env.OTEL_EXPORTER_OTLP_TRACES_PROTOCOL)
        or environ.get(env.OTEL_EXPORTER_OTLP_PROTOCOL)
        or _DEFAULT_PROTOCOL
    ).strip()
    chosen = [n.strip().lower() for n in names.split(",") if n.strip()]
    resolved = []
    for name in chosen:
        if name == "none":
            continue
        if name == "otlp":
            if protocol not in _OTLP_BY_PROTOCOL:
                raise ConfigurationError(
                    f"OTLP protocol {protocol!r} is not one of {sorted(_OTLP_BY_PROTOCOL)}"
                )
            name = _OTLP_BY_PROTOCOL[protocol]
        resolved.append(name)
    return resolved


def _exporter(name: str) -> SpanExporter:
    """The exporter registered under ``name``, built with no arguments: it reads
    its own ``OTEL_EXPORTER_*`` settings (endpoint, headers, timeout, compression).

    Raises:
        ConfigurationError: no installed package provides it.
    """
    package = _PACKAGES.get(name)
    hint = f"pip install '{package}'" if package else "install the package that provides it"
    try:
        factory: Callable[[], SpanExporter] = next(
            iter(entry_points(group=_EXPORTER_GROUP, name=name))
        ).load()
    except (StopIteration, ImportError) as exc:
        raise ConfigurationError(
            f"the {name!r} span exporter (OTEL_TRACES_EXPORTER, OTEL_EXPORTER_OTLP_*) "
            f"is not installed: {hint}"
        ) from exc
    return factory()


def tracing_configured(environ: Mapping[str, str] | None = None) -> bool:
    """True when the ``OTEL_*`` environment asks for traces to be exported."""
    return bool(_exporters(os.environ if environ is None else environ))


def default_service_name(component: str) -> str:
    """The ``service.name`` of a process when ``OTEL_SERVICE_NAME`` is not set.

    ``"coordinator"`` becomes ``sagaflow-coordinator``; a participant keeps its
    service name (``inventory``).
    """
    return f"sagaflow-{component}" if component in ("coordinator", "cli") else component


def resource(service_name: str) -> Resource:
    """The process's resource: ``OTEL_RESOURCE_ATTRIBUTES``/``OTEL_SERVICE_NAME``
    first, ``service_name`` when they name no service, plus ``process.pid``."""
    detected = Resource.create({"process.pid": os.getpid()})
    name = str(detected.attributes.get(SERVICE_NAME, ""))
    if not name or name.startswith("unknown_service"):
        detected = detected.merge(Resource({SERVICE_NAME: service_name}))
    return detected


def configure_tracing(
    service_name: str = "sagaflow", *, database: bool = True
) -> TracerProvider | None:
    """Install the global tracer provider as the ``OTEL_*`` environment says.

    Exports through OTLP (``OTEL_EXPORTER_OTLP_ENDPOINT``, or
    ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``; HTTP unless
    ``OTEL_EXPORTER_OTLP_PROTOCOL`` says ``grpc``; headers, timeouts and
    compression as the exporter reads them), in batches (``OTEL_BSP_*``),
    sampled by ``OTEL_TRACES_SAMPLER``/``OTEL_TRACES_SAMPLER_ARG``.
    ``OTEL_TRACES_EXPORTER`` may name any installed OpenTelemetry span exporter
    (``otlp``, ``console``, ``none``...). Idempotent: a second call returns the
    provider of the first.

    Args:
        service_name: ``service.name`` unless ``OTEL_SERVICE_NAME`` (or
            ``OTEL_RESOURCE_ATTRIBUTES``) names one.
        database: Also trace asyncpg queries (parameters never recorded); only
            queries beneath a span are kept.

    Returns:
        The provider, or ``None`` when nothing is configured: then install no
        :class:`TracingHooks` at all.

    Raises:
        ConfigurationError: the configured exporter, or the asyncpg
            instrumentation, is not installed (``pip install 'sagaflow[tracing]'``).
    """
    global _configured
    if _configured is not None:
        return _configured
    exporters = _exporters(os.environ)
    if not exporters:
        return None
    instrumentor = _asyncpg_instrumentor() if database else None
    processors = [BatchSpanProcessor(_exporter(name)) for name in exporters]
    provider = TracerProvider(resource=resource(service_name))
    # the provider read OTEL_TRACES_SAMPLER; keep it, minus the orphan queries
    provider.sampler = DropOrphanQueries(provider.sampler)
    for processor in processors:
        provider.add_span_processor(processor)
    trace.set_tracer_provider(provider)
    if instrumentor is not None and not instrumentor.is_instrumented_by_opentelemetry:
        instrumentor.instrument(tracer_provider=provider)
    _configured = provider
    log.info(
        "tracing on: service %s, exporters %s",
        provider.resource.attributes[SERVICE_NAME],
        exporters,
    )
    return provider


def _asyncpg_instrumentor() -> Any:
    """The asyncpg instrumentation, with query parameters never recorded.

    Raises:
        ConfigurationError: it is not installed (the tracing extra).
    """
    try:
        from opentelemetry.instrumentation.asyncpg import AsyncPGInstrumentor
    except ImportError as exc:
        raise ConfigurationError(
            f"tracing database queries needs opentelemetry-instrumentation-asyncpg: "
            f"pip install '{EXTRA}' ({exc})"
        ) from exc
    # 1 ignore: the instrumentation package ships no type hints
    return AsyncPGInstrumentor(capture_parameters=False)  # type: ignore[no-untyped-call]


def shutdown_tracing(timeout_millis: int = 5_000) -> None:
    """Flush the spans still buffered and stop exporting (call on SIGTERM)."""
    provider = _configured
    if provider is None:
        return
    provider.force_flush(timeout_millis)
    provider.shutdown()
