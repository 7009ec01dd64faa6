"""The pure state machine: examples for each path, then properties over any history."""

from __future__ import annotations

from dataclasses import dataclass, field

from hypothesis import given, settings
from hypothesis import strategies as st

from sagaflow import SagaStatus
from sagaflow.core import engine
from sagaflow.core.messages import Envelope, MessageKind, Outcome
from sagaflow.core.state import LogEvent, SagaState
from tests.sample import saga

T0 = 1000.0


def reply(env: Envelope, outcome: Outcome, reason: str | None = None) -> engine.ReplyReceived:
    payload = {"ref": "R-" + env.step} if outcome is Outcome.SUCCESS else {}
    return engine.ReplyReceived(env.reply(outcome, payload, reason))


def started() -> engine.Decision:
    return engine.start(saga, "s1", {"order_id": "o1"}, T0, trace={"traceparent": "00-x"})


def run_ok(decision: engine.Decision, upto: int) -> engine.Decision:
    for _ in range(upto):
        decision = engine.decide(
            saga, decision.state, reply(decision.messages[0], Outcome.SUCCESS), T0
        )
    return decision


def test_start_sends_the_first_command_with_a_deterministic_id() -> None:
    d = started()
    assert d.state.status is SagaStatus.RUNNING and d.state.awaiting
    (msg,) = d.messages
    assert (msg.type, msg.kind, msg.attempt) == ("inventory.reserve", MessageKind.COMMAND, 1)
    assert msg.command_id == "s1:reserve:command" and msg.message_id == "s1:reserve:command:1"
    assert msg.payload == {"order_id": "o1", "amount": 10}
    assert msg.trace == {"traceparent": "00-x"}
    assert d.state.timer is not None and d.state.timer.due_at == T0 + 5
    assert [e.event for e in d.log] == [LogEvent.STARTED, LogEvent.COMMAND_SENT]


def test_happy_path_merges_replies_and_completes() -> None:
    d = run_ok(started(), 5)
    assert d.state.status is SagaStatus.COMPLETED
    assert d.state.data["reservation"] == "R-reserve"
    assert d.state.completed == (0, 1, 2)
    assert d.state.timer is None and d.messages == ()
    assert d.log[-1].event is LogEvent.COMPLETED


def test_business_failure_compensates_completed_steps_in_reverse() -> None:
    d = run_ok(started(), 2)  # reserve, charge done; schedule in flight
    d = engine.decide(saga, d.state, reply(d.messages[0], Outcome.FAILURE, "no_route"), T0)
    assert d.state.status is SagaStatus.COMPENSATING
    sent = []
    while d.messages:
        sent.append(d.messages[0].type)
        d = engine.decide(saga, d.state, reply(d.messages[0], Outcome.SUCCESS), T0)
    assert sent == ["payment.refund", "inventory.release"]
    assert d.state.status is SagaStatus.COMPENSATED
    assert d.state.failure is not None and d.state.failure.step == "schedule"
    assert d.state.failure.reason == "no_route"


def test_compensation_payload_defaults_to_the_step_command() -> None:
    d = run_ok(started(), 1)
    d = engine.decide(saga, d.state, reply(d.messages[0], Outcome.FAILURE, "broke"), T0)
    (msg,) = d.messages
    assert msg.kind is MessageKind.COMPENSATION and msg.payload == {"order_id": "o1", "amount": 10}
    assert msg.command_id == "s1:reserve:compensation"


def test_transient_error_retries_with_backoff_then_compensates() -> None:
    d = run_ok(started(), 1)
    now = T0
    for attempt in (1, 2):
        d = engine.decide(saga, d.state, reply(d.messages[0], Outcome.ERROR, "db down"), now)
        assert d.messages == () and d.state.timer is not None
        assert d.state.timer.purpose == "retry" and d.state.attempt == attempt + 1
        assert 0 < d.state.timer.due_at - now <= 0.1 * 2 ** (attempt - 1)
        early = engine.decide(saga, d.state, engine.TimerFired(), now)
        assert early.ignored == "timer not due yet"
        now = d.state.timer.due_at
        d = engine.decide(saga, d.state, engine.TimerFired(), now)
        assert d.messages[0].attempt == attempt + 1
        assert d.messages[0].command_id == "s1:charge:command"
    d = engine.decide(saga, d.state, reply(d.messages[0], Outcome.ERROR, "db down"), now)
    assert d.state.status is SagaStatus.COMPENSATING
    assert d.state.failure is not None and d.state.failure.cause == "retries_exhausted"
    # the abandoned step is compensated too (its effect is unknown), then reserve
    assert d.state.to_compensate == (1, 0)


def test_timeout_resends_then_abandons_and_compensates_the_unknown_step() -> None:
    d = run_ok(started(), 1)
    now = T0
    for _ in range(2):
        now += 5
        d = engine.decide(saga, d.state, engine.TimerFired(), now)
        assert d.log[0].event is LogEvent.TIMED_OUT
    assert d.messages[0].attempt == 3
    now += 5
    d = engine.decide(saga, d.state, engine.TimerFired(), now)
    assert d.state.failure is not None and d.state.failure.cause == "timeout"
    assert [m.type for m in d.messages] == ["payment.refund"]


def test_late_success_from_an_earlier_attempt_is_accepted() -> None:
    d = run_ok(started(), 1)
    first = d.messages[0]
    d = engine.decide(saga, d.state, engine.TimerFired(), T0 + 5)
    assert d.messages[0].attempt == 2
    d = engine.decide(saga, d.state, reply(first, Outcome.SUCCESS), T0 + 6)
    assert d.changed and d.messages[0].type == "shipping.schedule"


def test_stale_duplicate_and_forged_replies() -> None:
    d = run_ok(started(), 1)
    old = reply(started().messages[0], Outcome.SUCCESS)
    assert engine.decide(saga, d.state, old, T0).ignored == "stale reply: the saga has moved on"
    forged = engine.ReplyReceived(
        d.messages[0].model_copy(update={"attempt": 7}).reply(Outcome.SUCCESS, {})
    )
    assert "forged attempt" in (engine.decide(saga, d.state, forged, T0).rejected or "")
    wrong = engine.ReplyReceived(
        d.messages[0].model_copy(update={"step": "nope"}).reply(Outcome.SUCCESS, {})
    )
    assert "unknown step" in (engine.decide(saga, d.state, wrong, T0).rejected or "")
    bad = engine.ReplyReceived(d.messages[0].reply(Outcome.SUCCESS, {"ref": {"not": "a string"}}))
    assert "payload invalid" in (engine.decide(saga, d.state, bad, T0).rejected or "")


def test_failing_compensation_ends_failed_then_operator_retry_resumes() -> None:
    d = run_ok(started(), 1)
    d = engine.decide(saga, d.state, reply(d.messages[0], Outcome.FAILURE, "card declined"), T0)
    now = T0
    for _ in range(3):
        d = engine.decide(saga, d.state, reply(d.messages[0], Outcome.ERROR, "inventory down"), now)
        assert d.state.timer is not None
        now = d.state.timer.due_at
        d = engine.decide(saga, d.state, engine.TimerFired(), now)
    d = engine.decide(saga, d.state, reply(d.messages[0], Outcome.ERROR, "inventory down"), now)
    assert d.state.status is SagaStatus.FAILED
    assert d.state.failure is not None and d.state.failure.cause == "compensation"
    assert "inventory.release failed after 4 attempts" in d.state.failure.reason
    assert engine.decide(saga, d.state, engine.TimerFired(), now).ignored
    d = engine.decide(saga, d.state, engine.RetryRequested(by="ops", reason="fixed"), now)
    assert d.state.status is SagaStatus.COMPENSATING and d.messages[0].attempt == 5
    assert d.state.round_start == 5
    d = engine.decide(saga, d.state, reply(d.messages[0], Outcome.SUCCESS), now)
    assert d.state.status is SagaStatus.COMPENSATED
    assert d.state.failure is not None and d.state.failure.reason == "card declined"


def test_retry_is_only_for_failed_sagas_and_cancel_only_before_the_pivot() -> None:
    d = started()
    assert engine.decide(saga, d.state, engine.RetryRequested(by="a", reason="b"), T0).rejected
    d = run_ok(d, 3)  # at the pivot
    assert "past the pivot" in (
        engine.decide(saga, d.state, engine.CancelRequested("a", "b"), T0).rejected or ""
    )


def test_cancel_compensates_including_the_step_in_flight() -> None:
    d = run_ok(started(), 1)
    d = engine.decide(
        saga, d.state, engine.CancelRequested(by="alice", reason="customer asked"), T0
    )
    assert [m.type for m in d.messages] == ["payment.refund"]
    d = run_ok(d, 2)
    assert d.state.status is SagaStatus.CANCELLED
    assert d.state.failure is not None and "alice" in d.state.failure.reason


def test_retriable_step_retries_forever_and_pivot_timeouts_keep_trying() -> None:
    d = run_ok(started(), 4)  # at approve (retriable)
    now = T0
    for _ in range(10):
        d = engine.decide(saga, d.state, reply(d.messages[0], Outcome.ERROR, "x"), now)
        assert d.state.status is SagaStatus.RUNNING
        now = d.state.timer.due_at  # type: ignore[union-attr]
        d = engine.decide(saga, d.state, engine.TimerFired(), now)
    d = run_ok(started(), 3)  # at confirm (pivot)
    for i in range(10):
        d = engine.decide(saga, d.state, engine.TimerFired(), T0 + 5 * (i + 1))
        assert d.state.status is SagaStatus.RUNNING and d.messages[0].type == "order.confirm"


def test_business_failure_of_a_retriable_step_needs_an_operator() -> None:
    d = run_ok(started(), 4)
    d = engine.decide(saga, d.state, reply(d.messages[0], Outcome.FAILURE, "bug"), T0)
    assert d.state.status is SagaStatus.FAILED and d.messages == ()


def test_command_builder_raising_fails_the_step() -> None:
    from sagaflow import Saga, Step
    from tests.sample import Data, release, reserve

    def boom(d: Data) -> object:
        raise ValueError("bad data")

    s = Saga("boom", data=Data, steps=[Step("a", reserve, boom, release)])  # type: ignore[arg-type]
    d = engine.start(s, "b1", {"order_id": "o"}, T0)
    assert d.state.status is SagaStatus.COMPENSATED
    assert d.state.failure is not None and "bad data" in d.state.failure.reason


# --------------------------------------------------------------------------- properties


@dataclass
class Participants:
    """Simulated participants with an inbox: stored outcomes answer duplicates."""

    stored: dict[str, Outcome] = field(default_factory=dict)
    effects: list[int] = field(default_factory=list)  # forward steps applied, in order
    undone: list[int] = field(default_factory=list)  # compensations applied, in order
    tombstones: set[str] = field(default_factory=set)

    def answer(self, env: Envelope, choice: Outcome) -> Outcome | None:
        if env.kind is MessageKind.COMPENSATION:
            forward = env.command_id.replace(":compensation", ":command")
            if forward not in self.stored:
                self.tombstones.add(forward)
        if env.command_id in self.tombstones:
            return None
        if env.command_id in self.stored:
            return self.stored[env.command_id]
        if env.kind is MessageKind.COMPENSATION and choice is Outcome.FAILURE:
            choice = Outcome.ERROR  # a compensation cannot refuse: it errs and is retried
        if choice is Outcome.ERROR:
            return choice
        self.stored[env.command_id] = choice
        if choice is Outcome.SUCCESS:
            forward = env.command_id.replace(":compensation", ":command")
            if env.kind is MessageKind.COMMAND:
                self.effects.append(env.step_index)
            elif self.stored.get(forward) is Outcome.SUCCESS:
                self.undone.append(env.step_index)
        return choice


actions = st.lists(
    st.tuples(
        st.sampled_from(["reply", "reply", "reply", "timer", "duplicate", "cancel"]),
        st.sampled_from([Outcome.SUCCESS, Outcome.SUCCESS, Outcome.FAILURE, Outcome.ERROR]),
        st.integers(min_value=0, max_value=1000),
    ),
    max_size=60,
)


@settings(max_examples=400, deadline=None)
@given(actions)
def test_any_history_ends_terminal_with_exact_reverse_compensation(
    script: list[tuple[str, Outcome, int]],
) -> None:
    d = started()
    state: SagaState = d.state
    sent: list[Envelope] = list(d.messages)
    log = list(d.log)
    sim = Participants()
    now = T0

    def apply(event: engine.Event) -> None:
        nonlocal state, d
        d = engine.decide(saga, state, event, now)
        state = d.state
        sent.extend(d.messages)
        log.extend(d.log)

    def deliver(env: Envelope, choice: Outcome) -> None:
        outcome = sim.answer(env, choice)
        if outcome is not None:
            apply(reply(env, outcome, "x"))

    for action, choice, pick in script:
        if state.status.terminal:
            break
        if action == "reply" and sent:
            deliver(sent[-1], choice)
        elif action == "duplicate" and sent:
            deliver(sent[pick % len(sent)], choice)
        elif action == "timer" and state.timer is not None:
            now = state.timer.due_at
            apply(engine.TimerFired())
        elif action == "cancel":
            apply(engine.CancelRequested(by="t", reason="t"))
    # then a healthy world: every message answered, every timer fired
    for _ in range(500):
        if state.status.terminal:
            break
        if state.awaiting:
            deliver(sent[-1], Outcome.SUCCESS)
        else:
            assert state.timer is not None, (
                "a non-terminal saga always has a timer or a message in flight"
            )
            now = state.timer.due_at
            apply(engine.TimerFired())
    assert state.status.terminal

    compensatable = {i for i, s in enumerate(saga.steps) if s.compensation is not None}
    applied = [i for i in sim.effects if i in compensatable]
    if state.status is SagaStatus.COMPLETED:
        assert sim.effects == [0, 1, 2, 3, 4] and sim.undone == []
    elif state.status in (SagaStatus.COMPENSATED, SagaStatus.CANCELLED):
        # every applied compensatable step undone exactly once, in exact reverse order
        assert sim.undone == sorted(applied, reverse=True)
    else:
        assert state.status is SagaStatus.FAILED
        assert sim.undone == sorted(sim.undone, reverse=True)
    # compensations were sent in reverse step order, each step's first send once
    comp_order = [m.step_index for m in sent if m.kind is MessageKind.COMPENSATION]
    firsts = list(dict.fromkeys(comp_order))
    assert firsts == sorted(firsts, reverse=True)
    # every step outcome is logged once: one accepted success per completed step
    outcomes = [
        (e.step_index, e.kind)
        for e in log
        if e.event is LogEvent.REPLY_RECEIVED and e.detail["outcome"] == "success"
    ]
    assert len(outcomes) == len(set(outcomes))


def test_compensation_carries_a_link_to_the_step_it_undoes() -> None:
    d = started()
    traced = (
        d.messages[0]
        .reply(Outcome.SUCCESS, {"ref": "r"})
        .model_copy(update={"trace": {"traceparent": "00-step0"}})
    )
    d = engine.decide(saga, d.state, engine.ReplyReceived(traced), T0)
    assert d.state.step_traces == {"0": "00-step0"}
    assert d.messages[0].trace == {"traceparent": "00-x"}  # commands carry the saga's context
    d = engine.decide(saga, d.state, reply(d.messages[0], Outcome.FAILURE, "declined"), T0)
    (comp,) = d.messages
    assert comp.trace == {"traceparent": "00-x", "sagaflow-link": "00-step0"}


def test_pivot_whose_outcome_is_unknown_needs_an_operator_not_compensation() -> None:
    d = run_ok(started(), 3)  # at confirm (pivot)
    d = engine.decide(
        saga, d.state, engine.TimerFired(), T0 + 5
    )  # attempt 1 timed out: may still apply
    now = T0 + 5
    for _ in range(1):
        d = engine.decide(saga, d.state, reply(d.messages[0], Outcome.ERROR, "x"), now)
        now = d.state.timer.due_at  # type: ignore[union-attr]
        d = engine.decide(saga, d.state, engine.TimerFired(), now)
    d = engine.decide(saga, d.state, reply(d.messages[0], Outcome.ERROR, "x"), now)
    assert d.state.status is SagaStatus.FAILED and d.messages == ()
    assert d.state.failure is not None and "outcome is unknown" in d.state.failure.reason
    # the operator's retry asks the pivot again under the same id: its stored answer decides
    d = engine.decide(saga, d.state, engine.RetryRequested(by="ops", reason="look again"), now)
    assert d.messages[0].command_id == "s1:confirm:command"


def test_pivot_errors_without_timeouts_compensate_the_steps_before_it() -> None:
    d = run_ok(started(), 3)
    now = T0
    for _ in range(2):
        d = engine.decide(saga, d.state, reply(d.messages[0], Outcome.ERROR, "x"), now)
        now = d.state.timer.due_at  # type: ignore[union-attr]
        d = engine.decide(saga, d.state, engine.TimerFired(), now)
    d = engine.decide(saga, d.state, reply(d.messages[0], Outcome.ERROR, "x"), now)
    assert d.state.status is SagaStatus.COMPENSATING
    assert [m.type for m in d.messages] == ["shipping.cancel"]


def test_operator_retry_after_a_refusal_uses_new_command_ids() -> None:
    d = run_ok(started(), 4)
    d = engine.decide(saga, d.state, reply(d.messages[0], Outcome.FAILURE, "bug"), T0)
    assert d.state.status is SagaStatus.FAILED
    d = engine.decide(saga, d.state, engine.RetryRequested(by="ops", reason="fixed"), T0)
    assert d.messages[0].command_id == "s1:approve:command:g1"
    d = engine.decide(saga, d.state, reply(d.messages[0], Outcome.SUCCESS), T0)
    assert d.state.status is SagaStatus.COMPLETED


def test_on_reply_raising_past_the_pivot_fails_instead_of_compensating() -> None:
    from sagaflow import Saga, Step
    from tests.sample import Data, _cmd, confirm, release, reserve

    def boom(d: Data, r: object) -> Data:
        raise ValueError("merge bug")

    s = Saga(
        "p",
        data=Data,
        steps=[Step("a", reserve, _cmd, release), Step("b", confirm, _cmd, on_reply=boom)],
    )
    d = run_ok_on(s, engine.start(s, "p1", {"order_id": "o"}, T0), 2)
    assert d.state.status is SagaStatus.FAILED
    assert d.state.failure is not None and "merge bug" in d.state.failure.reason


def run_ok_on(s: object, decision: engine.Decision, upto: int) -> engine.Decision:
    for _ in range(upto):
        decision = engine.decide(
            s, decision.state, reply(decision.messages[0], Outcome.SUCCESS), T0
        )  # type: ignore[arg-type]
    return decision


def test_decode_keeps_only_trace_headers() -> None:
    from sagaflow.core.messages import decode, encode

    env = started().messages[0]
    got = decode(
        encode(env), {"traceparent": "00-a", "x-saga-step": "reserve", "x-delivery-count": "2"}
    )
    assert got.trace == {"traceparent": "00-a"}
