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

from sagaflow.core.definition import Saga, StepKind, Wait
from sagaflow.core.groups import on_group_reply, on_group_timer, resume_group
from sagaflow.core.messages import Envelope, MessageKind, Outcome
from sagaflow.core.schema import DEFAULT_STRICT, validate_payload
from sagaflow.core.signals import SignalReceived, deadline_passed, on_signal, wait_timed_out
from sagaflow.core.state import Failure, LogEvent, SagaState, SagaStatus
from sagaflow.core.transitions import (
    LINK,
    TRACEPARENT,
    Decision,
    begin_compensation,
    changed,
    dispatch,
    enter,
    fail,
    log_entry,
    next_compensation,
    retry_or_abandon,
    retry_or_fail_compensation,
    step_at,
    step_succeeded,
)

__all__ = [
    "LINK",
    "TRACEPARENT",
    "CancelRequested",
    "Decision",
    "Event",
    "ReplyReceived",
    "RetryRequested",
    "SignalReceived",
    "TimerFired",
    "check_saga_id",
    "decide",
    "postpone",
    "start",
]


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


Event = ReplyReceived | TimerFired | CancelRequested | RetryRequested | SignalReceived


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
    entry = log_entry(saga, state, now, LogEvent.STARTED, detail={"data": state.data})
    return enter(saga, state, 0, now, [entry])


def decide(saga: Saga[Any], state: SagaState, event: Event, now: float) -> Decision:
    """Apply one event to a saga instance."""
    if isinstance(event, ReplyReceived):
        return _on_reply(saga, state, event.envelope, now, event.strict)
    if isinstance(event, TimerFired):
        return _on_timer(saga, state, now)
    if isinstance(event, CancelRequested):
        return _on_cancel(saga, state, event, now)
    if isinstance(event, SignalReceived):
        return on_signal(saga, state, event, now)
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
    if state.branches:  # a parallel group (or its compensations) in flight
        return on_group_reply(saga, state, env, now)
    expected = (
        MessageKind.COMMAND if state.status is SagaStatus.RUNNING else MessageKind.COMPENSATION
    )
    if env.for_kind is not expected or env.step_index != state.step_index:
        return Decision(state, ignored="stale reply: the saga has moved on")
    if env.attempt > state.attempt:
        return Decision(state, rejected=f"forged attempt {env.attempt} > {state.attempt}")
    if env.outcome is Outcome.ERROR and (env.attempt != state.attempt or not state.awaiting):
        return Decision(state, ignored="stale error reply from an earlier attempt")

    step = step_at(saga, state.step_index)
    log = [
        log_entry(
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
            rest = changed(state, to_compensate=state.to_compensate[1:], updated_at=now)
            return next_compensation(saga, rest, now, log)
        return retry_or_fail_compensation(saga, state, now, log, env.reason or "failed")

    if env.outcome is Outcome.SUCCESS:
        try:
            reply = validate_payload(step.action.reply, env.payload, strict=strict)
        except ValidationError as exc:
            return Decision(state, rejected=f"reply payload invalid for {step.action.type}: {exc}")
        return step_succeeded(saga, state, step, reply, env.trace, now, log)
    if env.outcome is Outcome.FAILURE:
        failure = Failure(step=step.name, reason=env.reason or "failed", cause="failure")
        if step.kind is StepKind.RETRIABLE:
            return fail(saga, state, failure, now, log)
        return begin_compensation(saga, state, failure, now, log, abandon_current=False)
    return retry_or_abandon(saga, state, step, now, log, env.reason or "error", timed_out=False)


def _on_timer(saga: Saga[Any], state: SagaState, now: float) -> Decision:
    if (
        not state.status.terminal
        and state.deadline_at is not None
        and not state.overdue
        and state.deadline_at <= now
    ):
        return deadline_passed(saga, state, now)
    if state.branches and not state.status.terminal:
        return on_group_timer(saga, state, now)
    timer = state.timer
    if state.status.terminal or timer is None:
        return Decision(state, ignored="no timer pending")
    if timer.due_at > now:
        return Decision(state, ignored="timer not due yet")
    if timer.purpose == "wait":
        return wait_timed_out(saga, state, now)
    step = step_at(saga, state.step_index)
    if timer.purpose == "retry":
        return dispatch(saga, state, state.step_index, state.kind, state.attempt, now, [])
    log = [log_entry(saga, state, now, LogEvent.TIMED_OUT, detail={"timeout": step.timeout})]
    reason = f"no reply within {step.timeout:g}s"
    if state.kind is MessageKind.COMPENSATION:
        return retry_or_fail_compensation(saga, state, now, log, reason, immediate=True)
    return retry_or_abandon(saga, state, step, now, log, reason, timed_out=True)


def _on_cancel(saga: Saga[Any], state: SagaState, event: CancelRequested, now: float) -> Decision:
    if state.status is not SagaStatus.RUNNING:
        return Decision(state, rejected=f"cannot cancel a saga that is {state.status.value}")
    step = saga.steps[state.step_index]
    if state.step_index >= saga.point_of_no_return:
        return Decision(state, rejected=f"cannot cancel: step {step.name!r} is past the pivot")
    log = [
        log_entry(
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
    cancelled = changed(state, cancelled=True)
    return begin_compensation(saga, cancelled, failure, now, log, abandon_current=True)


def _on_retry_requested(
    saga: Saga[Any], state: SagaState, event: RetryRequested, now: float
) -> Decision:
    if state.status is not SagaStatus.FAILED:
        return Decision(
            state, rejected=f"only a FAILED saga can be retried; it is {state.status.value}"
        )
    log = [
        log_entry(
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
    resumed = changed(
        state, status=status, generation=state.generation + int(refused), failure=failure
    )
    if state.branches:  # a group's compensations: each branch left, sent again
        return resume_group(saga, resumed, now, log)
    if isinstance(saga.steps[state.step_index], Wait):  # its condition or merge raised
        return enter(saga, resumed, state.step_index, now, log)
    return dispatch(
        saga, resumed, state.step_index, state.kind, state.attempt + 1, now, log, new_round=True
    )


# --------------------------------------------------------------------------- transitions


def postpone(state: SagaState, until: float) -> Decision:
    """Move the saga's timer to ``until`` and change nothing else: what a
    coordinator does with a due saga it could not decide (its definition raised),
    so that it does not come back every scan and crowd out the others."""
    if state.timer is None:
        return Decision(state=state)
    return Decision(state=changed(state, timer=state.timer.model_copy(update={"due_at": until})))
