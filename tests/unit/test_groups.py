"""Parallel groups in the pure engine, and their definition errors."""

from __future__ import annotations

import pytest
from pydantic import BaseModel

from sagaflow import DefinitionError, Saga, SagaStatus, Step, Wait
from sagaflow.core import engine
from sagaflow.core.definition import Group, to_mermaid
from sagaflow.core.export import definition_document
from sagaflow.core.messages import Envelope, MessageKind, Outcome
from sagaflow.core.state import LogEvent
from tests.sample import (
    COMP,
    FAST,
    Cmd,
    Data,
    approve,
    cancel,
    charge,
    confirm,
    refund,
    release,
    reserve,
    schedule,
)

T0 = 1000.0


class Both(Data):
    paid: str | None = None
    shipped: str | None = None


class Ref(BaseModel):
    ref: str = "ok"


def _cmd(d: Both) -> Cmd:
    return Cmd(order_id=d.order_id, amount=d.amount)


def _paid(d: Both, r: Ref) -> Both:
    return d.model_copy(update={"paid": r.ref})


def _shipped(d: Both, r: Ref) -> Both:
    return d.model_copy(update={"shipped": r.ref})


def grouped() -> Saga[Both]:
    return Saga(
        "grouped",
        data=Both,
        steps=[
            Step("reserve", reserve, _cmd, release, retry=FAST, compensation_retry=COMP, timeout=5),
            Group(
                "pay-and-ship",
                [
                    Step("charge", charge, _cmd, refund, on_reply=_paid, retry=FAST,
                         compensation_retry=COMP, timeout=5),
                    Step("schedule", schedule, _cmd, cancel, on_reply=_shipped, retry=FAST,
                         compensation_retry=COMP, timeout=8),
                ],
            ),
            Step("confirm", confirm, _cmd, retry=FAST, timeout=5),
            Step("approve", approve, _cmd, retriable=True, timeout=5),
        ],
    )  # fmt: skip


def reply(
    env: Envelope, outcome: Outcome = Outcome.SUCCESS, ref: str = "R"
) -> engine.ReplyReceived:
    payload = {"ref": ref} if outcome is Outcome.SUCCESS else {}
    return engine.ReplyReceived(
        env.reply(outcome, payload, None if outcome is Outcome.SUCCESS else "no")
    )


def at_group(s: Saga[Both]) -> engine.Decision:
    d = engine.start(s, "g1", {"order_id": "o"}, T0)
    return engine.decide(s, d.state, reply(d.messages[0]), T0)


def test_a_groups_commands_go_out_together_and_replies_in_any_order_keep_both_merges() -> None:
    s = grouped()
    d = at_group(s)
    assert [(m.type, m.kind) for m in d.messages] == [
        ("payment.charge", MessageKind.COMMAND),
        ("shipping.schedule", MessageKind.COMMAND),
    ]
    charge_msg, schedule_msg = d.messages
    assert set(d.state.branches) == {"1", "2"} and d.state.wake_at == T0 + 5
    d = engine.decide(s, d.state, reply(schedule_msg, ref="S"), T0)  # the second answers first
    assert d.messages == () and d.state.data["shipped"] == "S" and set(d.state.branches) == {"1"}
    d = engine.decide(s, d.state, reply(schedule_msg, ref="S2"), T0)
    assert d.ignored  # a duplicate of a settled branch
    d = engine.decide(s, d.state, reply(charge_msg, ref="P"), T0)
    assert d.state.data["paid"] == "P" and d.state.data["shipped"] == "S"  # neither lost
    (msg,) = d.messages
    assert msg.type == "order.confirm" and d.state.branches == {}


def test_a_refused_branch_abandons_the_other_and_undoes_in_parallel_then_in_reverse() -> None:
    s = grouped()
    d = at_group(s)
    charge_msg, _ = d.messages
    d = engine.decide(s, d.state, reply(charge_msg, Outcome.FAILURE), T0)
    # schedule was in flight: abandoned, compensated (tombstone); charge refused: not undone
    assert [(m.type, m.kind) for m in d.messages] == [("shipping.cancel", MessageKind.COMPENSATION)]
    started = next(e for e in d.log if e.event is LogEvent.COMPENSATION_STARTED)
    assert started.detail["undo"] == ["schedule", "reserve"]
    d = engine.decide(s, d.state, reply(d.messages[0]), T0)
    (msg,) = d.messages
    assert msg.type == "inventory.release"
    d = engine.decide(s, d.state, reply(msg), T0)
    assert d.state.status is SagaStatus.COMPENSATED


def test_a_later_failure_undoes_the_group_in_parallel() -> None:
    s = grouped()
    d = at_group(s)
    a, b = d.messages
    d = engine.decide(s, d.state, reply(a), T0)
    d = engine.decide(s, d.state, reply(b), T0)
    d = engine.decide(s, d.state, reply(d.messages[0], Outcome.FAILURE), T0)  # confirm refuses
    assert sorted(m.type for m in d.messages) == ["payment.refund", "shipping.cancel"]
    started = next(e for e in d.log if e.event is LogEvent.COMPENSATION_STARTED)
    assert sorted(started.detail["parallel"]) == ["charge", "schedule"]  # as the log says
    assert started.detail["undo"][2:] == ["reserve"]
    first, second = d.messages
    d = engine.decide(s, d.state, reply(second), T0)
    assert d.messages == ()  # release waits for the whole group's undo
    d = engine.decide(s, d.state, reply(first), T0)
    (msg,) = d.messages
    assert msg.type == "inventory.release"


def test_a_branch_that_times_out_is_retried_then_fails_the_group() -> None:
    s = grouped()
    d = at_group(s)
    charge_msg, _ = d.messages
    d = engine.decide(s, d.state, reply(charge_msg), T0)
    now = T0
    for attempt in (2, 3):
        now = d.state.wake_at  # type: ignore[assignment]
        d = engine.decide(s, d.state, engine.TimerFired(), now)
        (msg,) = d.messages
        assert (msg.type, msg.attempt) == ("shipping.schedule", attempt)
    d = engine.decide(s, d.state, engine.TimerFired(), d.state.wake_at)  # type: ignore[arg-type]
    assert d.state.status is SagaStatus.COMPENSATING
    assert d.state.failure is not None and d.state.failure.cause == "timeout"
    assert sorted(m.type for m in d.messages) == ["payment.refund", "shipping.cancel"]


def test_cancel_during_a_group_abandons_both_branches() -> None:
    s = grouped()
    d = at_group(s)
    d = engine.decide(s, d.state, engine.CancelRequested("ops", "asked"), T0)
    assert sorted(m.type for m in d.messages) == ["payment.refund", "shipping.cancel"]


def test_a_compensation_that_keeps_failing_needs_an_operator_who_resumes_the_group() -> None:
    s = grouped()
    d = at_group(s)
    a, b = d.messages
    d = engine.decide(s, d.state, reply(a), T0)
    d = engine.decide(s, d.state, reply(b), T0)
    d = engine.decide(s, d.state, reply(d.messages[0], Outcome.FAILURE), T0)
    refund_msg = next(m for m in d.messages if m.type == "payment.refund")
    cancel_msg = next(m for m in d.messages if m.type == "shipping.cancel")
    d = engine.decide(s, d.state, reply(cancel_msg), T0)
    for _ in range(COMP.max_attempts):
        d = engine.decide(s, d.state, engine.TimerFired(), d.state.wake_at)  # type: ignore[arg-type]
    assert d.state.status is SagaStatus.FAILED and set(d.state.branches) == {"1"}
    d = engine.decide(s, d.state, engine.RetryRequested("ops", "fixed"), T0 + 100)
    (msg,) = d.messages
    assert msg.type == "payment.refund" and msg.attempt > refund_msg.attempt
    d = engine.decide(s, d.state, reply(msg), T0 + 100)
    (msg,) = d.messages
    assert msg.type == "inventory.release"


@pytest.mark.parametrize(
    ("group", "message"),
    [
        (Group("g", [Step("a", reserve, _cmd, release)]), "a group needs at least two steps"),
        (
            Group("g", [Step("a", reserve, _cmd, release), Step("p", confirm, _cmd)]),
            "step 'p' is the pivot; a group cannot contain it",
        ),
        (
            Group(
                "g", [Step("a", reserve, _cmd, release), Step("r", approve, _cmd, retriable=True)]
            ),
            "step 'r' is retriable; a group runs before the pivot",
        ),
        (
            Group("g", [Step("a", reserve, _cmd, release), Wait("w", model=Ref)]),  # type: ignore[list-item]
            "holds a wait; a group holds steps only",
        ),
    ],
)
def test_group_definition_errors(group: Group[Both], message: str) -> None:
    with pytest.raises(DefinitionError, match=message.replace("(", r"\(")):
        Saga("s", data=Both, steps=[group])


def test_graph_json_and_fingerprint_know_the_group() -> None:
    s = grouped()
    text = to_mermaid(s)
    assert 'subgraph g1["pay-and-ship (in parallel)"]' in text
    edges = set(text.splitlines())
    # side by side: from the step before to each, from each to the step after
    assert {f"    s0 --> s{i}" for i in (1, 2)} | {f"    s{i} --> s3" for i in (1, 2)} <= edges
    assert "    s1 --> s2" not in edges
    # a branch that fails undoes its sibling (it ran alongside), then reserve; a
    # later step undoes both branches together, then reserve
    assert {"    s1 -. fails .-> c2", "    s2 -. fails .-> c1"} <= edges
    assert {"    s3 -. fails .-> c1", "    s3 -. fails .-> c2"} <= edges
    assert {"    c1 -.-> c0", "    c2 -.-> c0"} <= edges
    assert "    c2 -.-> c1" not in edges
    doc = definition_document(s)
    assert doc["groups"] == [{"name": "pay-and-ship", "steps": ["charge", "schedule"]}]
    flat = Saga("grouped", data=Both, steps=list(s.steps))
    assert flat.fingerprint != s.fingerprint  # grouping steps is a change of shape
