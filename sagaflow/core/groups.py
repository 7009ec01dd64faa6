"""Parallel groups: several steps in flight at once, each its own branch.

A group's commands are sent together when the saga reaches it (members whose
condition is false are skipped); each branch has its own attempt and timer in
``state.branches`` (the saga's ``wake_at`` is the earliest of them). Replies
are decided one at a time (the saga's row is locked), so each ``on_reply``
merges into the data the previous left. When every branch succeeded the saga
goes on after the group.

When a branch fails for good (a refusal, its retries or timeouts exhausted, a
cancel, the deadline): no branch starts again, the branches still in flight
are abandoned (their compensation is sent too; participants tombstone the
command), the branches that took effect and the abandoned ones are
compensated in parallel, then the earlier steps in reverse order. A refused
branch is not compensated. The same parallel undo applies when a later step
fails after the group completed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pydantic import ValidationError

from sagaflow.core.definition import Saga
from sagaflow.core.messages import Envelope, MessageKind, Outcome
from sagaflow.core.state import Branch, Failure, LogEntry, LogEvent, SagaState, SagaStatus, Timer
from sagaflow.core.transitions import (
    TRACEPARENT,
    Decision,
    changed,
    compensation_type,
    enter,
    envelope_for,
    fail,
    log_entry,
    next_compensation,
    retry_scheduled,
    seed,
    step_at,
)

__all__ = ["enter_group", "group_failure", "on_group_reply", "on_group_timer", "resume_group"]


def _view(state: SagaState, index: int, branch: Branch) -> SagaState:
    """The state as the log entry of one branch names it."""
    return changed(state, step_index=index, kind=branch.kind, attempt=branch.attempt)


def enter_group(
    saga: Saga[Any], state: SagaState, first: int, now: float, log: list[LogEntry]
) -> Decision:
    """Reach the group starting at ``first``: skip its members whose condition is
    false, send the others' commands together."""
    members = saga.groups[first]
    model = saga.data_model.model_validate(state.data)
    effective: list[int] = []
    for index in members:
        step = step_at(saga, index)
        if step.when is not None:
            try:
                holds = bool(step.when(model))
            except Exception as exc:  # user code: fails the group before anything is sent
                moved = changed(state, step_index=index, kind=MessageKind.COMMAND, attempt=1)
                failure = Failure(step=step.name, reason=f"when raised {exc!r}", cause="failure")
                from sagaflow.core.transitions import step_failed

                return step_failed(saga, moved, failure, now, log)
            if not holds:
                state = changed(state, skipped=(*state.skipped, index), updated_at=now)
                view = changed(state, step_index=index, kind=MessageKind.COMMAND, attempt=1)
                log.append(
                    log_entry(saga, view, now, LogEvent.STEP_SKIPPED, detail={"reason": "when"})
                )
                continue
        effective.append(index)
    if not effective:
        return enter(saga, state, members[-1] + 1, now, log)
    at_group = changed(
        state,
        step_index=first,
        kind=MessageKind.COMMAND,
        attempt=1,
        round_start=1,
        uncertain=False,
        timer=None,
        updated_at=now,
    )
    return send_branches(saga, at_group, effective, MessageKind.COMMAND, now, log)


def send_branches(
    saga: Saga[Any],
    state: SagaState,
    indexes: Sequence[int],
    kind: MessageKind,
    now: float,
    log: list[LogEntry],
) -> Decision:
    """Send the first attempt of each of ``indexes``' commands or compensations."""
    built: list[Envelope] = []
    for index in indexes:
        try:
            built.append(envelope_for(saga, state, index, kind, 1))
        except Exception as exc:  # user code: nothing of the batch is sent
            step = step_at(saga, index)
            reason = f"building the {kind.value} raised {exc!r}"
            moved = changed(state, step_index=index, kind=kind, attempt=1, branches={})
            if kind is MessageKind.COMPENSATION:
                failure = Failure(
                    step=step.name, reason=reason, cause="compensation", original=state.failure
                )
                return fail(saga, moved, failure, now, log)
            from sagaflow.core.transitions import begin_compensation

            failure = Failure(step=step.name, reason=reason, cause="failure")
            return begin_compensation(saga, moved, failure, now, log, abandon_current=False)
    branches = dict(state.branches)
    for envelope in built:
        branch = _in_flight(saga, envelope, now, round_start=1)
        branches[str(envelope.step_index)] = branch
        _log_sent(saga, state, envelope, branch, now, log)
    sent = changed(state, branches=branches, awaiting=True, timer=None, updated_at=now)
    return Decision(sent, messages=tuple(built), log=tuple(log))


def _in_flight(saga: Saga[Any], envelope: Envelope, now: float, *, round_start: int) -> Branch:
    step = step_at(saga, envelope.step_index)
    timer = Timer(
        purpose="timeout",
        step_index=envelope.step_index,
        kind=envelope.kind,
        attempt=envelope.attempt,
        due_at=now + step.timeout,
    )
    return Branch(
        kind=envelope.kind,
        attempt=envelope.attempt,
        round_start=round_start,
        awaiting=True,
        timer=timer,
    )


def _log_sent(
    saga: Saga[Any],
    state: SagaState,
    envelope: Envelope,
    branch: Branch,
    now: float,
    log: list[LogEntry],
) -> None:
    event = (
        LogEvent.COMMAND_SENT
        if envelope.kind is MessageKind.COMMAND
        else LogEvent.COMPENSATION_SENT
    )
    detail = {"type": envelope.type, "message_id": envelope.message_id}
    log.append(
        log_entry(saga, _view(state, envelope.step_index, branch), now, event, detail=detail)
    )


def _resend(
    saga: Saga[Any],
    state: SagaState,
    index: int,
    branch: Branch,
    attempt: int,
    now: float,
    log: list[LogEntry],
) -> Decision:
    """Send attempt ``attempt`` of one branch (a retry, or after a timeout)."""
    try:
        envelope = envelope_for(saga, state, index, branch.kind, attempt)
    except Exception as exc:  # the data did not change since the first attempt: unlikely
        failure = Failure(
            step=step_at(saga, index).name,
            reason=f"building the {branch.kind.value} raised {exc!r}",
            cause="compensation" if branch.kind is MessageKind.COMPENSATION else "failure",
            original=state.failure if branch.kind is MessageKind.COMPENSATION else None,
        )
        if branch.kind is MessageKind.COMPENSATION:
            return fail(saga, state, failure, now, log)
        return group_failure(saga, state, failure, now, log, refused=None)
    sent = _in_flight(saga, envelope, now, round_start=branch.round_start)
    sent = sent.model_copy(update={"uncertain": branch.uncertain})
    state = changed(state, branches={**state.branches, str(index): sent}, updated_at=now)
    _log_sent(saga, state, envelope, sent, now, log)
    return Decision(state, messages=(envelope,), log=tuple(log))


def on_group_reply(saga: Saga[Any], state: SagaState, env: Envelope, now: float) -> Decision:
    """A reply while a group's branches (or their compensations) are in flight."""
    index = env.step_index
    branch = state.branches.get(str(index))
    if branch is None or env.for_kind is not branch.kind:
        return Decision(state, ignored="stale reply: the branch has settled")
    if env.attempt > branch.attempt:
        return Decision(state, rejected=f"forged attempt {env.attempt} > {branch.attempt}")
    if env.outcome is Outcome.ERROR and (env.attempt != branch.attempt or not branch.awaiting):
        return Decision(state, ignored="stale error reply from an earlier attempt")
    step = step_at(saga, index)
    log = [
        log_entry(
            saga,
            _view(state, index, branch),
            now,
            LogEvent.REPLY_RECEIVED,
            attempt=env.attempt,
            detail={"outcome": env.outcome.value if env.outcome else None, "reason": env.reason},
        )
    ]
    reason = env.reason or ("failed" if env.outcome is Outcome.FAILURE else "error")
    if branch.kind is MessageKind.COMPENSATION:
        if env.outcome is Outcome.SUCCESS:
            rest = {k: b for k, b in state.branches.items() if k != str(index)}
            return _compensations_progress(saga, changed(state, branches=rest), now, log)
        return _retry_compensation(saga, state, index, branch, now, log, reason, immediate=False)
    if env.outcome is Outcome.SUCCESS:
        try:
            reply = step.action.reply.model_validate(env.payload)
        except ValidationError as exc:
            return Decision(state, rejected=f"reply payload invalid for {step.action.type}: {exc}")
        data = state.data
        if step.on_reply is not None:
            try:
                merged = step.on_reply(saga.data_model.model_validate(state.data), reply)
                data = merged.model_dump(mode="json")
            except Exception as exc:  # user code: the branch took effect, so it is undone
                failure = Failure(
                    step=step.name, reason=f"on_reply raised {exc!r}", cause="failure"
                )
                return group_failure(saga, state, failure, now, log, refused=None)
        step_traces = state.step_traces
        if TRACEPARENT in env.trace:
            step_traces = {**step_traces, str(index): env.trace[TRACEPARENT]}
        rest = {k: b for k, b in state.branches.items() if k != str(index)}
        done = changed(
            state,
            data=data,
            completed=(*state.completed, index),
            step_traces=step_traces,
            branches=rest,
            updated_at=now,
        )
        if rest:
            return Decision(done, log=tuple(log))
        last = saga.groups[index][-1]
        after = changed(done, step_index=last, awaiting=False, timer=None)
        return enter(saga, after, last + 1, now, log)
    if env.outcome is Outcome.FAILURE:
        failure = Failure(step=step.name, reason=reason, cause="failure")
        return group_failure(saga, state, failure, now, log, refused=index)
    return _retry_command(saga, state, index, branch, now, log, reason, timed_out=False)


def on_group_timer(saga: Saga[Any], state: SagaState, now: float) -> Decision:
    """The earliest due branch timer: a retry to send, or a timeout."""
    due = [
        (b.timer.due_at, int(k), b)
        for k, b in state.branches.items()
        if b.timer is not None and b.timer.due_at <= now
    ]
    if not due:
        return Decision(state, ignored="timer not due yet")
    _, index, branch = min(due)
    assert branch.timer is not None
    if branch.timer.purpose == "retry":
        return _resend(saga, state, index, branch, branch.attempt, now, [])
    step = step_at(saga, index)
    log = [
        log_entry(
            saga,
            _view(state, index, branch),
            now,
            LogEvent.TIMED_OUT,
            detail={"timeout": step.timeout},
        )
    ]
    reason = f"no reply within {step.timeout:g}s"
    if branch.kind is MessageKind.COMPENSATION:
        return _retry_compensation(saga, state, index, branch, now, log, reason, immediate=True)
    return _retry_command(saga, state, index, branch, now, log, reason, timed_out=True)


def _retry_command(
    saga: Saga[Any],
    state: SagaState,
    index: int,
    branch: Branch,
    now: float,
    log: list[LogEntry],
    reason: str,
    *,
    timed_out: bool,
) -> Decision:
    step = step_at(saga, index)
    used = branch.attempt - branch.round_start + 1
    if timed_out:
        branch = branch.model_copy(update={"uncertain": True})
        state = changed(state, branches={**state.branches, str(index): branch})
    if used < step.retry.max_attempts:
        if timed_out:
            return _resend(saga, state, index, branch, branch.attempt + 1, now, log)
        delay = step.retry.backoff(used, seed(_view(state, index, branch)))
        return _schedule(saga, state, index, branch, delay, now, log, reason)
    cause = "timeout" if timed_out else "retries_exhausted"
    failure = Failure(step=step.name, reason=f"{reason} (after {used} attempts)", cause=cause)
    return group_failure(saga, state, failure, now, log, refused=None)


def _retry_compensation(
    saga: Saga[Any],
    state: SagaState,
    index: int,
    branch: Branch,
    now: float,
    log: list[LogEntry],
    reason: str,
    *,
    immediate: bool,
) -> Decision:
    step = step_at(saga, index)
    policy = step.compensation_retry
    used = branch.attempt - branch.round_start + 1
    if used < policy.max_attempts:
        if immediate:
            return _resend(saga, state, index, branch, branch.attempt + 1, now, log)
        delay = policy.backoff(used, seed(_view(state, index, branch)))
        return _schedule(saga, state, index, branch, delay, now, log, reason)
    failure = Failure(
        step=step.name,
        reason=f"compensation {compensation_type(step)} failed after {used} attempts: {reason}",
        cause="compensation",
        original=state.failure,
    )
    # the branches left wait for an operator's retry (resume_group)
    parked = {
        k: b.model_copy(update={"awaiting": False, "timer": None})
        for k, b in state.branches.items()
    }
    return fail(
        saga, changed(state, step_index=index, kind=branch.kind, branches=parked), failure, now, log
    )


def _schedule(
    saga: Saga[Any],
    state: SagaState,
    index: int,
    branch: Branch,
    delay: float,
    now: float,
    log: list[LogEntry],
    reason: str,
) -> Decision:
    attempt = branch.attempt + 1
    timer = Timer(
        purpose="retry", step_index=index, kind=branch.kind, attempt=attempt, due_at=now + delay
    )
    waiting = branch.model_copy(update={"attempt": attempt, "awaiting": False, "timer": timer})
    state = changed(state, branches={**state.branches, str(index): waiting}, updated_at=now)
    log.append(retry_scheduled(saga, _view(state, index, waiting), now, delay, reason))
    return Decision(state, log=tuple(log))


def group_failure(
    saga: Saga[Any],
    state: SagaState,
    failure: Failure,
    now: float,
    log: list[LogEntry],
    *,
    refused: int | None,
) -> Decision:
    """A branch failed for good (or the saga was cancelled): abandon the branches
    in flight, and undo the group's effective branches in parallel, then the
    earlier steps in reverse order. ``refused`` is the branch a participant
    refused: it took no effect, so it is not compensated."""
    members = saga.groups[state.step_index]
    in_flight = {int(k) for k, b in state.branches.items() if b.kind is MessageKind.COMMAND} - {
        refused
    }
    done = [i for i in state.completed if i in members]
    earlier = [i for i in state.completed if i not in members]
    group_undo = sorted({*done, *in_flight})
    nxt = changed(
        state,
        status=SagaStatus.COMPENSATING,
        failure=failure,
        to_compensate=(*group_undo, *reversed(earlier)),
        branches={},
        awaiting=False,
        waiting_for=None,
        timer=None,
        updated_at=now,
    )
    failing = state.step_index
    if failure.step is not None and failure.step in {saga.steps[i].name for i in members}:
        failing = saga.step_index(failure.step)  # the log names the branch that failed
    log.append(
        log_entry(
            saga,
            changed(nxt, step_index=failing),
            now,
            LogEvent.COMPENSATION_STARTED,
            detail={
                "cause": failure.cause,
                "reason": failure.reason,
                "undo": [saga.steps[i].name for i in nxt.to_compensate],
                "parallel": [saga.steps[i].name for i in group_undo],
            },
        )
    )
    return next_compensation(saga, nxt, now, log)


def compensate_group_batch(
    saga: Saga[Any], state: SagaState, now: float, log: list[LogEntry]
) -> Decision | None:
    """When the next steps to undo are members of one group: send their
    compensations together (``None`` otherwise: the caller goes one at a time)."""
    first = state.to_compensate[0]
    members = saga.groups.get(first)
    if members is None:
        return None
    batch: list[int] = []
    for index in state.to_compensate:
        if index not in members:
            break
        batch.append(index)
    if len(batch) < 2:
        return None
    rest = changed(state, to_compensate=state.to_compensate[len(batch) :], step_index=members[0])
    return send_branches(saga, rest, batch, MessageKind.COMPENSATION, now, log)


def _compensations_progress(
    saga: Saga[Any], state: SagaState, now: float, log: list[LogEntry]
) -> Decision:
    if state.branches:
        return Decision(changed(state, updated_at=now), log=tuple(log))
    return next_compensation(saga, changed(state, awaiting=False, updated_at=now), now, log)


def resume_group(saga: Saga[Any], state: SagaState, now: float, log: list[LogEntry]) -> Decision:
    """An operator's retry of a saga FAILED while undoing a group: send each branch
    left again, with a fresh retry budget."""
    messages: list[Envelope] = []
    branches: dict[str, Branch] = {}
    for key, branch in sorted(state.branches.items(), key=lambda kv: int(kv[0])):
        index, attempt = int(key), branch.attempt + 1
        envelope = envelope_for(saga, state, index, branch.kind, attempt)
        sent = _in_flight(saga, envelope, now, round_start=attempt)
        branches[key] = sent
        _log_sent(saga, state, envelope, sent, now, log)
        messages.append(envelope)
    resumed = changed(state, branches=branches, awaiting=True, timer=None, updated_at=now)
    return Decision(resumed, messages=tuple(messages), log=tuple(log))
