"""The engine's transitions: reaching a step, sending, retrying, compensating,
failing. :mod:`sagaflow.core.engine` decides which applies to an event; these
build the :class:`Decision` (pure functions, as the engine)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from sagaflow.core.definition import Saga, Step, StepKind, Wait
from sagaflow.core.messages import Envelope, MessageKind, command_id
from sagaflow.core.state import Failure, LogEntry, LogEvent, SagaState, SagaStatus, Timer

TRACEPARENT = "traceparent"
LINK = "sagaflow-link"  # the traceparent of the step a compensation undoes


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


def step_succeeded(
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
                return fail(saga, state, failure, now, log)
            return begin_compensation(saga, state, failure, now, log, abandon_current=True)
    completed = state.completed + ((state.step_index,) if step.compensation is not None else ())
    step_traces = state.step_traces
    if step.compensation is not None and TRACEPARENT in reply_trace:
        step_traces = {**step_traces, str(state.step_index): reply_trace[TRACEPARENT]}
    done = changed(
        state,
        data=data,
        completed=completed,
        step_traces=step_traces,
        awaiting=False,
        timer=None,
        updated_at=now,
    )
    return enter(saga, done, state.step_index + 1, now, log)


def enter(
    saga: Saga[Any], state: SagaState, index: int, now: float, log: list[LogEntry]
) -> Decision:
    """Reach step ``index``: skip it (and the next) while its condition is false, send
    the first one whose condition holds, or complete the saga past the last."""
    while index < len(saga.steps):
        if saga.groups.get(index, (None,))[0] == index:  # the first step of a parallel group
            from sagaflow.core.groups import enter_group

            return enter_group(saga, state, index, now, log)
        step = saga.steps[index]
        holds = True
        if step.when is not None:
            try:
                holds = bool(step.when(saga.data_model.model_validate(state.data)))
            except Exception as exc:  # user code: a bug here fails the step, never the engine
                moved = changed(state, step_index=index, kind=MessageKind.COMMAND, attempt=1)
                failure = Failure(step=step.name, reason=f"when raised {exc!r}", cause="failure")
                return step_failed(saga, moved, failure, now, log)
        if holds and isinstance(step, Wait):
            reached = changed(
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
                return wait_at(saga, reached, step, now, log)
            detail = {"signal": step.signal_name, "data": kept, "kept": False, "early": True}
            log.append(log_entry(saga, reached, now, LogEvent.SIGNAL_RECEIVED, detail=detail))
            taken = take_signal(saga, reached, step, kept, "signal", now, log)
            if isinstance(taken, Decision):
                return taken
            state = taken
            index += 1
            continue
        if holds:
            break
        state = changed(
            state,
            step_index=index,
            kind=MessageKind.COMMAND,
            attempt=1,
            round_start=1,
            uncertain=False,
            skipped=(*state.skipped, index),
            updated_at=now,
        )
        log.append(log_entry(saga, state, now, LogEvent.STEP_SKIPPED, detail={"reason": "when"}))
        index += 1
    if index < len(saga.steps):
        return dispatch(saga, state, index, MessageKind.COMMAND, 1, now, log, new_round=True)
    final = changed(state, status=SagaStatus.COMPLETED, awaiting=False, timer=None, updated_at=now)
    log.append(log_entry(saga, final, now, LogEvent.COMPLETED))
    return Decision(final, log=tuple(log))


def step_failed(
    saga: Saga[Any], state: SagaState, failure: Failure, now: float, log: list[LogEntry]
) -> Decision:
    """The current step failed for good: compensate, or before nothing can be
    undone any more (past the pivot) end FAILED for an operator."""
    if state.step_index >= saga.point_of_no_return:
        return fail(saga, state, failure, now, log)
    return begin_compensation(saga, state, failure, now, log, abandon_current=False)


def wait_at(
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
    waiting = changed(state, awaiting=True, waiting_for=wait.signal_name, timer=timer)
    log.append(
        log_entry(
            saga,
            waiting,
            now,
            LogEvent.WAITING,
            detail={"signal": wait.signal_name, "timeout": wait.timeout},
        )
    )
    return Decision(waiting, log=tuple(log))


def take_signal(
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
        return step_failed(saga, state, failure, now, log)
    signals = {k: v for k, v in state.signals.items() if k != wait.signal_name}
    return changed(
        state,
        data=new_data,
        signals=signals,
        signalled={**state.signalled, wait.signal_name: how},
        awaiting=False,
        waiting_for=None,
        timer=None,
        updated_at=now,
    )


def retry_or_abandon(
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
        state = changed(state, uncertain=True)
    forever = step.kind is StepKind.RETRIABLE or (timed_out and step.kind is StepKind.PIVOT)
    if forever or used < step.retry.max_attempts:
        if timed_out:
            nxt = changed(state, attempt=state.attempt + 1)
            return dispatch(saga, nxt, state.step_index, state.kind, nxt.attempt, now, log)
        return schedule_retry(saga, state, step.retry.backoff(used, seed(state)), now, log, reason)
    cause = "timeout" if timed_out else "retries_exhausted"
    failure = Failure(step=step.name, reason=f"{reason} (after {used} attempts)", cause=cause)
    if step.kind is StepKind.PIVOT and state.uncertain:
        # an earlier attempt timed out and may still take effect: nothing may be
        # undone before the pivot's outcome is known
        unknown = f"{failure.reason}; the pivot's outcome is unknown"
        return fail(saga, state, failure.model_copy(update={"reason": unknown}), now, log)
    return begin_compensation(saga, state, failure, now, log, abandon_current=True)


def retry_or_fail_compensation(
    saga: Saga[Any],
    state: SagaState,
    now: float,
    log: list[LogEntry],
    reason: str,
    *,
    immediate: bool = False,
) -> Decision:
    step = step_at(saga, state.step_index)
    policy = step.compensation_retry
    used = state.attempt - state.round_start + 1
    if used < policy.max_attempts:
        if immediate:
            nxt = changed(state, attempt=state.attempt + 1)
            return dispatch(saga, nxt, state.step_index, state.kind, nxt.attempt, now, log)
        return schedule_retry(saga, state, policy.backoff(used, seed(state)), now, log, reason)
    failure = Failure(
        step=step.name,
        reason=f"compensation {compensation_type(step)} failed after {used} attempts: {reason}",
        cause="compensation",
        original=state.failure,
    )
    return fail(saga, state, failure, now, log)


def schedule_retry(
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
    nxt = changed(state, attempt=attempt, awaiting=False, timer=timer, updated_at=now)
    log.append(retry_scheduled(saga, nxt, now, delay, reason))
    return Decision(nxt, log=tuple(log))


def retry_scheduled(
    saga: Saga[Any], state: SagaState, now: float, delay: float, reason: str
) -> LogEntry:
    """The log entry of a retry ``delay`` seconds away (``state`` names the step)."""
    return log_entry(
        saga,
        state,
        now,
        LogEvent.RETRY_SCHEDULED,
        detail={"delay": round(delay, 3), "reason": reason},
    )


def begin_compensation(
    saga: Saga[Any],
    state: SagaState,
    failure: Failure,
    now: float,
    log: list[LogEntry],
    *,
    abandon_current: bool,
) -> Decision:
    if state.branches and state.status is SagaStatus.RUNNING:  # a parallel group in flight
        from sagaflow.core.groups import group_failure

        return group_failure(saga, state, failure, now, log, refused=None)
    undo = list(state.completed)
    current = saga.steps[state.step_index]
    if abandon_current and current.compensation is not None and state.step_index not in undo:
        undo.append(state.step_index)
    nxt = changed(
        state,
        status=SagaStatus.COMPENSATING,
        failure=failure,
        to_compensate=tuple(reversed(undo)),
        awaiting=False,
        waiting_for=None,
        timer=None,
    )
    detail: dict[str, Any] = {
        "cause": failure.cause,
        "reason": failure.reason,
        "undo": [saga.steps[i].name for i in nxt.to_compensate],
    }
    # a group's steps to undo (two or more of one group) are undone together
    together = [
        saga.steps[i].name
        for i in nxt.to_compensate
        if len(set(saga.groups.get(i, ())) & set(nxt.to_compensate)) > 1
    ]
    if together:
        detail["parallel"] = together
    log.append(log_entry(saga, nxt, now, LogEvent.COMPENSATION_STARTED, detail=detail))
    return next_compensation(saga, changed(nxt, updated_at=now), now, log)


def next_compensation(
    saga: Saga[Any], state: SagaState, now: float, log: list[LogEntry]
) -> Decision:
    if state.to_compensate:
        from sagaflow.core.groups import compensate_group_batch

        batch = compensate_group_batch(saga, state, now, log)
        if batch is not None:  # a group's steps: undone together
            return batch
        index = state.to_compensate[0]
        return dispatch(saga, state, index, MessageKind.COMPENSATION, 1, now, log, new_round=True)
    status = SagaStatus.CANCELLED if state.cancelled else SagaStatus.COMPENSATED
    final = changed(state, status=status, awaiting=False, timer=None)
    event = LogEvent.CANCELLED if state.cancelled else LogEvent.COMPENSATED
    reason = state.failure.reason if state.failure else None
    step = state.failure.step if state.failure else None
    log.append(log_entry(saga, final, now, event, step=step, detail={"reason": reason}))
    return Decision(final, log=tuple(log))


def fail(
    saga: Saga[Any], state: SagaState, failure: Failure, now: float, log: list[LogEntry]
) -> Decision:
    final = changed(
        state,
        status=SagaStatus.FAILED,
        failure=failure,
        awaiting=False,
        waiting_for=None,
        timer=None,
        updated_at=now,
    )
    log.append(
        log_entry(
            saga,
            final,
            now,
            LogEvent.FAILED,
            detail={"cause": failure.cause, "reason": failure.reason},
        )
    )
    return Decision(final, log=tuple(log))


def dispatch(
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
    step = step_at(saga, index)
    position = {
        "step_index": index,
        "kind": kind,
        "attempt": attempt,
        "round_start": attempt if new_round else state.round_start,
        "uncertain": False if new_round else state.uncertain,
    }
    try:
        envelope = envelope_for(saga, state, index, kind, attempt)
    except Exception as exc:  # user code building a command: fail the step, never crash
        moved = changed(state, **position)
        reason = f"building the {kind.value} raised {exc!r}"
        if kind is MessageKind.COMPENSATION:
            failed = Failure(
                step=step.name, reason=reason, cause="compensation", original=state.failure
            )
            return fail(saga, moved, failed, now, log)
        failure = Failure(step=step.name, reason=reason, cause="failure")
        if step.kind is StepKind.RETRIABLE:
            return fail(saga, moved, failure, now, log)
        return begin_compensation(saga, moved, failure, now, log, abandon_current=False)
    timer = Timer(
        purpose="timeout",
        step_index=index,
        kind=kind,
        attempt=attempt,
        due_at=now + step.timeout,
    )
    sent = changed(state, **position, awaiting=True, timer=timer, updated_at=now)
    event = LogEvent.COMMAND_SENT if kind is MessageKind.COMMAND else LogEvent.COMPENSATION_SENT
    log.append(
        log_entry(
            saga,
            sent,
            now,
            event,
            detail={"type": envelope.type, "message_id": envelope.message_id},
        )
    )
    return Decision(sent, messages=(envelope,), log=tuple(log))


def envelope_for(
    saga: Saga[Any], state: SagaState, index: int, kind: MessageKind, attempt: int
) -> Envelope:
    """Attempt ``attempt`` of step ``index``'s command or compensation.

    Raises:
        Exception: whatever the user's builder raised, or a validation error.
    """
    step = step_at(saga, index)
    action, payload = build(saga, step, kind, state.data)
    cid = command_id(state.saga_id, step.name, kind)
    if kind is MessageKind.COMMAND and state.generation:
        cid = f"{cid}:g{state.generation}"
    return Envelope(
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
        trace=trace_for(state, index, kind),
    )


def build(
    saga: Saga[Any], step: Step[Any], kind: MessageKind, data: dict[str, Any]
) -> tuple[str, dict[str, Any]]:
    model = saga.data_model.model_validate(data)
    if kind is MessageKind.COMMAND:
        return step.action.type, payload_of(step.action.command, step.command(model))
    assert step.compensation is not None  # only compensatable steps are compensated
    if step.compensation_command is not None:
        command = step.compensation_command(model)
    else:
        command = step.compensation.command.model_validate(step.command(model).model_dump())
    return step.compensation.type, payload_of(step.compensation.command, command)


def payload_of(model: type[BaseModel], command: Any) -> dict[str, Any]:
    """The JSON payload of a command, validated unless it already is the model."""
    if type(command) is not model:  # a dict, or another model: check it fits
        command = model.model_validate(command)
    return command.model_dump(mode="json")  # type: ignore[no-any-return]


def trace_for(state: SagaState, index: int, kind: MessageKind) -> dict[str, str]:
    link = state.step_traces.get(str(index)) if kind is MessageKind.COMPENSATION else None
    return {**state.trace, LINK: link} if link else state.trace


def step_at(saga: Saga[Any], index: int) -> Step[Any]:
    """Step ``index``, which the caller knows sends a command (not a wait)."""
    step = saga.steps[index]
    assert isinstance(step, Step), f"step {step.name!r} is a wait"
    return step


def compensation_type(step: Step[Any]) -> str:
    return step.compensation.type if step.compensation is not None else "<none>"


def seed(state: SagaState) -> str:
    return f"{state.saga_id}:{state.step_index}:{state.kind.value}:{state.attempt}"


def changed(state: SagaState, **changes: Any) -> SagaState:
    return state.model_copy(update=changes)


def log_entry(
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
