"""Signals, waits that time out, and deadlines: the engine's events from outside
the step sequence (see docs/concepts.md, "Waiting for a signal" and "Deadlines")."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError

from sagaflow.core.definition import Saga, Wait
from sagaflow.core.messages import MessageKind
from sagaflow.core.state import Failure, LogEvent, SagaState, SagaStatus
from sagaflow.core.transitions import (
    Decision,
    begin_compensation,
    changed,
    enter,
    log_entry,
    step_failed,
    take_signal,
)


@dataclass(frozen=True)
class SignalReceived:
    """A named signal sent from outside (``SagaClient.signal_saga``)."""

    name: str
    data: BaseModel | dict[str, Any]
    by: str
    reason: str


def on_signal(saga: Saga[Any], state: SagaState, event: SignalReceived, now: float) -> Decision:
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
    entry = log_entry(
        saga,
        changed(state, step_index=index, kind=MessageKind.COMMAND),
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
        kept = changed(state, signals={**state.signals, event.name: data}, updated_at=now)
        return Decision(kept, log=tuple(log))
    taken = take_signal(saga, state, wait, data, "signal", now, log)
    if isinstance(taken, Decision):
        return taken
    return enter(saga, taken, index + 1, now, log)


def wait_timed_out(saga: Saga[Any], state: SagaState, now: float) -> Decision:
    wait = saga.steps[state.step_index]
    assert isinstance(wait, Wait) and wait.timeout is not None
    default = wait.on_timeout
    log = [
        log_entry(
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
        return step_failed(saga, state, failure, now, log)
    taken = take_signal(saga, state, wait, default.model_dump(mode="json"), "timeout", now, log)
    if isinstance(taken, Decision):
        return taken
    return enter(saga, taken, state.step_index + 1, now, log)


def deadline_passed(saga: Saga[Any], state: SagaState, now: float) -> Decision:
    """Before the pivot the saga is cancelled by its deadline and compensates;
    after it (or already compensating) the deadline is recorded, nothing undone."""
    overdue = changed(state, overdue=True, updated_at=now)
    before_pivot = state.status is SagaStatus.RUNNING and state.step_index < saga.point_of_no_return
    log = [
        log_entry(
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
    return begin_compensation(
        saga, changed(overdue, waiting_for=None), failure, now, log, abandon_current=True
    )
