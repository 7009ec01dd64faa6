"""What a saga did, read from its log, and what it is waiting for: the text of
the harness's assertions and time-outs."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sagaflow.core.definition import Saga
from sagaflow.core.messages import MessageKind
from sagaflow.core.state import LogEntry, LogEvent, SagaState, SagaStatus

__all__ = ["SagaHistory", "describe"]


@dataclass(frozen=True)
class SagaHistory:
    """A saga's outcome in the terms a test asserts on.

    Attributes:
        saga_id: The saga.
        status: Its status now.
        steps: The steps whose action succeeded, in the order they did.
        compensations: The steps whose compensation succeeded, in order.
        events: Every log event, in order (``"saga_started"``, ``"command_sent"``...).
        reason: Why it left the happy path, if it did.
        log: The log entries themselves.
    """

    saga_id: str
    status: SagaStatus
    steps: tuple[str, ...]
    compensations: tuple[str, ...]
    events: tuple[str, ...]
    reason: str | None
    log: tuple[LogEntry, ...]

    @classmethod
    def of(cls, state: SagaState, log: Sequence[LogEntry]) -> SagaHistory:
        steps: list[str] = []
        compensations: list[str] = []
        for entry in log:
            if entry.event is not LogEvent.REPLY_RECEIVED or entry.step is None:
                continue
            if entry.detail.get("outcome") != "success":
                continue
            if entry.kind is MessageKind.COMPENSATION:
                compensations.append(entry.step)
            else:
                steps.append(entry.step)
        return cls(
            saga_id=state.saga_id,
            status=state.status,
            steps=tuple(steps),
            compensations=tuple(compensations),
            events=tuple(str(entry.event.value) for entry in log),
            reason=None if state.failure is None else state.failure.reason,
            log=tuple(log),
        )

    def mismatches(
        self,
        *,
        status: SagaStatus | None = None,
        steps: Sequence[str] | None = None,
        compensations: Sequence[str] | None = None,
        events: Sequence[str] | None = None,
        reason: str | None = None,
    ) -> list[str]:
        """One line per expectation the saga does not meet."""
        wrong: list[str] = []
        if status is not None and self.status != status:
            wrong.append(f"saga {self.saga_id}: status is {self.status}, expected {status}")
        if steps is not None and tuple(steps) != self.steps:
            wrong.append(f"saga {self.saga_id}: steps {list(self.steps)}, expected {list(steps)}")
        if compensations is not None and tuple(compensations) != self.compensations:
            wrong.append(
                f"saga {self.saga_id}: compensations {list(self.compensations)},"
                f" expected {list(compensations)}"
            )
        if events is not None and not _in_order(events, self.events):
            wrong.append(
                f"saga {self.saga_id}: events {list(self.events)} do not include"
                f" {list(events)} in that order"
            )
        if reason is not None and self.reason != reason:
            wrong.append(f"saga {self.saga_id}: reason is {self.reason!r}, expected {reason!r}")
        return wrong

    def render(self) -> str:
        """The log as a timeline, one line per entry."""
        lines = [
            f"saga {self.saga_id}: {self.status}" + (f" ({self.reason})" if self.reason else "")
        ]
        start = self.log[0].at if self.log else 0.0
        for entry in self.log:
            where = "" if entry.step is None else f" {entry.step}"
            kind = "" if entry.kind is None else f" {entry.kind.value}"
            attempt = "" if entry.attempt is None else f" #{entry.attempt}"
            detail = {k: v for k, v in entry.detail.items() if k != "message_id" and v is not None}
            extra = f" {detail}" if detail else ""
            lines.append(
                f"  +{entry.at - start:8.3f}s {entry.event.value}{where}{kind}{attempt}{extra}"
            )
        return "\n".join(lines)


def _in_order(wanted: Sequence[str], events: Sequence[str]) -> bool:
    remaining = iter(events)
    return all(any(event == want for event in remaining) for want in wanted)


def describe(state: SagaState, saga: Saga[Any] | None, now: float) -> str:
    """One line: the saga, its state, and what it is waiting for."""
    head = f"saga {state.saga_id} ({state.saga_name}) is {state.status}"
    if state.status.terminal:
        reason = "" if state.failure is None else f": {state.failure.reason}"
        return head + reason
    step: Any = None
    if saga is not None and 0 <= state.step_index < len(saga.steps):
        step = saga.steps[state.step_index]
    name = getattr(step, "name", f"#{state.step_index}")
    compensating = state.kind is MessageKind.COMPENSATION
    action = getattr(step, "compensation" if compensating else "action", None)
    what = getattr(action, "type", state.kind.value)
    signal = getattr(state, "waiting_for", None)  # a wait step (sagas with waits)
    if signal and not compensating:
        text = f"{head} at step {name!r}, waiting for the signal {signal!r}"
    elif state.awaiting:
        text = (
            f"{head} at step {name!r}, waiting for the reply to {what}"
            f" ({state.kind.value}, attempt {state.attempt})"
        )
    else:
        text = f"{head} at step {name!r}, about to send {what} (attempt {state.attempt})"
    timer = state.timer
    if timer is not None:
        text += f"; its {timer.purpose} timer is due in {timer.due_at - now:g}s of test time"
    elif state.awaiting or signal:
        text += "; no timer is set"
    deadline = getattr(state, "deadline_at", None)
    if isinstance(deadline, float | int):
        text += f"; its deadline is in {deadline - now:g}s"
    return text
