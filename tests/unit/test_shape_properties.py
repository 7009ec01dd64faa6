"""Property: conditions, waits, signals and deadlines under any history.

For any order of replies (duplicates, errors, refusals), timeouts, cancels,
signals (early, late, twice, unknown, invalid) and a deadline at any moment,
then a healthy world: the saga ends terminal; compensations undo exactly the
steps that took effect, in reverse order; a skipped step or one never started
is never sent nor compensated; a signal is applied once; the pivot is never
undone; a deadline that passed before the pivot never lets the saga complete.

``test_the_property_fails_when_a_rule_is_broken`` runs the same property
against an engine that compensates skipped steps, and shows that it fails.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from sagaflow import Saga, SagaStatus, Step, Wait
from sagaflow.core import engine, signals, transitions
from sagaflow.core.definition import Group
from sagaflow.core.messages import Envelope, MessageKind, Outcome
from sagaflow.core.state import LogEvent, SagaState
from tests.sample import COMP, FAST, Cmd, Ok, approve, cancel, charge, confirm, refund, release
from tests.sample import reserve as reserve_action
from tests.sample import schedule as schedule_action
from tests.unit.test_engine import Participants

T0 = 1000.0


class Flags(BaseModel):
    order_id: str
    amount: int = 10
    reserve: bool = True
    charge: bool = True
    approval: bool = True
    approved_by: str | None = None
    acked: str | None = None


class Approval(BaseModel):
    approved_by: str


class Ack(BaseModel):
    acked: str


def _cmd(d: Flags) -> Cmd:
    return Cmd(order_id=d.order_id, amount=d.amount)


def _flag(name: str) -> Any:
    return lambda d: getattr(d, name)


def shaped(deadline: float | None) -> Saga[Flags]:
    return Saga(
        "shaped",
        data=Flags,
        deadline=deadline,
        steps=[
            Step(
                "reserve",
                reserve_action,
                _cmd,
                release,
                retry=FAST,
                compensation_retry=COMP,
                timeout=5,
                when=_flag("reserve"),
            ),
            Wait("approval", model=Approval, timeout=30, when=_flag("approval")),
            Group(
                "pay-and-ship",
                [
                    Step(
                        "charge",
                        charge,
                        _cmd,
                        refund,
                        retry=FAST,
                        compensation_retry=COMP,
                        timeout=5,
                        when=_flag("charge"),
                    ),
                    Step(
                        "schedule",
                        schedule_action,
                        _cmd,
                        cancel,
                        retry=FAST,
                        compensation_retry=COMP,
                        timeout=7,
                    ),
                ],
            ),
            Step("confirm", confirm, _cmd, retry=FAST, timeout=5),
            Wait("ack", model=Ack, timeout=20, on_timeout=Ack(acked="auto")),
            Step("approve", approve, _cmd, retriable=True, retry=FAST, timeout=5),
        ],
    )


PIVOT = 4
SIGNALS = {
    "approval": [{"approved_by": "ann"}, {"approved_by": "bob"}, {"approved_by": 7}],
    "ack": [{"acked": "yes"}, {"acked": "again"}, {}],
    "unknown": [{}],
}

histories = st.tuples(
    st.fixed_dictionaries(
        {"reserve": st.booleans(), "charge": st.booleans(), "approval": st.booleans()}
    ),
    st.one_of(st.none(), st.floats(min_value=1, max_value=200)),
    st.lists(
        st.tuples(
            st.sampled_from(
                [
                    "reply",
                    "reply",
                    "reply",
                    "timer",
                    "duplicate",
                    "cancel",
                    "signal",
                    "signal",
                    "deadline",
                ]
            ),
            st.sampled_from([Outcome.SUCCESS, Outcome.SUCCESS, Outcome.FAILURE, Outcome.ERROR]),
            st.integers(min_value=0, max_value=1000),
        ),
        max_size=60,
    ),
)


def ok_reply(env: Envelope, outcome: Outcome) -> engine.ReplyReceived:
    payload = Ok(ref="R").model_dump() if outcome is Outcome.SUCCESS else {}
    return engine.ReplyReceived(env.reply(outcome, payload, "x"))


def check(history: tuple[dict[str, bool], float | None, list[tuple[str, Outcome, int]]]) -> None:
    flags, deadline, script = history
    saga = shaped(deadline)
    d = engine.start(saga, "p1", {"order_id": "o", **flags}, T0)
    state: SagaState = d.state
    sent: list[Envelope] = list(d.messages)
    log = list(d.log)
    sim = Participants()
    now = T0
    accepted: dict[str, list[dict[str, Any]]] = {}

    def apply(event: engine.Event) -> engine.Decision:
        nonlocal state
        decision = engine.decide(saga, state, event, now)
        if decision.rejected or decision.ignored:
            assert decision.state == state and not decision.messages and not decision.log
        state = decision.state
        sent.extend(decision.messages)
        log.extend(decision.log)
        return decision

    def deliver(env: Envelope, choice: Outcome) -> None:
        outcome = sim.answer(env, choice)
        if outcome is not None:
            apply(ok_reply(env, outcome))

    def signal(name: str, data: dict[str, Any]) -> None:
        decision = apply(engine.SignalReceived(name, data, "t", "t"))
        if decision.changed:
            accepted.setdefault(name, []).append(data)

    def in_flight() -> list[Envelope]:
        """The messages the saga waits on: its branches', or its one message."""
        if state.branches:
            return [
                next(
                    m
                    for m in reversed(sent)
                    if (m.step_index, m.kind, m.attempt) == (int(k), b.kind, b.attempt)
                )
                for k, b in sorted(state.branches.items())
                if b.awaiting
            ]
        if state.awaiting and state.waiting_for is None and sent:
            return [sent[-1]]
        return []

    def wake() -> None:
        nonlocal now
        assert state.wake_at is not None, "a saga that waits on nothing must be terminal"
        now = max(now, state.wake_at)
        apply(engine.TimerFired())

    for action, choice, pick in script:
        if state.status.terminal:
            break
        if action == "reply" and in_flight():
            waiting = in_flight()
            deliver(waiting[pick % len(waiting)], choice)
        elif action == "duplicate" and sent:
            deliver(sent[pick % len(sent)], choice)
        elif action == "timer" and state.wake_at is not None:
            wake()
        elif action == "cancel":
            apply(engine.CancelRequested(by="t", reason="t"))
        elif action == "signal":
            name = list(SIGNALS)[pick % 3]
            options = SIGNALS[name]
            signal(name, options[(pick // 3) % len(options)])
        elif action == "deadline" and state.deadline_at is not None:
            now = max(now, state.deadline_at)
            apply(engine.TimerFired())
    for _ in range(500):  # then a healthy world
        if state.status.terminal:
            break
        if state.waiting_for is not None:
            signal(state.waiting_for, SIGNALS[state.waiting_for][0])
        elif in_flight():
            deliver(in_flight()[0], Outcome.SUCCESS)
        else:
            wake()
    assert state.status.terminal

    skipped = set(state.skipped)
    assert not [m for m in sent if m.step_index in skipped], "a skipped step was sent"
    action_steps = [i for i, s in enumerate(saga.steps) if isinstance(s, Step)]
    compensatable = {i for i in action_steps if saga.steps[i].compensation is not None}
    applied = [i for i in sim.effects if i in compensatable]

    def unit(index: int) -> int:  # a group's steps are one unit: the group's first
        return saga.groups.get(index, (index,))[0]

    def in_reverse(order: list[int]) -> bool:
        units = [unit(i) for i in order]
        return units == sorted(units, reverse=True)

    if state.status is SagaStatus.COMPLETED:
        assert sorted(sim.effects) == [i for i in action_steps if i not in skipped]
        assert [unit(i) for i in sim.effects] == sorted(unit(i) for i in sim.effects)
        assert sim.undone == []
    elif state.status in (SagaStatus.COMPENSATED, SagaStatus.CANCELLED):
        assert sorted(sim.undone) == sorted(applied), "not every step that took effect was undone"
        assert len(sim.undone) == len(set(sim.undone)), "a step was undone twice"
        assert in_reverse(sim.undone), f"undone out of order: {sim.undone}"
    else:
        assert in_reverse(sim.undone), f"undone out of order: {sim.undone}"
    comp_order = [m.step_index for m in sent if m.kind is MessageKind.COMPENSATION]
    firsts = list(dict.fromkeys(comp_order))
    assert in_reverse(firsts), f"compensations sent out of order: {firsts}"
    assert not skipped & set(comp_order), "a skipped step was compensated"
    if PIVOT in sim.effects:
        assert sim.undone == [], "the pivot was undone"
    # each signal is applied once, with the data of the first accepted
    for name, datas in accepted.items():
        assert len(datas) == 1, f"signal {name!r} accepted {len(datas)} times"
        taken = [
            e
            for e in log
            if e.event is LogEvent.SIGNAL_RECEIVED
            and e.detail["signal"] == name
            and not e.detail.get("early")
        ]
        assert len(taken) == 1
    if "approval" in accepted and state.signalled.get("approval") == "signal":
        assert state.data["approved_by"] == accepted["approval"][0]["approved_by"]
    # a deadline that passed before the pivot never lets the saga complete
    passed = [e for e in log if e.event is LogEvent.DEADLINE_PASSED]
    if passed and passed[0].detail["compensates"]:
        assert state.status is not SagaStatus.COMPLETED and PIVOT not in sim.effects


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(histories)
def test_any_history_with_conditions_waits_signals_and_deadlines(
    history: tuple[dict[str, bool], float | None, list[tuple[str, Outcome, int]]],
) -> None:
    check(history)


def test_the_property_fails_when_a_rule_is_broken(monkeypatch: pytest.MonkeyPatch) -> None:
    """An engine that also compensates skipped steps: the property must catch it."""
    original = transitions.begin_compensation

    def broken(*args: Any, **kwargs: Any) -> Any:
        saga, state, *rest = args
        undoable = {i for i in state.skipped if saga.steps[i].compensation is not None}
        everything = tuple(sorted({*state.completed, *undoable}))
        return original(saga, state.model_copy(update={"completed": everything}), *rest, **kwargs)

    for module in (engine, signals, transitions):
        monkeypatch.setattr(module, "begin_compensation", broken)

    @settings(max_examples=400, deadline=None, database=None, report_multiple_bugs=False)
    @given(histories)
    def run(history: tuple[dict[str, bool], float | None, list[tuple[str, Outcome, int]]]) -> None:
        check(history)

    with pytest.raises(AssertionError, match="skipped step"):
        run()
