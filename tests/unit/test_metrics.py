"""Metrics over the in-memory harness: counters and histograms after real runs."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import HistogramDataPoint, InMemoryMetricReader
from prometheus_client import CollectorRegistry, generate_latest

from sagaflow import SagaClient, SagaStatus
from sagaflow.metrics import MetricsHooks, OutboxMonitor, metrics_configured, reason_code
from sagaflow.testing import SagaTestEnvironment
from tests.sample import saga
from tests.unit.test_tracing import World, participants


@pytest.fixture
def reader() -> InMemoryMetricReader:
    return InMemoryMetricReader()


@pytest.fixture
def provider(reader: InMemoryMetricReader) -> Iterator[MeterProvider]:
    provider = MeterProvider(metric_readers=[reader], shutdown_on_exit=False)
    yield provider
    provider.shutdown()


def points(reader: InMemoryMetricReader, name: str) -> dict[frozenset[tuple[str, object]], object]:
    """The data points of metric ``name`` by attribute set: a value, or a histogram point."""
    found: dict[frozenset[tuple[str, object]], object] = {}
    data = reader.get_metrics_data()
    for resource in data.resource_metrics if data is not None else []:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                if metric.name != name:
                    continue
                for point in metric.data.data_points:
                    key = frozenset((point.attributes or {}).items())
                    found[key] = point if isinstance(point, HistogramDataPoint) else point.value
    return found


def key(**attributes: object) -> frozenset[tuple[str, object]]:
    return frozenset(attributes.items())


async def test_counters_match_the_outcomes_of_a_run(
    provider: MeterProvider, reader: InMemoryMetricReader
) -> None:
    hooks = MetricsHooks(provider)
    world = World(refuse={"shipping.schedule"})
    async with SagaTestEnvironment(
        [saga], participants(world), hooks=hooks, worker_hooks=hooks
    ) as env:
        compensated = await env.start_saga(saga, {"order_id": "bad"})
        await env.drain(fail_fast=True)
        world.refuse.clear()
        world.crash["payment.charge"] = 1
        completed = [await env.start_saga(saga, {"order_id": f"ok-{n}"}) for n in range(2)]
        await env.drain()
        await env.advance(1)  # the back-off after the crash fires
        statuses = Counter([(await env.get(h.saga_id)).status for h in [compensated, *completed]])
    assert statuses == Counter({SagaStatus.COMPLETED: 2, SagaStatus.COMPENSATED: 1})

    sample = key(saga="sample")
    assert points(reader, "sagaflow.sagas.started") == {sample: 3}
    assert points(reader, "sagaflow.sagas.completed") == {sample: 2}
    assert points(reader, "sagaflow.sagas.compensated") == {sample: 1}
    assert points(reader, "sagaflow.sagas.failed") == {}
    assert points(reader, "sagaflow.step.retries") == {
        key(saga="sample", step="charge", kind="command"): 1
    }
    durations = points(reader, "sagaflow.saga.duration")
    assert {k: p.count for k, p in durations.items()} == {  # type: ignore[attr-defined]
        key(saga="sample", status="completed"): 2,
        key(saga="sample", status="compensated"): 1,
    }
    steps = points(reader, "sagaflow.step.duration")
    counts = {
        (dict(k)["step"], dict(k)["kind"], dict(k)["outcome"]): p.count  # type: ignore[attr-defined]
        for k, p in steps.items()
    }
    assert counts[("reserve", "command", "success")] == 3
    assert counts[("reserve", "compensation", "success")] == 1
    assert counts[("schedule", "command", "failure")] == 1
    assert counts[("charge", "command", "error")] == 1
    assert counts[("charge", "command", "success")] == 3

    handled = points(reader, "sagaflow.commands.handled")
    assert handled[key(type="shipping.schedule", outcome="failure")] == 1
    assert handled[key(type="payment.charge", outcome="error")] == 1
    assert handled[key(type="payment.charge", outcome="success")] == 3
    assert handled[key(type="payment.refund", outcome="success")] == 1
    assert handled[key(type="order.approve", outcome="success")] == 2


async def test_timeouts_are_counted_with_their_step_latency(
    provider: MeterProvider, reader: InMemoryMetricReader
) -> None:
    hooks = MetricsHooks(provider)
    async with SagaTestEnvironment(
        [saga], participants(World(), without=["payment"]), hooks=hooks
    ) as env:
        await env.start_saga(saga, {"order_id": "o1"})
        await env.drain()
        await env.advance(5)
    assert points(reader, "sagaflow.step.timeouts") == {
        key(saga="sample", step="charge", kind="command"): 1
    }
    [timed_out] = [
        p
        for k, p in points(reader, "sagaflow.step.duration").items()
        if dict(k)["outcome"] == "timeout"
    ]
    assert timed_out.count == 1 and timed_out.sum == 5  # type: ignore[attr-defined]


async def test_dead_letters_are_counted_by_queue_and_reason_code(
    provider: MeterProvider, reader: InMemoryMetricReader
) -> None:
    hooks = MetricsHooks(provider)
    async with SagaTestEnvironment(
        [saga], participants(World()), hooks=hooks, worker_hooks=hooks
    ) as env:
        env.transport.inject(env.transport.topology.replies_queue, b"not json")
        env.transport.inject(env.transport.topology.service_queue("inventory"), b"[1]")
        env.transport.inject(env.transport.topology.service_queue("inventory"), b"[2]")
        await env.drain()
    assert points(reader, "sagaflow.messages.dead_lettered") == {
        key(queue="sagaflow.replies", reason="not_json"): 1,
        key(queue="sagaflow.service.inventory", reason="invalid"): 2,
    }


async def test_the_outbox_gauges_come_from_the_monitor(
    provider: MeterProvider, reader: InMemoryMetricReader
) -> None:
    hooks = MetricsHooks(provider)
    assert points(reader, "sagaflow.outbox.backlog") == {}  # unknown until first read
    env = SagaTestEnvironment([saga], participants(World()), hooks=hooks)
    async with env:
        # started inside the application's own transaction (the in-memory store
        # ignores the connection): committed, left for the relay to publish
        client = SagaClient([saga], store=env.store, clock=env.clock)
        await client.start_saga(saga, {"order_id": "queued"}, connection=object())
        monitor = OutboxMonitor(hooks, env.store, clock=env.clock, interval=3600)
        env.clock.advance(30)
        await monitor.refresh()
        assert points(reader, "sagaflow.outbox.backlog") == {key(): 1}
        assert points(reader, "sagaflow.outbox.oldest_age") == {key(): 30}
        monitor.start()
        await monitor.stop()
        await env.drain()  # the relay publishes it
        await monitor.refresh()
    assert points(reader, "sagaflow.outbox.backlog") == {key(): 0}


def test_the_prometheus_names(reader: InMemoryMetricReader) -> None:
    from opentelemetry.exporter.prometheus import PrometheusMetricReader

    registry = CollectorRegistry()
    provider = MeterProvider(
        metric_readers=[PrometheusMetricReader(registry=registry)], shutdown_on_exit=False
    )
    try:
        hooks = MetricsHooks(provider)
        hooks.dead_lettered("q", "too_large: 300000 bytes")
        hooks.observe_outbox(3, 1.5)
        text = generate_latest(registry).decode()
    finally:
        provider.shutdown()
    assert "sagaflow_messages_dead_lettered_total{" in text
    assert 'reason="too_large"' in text
    assert "sagaflow_outbox_backlog{" in text
    assert "sagaflow_outbox_oldest_age_seconds{" in text


def test_reason_codes_stay_low_cardinality() -> None:
    assert reason_code("invalid: step.0: field required") == "invalid"
    assert reason_code("delivery_limit") == "delivery_limit"
    assert reason_code("something went wrong") == "other"
    assert reason_code("") == "other"


def test_metrics_are_configured_by_a_port_or_otlp() -> None:
    assert not metrics_configured(None, {})
    assert metrics_configured(9464, {})
    assert metrics_configured(None, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"})
    assert not metrics_configured(
        None, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://x:4318", "OTEL_METRICS_EXPORTER": "none"}
    )


def test_a_groups_branches_are_timed_from_their_own_send_and_by_their_kind(
    provider: MeterProvider, reader: InMemoryMetricReader
) -> None:
    """Branches answer one at a time: the second is timed from its send, not from
    its sibling's reply, and the group's compensations count as compensations."""
    from sagaflow.core import engine
    from sagaflow.core.messages import Outcome
    from tests.unit.test_groups import T0, at_group, grouped, reply

    hooks = MetricsHooks(provider)
    s = grouped()

    def decide(before: engine.Decision, event: engine.ReplyReceived, now: float) -> engine.Decision:
        after = engine.decide(s, before.state, event, now)
        hooks.decided(s, before.state, after)
        return after

    d = at_group(s)  # charge and schedule sent at T0
    charge, schedule = d.messages
    d = decide(d, reply(charge), T0 + 1)
    d = decide(d, reply(schedule), T0 + 3)
    d = decide(d, reply(d.messages[0], Outcome.FAILURE), T0 + 4)  # confirm refuses
    cancel, refund = d.messages
    assert (cancel.type, refund.type) == ("shipping.cancel", "payment.refund")
    d = decide(d, reply(cancel), T0 + 6)
    d = decide(d, reply(refund), T0 + 9)
    took = {
        (dict(k)["step"], dict(k)["kind"]): p.sum  # type: ignore[attr-defined]
        for k, p in points(reader, "sagaflow.step.duration").items()
    }
    assert took == {
        ("charge", "command"): 1,
        ("schedule", "command"): 3,
        ("confirm", "command"): 1,
        ("schedule", "compensation"): 2,
        ("charge", "compensation"): 5,
    }
