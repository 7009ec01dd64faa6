"""The saga state machine, as pure functions.

``start`` and ``decide`` take a definition, a state and an event and return a
``Decision``: the next state, the messages to send and the log entries to
append. They do no I/O and read no clock (``now`` is an argument), so the
coordinator only loads, decides, saves and publishes, and every path is tested
without a broker or a database.

Rules worth knowing (docs/concepts.md explains them):

* One message in flight per saga: the next command is sent only after the
  reply to the previous one, so per-saga order needs no broker ordering.
* A step is *abandoned* when it times out for good, exhausts transient
  retries, or the saga is cancelled while it is in flight. Its effect is then
  unknown, so its compensation is sent too; participants record a tombstone
  for the command, so a late delivery of it never takes effect, and the
  compensation handler runs only when the command did take effect.
* A business failure is definitive (participants record it), so the failing
  step itself is not compensated.
* A step whose ``when=`` condition is false when the saga reaches it is
  skipped: logged (``step_skipped``), never sent, never compensated.
* A pivot that times out is retried until it answers: its outcome decides
  whether the saga can still be undone. Retriable steps are retried forever.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError

from sagaflow.core.definition import Saga, Step, StepKind, Wait
from sagaflow.core.messages import Envelope, MessageKind, Outcome, command_id
from sagaflow.core.schema import DEFAULT_STRICT, validate_payload
from sagaflow.core.state import Failure, LogEntry, LogEvent, SagaState, SagaStatus, Timer


@dataclass(frozen=True)
class ReplyReceived:
    envelope: Envelope
    strict: bool = DEFAULT_STRICT  # how a success payload is validated (core/schema.py)


@dataclass(frozen=True)
class TimerFired:
    """The saga's timer is due (the engine checks ``state.timer`` against ``now``)."""


@dataclass(frozen=True)
class CancelRequested:
    by: str
    reason: str


@dataclass(frozen=True)
class RetryRequested:
    by: str
    reason: str


@dataclass(frozen=True)
class SignalReceived:
    """A named signal sent from outside (``SagaClient.signal_saga``)."""

    name: str
    data: BaseModel | dict[str, Any]
    by: str
    reason: str


Event = ReplyReceived | TimerFired | CancelRequested | RetryRequested | SignalReceived


@dataclass(frozen=True)
class Decision:
    """What to do after an event.

    ``ignored`` (a duplicate or stale event: settle it, change nothing) and
    ``rejected`` (an invalid event: dead-letter it, change nothing) leave
    ``state`` as it was.
    """

    state: SagaState
    messages: tuple[Envelope, ...] = ()
    log: tuple[LogEntry, ...] = ()
    ignored: str | None = None
    rejected: str | None = None

    @property
    def changed(self) -> bool:
        return self.ignored is None and self.rejected is None


MAX_SAGA_ID = 200
"""The longest saga id, in characters (ids travel in every message and key)."""


def check_saga_id(saga_id: str) -> str:
    """A caller's saga id, checked where it enters (a message built from it must be
    one its receiver accepts).

    Raises:
        ValueError: it is empty, longer than :data:`MAX_SAGA_ID` characters, or
            has a control character.
    """
    if not isinstance(saga_id, str) or not 0 < len(saga_id) <= MAX_SAGA_ID:
        raise ValueError(f"a saga id must be 1 to {MAX_SAGA_ID} characters: {saga_id!r:.80}")
    if not saga_id.isprintable():
        raise ValueError(f"a saga id must not contain control characters: {saga_id!r:.80}")
    return saga_id


def start(
    saga: Saga[Any],
    saga_id: str,
    data: BaseModel | dict[str, Any],
    now: float,
    trace: dict[str, str] | None = None,
    deadline_at: float | None = None,
) -> Decision:
    """Create a saga instance and send its first command.

    ``deadline_at`` (seconds since the epoch) overrides the definition's
    ``deadline`` for this saga.

    Raises:
        pydantic.ValidationError: ``data`` does not fit the saga's data model.
        ValueError: ``saga_id`` is not a valid saga id (:func:`check_saga_id`),
            or ``deadline_at`` is not after ``now``.
    """
    check_saga_id(saga_id)
    if deadline_at is not None and not deadline_at > now:
        raise ValueError(f"the deadline {deadline_at:.3f} is in the past (now {now:.3f})")
    if deadline_at is None and saga.deadline is not None:
        deadline_at = now + saga.deadline
    model = data if isinstance(data, saga.data_model) else saga.data_model.model_validate(data)
    state = SagaState(
        saga_id=saga_id,
        saga_name=saga.name,
        saga_version=saga.version,
        status=SagaStatus.RUNNING,
        data=model.model_dump(mode="json"),
        created_at=now,
        updated_at=now,
        trace=dict(trace or {}),
        fingerprint=saga.fingerprint,
        deadline_at=deadline_at,
    )
    entry = _entry(saga, state, now, LogEvent.STARTED, detail={"data": state.data})
    return _enter(saga, state, 0, now, [entry])


def decide(saga: Saga[Any], state: SagaState, event: Event, now: float) -> Decision:
    """Apply one event to a saga instance."""
    if isinstance(event, ReplyReceived):
        return _on_reply(saga, state, event.envelope, now, event.strict)
    if isinstance(event, TimerFired):
        return _on_timer(saga, state, now)
    if isinstance(event, CancelRequested):
        return _on_cancel(saga, state, event, now)
    if isinstance(event, SignalReceived):
        return _on_signal(saga, state, event, now)
    return _on_retry_requested(saga, state, event, now)


# --------------------------------------------------------------------------- events


def _on_reply(
    saga: Saga[Any], state: SagaState, env: Envelope, now: float, strict: bool
) -> Decision:
    if env.saga_name != state.saga_name:
        return Decision(
            state, rejected=f"reply names saga {env.saga_name!r}, not {state.saga_name!r}"
        )
    if not 0 <= env.step_index < len(saga.steps) or saga.steps[env.step_index].name != env.step:
        return Decision(state, rejected=f"unknown step {env.step!r} at index {env.step_index}")
    if isinstance(saga.steps[env.step_index], Wait):
        return Decision(
            state, rejected=f"step {env.step!r} is a wait: it takes signals, not replies"
        )
    if state.status.terminal:
        return Decision(state, ignored=f"saga is {state.status.value}")
    expected = (
        MessageKind.COMMAND if state.status is SagaStatus.RUNNING else MessageKind.COMPENSATION
    )
    if env.for_kind is not expected or env.step_index != state.step_index:
        return Decision(state, ignored="stale reply: the saga has moved on")
    if env.attempt > state.attempt:
        return Decision(state, rejected=f"forged attempt {env.attempt} > {state.attempt}")
    if env.outcome is Outcome.ERROR and (env.attempt != state.attempt or not state.awaiting):
        return Decision(state, ignored="stale error reply from an earlier attempt")

    step = _step(saga, state.step_index)
    log = [
        _entry(
            saga,
            state,
            now,
            LogEvent.REPLY_RECEIVED,
            attempt=env.attempt,
            detail={"outcome": env.outcome.value if env.outcome else None, "reason": env.reason},
        )
    ]
    if expected is MessageKind.COMPENSATION:
        if env.outcome is Outcome.SUCCESS:
            rest = _with(state, to_compensate=state.to_compensate[1:], updated_at=now)
            return _next_compensation(saga, rest, now, log)
        return _retry_or_fail_compensation(saga, state, now, log, env.reason or "failed")

    if env.outcome is Outcome.SUCCESS:
        try:
            reply = validate_payload(step.action.reply, env.payload, strict=strict)
        except ValidationError as exc:
            return Decision(state, rejected=f"reply payload invalid for {step.action.type}: {exc}")
        return _step_succeeded(saga, state, step, reply, env.trace, now, log)
    if env.outcome is Outcome.FAILURE:
        failure = Failure(step=step.name, reason=env.reason or "failed", cause="failure")
        if step.kind is StepKind.RETRIABLE:
            return _fail(saga, state, failure, now, log)
        return _begin_compensation(saga, state, failure, now, log, abandon_current=False)
    return _retry_or_abandon(saga, state, step, now, log, env.reason or "error", timed_out=False)


def _on_timer(saga: Saga[Any], state: SagaState, now: float) -> Decision:
    if (
        not state.status.terminal
        and state.deadline_at is not None
        and not state.overdue
        and state.deadline_at <= now
    ):
        return _deadline_passed(saga, state, now)
    timer = state.timer
    if state.status.terminal or timer is None:
        return Decision(state, ignored="no timer pending")
    if timer.due_at > now:
        return Decision(state, ignored="timer not due yet")
    if timer.purpose == "wait":
        return _wait_timed_out(saga, state, now)
    step = _step(saga, state.step_index)
    if timer.purpose == "retry":
        return _dispatch(saga, state, state.step_index, state.kind, state.attempt, now, [])
    log = [_entry(saga, state, now, LogEvent.TIMED_OUT, detail={"timeout": step.timeout})]
    reason = f"no reply within {step.timeout:g}s"
    if state.kind is MessageKind.COMPENSATION:
        return _retry_or_fail_compensation(saga, state, now, log, reason, immediate=True)
    return _retry_or_abandon(saga, state, step, now, log, reason, timed_out=True)


def _on_cancel(saga: Saga[Any], state: SagaState, event: CancelRequested, now: float) -> Decision:
    if state.status is not SagaStatus.RUNNING:
        return Decision(state, rejected=f"cannot cancel a saga that is {state.status.value}")
    step = saga.steps[state.step_index]
    if state.step_index >= saga.point_of_no_return:
        return Decision(state, rejected=f"cannot cancel: step {step.name!r} is past the pivot")
    log = [
        _entry(
            saga,
            state,
            now,
            LogEvent.CANCEL_REQUESTED,
            detail={"by": event.by, "reason": event.reason},
        )
    ]
    failure = Failure(
        step=step.name, reason=f"cancelled by {event.by}: {event.reason}", cause="cancelled"
    )
    cancelled = _with(state, cancelled=True)
    return _begin_compensation(saga, cancelled, failure, now, log, abandon_current=True)


def _on_retry_requested(
    saga: Saga[Any], state: SagaState, event: RetryRequested, now: float
) -> Decision:
    if state.status is not SagaStatus.FAILED:
        return Decision(
            state, rejected=f"only a FAILED saga can be retried; it is {state.status.value}"
        )
    log = [
        _entry(
            saga,
            state,
            now,
            LogEvent.RETRY_REQUESTED,
            detail={"by": event.by, "reason": event.reason},
        )
    ]
    status = (
        SagaStatus.COMPENSATING if state.kind is MessageKind.COMPENSATION else SagaStatus.RUNNING
    )
    # a refusal is stored by the participant: only a new command id can ask again
    refused = state.failure is not None and state.failure.cause == "failure"
    failure = state.failure
    if failure is not None and failure.original is not None:
        failure = failure.original  # compensating again: for the reason it first did
    resumed = _with(
        state, status=status, generation=state.generation + int(refused), failure=failure
    )
    if isinstance(saga.steps[state.step_index], Wait):  # its condition or merge raised
        return _enter(saga, resumed, state.step_index, now, log)
    return _dispatch(
        saga, resumed, state.step_index, state.kind, state.attempt + 1, now, log, new_round=True
    )


# --------------------------------------------------------------------------- transitions


def _step_succeeded(
    saga: Saga[Any],
    state: SagaState,
    step: Step[Any],
    reply: BaseModel,
    reply_trace: dict[str, str],
    now: float,
    log: list[LogEntry],
) -> Decision:
    data = state.data
    if step.on_reply is not None:
        try:
            merged = step.on_reply(saga.data_model.model_validate(state.data), reply)
            data = merged.model_dump(mode="json")
        except Exception as exc:  # user code: a bug here must not wedge the saga
            failure = Failure(step=step.name, reason=f"on_reply raised {exc!r}", cause="failure")
            if step.kind is not StepKind.COMPENSATABLE:  # past the point of no return
                return _fail(saga, state, failure, now, log)
            return _begin_compensation(saga, state, failure, now, log, abandon_current=True)
    completed = state.completed + ((state.step_index,) if step.compensation is not None else ())
    step_traces = state.step_traces
    if step.compensation is not None and TRACEPARENT in reply_trace:
        step_traces = {**step_traces, str(state.step_index): reply_trace[TRACEPARENT]}
    done = _with(
        state,
        data=data,
        completed=completed,
        step_traces=step_traces,
        awaiting=False,
        timer=None,
        updated_at=now,
    )
    return _enter(saga, done, state.step_index + 1, now, log)


def _enter(
    saga: Saga[Any], state: SagaState, index: int, now: float, log: list[LogEntry]
) -> Decision:
    """Reach step ``index``: skip it (and the next) while its condition is false, send
    the first one whose condition holds, or complete the saga past the last."""
    while index < len(saga.steps):
        step = saga.steps[index]
        holds = True
        if step.when is not None:
            try:
                holds = bool(step.when(saga.data_model.model_validate(state.data)))
            except Exception as exc:  # user code: a bug here fails the step, never the engine
                moved = _with(state, step_index=index, kind=MessageKind.COMMAND, attempt=1)
                failure = Failure(step=step.name, reason=f"when raised {exc!r}", cause="failure")
                return _step_failed(saga, moved, failure, now, log)
        if holds and isinstance(step, Wait):
            reached = _with(
                state,
                step_index=index,
                kind=MessageKind.COMMAND,
                attempt=1,
                round_start=1,
                uncertain=False,
                updated_at=now,
            )
            kept = state.signals.get(step.signal_name)
            if kept is None:
                return _wait(saga, reached, step, now, log)
            detail = {"signal": step.signal_name, "data": kept, "kept": False, "early": True}
            log.append(_entry(saga, reached, now, LogEvent.SIGNAL_RECEIVED, detail=detail))
            taken = _take_signal(saga, reached, step, kept, "signal", now, log)
            if isinstance(taken, Decision):
                return taken
            state = taken
            index += 1
            continue
        if holds:
            break
        state = _with(
            state,
            step_index=index,
            kind=MessageKind.COMMAND,
            attempt=1,
            round_start=1,
            uncertain=False,
            skipped=(*state.skipped, index),
            updated_at=now,
        )
        log.append(_entry(saga, state, now, LogEvent.STEP_SKIPPED, detail={"reason": "when"}))
        index += 1
    if index < len(saga.steps):
        return _dispatch(saga, state, index, MessageKind.COMMAND, 1, now, log, new_round=True)
    final = _with(state, status=SagaStatus.COMPLETED, awaiting=False, timer=None, updated_at=now)
    log.append(_entry(saga, final, now, LogEvent.COMPLETED))
    return Decision(final, log=tuple(log))


def _step_failed(
    saga: Saga[Any], state: SagaState, failure: Failure, now: float, log: list[LogEntry]
) -> Decision:
    """The current step failed for good: compensate, or before nothing can be
    undone any more (past the pivot) end FAILED for an operator."""
    if state.step_index >= saga.point_of_no_return:
        return _fail(saga, state, failure, now, log)
    return _begin_compensation(saga, state, failure, now, log, abandon_current=False)


def _wait(
    saga: Saga[Any], state: SagaState, wait: Wait[Any], now: float, log: list[LogEntry]
) -> Decision:
    """Stop at a wait until its signal (or its timeout) comes."""
    timer = None
    if wait.timeout is not None:
        timer = Timer(
            purpose="wait",
            step_index=state.step_index,
            kind=MessageKind.COMMAND,
            attempt=1,
            due_at=now + wait.timeout,
        )
    waiting = _with(state, awaiting=True, waiting_for=wait.signal_name, timer=timer)
    log.append(
        _entry(
            saga,
            waiting,
            now,
            LogEvent.WAITING,
            detail={"signal": wait.signal_name, "timeout": wait.timeout},
        )
    )
    return Decision(waiting, log=tuple(log))


def _take_signal(
    saga: Saga[Any],
    state: SagaState,
    wait: Wait[Any],
    data: dict[str, Any],
    how: str,
    now: float,
    log: list[LogEntry],
) -> SagaState | Decision:
    """Merge a signal's data at the wait ``state`` is at: the new state, or the
    decision that fails the wait when the merge raised."""
    assert wait.model is not None  # checked by the definition
    try:
        received = wait.model.model_validate(data)
        merged = wait.merge(saga.data_model.model_validate(state.data), received)
        new_data = merged.model_dump(mode="json")
    except Exception as exc:  # user code: a bug here fails the wait, never the engine
        failure = Failure(step=wait.name, reason=f"on_signal raised {exc!r}", cause="failure")
        return _step_failed(saga, state, failure, now, log)
    signals = {k: v for k, v in state.signals.items() if k != wait.signal_name}
    return _with(
        state,
        data=new_data,
        signals=signals,
        signalled={**state.signalled, wait.signal_name: how},
        awaiting=False,
        waiting_for=None,
        timer=None,
        updated_at=now,
    )


def _on_signal(saga: Saga[Any], state: SagaState, event: SignalReceived, now: float) -> Decision:
    if state.status.terminal:
        return Decision(
            state, rejected=f"saga is {state.status.value}: signal {event.name!r} not applied"
        )
    found = saga.wait_for(event.name)
    if found is None:
        known = sorted(w.signal_name for w in saga.steps if isinstance(w, Wait))
        return Decision(
            state,
            rejected=f"saga {saga.name!r} v{saga.version} waits for no signal {event.name!r}"
            f" (it waits for: {', '.join(known) or 'none'})",
        )
    index, wait = found
    assert wait.model is not None  # checked by the definition
    try:
        received = (
            event.data
            if isinstance(event.data, wait.model)
            else wait.model.model_validate(
                event.data.model_dump() if isinstance(event.data, BaseModel) else event.data
            )
        )
    except ValidationError as exc:
        return Decision(
            state,
            rejected=f"signal {event.name!r} data does not fit {wait.model.__name__}: "
            + "; ".join(
                f"{'.'.join(map(str, e['loc'])) or 'data'}: {e['msg']}" for e in exc.errors()
            ),
        )
    if event.name in state.signals or state.signalled.get(event.name) == "signal":
        return Decision(state, ignored=f"signal {event.name!r} was received already")
    if state.signalled.get(event.name) == "timeout":
        return Decision(
            state, rejected=f"wait {wait.name!r} timed out already and took its default"
        )
    if state.status is not SagaStatus.RUNNING:
        return Decision(
            state, rejected=f"saga is {state.status.value}: signal {event.name!r} not applied"
        )
    if index < state.step_index or (index == state.step_index and not state.awaiting):
        return Decision(state, rejected=f"saga is past wait {wait.name!r} (skipped or done)")
    data = received.model_dump(mode="json")
    entry = _entry(
        saga,
        _with(state, step_index=index, kind=MessageKind.COMMAND),
        now,
        LogEvent.SIGNAL_RECEIVED,
        attempt=1,
        detail={
            "signal": event.name,
            "by": event.by,
            "reason": event.reason,
            "data": data,
            "kept": index != state.step_index,
        },
    )
    log = [entry]
    if index != state.step_index:  # early: kept until the saga reaches the wait
        kept = _with(state, signals={**state.signals, event.name: data}, updated_at=now)
        return Decision(kept, log=tuple(log))
    taken = _take_signal(saga, state, wait, data, "signal", now, log)
    if isinstance(taken, Decision):
        return taken
    return _enter(saga, taken, index + 1, now, log)


def _wait_timed_out(saga: Saga[Any], state: SagaState, now: float) -> Decision:
    wait = saga.steps[state.step_index]
    assert isinstance(wait, Wait) and wait.timeout is not None
    default = wait.on_timeout
    log = [
        _entry(
            saga,
            state,
            now,
            LogEvent.WAIT_TIMED_OUT,
            detail={
                "signal": wait.signal_name,
                "timeout": wait.timeout,
                "default": None if default is None else default.model_dump(mode="json"),
            },
        )
    ]
    if default is None:
        failure = Failure(
            step=wait.name,
            reason=f"no signal {wait.signal_name!r} within {wait.timeout:g}s",
            cause="timeout",
        )
        return _step_failed(saga, state, failure, now, log)
    taken = _take_signal(saga, state, wait, default.model_dump(mode="json"), "timeout", now, log)
    if isinstance(taken, Decision):
        return taken
    return _enter(saga, taken, state.step_index + 1, now, log)


def _deadline_passed(saga: Saga[Any], state: SagaState, now: float) -> Decision:
    """Before the pivot the saga is cancelled by its deadline and compensates;
    after it (or already compensating) the deadline is recorded, nothing undone."""
    overdue = _with(state, overdue=True, updated_at=now)
    before_pivot = state.status is SagaStatus.RUNNING and state.step_index < saga.point_of_no_return
    log = [
        _entry(
            saga,
            overdue,
            now,
            LogEvent.DEADLINE_PASSED,
            detail={"deadline_at": state.deadline_at, "compensates": before_pivot},
        )
    ]
    if not before_pivot:
        return Decision(overdue, log=tuple(log))
    step = saga.steps[state.step_index]
    failure = Failure(
        step=step.name,
        reason=f"deadline passed ({(state.deadline_at or now) - state.created_at:g}s after start)",
        cause="deadline",
    )
    return _begin_compensation(
        saga, _with(overdue, waiting_for=None), failure, now, log, abandon_current=True
    )


def _retry_or_abandon(
    saga: Saga[Any],
    state: SagaState,
    step: Step[Any],
    now: float,
    log: list[LogEntry],
    reason: str,
    *,
    timed_out: bool,
) -> Decision:
    used = state.attempt - state.round_start + 1
    if timed_out:
        state = _with(state, uncertain=True)
    forever = step.kind is StepKind.RETRIABLE or (timed_out and step.kind is StepKind.PIVOT)
    if forever or used < step.retry.max_attempts:
        if timed_out:
            nxt = _with(state, attempt=state.attempt + 1)
            return _dispatch(saga, nxt, state.step_index, state.kind, nxt.attempt, now, log)
        return _schedule_retry(
            saga, state, step.retry.backoff(used, _seed(state)), now, log, reason
        )
    cause = "timeout" if timed_out else "retries_exhausted"
    failure = Failure(step=step.name, reason=f"{reason} (after {used} attempts)", cause=cause)
    if step.kind is StepKind.PIVOT and state.uncertain:
        # an earlier attempt timed out and may still take effect: nothing may be
        # undone before the pivot's outcome is known
        unknown = f"{failure.reason}; the pivot's outcome is unknown"
        return _fail(saga, state, failure.model_copy(update={"reason": unknown}), now, log)
    return _begin_compensation(saga, state, failure, now, log, abandon_current=True)


def _retry_or_fail_compensation(
    saga: Saga[Any],
    state: SagaState,
    now: float,
    log: list[LogEntry],
    reason: str,
    *,
    immediate: bool = False,
) -> Decision:
    step = _step(saga, state.step_index)
    policy = step.compensation_retry
    used = state.attempt - state.round_start + 1
    if used < policy.max_attempts:
        if immediate:
            nxt = _with(state, attempt=state.attempt + 1)
            return _dispatch(saga, nxt, state.step_index, state.kind, nxt.attempt, now, log)
        return _schedule_retry(saga, state, policy.backoff(used, _seed(state)), now, log, reason)
    failure = Failure(
        step=step.name,
        reason=f"compensation {_compensation_type(step)} failed after {used} attempts: {reason}",
        cause="compensation",
        original=state.failure,
    )
    return _fail(saga, state, failure, now, log)


def _schedule_retry(
    saga: Saga[Any], state: SagaState, delay: float, now: float, log: list[LogEntry], reason: str
) -> Decision:
    attempt = state.attempt + 1
    timer = Timer(
        purpose="retry",
        step_index=state.step_index,
        kind=state.kind,
        attempt=attempt,
        due_at=now + delay,
    )
    nxt = _with(state, attempt=attempt, awaiting=False, timer=timer, updated_at=now)
    log.append(
        _entry(
            saga,
            nxt,
            now,
            LogEvent.RETRY_SCHEDULED,
            detail={"delay": round(delay, 3), "reason": reason},
        )
    )
    return Decision(nxt, log=tuple(log))


def _begin_compensation(
    saga: Saga[Any],
    state: SagaState,
    failure: Failure,
    now: float,
    log: list[LogEntry],
    *,
    abandon_current: bool,
) -> Decision:
    undo = list(state.completed)
    current = saga.steps[state.step_index]
    if abandon_current and current.compensation is not None and state.step_index not in undo:
        undo.append(state.step_index)
    nxt = _with(
        state,
        status=SagaStatus.COMPENSATING,
        failure=failure,
        to_compensate=tuple(reversed(undo)),
        awaiting=False,
        waiting_for=None,
        timer=None,
    )
    log.append(
        _entry(
            saga,
            nxt,
            now,
            LogEvent.COMPENSATION_STARTED,
            detail={
                "cause": failure.cause,
                "reason": failure.reason,
                "undo": [saga.steps[i].name for i in nxt.to_compensate],
            },
        )
    )
    return _next_compensation(saga, _with(nxt, updated_at=now), now, log)


def _next_compensation(
    saga: Saga[Any], state: SagaState, now: float, log: list[LogEntry]
) -> Decision:
    if state.to_compensate:
        index = state.to_compensate[0]
        return _dispatch(saga, state, index, MessageKind.COMPENSATION, 1, now, log, new_round=True)
    status = SagaStatus.CANCELLED if state.cancelled else SagaStatus.COMPENSATED
    final = _with(state, status=status, awaiting=False, timer=None)
    event = LogEvent.CANCELLED if state.cancelled else LogEvent.COMPENSATED
    reason = state.failure.reason if state.failure else None
    step = state.failure.step if state.failure else None
    log.append(_entry(saga, final, now, event, step=step, detail={"reason": reason}))
    return Decision(final, log=tuple(log))


def _fail(
    saga: Saga[Any], state: SagaState, failure: Failure, now: float, log: list[LogEntry]
) -> Decision:
    final = _with(
        state,
        status=SagaStatus.FAILED,
        failure=failure,
        awaiting=False,
        waiting_for=None,
        timer=None,
        updated_at=now,
    )
    log.append(
        _entry(
            saga,
            final,
            now,
            LogEvent.FAILED,
            detail={"cause": failure.cause, "reason": failure.reason},
        )
    )
    return Decision(final, log=tuple(log))


def _dispatch(
    saga: Saga[Any],
    state: SagaState,
    index: int,
    kind: MessageKind,
    attempt: int,
    now: float,
    log: list[LogEntry],
    *,
    new_round: bool = False,
) -> Decision:
    """Send attempt ``attempt`` of step ``index``'s command or compensation."""
    step = _step(saga, index)
    position = {
        "step_index": index,
        "kind": kind,
        "attempt": attempt,
        "round_start": attempt if new_round else state.round_start,
        "uncertain": False if new_round else state.uncertain,
    }
    try:
        action, payload = _build(saga, step, kind, state.data)
    except Exception as exc:  # user code building a command: fail the step, never crash
        moved = _with(state, **position)
        reason = f"building the {kind.value} raised {exc!r}"
        if kind is MessageKind.COMPENSATION:
            failed = Failure(
                step=step.name, reason=reason, cause="compensation", original=state.failure
            )
            return _fail(saga, moved, failed, now, log)
        failure = Failure(step=step.name, reason=reason, cause="failure")
        if step.kind is StepKind.RETRIABLE:
            return _fail(saga, moved, failure, now, log)
        return _begin_compensation(saga, moved, failure, now, log, abandon_current=False)
    cid = command_id(state.saga_id, step.name, kind)
    if kind is MessageKind.COMMAND and state.generation:
        cid = f"{cid}:g{state.generation}"
    envelope = Envelope(
        message_id=f"{cid}:{attempt}",
        command_id=cid,
        saga_id=state.saga_id,
        saga_name=state.saga_name,
        saga_version=state.saga_version,
        step=step.name,
        step_index=index,
        kind=kind,
        attempt=attempt,
        type=action,
        payload=payload,
        trace=_trace_for(state, index, kind),
    )
    timer = Timer(
        purpose="timeout",
        step_index=index,
        kind=kind,
        attempt=attempt,
        due_at=now + step.timeout,
    )
    sent = _with(state, **position, awaiting=True, timer=timer, updated_at=now)
    event = LogEvent.COMMAND_SENT if kind is MessageKind.COMMAND else LogEvent.COMPENSATION_SENT
    log.append(
        _entry(saga, sent, now, event, detail={"type": action, "message_id": envelope.message_id})
    )
    return Decision(sent, messages=(envelope,), log=tuple(log))


def _build(
    saga: Saga[Any], step: Step[Any], kind: MessageKind, data: dict[str, Any]
) -> tuple[str, dict[str, Any]]:
    model = saga.data_model.model_validate(data)
    if kind is MessageKind.COMMAND:
        return step.action.type, _payload(step.action.command, step.command(model))
    assert step.compensation is not None  # only compensatable steps are compensated
    if step.compensation_command is not None:
        command = step.compensation_command(model)
    else:
        command = step.compensation.command.model_validate(step.command(model).model_dump())
    return step.compensation.type, _payload(step.compensation.command, command)


def _payload(model: type[BaseModel], command: Any) -> dict[str, Any]:
    """The JSON payload of a command, validated unless it already is the model."""
    if type(command) is not model:  # a dict, or another model: check it fits
        command = model.model_validate(command)
    return command.model_dump(mode="json")  # type: ignore[no-any-return]


TRACEPARENT = "traceparent"
LINK = "sagaflow-link"  # the traceparent of the step a compensation undoes


def _trace_for(state: SagaState, index: int, kind: MessageKind) -> dict[str, str]:
    link = state.step_traces.get(str(index)) if kind is MessageKind.COMPENSATION else None
    return {**state.trace, LINK: link} if link else state.trace


def _step(saga: Saga[Any], index: int) -> Step[Any]:
    """Step ``index``, which the caller knows sends a command (not a wait)."""
    step = saga.steps[index]
    assert isinstance(step, Step), f"step {step.name!r} is a wait"
    return step


def _compensation_type(step: Step[Any]) -> str:
    return step.compensation.type if step.compensation is not None else "<none>"


def _seed(state: SagaState) -> str:
    return f"{state.saga_id}:{state.step_index}:{state.kind.value}:{state.attempt}"


def postpone(state: SagaState, until: float) -> Decision:
    """Move the saga's timer to ``until`` and change nothing else: what a
    coordinator does with a due saga it could not decide (its definition raised),
    so that it does not come back every scan and crowd out the others."""
    if state.timer is None:
        return Decision(state=state)
    return Decision(state=_with(state, timer=state.timer.model_copy(update={"due_at": until})))


def _with(state: SagaState, **changes: Any) -> SagaState:
    return state.model_copy(update=changes)


def _entry(
    saga: Saga[Any],
    state: SagaState,
    now: float,
    event: LogEvent,
    *,
    step: str | None = None,
    attempt: int | None = None,
    detail: dict[str, Any] | None = None,
) -> LogEntry:
    on_step = event not in (LogEvent.STARTED, LogEvent.COMPLETED)
    return LogEntry(
        saga_id=state.saga_id,
        at=now,
        event=event,
        step=step if step is not None else (saga.steps[state.step_index].name if on_step else None),
        step_index=state.step_index if on_step else None,
        kind=state.kind if on_step else None,
        attempt=attempt if attempt is not None else (state.attempt if on_step else None),
        detail=detail or {},
    )
