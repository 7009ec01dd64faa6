"""Waits for signals and saga deadlines, in the pure engine and through the client."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest
from pydantic import BaseModel
from typer.testing import CliRunner

from sagaflow import DefinitionError, Saga, SagaClient, SagaflowError, SagaStatus, Step, Wait
from sagaflow.cli import app, common
from sagaflow.core import engine
from sagaflow.core.definition import to_mermaid
from sagaflow.core.messages import Envelope, MessageKind, Outcome
from sagaflow.core.ports import UnitOfWork
from sagaflow.core.state import LogEvent, SagaState
from sagaflow.runtime.client import SagaView
from sagaflow.store import InMemorySagaStore
from sagaflow.testing import SagaTestEnvironment
from tests.sample import COMP, FAST, Data, _cmd, approve, charge, confirm, refund, release, reserve
from tests.unit.test_tracing import World, participants

T0 = 1000.0


class Approval(BaseModel):
    approved_by: str
    note: str = ""


class Approved(Data):
    approved_by: str | None = None


def shop(
    *, timeout: float | None = 60.0, default: Approval | None = None, deadline: float | None = None
) -> Saga[Approved]:
    return Saga(
        "approval",
        data=Approved,
        steps=[
            Step("reserve", reserve, _cmd, release, retry=FAST, compensation_retry=COMP, timeout=5),
            Wait("manager", model=Approval, signal="approve", timeout=timeout, on_timeout=default),
            Step("charge", charge, _cmd, refund, retry=FAST, compensation_retry=COMP, timeout=5),
            Step("confirm", confirm, _cmd, retry=FAST, timeout=5),
            Step("approve", approve, _cmd, retriable=True, timeout=5),
        ],
        deadline=deadline,
    )


def ok(env: Envelope) -> engine.ReplyReceived:
    return engine.ReplyReceived(env.reply(Outcome.SUCCESS, {"ref": "R"}, None))


def signal(name: str = "approve", **data: object) -> engine.SignalReceived:
    return engine.SignalReceived(
        name=name, data=data or {"approved_by": "ann"}, by="ann", reason="ok"
    )


def at_wait(s: Saga[Approved]) -> engine.Decision:
    d = engine.start(s, "s1", {"order_id": "o"}, T0)
    return engine.decide(s, d.state, ok(d.messages[0]), T0)


def finish(s: Saga[Approved], d: engine.Decision) -> engine.Decision:
    while d.messages:
        d = engine.decide(s, d.state, ok(d.messages[0]), T0)
    return d


# --------------------------------------------------------------------------- waits


def test_the_saga_waits_then_a_signal_merges_and_moves_on() -> None:
    s = shop()
    d = at_wait(s)
    assert d.messages == () and d.state.waiting_for == "approve" and d.state.awaiting
    assert d.state.timer is not None and d.state.timer.purpose == "wait"
    assert d.state.wake_at == T0 + 60
    assert d.log[-1].event is LogEvent.WAITING and d.log[-1].step == "manager"
    d = engine.decide(s, d.state, signal(), T0 + 1)
    assert d.changed and d.state.data["approved_by"] == "ann" and d.state.waiting_for is None
    (msg,) = d.messages
    assert msg.step == "charge"
    d = finish(s, d)
    assert d.state.status is SagaStatus.COMPLETED


def test_a_signal_sent_twice_is_applied_once() -> None:
    s = shop()
    d = engine.decide(s, at_wait(s).state, signal(), T0)
    again = engine.decide(s, d.state, signal(approved_by="bob"), T0)
    assert again.ignored and again.state is d.state and again.messages == ()


def test_an_early_signal_is_kept_and_used_when_the_saga_gets_there() -> None:
    s = shop()
    d = engine.start(s, "s1", {"order_id": "o"}, T0)
    d = engine.decide(s, d.state, signal(), T0)  # reserve is still in flight
    assert (
        d.changed
        and d.messages == ()
        and d.state.signals == {"approve": {"approved_by": "ann", "note": ""}}
    )
    assert d.log[-1].detail["kept"] is True
    dup = engine.decide(s, d.state, signal(approved_by="bob"), T0)
    assert dup.ignored
    d = engine.decide(
        s, d.state, d.state and ok(engine.start(s, "s1", {"order_id": "o"}, T0).messages[0]), T0
    )
    (msg,) = d.messages  # no wait: straight on to charge
    assert msg.step == "charge" and d.state.data["approved_by"] == "ann" and d.state.signals == {}


@pytest.mark.parametrize(
    ("event", "message"),
    [
        (signal("nope"), "waits for no signal 'nope' (it waits for: approve)"),
        (
            signal(approved_by=5),
            "does not fit Approval: approved_by: Input should be a valid string",
        ),
        (engine.SignalReceived("approve", {}, "x", "y"), "approved_by: Field required"),
    ],
)
def test_bad_signals_are_rejected_and_change_nothing(
    event: engine.SignalReceived, message: str
) -> None:
    s = shop()
    state = at_wait(s).state
    d = engine.decide(s, state, event, T0)
    assert d.rejected is not None and message in d.rejected
    assert d.state is state and d.log == ()


def test_a_signal_for_a_finished_saga_is_rejected() -> None:
    s = shop()
    d = finish(s, engine.decide(s, at_wait(s).state, signal(), T0))
    r = engine.decide(s, d.state, signal("approve"), T0)
    assert r.rejected == "saga is COMPLETED: signal 'approve' not applied"


def test_a_wait_that_times_out_compensates() -> None:
    s = shop()
    d = at_wait(s)
    d = engine.decide(s, d.state, engine.TimerFired(), T0 + 61)
    assert d.state.status is SagaStatus.COMPENSATING
    assert d.state.failure is not None and d.state.failure.cause == "timeout"
    assert "no signal 'approve' within 60s" in d.state.failure.reason
    assert [m.type for m in d.messages] == ["inventory.release"]
    assert LogEvent.WAIT_TIMED_OUT in [e.event for e in d.log]
    d = finish(s, d)
    assert d.state.status is SagaStatus.COMPENSATED
    late = engine.decide(s, d.state, signal(), T0 + 62)
    assert late.rejected is not None and "COMPENSATED" in late.rejected


def test_a_wait_that_times_out_with_a_default_goes_on() -> None:
    s = shop(default=Approval(approved_by="auto"))
    d = engine.decide(s, at_wait(s).state, engine.TimerFired(), T0 + 61)
    assert d.state.data["approved_by"] == "auto" and d.messages[0].step == "charge"
    late = engine.decide(s, d.state, signal(), T0 + 62)
    assert late.rejected == "wait 'manager' timed out already and took its default"


def test_cancel_while_waiting_compensates() -> None:
    s = shop(timeout=None)
    d = at_wait(s)
    assert d.state.timer is None and d.state.wake_at is None
    d = engine.decide(s, d.state, engine.CancelRequested("ops", "customer called"), T0)
    assert [m.type for m in d.messages] == ["inventory.release"]
    assert finish(s, d).state.status is SagaStatus.CANCELLED


def test_a_reply_naming_a_wait_is_rejected() -> None:
    s = shop()
    d = at_wait(s)
    forged = Envelope(
        message_id="m",
        command_id="c",
        saga_id="s1",
        saga_name="approval",
        saga_version=1,
        step="manager",
        step_index=1,
        kind=MessageKind.COMMAND,
        attempt=1,
        type="x.y",
        payload={},
    ).reply(Outcome.SUCCESS, {}, None)
    r = engine.decide(s, d.state, engine.ReplyReceived(forged), T0)
    assert r.rejected == "step 'manager' is a wait: it takes signals, not replies"


# --------------------------------------------------------------------------- deadlines


def test_a_deadline_before_the_pivot_cancels_and_compensates() -> None:
    s = shop(timeout=None, deadline=30)
    d = at_wait(s)
    assert d.state.deadline_at == T0 + 30 and d.state.wake_at == T0 + 30
    d = engine.decide(s, d.state, engine.TimerFired(), T0 + 30)
    assert d.state.overdue and d.state.failure is not None and d.state.failure.cause == "deadline"
    assert d.log[0].event is LogEvent.DEADLINE_PASSED and d.log[0].detail["compensates"]
    d = finish(s, d)
    assert d.state.status is SagaStatus.COMPENSATED and d.state.wake_at is None


def test_a_deadline_abandons_the_step_in_flight() -> None:
    s = shop(deadline=2)
    d = engine.start(s, "s1", {"order_id": "o"}, T0)  # reserve in flight, its timeout at +5
    assert d.state.wake_at == T0 + 2
    d = engine.decide(s, d.state, engine.TimerFired(), T0 + 2)
    assert [(m.type, m.kind) for m in d.messages] == [
        ("inventory.release", MessageKind.COMPENSATION)
    ]


def test_a_deadline_after_the_pivot_is_recorded_and_undoes_nothing() -> None:
    s = shop(deadline=30)
    d = engine.decide(s, at_wait(s).state, signal(), T0)
    d = engine.decide(s, d.state, ok(d.messages[0]), T0)  # charge; confirm (the pivot) in flight
    pivot = d.messages[0]
    assert pivot.step == "confirm"
    late = engine.decide(s, d.state, engine.TimerFired(), T0 + 31)
    assert late.state.overdue and late.messages == () and late.state.status is SagaStatus.RUNNING
    assert late.log[0].event is LogEvent.DEADLINE_PASSED and not late.log[0].detail["compensates"]
    assert late.state.wake_at == late.state.timer.due_at  # type: ignore[union-attr]
    # the pivot's own timeout (due at +5) comes next: re-sent, never compensated
    again = engine.decide(s, late.state, engine.TimerFired(), T0 + 31)
    assert [(m.step, m.kind, m.attempt) for m in again.messages] == [
        ("confirm", MessageKind.COMMAND, 2)
    ]
    d = finish(s, engine.decide(s, late.state, ok(pivot), T0 + 32))
    assert d.state.status is SagaStatus.COMPLETED and d.state.overdue


def test_a_deadline_in_the_past_is_refused() -> None:
    with pytest.raises(ValueError, match="in the past"):
        engine.start(shop(), "s1", {"order_id": "o"}, T0, deadline_at=T0 - 1)


# --------------------------------------------------------------------------- definition errors


@pytest.mark.parametrize(
    ("steps", "message"),
    [
        ([Wait("w")], "a wait needs the pydantic model of its signal's data"),
        ([Wait("w", model=dict)], "model must be a pydantic model class"),  # type: ignore[arg-type]
        ([Wait("w", model=Approval, timeout=0)], "timeout must be positive"),
        (
            [Wait("w", model=Approval, on_timeout=Approval(approved_by="x"))],
            "on_timeout needs a timeout",
        ),
        (
            [Wait("w", model=Approval, timeout=1, on_timeout=Data(order_id="x"))],
            "on_timeout must be a Approval",
        ),
        (
            [Wait("w", model=Approval), Wait("v", model=Approval, signal="w")],
            "a signal name must name one wait",
        ),
        ([Wait("w", model=Approval, signal="Bad Name")], "signal 'Bad Name' must be"),
        (
            [Step("p", confirm, _cmd), Wait("w", model=Approval, timeout=5)],
            "comes after the point of no return ('p'), so its timeout cannot compensate",
        ),
        (["not a step"], "a step must be a Step, a Wait or a Group"),
    ],
)
def test_wait_definition_errors(steps: list[object], message: str) -> None:
    with pytest.raises(DefinitionError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Saga("s", data=Data, steps=steps)  # type: ignore[arg-type]


@pytest.mark.parametrize("deadline", [0, -5])
def test_a_deadline_must_be_positive(deadline: float) -> None:
    with pytest.raises(DefinitionError, match="deadline must be a positive number"):
        Saga("s", data=Data, steps=[Step("a", reserve, _cmd, release)], deadline=deadline)


def test_a_wait_after_the_pivot_without_timeout_or_with_a_default_is_fine() -> None:
    Saga("s", data=Data, steps=[Step("p", confirm, _cmd), Wait("w", model=Approval)])
    Saga(
        "s",
        data=Data,
        steps=[
            Step("p", confirm, _cmd),
            Wait("w", model=Approval, timeout=5, on_timeout=Approval(approved_by="auto")),
        ],
    )


def test_mermaid_shows_waits_timeouts_and_the_deadline() -> None:
    text = to_mermaid(shop(deadline=3600))
    assert "deadline 3600s" in text
    assert 's1{{"manager<br/>signal approve<br/><i>wait, 60s</i>"}}' in text
    assert "s1 -. times out .-> c0" in text


# --------------------------------------------------------------------------- through the client


async def test_signal_saga_and_a_typed_get_through_the_runtime() -> None:
    s = shop(deadline=600)
    async with SagaTestEnvironment([s], participants(World())) as env:
        handle = await env.start_saga(s, {"order_id": "o9"})
        await env.drain(fail_fast=True)
        client = env.coordinator.client
        view = await client.get(handle.saga_id, s)
        assert isinstance(view, SagaView) and view.waiting_for == "approve"
        assert view.step == "manager" and view.completed == ("reserve",)
        assert isinstance(view.data, Approved) and view.data.approved_by is None
        with pytest.raises(SagaflowError, match="does not fit Approval"):
            await client.signal_saga(handle.saga_id, "approve", {"note": 1}, by="ann", reason="r")
        with pytest.raises(SagaflowError, match="no saga with id"):
            await client.signal_saga("nope", "approve", {"approved_by": "a"}, by="a", reason="r")
        state = await client.signal_saga(
            handle.saga_id, "approve", Approval(approved_by="ann"), by="ann", reason="fine"
        )
        assert state.data["approved_by"] == "ann"
        again = await client.signal_saga(
            handle.saga_id, "approve", {"approved_by": "bob"}, by="bob", reason="dup"
        )
        assert again.data["approved_by"] == "ann"
        await env.drain(fail_fast=True)
        done = await client.get(handle.saga_id, s)
        assert done is not None and done.status is SagaStatus.COMPLETED
        assert done.completed == ("reserve", "charge") and done.data.approved_by == "ann"
        with pytest.raises(SagaflowError, match="saga is COMPLETED"):
            await client.signal_saga(
                handle.saga_id, "approve", {"approved_by": "x"}, by="x", reason="r"
            )
        log = [e.event for e in await env.log(handle.saga_id)]
        assert log.count(LogEvent.SIGNAL_RECEIVED) == 1


async def test_wait_timeout_and_deadline_run_on_the_fake_clock() -> None:
    timed = shop(timeout=30)
    late = shop(timeout=None, deadline=100)
    async with SagaTestEnvironment([timed], participants(World())) as env:
        a = await env.start_saga(timed, {"order_id": "o1"})
        await env.drain(fail_fast=True)
        await env.advance(31)
        assert (await env.get(a.saga_id)).status is SagaStatus.COMPENSATED
    async with SagaTestEnvironment([late], participants(World())) as env:
        b = await env.start_saga(late, {"order_id": "o2"})
        await env.drain(fail_fast=True)
        await env.advance(50)
        assert (await env.get(b.saga_id)).status is SagaStatus.RUNNING
        await env.advance(51)
        state: SagaState = await env.get(b.saga_id)
        assert state.status is SagaStatus.COMPENSATED and state.overdue
        assert state.failure is not None and state.failure.cause == "deadline"


# --------------------------------------------------------------------------- the command line

approval_saga = shop(timeout=None, deadline=3600)
"""For ``sagaflow sagas signal -m tests.unit.test_waits_and_deadlines:approval_saga``."""
SPEC = f"{__name__}:approval_saga"


def test_sagas_signal_and_list_overdue(monkeypatch: pytest.MonkeyPatch) -> None:
    memory = InMemorySagaStore()
    monkeypatch.setattr(common, "saga_store", lambda settings: memory)

    async def waiting() -> str:
        client = SagaClient([approval_saga], store=memory)
        handle = await client.start_saga(approval_saga, {"order_id": "c1"})
        return handle.saga_id

    saga_id = asyncio.run(waiting())  # started, first command queued: not yet at the wait
    runner = CliRunner()

    def sagaflow(*args: str) -> Any:
        return runner.invoke(app, list(args))

    bad = sagaflow(
        "sagas", "signal", saga_id, "approve", "-d", '{"note": 1}', "-r", "x", "-m", SPEC
    )
    assert bad.exit_code == 1 and "does not fit Approval" in bad.stderr
    unknown = sagaflow("sagas", "signal", saga_id, "nope", "-r", "x", "-m", SPEC)
    assert unknown.exit_code == 1 and "waits for no signal 'nope'" in unknown.stderr
    ok_ = sagaflow(
        "sagas",
        "signal",
        saga_id,
        "approve",
        "-d",
        '{"approved_by": "ann"}',
        "-r",
        "fine",
        "-m",
        SPEC,
    )
    assert ok_.exit_code == 0, ok_.output
    assert "kept until the saga reaches its wait" in ok_.stdout
    twice = sagaflow(
        "sagas",
        "signal",
        saga_id,
        "approve",
        "-d",
        '{"approved_by": "bob"}',
        "-r",
        "again",
        "-m",
        SPEC,
    )
    assert twice.exit_code == 0, twice.output
    state = asyncio.run(memory.get(saga_id))
    assert state is not None and state.signals == {"approve": {"approved_by": "ann", "note": ""}}

    listed = sagaflow("sagas", "list", "--overdue", "--json")
    assert listed.exit_code == 0 and orjson.loads(listed.stdout) == []
    asyncio.run(_overdue(memory, saga_id))
    listed = sagaflow("sagas", "list", "--overdue", "--json")
    (row,) = orjson.loads(listed.stdout)
    assert row["saga_id"] == saga_id and row["overdue"] is True


async def _overdue(memory: InMemorySagaStore, saga_id: str) -> None:
    async with memory.transaction() as tx:
        (state,) = (await tx.lock([saga_id])).values()
        await tx.write(UnitOfWork(states=[state.model_copy(update={"overdue": True})]))


def test_graph_format_json_exports_the_whole_definition() -> None:
    import jsonschema

    result = CliRunner().invoke(app, ["graph", SPEC, "--format", "json"])
    assert result.exit_code == 0, result.output
    doc = orjson.loads(result.stdout)
    assert (doc["saga"], doc["version"], doc["fingerprint"]) == (
        "approval",
        1,
        approval_saga.fingerprint,
    )
    assert doc["deadline_seconds"] == 3600 and doc["point_of_no_return"] == 3
    kinds = [(s["name"], s["kind"]) for s in doc["steps"]]
    assert kinds == [
        ("reserve", "compensatable"),
        ("manager", "wait"),
        ("charge", "compensatable"),
        ("confirm", "pivot"),
        ("approve", "retriable"),
    ]
    reserve_, wait = doc["steps"][0], doc["steps"][1]
    assert reserve_["action"]["type"] == "inventory.reserve"
    assert reserve_["compensation"]["type"] == "inventory.release"
    command_schema = reserve_["action"]["command"]
    jsonschema.validate({"order_id": "o", "amount": 1}, command_schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"amount": 1}, command_schema)
    assert wait["signal"] == "approve" and wait["on_timeout"] is None
    assert wait["model"]["required"] == ["approved_by"]
    bad = CliRunner().invoke(app, ["graph", SPEC, "--format", "yaml"])
    assert bad.exit_code == 2 and "--format must be mermaid or json" in bad.stderr


async def test_the_trace_shows_the_wait_the_signal_and_the_deadline() -> None:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from sagaflow.tracing import TracingHooks

    exporter = InMemorySpanExporter()
    provider = TracerProvider(shutdown_on_exit=False)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    s = shop(timeout=None, deadline=100)
    async with SagaTestEnvironment([s], participants(World()), hooks=TracingHooks(provider)) as env:
        signalled = await env.start_saga(s, {"order_id": "t1"})
        late = await env.start_saga(s, {"order_id": "t2"})
        await env.drain(fail_fast=True)
        await env.coordinator.client.signal_saga(
            signalled.saga_id, "approve", {"approved_by": "ann"}, by="ann", reason="ok"
        )
        await env.drain(fail_fast=True)
        await env.advance(101)
        assert (await env.get(late.saga_id)).status is SagaStatus.COMPENSATED
    provider.shutdown()
    spans = exporter.get_finished_spans()
    names = [span.name for span in spans]
    assert names.count("saga wait approval/manager") == 2, names
    assert names.count("saga signal approval/manager") == 1, names
    assert names.count("saga deadline approval") == 1, names
    (signal_span,) = [sp for sp in spans if sp.name == "saga signal approval/manager"]
    assert signal_span.attributes is not None
    assert signal_span.attributes["saga.signal"] == "approve"
    assert signal_span.attributes["saga.by"] == "ann"
