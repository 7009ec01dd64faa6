"""Tracing over the in-memory harness: the span tree of one saga, with an in-memory exporter.

Coordinator and workers get their own ``TracingHooks`` on one tracer provider
whose spans land in an ``InMemorySpanExporter``; each test reads the finished
spans and checks the tree: one trace per saga, parents, kinds, names,
attributes, and the compensation spans with their links.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, Decision, ParentBased, StaticSampler
from opentelemetry.trace import SpanContext, SpanKind, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from sagaflow import BusinessFailure, HandlerContext, Participant, SagaStatus
from sagaflow.core.engine import LINK, TRACEPARENT
from sagaflow.core.messages import Envelope, MessageKind
from sagaflow.runtime.hooks import CompositeHooks
from sagaflow.testing import SagaTestEnvironment
from sagaflow.tracing import TRACESTATE, TracingHooks, _parent, _remote, trace_id_of
from sagaflow.tracing_setup import configure_tracing, tracing_configured
from tests.sample import (
    Cmd,
    Ok,
    approve,
    cancel,
    charge,
    confirm,
    refund,
    release,
    reserve,
    saga,
    schedule,
)

COMMANDS = "sagaflow.commands"
REPLIES = "sagaflow.replies"
STEPS = ["reserve", "charge", "schedule", "confirm", "approve"]
SERVICE = {
    "reserve": "inventory",
    "charge": "payment",
    "schedule": "shipping",
    "confirm": "order",
    "approve": "order",
}


@dataclass
class World:
    refuse: set[str] = field(default_factory=set)
    crash: Counter[str] = field(default_factory=Counter)
    contexts: list[SpanContext] = field(default_factory=list)  # current in each handler


def participants(world: World, *, without: Sequence[str] = ()) -> list[Participant]:
    made: dict[str, Participant] = {}
    for action in (reserve, release, charge, refund, schedule, cancel, confirm, approve):
        if action.service in without:
            continue
        p = made.setdefault(action.service, Participant(action.service))

        def handler(kind: str = action.type) -> object:
            async def handle(cmd: Cmd, ctx: HandlerContext) -> Ok:
                world.contexts.append(trace.get_current_span().get_span_context())
                if world.crash[kind] > 0:
                    world.crash[kind] -= 1
                    raise ConnectionError("database went away")
                if kind in world.refuse:
                    raise BusinessFailure(f"{kind} refused")
                return Ok(ref=kind)

            return handle

        p.handler(action)(handler())  # type: ignore[arg-type]
    return list(made.values())


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def provider(exporter: InMemorySpanExporter) -> Iterator[TracerProvider]:
    provider = TracerProvider(shutdown_on_exit=False)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider
    provider.shutdown()


def environment(
    provider: TracerProvider, world: World, *, without: Sequence[str] = ()
) -> SagaTestEnvironment:
    return SagaTestEnvironment(
        [saga],
        participants(world, without=without),
        hooks=TracingHooks(provider),
        worker_hooks=TracingHooks(provider),
    )


class Tree:
    """The finished spans of one trace, with lookups."""

    def __init__(self, spans: Sequence[ReadableSpan]) -> None:
        self.spans = list(spans)  # in the order they ended
        self.by_id = {s.context.span_id: s for s in self.spans}

    def named(self, name: str) -> list[ReadableSpan]:
        return [s for s in self.spans if s.name == name]

    def one(self, name: str, **attributes: object) -> ReadableSpan:
        found = [
            s
            for s in self.named(name)
            if all((s.attributes or {}).get(k) == v for k, v in attributes.items())
        ]
        assert len(found) == 1, (name, attributes, [s.attributes for s in self.named(name)])
        return found[0]

    def parent(self, span: ReadableSpan) -> ReadableSpan:
        assert span.parent is not None, span.name
        return self.by_id[span.parent.span_id]

    def roots(self) -> list[ReadableSpan]:
        return [s for s in self.spans if s.parent is None or s.parent.span_id not in self.by_id]


def traces(exporter: InMemorySpanExporter) -> dict[int, Tree]:
    grouped: dict[int, list[ReadableSpan]] = {}
    for span in exporter.get_finished_spans():
        grouped.setdefault(span.context.trace_id, []).append(span)
    return {trace_id: Tree(spans) for trace_id, spans in grouped.items()}


def only_trace(exporter: InMemorySpanExporter) -> Tree:
    found = traces(exporter)
    assert len(found) == 1, {hex(t): [s.name for s in tree.spans] for t, tree in found.items()}
    return next(iter(found.values()))


def attrs(span: ReadableSpan) -> dict[str, object]:
    return dict(span.attributes or {})


def check_step(tree: Tree, root: ReadableSpan, step: str, kind: str = "command") -> None:
    """send command -> process command -> send reply -> process reply, each the parent of the next."""
    service = SERVICE[step]
    send = tree.one(f"send {COMMANDS}:{service}", **{"saga.step": step, "saga.kind": kind})
    assert send.kind is SpanKind.PRODUCER
    assert tree.parent(send) is root
    process = tree.one(
        f"process {COMMANDS}:{service}:sagaflow.service.{service}",
        **{"saga.step": step, "saga.kind": kind},
    )
    assert process.kind is SpanKind.CONSUMER
    assert tree.parent(process) is send
    assert attrs(process)["saga.outcome"] == "success"
    reply = tree.one(f"send {REPLIES}:reply", **{"saga.step": step, "saga.reply_to": kind})
    assert reply.kind is SpanKind.PRODUCER
    assert tree.parent(reply) is process
    handled = tree.one(
        f"process {REPLIES}:reply:{REPLIES}", **{"saga.step": step, "saga.reply_to": kind}
    )
    assert handled.kind is SpanKind.CONSUMER
    assert tree.parent(handled) is reply
    assert attrs(handled)["saga.outcome"] == "success"


async def test_a_completed_saga_is_one_trace_rooted_at_its_start_span(
    provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    async with environment(provider, World()) as env:
        handle = await env.start_saga(saga, {"order_id": "o1"})
        await env.drain(fail_fast=True)
        state = await env.get(handle.saga_id)
    assert state.status is SagaStatus.COMPLETED

    tree = only_trace(exporter)
    [root] = tree.roots()
    assert root.name == "saga start sample"
    assert root.parent is None and root.kind is SpanKind.INTERNAL
    assert attrs(root) == {"saga.id": handle.saga_id, "saga.name": "sample", "saga.version": 1}
    # the context stored with the saga is the start span's
    assert trace_id_of(state.trace) == format(root.context.trace_id, "032x")
    assert state.trace[TRACEPARENT].split("-")[2] == format(root.context.span_id, "016x")

    for step in STEPS:
        check_step(tree, root, step)
    end = tree.one("saga completed sample")
    assert tree.parent(end) is root and end.kind is SpanKind.INTERNAL
    assert attrs(end)["saga.outcome"] == "COMPLETED"
    # 1 start + 4 spans per step + the end; no span stays open for the saga's life
    assert len(tree.spans) == 1 + 4 * len(STEPS) + 1
    assert all(s.end_time is not None for s in tree.spans)


async def test_message_spans_follow_the_messaging_conventions(
    provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    async with environment(provider, World()) as env:
        handle = await env.start_saga(saga, {"order_id": "o2"})
        await env.drain(fail_fast=True)
    tree = only_trace(exporter)
    send = tree.one(f"send {COMMANDS}:payment", **{"saga.step": "charge"})
    assert attrs(send) == {
        "messaging.system": "rabbitmq",
        "messaging.operation.type": "send",
        "messaging.operation.name": "publish",
        "messaging.destination.name": f"{COMMANDS}:payment",
        "messaging.rabbitmq.destination.routing_key": "payment",
        "messaging.message.id": f"{handle.saga_id}:charge:command:1",
        "messaging.message.conversation_id": handle.saga_id,
        "saga.id": handle.saga_id,
        "saga.name": "sample",
        "saga.version": 1,
        "saga.step": "charge",
        "saga.step_index": 1,
        "saga.attempt": 1,
        "saga.kind": "command",
        "saga.action": "payment.charge",
    }
    process = tree.one(f"process {COMMANDS}:payment:sagaflow.service.payment")
    assert attrs(process)["messaging.operation.type"] == "process"
    assert attrs(process)["messaging.destination.name"] == (
        f"{COMMANDS}:payment:sagaflow.service.payment"
    )
    assert attrs(process)["messaging.message.id"] == attrs(send)["messaging.message.id"]
    reply = tree.one(f"process {REPLIES}:reply:{REPLIES}", **{"saga.step": "charge"})
    assert attrs(reply)["messaging.rabbitmq.destination.routing_key"] == "reply"
    assert attrs(reply)["messaging.message.id"] == f"{handle.saga_id}:charge:command:1:reply"
    assert attrs(reply)["messaging.message.conversation_id"] == handle.saga_id
    assert attrs(reply)["saga.outcome"] == "success"


async def test_each_saga_has_its_own_trace_under_the_callers_span(
    provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    tracer = provider.get_tracer("test")
    async with environment(provider, World()) as env:
        with tracer.start_as_current_span("POST /orders", kind=SpanKind.SERVER) as request:
            first = await env.start_saga(saga, {"order_id": "o3"})
        second = await env.start_saga(saga, {"order_id": "o4"})
        await env.drain(fail_fast=True)
    found = traces(exporter)
    assert len(found) == 2
    ids = {
        str((s.attributes or {}).get("saga.id"))
        for tree in found.values()
        for s in tree.spans
        if s.attributes and "saga.id" in s.attributes
    }
    assert ids == {first.saga_id, second.saga_id}
    for tree in found.values():
        # every span of a trace belongs to the same saga
        assert len({(s.attributes or {}).get("saga.id") for s in tree.spans} - {None}) == 1
    with_request = found[request.get_span_context().trace_id]
    [root] = with_request.roots()
    assert root.name == "POST /orders"
    start = with_request.one("saga start sample")
    assert with_request.parent(start) is root
    assert attrs(start)["saga.id"] == first.saga_id


async def test_compensations_follow_the_failure_in_reverse_order_with_links(
    provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    async with environment(provider, World(refuse={"shipping.schedule"})) as env:
        handle = await env.start_saga(saga, {"order_id": "o5"})
        await env.drain(fail_fast=True)
        state = await env.get(handle.saga_id)
    assert state.status is SagaStatus.COMPENSATED

    tree = only_trace(exporter)
    [root] = tree.roots()
    failed = tree.one(f"process {COMMANDS}:shipping:sagaflow.service.shipping")
    assert attrs(failed)["saga.outcome"] == "failure"
    assert attrs(failed)["saga.reason"] == "shipping.schedule refused"
    failure_reply = tree.one(f"process {REPLIES}:reply:{REPLIES}", **{"saga.step": "schedule"})
    assert attrs(failure_reply)["saga.outcome"] == "failure"

    rollback = tree.one("saga rollback sample/schedule")
    assert tree.parent(rollback) is root
    assert attrs(rollback)["saga.cause"] == "failure"
    assert attrs(rollback)["saga.undo"] == ("charge", "reserve")

    compensations = [s for s in tree.spans if s.name.startswith("saga compensate ")]
    assert [s.name for s in compensations] == [
        "saga compensate sample/charge",
        "saga compensate sample/reserve",
    ]
    order = sorted(tree.spans, key=lambda s: s.start_time or 0)
    assert order.index(failure_reply) < order.index(rollback) < order.index(compensations[0])
    assert order.index(compensations[0]) < order.index(compensations[1])

    for span in compensations:
        step = str(attrs(span)["saga.step"])
        assert tree.parent(span) is root
        # the link points at the reply that told the coordinator the step took effect
        undone = tree.one(
            f"send {REPLIES}:reply", **{"saga.step": step, "saga.reply_to": "command"}
        )
        assert [link.context.span_id for link in span.links] == [undone.context.span_id]
        assert [link.context.trace_id for link in span.links] == [undone.context.trace_id]
        # the compensation's messages carry the same link, and form the usual chain
        check_step(tree, root, step, kind="compensation")
        for name in (
            f"send {COMMANDS}:{SERVICE[step]}",
            f"process {COMMANDS}:{SERVICE[step]}:sagaflow.service.{SERVICE[step]}",
        ):
            message = tree.one(name, **{"saga.step": step, "saga.kind": "compensation"})
            assert [link.context.span_id for link in message.links] == [undone.context.span_id]
    end = tree.one("saga compensated sample")
    assert order.index(compensations[1]) < order.index(end)
    assert attrs(end)["saga.outcome"] == "COMPENSATED"


async def test_retries_and_timeouts_are_short_spans_under_the_saga_root(
    provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    world = World(crash=Counter({"payment.charge": 1}))
    async with environment(provider, world) as env:
        handle = await env.start_saga(saga, {"order_id": "o6"})
        await env.drain()
        await env.advance(1)  # the back-off fires
        state = await env.get(handle.saga_id)
    assert state.status is SagaStatus.COMPLETED
    tree = only_trace(exporter)
    [root] = tree.roots()
    retry = tree.one("saga retry sample/charge")
    assert tree.parent(retry) is root and retry.kind is SpanKind.INTERNAL
    assert attrs(retry)["saga.attempt"] == 2
    assert "database went away" in str(attrs(retry)["saga.reason"])
    crashed = tree.one(
        f"process {COMMANDS}:payment:sagaflow.service.payment", **{"saga.attempt": 1}
    )
    assert attrs(crashed)["saga.outcome"] == "error"
    assert crashed.status.status_code is StatusCode.ERROR
    second = tree.one(f"send {COMMANDS}:payment", **{"saga.attempt": 2})
    assert tree.parent(second) is root


async def test_a_timeout_is_a_span_and_the_retry_continues_the_trace(
    provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    async with environment(provider, World(), without=["payment"]) as env:
        handle = await env.start_saga(saga, {"order_id": "o7"})
        await env.drain()
        await env.advance(5)
    tree = only_trace(exporter)
    [root] = tree.roots()
    timeout = tree.one("saga timeout sample/charge")
    assert tree.parent(timeout) is root
    assert attrs(timeout)["saga.timeout"] == 5
    assert attrs(timeout)["saga.id"] == handle.saga_id
    assert tree.parent(tree.one(f"send {COMMANDS}:payment", **{"saga.attempt": 2})) is root


async def test_a_saga_started_without_tracing_still_gets_one_trace(
    provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    # the application that started the saga had no tracing: no stored context

    class StartedUntraced(TracingHooks):
        def saga_started(self, saga: Any, saga_id: str) -> dict[str, str]:
            return {}  # starts without a context, and is traced from then on

    env = SagaTestEnvironment(
        [saga],
        participants(World()),
        hooks=StartedUntraced(provider),
        worker_hooks=TracingHooks(provider),
    )
    async with env:
        handle = await env.start_saga(saga, {"order_id": "o8"})
        await env.drain(fail_fast=True)
        state = await env.get(handle.saga_id)
    assert state.trace == {}
    tree = only_trace(exporter)
    # the spans share a trace id derived from the saga id, under a missing root
    assert len({s.parent.span_id for s in tree.roots() if s.parent is not None}) == 1
    assert len(tree.named(f"send {COMMANDS}:inventory")) == 1


def test_the_link_header_travels_with_a_compensation() -> None:
    envelope = Envelope(
        message_id="s:reserve:compensation:1",
        command_id="s:reserve:compensation",
        saga_id="s",
        saga_name="sample",
        step="reserve",
        step_index=0,
        kind=MessageKind.COMPENSATION,
        attempt=1,
        type="inventory.release",
        trace={
            TRACEPARENT: "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            LINK: "00-0af7651916cd43dd8448eb211c80319c-00f067aa0ba902b7-01",
        },
    )
    provider = TracerProvider(shutdown_on_exit=False)
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    with TracingHooks(provider).publishing([envelope]) as [sent]:
        pass
    [span] = exporter.get_finished_spans()
    assert sent.trace[LINK] == envelope.trace[LINK]  # kept for the worker's span
    assert sent.trace[TRACEPARENT].split("-")[2] == format(span.context.span_id, "016x")
    assert span.parent is not None and span.parent.span_id == 0xB7AD6B7169203331
    assert [link.context.span_id for link in span.links] == [0x00F067AA0BA902B7]


def test_trace_id_of() -> None:
    assert trace_id_of({}) is None
    assert trace_id_of({TRACEPARENT: "garbage"}) is None
    assert trace_id_of({TRACEPARENT: f"00-{'0' * 32}-b7ad6b7169203331-01"}) is None
    assert (
        trace_id_of({TRACEPARENT: "00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01"})
        == "0af7651916cd43dd8448eb211c80319c"
    )


def test_nothing_configured_means_no_tracing(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        "OTEL_TRACES_EXPORTER",
        "OTEL_SDK_DISABLED",
    ):
        monkeypatch.delenv(name, raising=False)
    assert not tracing_configured()
    assert configure_tracing("sagaflow-coordinator") is None
    assert tracing_configured({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"})
    assert tracing_configured({"OTEL_TRACES_EXPORTER": "console"})
    assert not tracing_configured(
        {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318", "OTEL_TRACES_EXPORTER": "none"}
    )
    assert not tracing_configured(
        {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318", "OTEL_SDK_DISABLED": "true"}
    )


def test_only_the_handlers_queries_are_offered_to_the_instrumentation(
    provider: TracerProvider,
) -> None:
    """In a worker's own work (transaction, inbox, savepoints) instrumentations
    are switched off; a handler's queries inside it are instrumented again."""
    from opentelemetry.instrumentation.utils import is_instrumentation_enabled

    hooks = CompositeHooks([TracingHooks(provider)])
    assert is_instrumentation_enabled()
    with hooks.queries(own=True):
        assert not is_instrumentation_enabled()
        with hooks.queries(own=False):
            assert is_instrumentation_enabled()
        assert not is_instrumentation_enabled()
    assert is_instrumentation_enabled()


class Collected(SpanProcessor):
    """Every span that ends, sampled or not (exporters only get sampled ones)."""

    def __init__(self) -> None:
        self.spans: list[ReadableSpan] = []

    def on_end(self, span: ReadableSpan) -> None:
        self.spans.append(span)


async def test_spans_recorded_under_a_parent_sampled_out_still_get_attributes_and_links() -> None:
    # Under a parent sampled out, spans are started bare (the usual sampler drops
    # them); one that a sampler records anyway gets its attributes and links
    # afterwards. RECORD_ONLY records every span without setting the sampled
    # flag, so every parent looks sampled out.
    collected = Collected()
    recording = TracerProvider(sampler=StaticSampler(Decision.RECORD_ONLY), shutdown_on_exit=False)
    recording.add_span_processor(collected)
    async with environment(recording, World(refuse={"shipping.schedule"})) as env:
        handle = await env.start_saga(saga, {"order_id": "o-rec"})
        await env.drain(fail_fast=True)
        assert (await env.get(handle.saga_id)).status is SagaStatus.COMPENSATED
    sends = [s for s in collected.spans if s.name == f"send {COMMANDS}:inventory"]
    assert len(sends) == 2  # the command and its compensation
    for span in sends:
        assert not span.context.trace_flags.sampled
        assert attrs(span)["messaging.system"] == "rabbitmq"
        assert attrs(span)["saga.step"] == "reserve"
    compensate = next(s for s in collected.spans if s.name == "saga compensate sample/reserve")
    assert attrs(compensate)["saga.step"] == "reserve"
    assert len(compensate.links) == 1
    compensation = next(s for s in sends if attrs(s)["saga.kind"] == "compensation")
    assert [link.context.span_id for link in compensation.links] == [
        compensate.links[0].context.span_id
    ]


async def test_a_saga_sampled_out_records_no_span_and_runs_as_usual() -> None:
    # A parent-based sampler drops the children of a span sampled out, so no
    # span is even started; the saga's trace context still travels with every
    # message (each handler runs under it, sampled out).
    collected = Collected()
    off = TracerProvider(sampler=ParentBased(ALWAYS_OFF), shutdown_on_exit=False)
    off.add_span_processor(collected)
    world = World(refuse={"shipping.schedule"})
    _remote.cache_clear()
    async with environment(off, world) as env:
        handle = await env.start_saga(saga, {"order_id": "o-off"})
        await env.drain(fail_fast=True)
        state = await env.get(handle.saga_id)
    assert state.status is SagaStatus.COMPENSATED
    assert collected.spans == []
    # the one context it carries to every hop is parsed once
    assert _remote.cache_info().misses == 1
    assert _remote.cache_info().hits >= 10
    started = _span_context_of(state.trace[TRACEPARENT])
    assert len(world.contexts) == 5  # reserve, charge, schedule (refused), refund, release
    assert {c.trace_id for c in world.contexts} == {started.trace_id}
    assert not any(c.trace_flags.sampled for c in world.contexts)


def test_a_parent_is_parsed_once_and_keeps_its_tracestate() -> None:
    traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    first = _parent({TRACEPARENT: traceparent, TRACESTATE: "k=a"}, "s-1")
    other = _parent({TRACEPARENT: traceparent, TRACESTATE: "k=b"}, "s-1")
    assert _parent({TRACEPARENT: traceparent, TRACESTATE: "k=a"}, "s-2") is first
    assert first.span_context.trace_id == 0x0AF7651916CD43DD8448EB211C80319C
    assert first.span_context.trace_state.get("k") == "a"
    assert other.span_context.trace_state.get("k") == "b"
    assert first.sampled
    # no or an invalid traceparent: the stand-in derived from the saga id
    derived = _parent({}, "s-1")
    assert _parent({TRACEPARENT: "00-garbage"}, "s-1") is derived
    assert derived.span_context.is_valid and derived.sampled
    assert _parent({}, "s-2").span_context.trace_id != derived.span_context.trace_id


def _span_context_of(traceparent: str) -> SpanContext:
    carrier = {TRACEPARENT: traceparent}
    return trace.get_current_span(
        TraceContextTextMapPropagator().extract(carrier)
    ).get_span_context()
