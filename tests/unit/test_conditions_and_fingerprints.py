"""Conditional steps (``when=``) and definition fingerprints, in the pure core."""

from __future__ import annotations

from dataclasses import replace

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from rich.console import Console

from sagaflow import ConfigurationError, DefinitionError, Saga, SagaStatus, Step
from sagaflow.cli.render import render_show, saga_document
from sagaflow.core import engine
from sagaflow.core.definition import to_mermaid
from sagaflow.core.fingerprint import drift, record_of
from sagaflow.core.messages import Envelope, MessageKind, Outcome
from sagaflow.core.ports import Topology
from sagaflow.core.state import LogEvent
from sagaflow.runtime.coordinator import Coordinator
from sagaflow.store import InMemorySagaStore
from sagaflow.testing import FakeClock, SagaTestEnvironment
from sagaflow.tracing import TracingHooks
from sagaflow.transport.memory import InMemoryTransport
from tests.sample import (
    COMP,
    FAST,
    Data,
    _cmd,
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
from tests.unit.test_tracing import World, participants

T0 = 1000.0


def big(d: Data) -> bool:
    return d.amount > 100


def wrapped_saga(when_charge: object = big, when_schedule: object = None) -> Saga[Data]:
    return Saga(
        "conditional",
        data=Data,
        steps=[
            Step("reserve", reserve, _cmd, release, retry=FAST, compensation_retry=COMP),
            Step("charge", charge, _cmd, refund, retry=FAST, when=when_charge),  # type: ignore[arg-type]
            Step("schedule", schedule, _cmd, cancel, retry=FAST, when=when_schedule),  # type: ignore[arg-type]
            Step("confirm", confirm, _cmd, retry=FAST),
            Step("approve", approve, _cmd, retriable=True, when=big),
        ],
    )


def ok(env: Envelope) -> engine.ReplyReceived:
    return engine.ReplyReceived(env.reply(Outcome.SUCCESS, {"ref": "R"}, None))


def fail(env: Envelope) -> engine.ReplyReceived:
    return engine.ReplyReceived(env.reply(Outcome.FAILURE, {}, "no"))


def test_a_false_condition_skips_the_step_and_logs_it() -> None:
    s = wrapped_saga()
    d = engine.start(s, "s1", {"order_id": "o", "amount": 5}, T0)
    d = engine.decide(s, d.state, ok(d.messages[0]), T0)  # reserve done: charge is skipped
    (msg,) = d.messages
    assert msg.step == "schedule"
    skipped = [e for e in d.log if e.event is LogEvent.STEP_SKIPPED]
    assert [(e.step, e.step_index) for e in skipped] == [("charge", 1)]
    assert d.state.skipped == (1,)
    d = engine.decide(s, d.state, ok(d.messages[0]), T0)  # schedule
    d = engine.decide(s, d.state, ok(d.messages[0]), T0)  # confirm; approve skipped: done
    assert d.state.status is SagaStatus.COMPLETED and d.state.skipped == (1, 4)
    assert d.log[-1].event is LogEvent.COMPLETED


def test_a_true_condition_sends_the_step() -> None:
    s = wrapped_saga()
    d = engine.start(s, "s1", {"order_id": "o", "amount": 500}, T0)
    d = engine.decide(s, d.state, ok(d.messages[0]), T0)
    assert d.messages[0].step == "charge" and d.state.skipped == ()


def test_a_skipped_step_is_never_compensated() -> None:
    s = wrapped_saga()
    d = engine.start(s, "s1", {"order_id": "o", "amount": 5}, T0)
    d = engine.decide(s, d.state, ok(d.messages[0]), T0)  # reserve; charge skipped
    d = engine.decide(s, d.state, ok(d.messages[0]), T0)  # schedule
    d = engine.decide(s, d.state, fail(d.messages[0]), T0)  # confirm refuses
    undone = []
    while d.messages:
        undone.append(d.messages[0].type)
        d = engine.decide(s, d.state, ok(d.messages[0]), T0)
    assert undone == ["shipping.cancel", "inventory.release"]
    assert d.state.status is SagaStatus.COMPENSATED


def test_the_first_step_may_be_skipped_and_every_step_may_be() -> None:
    never = Saga(
        "never",
        data=Data,
        steps=[Step("reserve", reserve, _cmd, release, when=lambda d: False)],
    )
    d = engine.start(never, "s1", {"order_id": "o"}, T0)
    assert d.messages == () and d.state.status is SagaStatus.COMPLETED
    assert [e.event for e in d.log] == [LogEvent.STARTED, LogEvent.STEP_SKIPPED, LogEvent.COMPLETED]


def test_a_condition_that_raises_fails_the_step_and_compensates() -> None:
    def broken(d: Data) -> bool:
        raise RuntimeError("bug")

    s = wrapped_saga(when_schedule=broken)
    d = engine.start(s, "s1", {"order_id": "o", "amount": 5}, T0)
    d = engine.decide(s, d.state, ok(d.messages[0]), T0)  # reserve; charge skipped; schedule raises
    assert d.state.status is SagaStatus.COMPENSATING
    assert d.state.failure is not None and "when raised" in d.state.failure.reason
    assert d.state.failure.step == "schedule"
    (msg,) = d.messages
    assert (msg.type, msg.kind) == ("inventory.release", MessageKind.COMPENSATION)


def test_a_conditional_pivot_is_a_definition_error() -> None:
    with pytest.raises(DefinitionError, match="the pivot cannot be conditional"):
        Saga("s", data=Data, steps=[Step("p", confirm, _cmd, when=big)])


def test_a_condition_that_is_not_a_function_is_a_definition_error() -> None:
    with pytest.raises(DefinitionError, match="when must be a function"):
        Saga("s", data=Data, steps=[Step("a", reserve, _cmd, release, when=True)])  # type: ignore[arg-type]


def test_mermaid_shows_the_skip_edge() -> None:
    text = to_mermaid(wrapped_saga())
    assert "s0 -. skipped .-> s2" in text
    assert "s3 -. skipped .-> done" in text
    assert "compensatable, when" in text


# --------------------------------------------------------------------------- fingerprints


def test_the_fingerprint_is_stored_with_every_saga() -> None:
    d = engine.start(saga, "s1", {"order_id": "o"}, T0)
    assert d.state.fingerprint == saga.fingerprint and len(saga.fingerprint) == 16


def test_timings_do_not_change_the_fingerprint_but_the_shape_does() -> None:
    slower = Saga(
        saga.name, data=Data, steps=[replace(s, timeout=99.0, retry=COMP) for s in saga.steps]
    )
    assert slower.fingerprint == saga.fingerprint
    assert drift(record_of(saga), record_of(slower)) is None


@pytest.mark.parametrize(
    ("edit", "named"),
    [
        (lambda steps: steps[:1] + steps[2:], "step 'charge' removed"),
        (
            lambda steps: [steps[1], steps[0], *steps[2:]],
            "steps reordered: was ['reserve', 'charge', 'schedule', 'confirm', 'approve']",
        ),
        (
            lambda steps: [*steps[:3], replace(steps[3], retriable=True), steps[4]],
            "step 'confirm' kind was 'pivot', now 'retriable'",
        ),
        (
            lambda steps: [replace(steps[0], action=charge, compensation=refund), *steps[1:]],
            "step 'reserve' action was 'inventory.reserve', now 'payment.charge'",
        ),
        (
            lambda steps: [replace(steps[0], when=big), *steps[1:]],
            "step 'reserve' conditional was None, now True",
        ),
    ],
)
def test_drift_names_the_difference_and_says_to_bump_the_version(edit, named) -> None:  # type: ignore[no-untyped-def]
    edited = Saga(saga.name, data=Data, steps=edit(list(saga.steps)))
    assert edited.fingerprint != saga.fingerprint
    message = drift(record_of(saga), record_of(edited))
    assert message is not None and "\n" not in message
    assert named in message
    assert "declare the change as version 2" in message
    assert f"fingerprint {saga.fingerprint}, now {edited.fingerprint}" in message


# --------------------------------------------------------------------------- the coordinator


async def _start_coordinator(store: InMemorySagaStore, *sagas: Saga[Data]) -> None:
    coordinator = Coordinator(
        list(sagas), store=store, transport=InMemoryTransport(Topology()), clock=FakeClock()
    )
    await coordinator.start()
    await coordinator.stop()


async def test_a_coordinator_refuses_a_definition_edited_in_place() -> None:
    store = InMemorySagaStore()
    await _start_coordinator(store, saga)
    slower = Saga(saga.name, data=Data, steps=[replace(s, timeout=60.0) for s in saga.steps])
    await _start_coordinator(store, slower)  # timings may change in place
    edited = Saga(saga.name, data=Data, steps=[*saga.steps[:1], *saga.steps[2:]])
    with pytest.raises(ConfigurationError) as refused:
        await _start_coordinator(store, edited)
    message = str(refused.value)
    assert "saga 'sample' v1" in message and "step 'charge' removed" in message
    assert "declare the change as version 2" in message
    bumped = Saga(saga.name, data=Data, steps=edited.steps, version=2)
    await _start_coordinator(store, saga, bumped)  # both versions run side by side
    held = await store.record_definitions([record_of(saga), record_of(bumped)])
    assert [r.fingerprint for r in held] == [saga.fingerprint, bumped.fingerprint]


# --------------------------------------------------------------------------- sagas show, traces


async def test_sagas_show_and_the_trace_show_the_skipped_step() -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider(shutdown_on_exit=False)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    world = World()
    s = wrapped_saga()
    async with SagaTestEnvironment([s], participants(world), hooks=TracingHooks(provider)) as env:
        handle = await env.start_saga(s, {"order_id": "o", "amount": 5})
        await env.drain(fail_fast=True)
        state = await env.get(handle.saga_id)
        log = await env.log(handle.saga_id)
    provider.shutdown()
    assert state.status is SagaStatus.COMPLETED

    doc = saga_document(state, log)
    assert [(st["step"], st["outcome"]) for st in doc["steps"]] == [
        ("reserve", "success"),
        ("charge", "skipped"),
        ("schedule", "success"),
        ("confirm", "success"),
        ("approve", "skipped"),
    ]
    assert doc["skipped_steps"] == [1, 4] and doc["fingerprint"] == s.fingerprint
    console = Console(record=True, width=200)
    render_show(console, doc)
    shown = [line for line in console.export_text().splitlines() if "skipped" in line]
    assert len(shown) == 2 and "charge" in shown[0] and "approve" in shown[1]

    names = [span.name for span in exporter.get_finished_spans()]
    assert "saga skip conditional/charge" in names
    assert "saga skip conditional/approve" in names
    assert "saga skip conditional/schedule" not in names
