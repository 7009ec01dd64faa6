"""The persisted state of a saga instance and the entries of its log."""

from __future__ import annotations

from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from sagaflow.core.messages import MessageKind


class SagaStatus(StrEnum):
    """Where a saga is. COMPLETED, COMPENSATED, FAILED and CANCELLED are terminal."""

    RUNNING = "RUNNING"
    COMPENSATING = "COMPENSATING"
    COMPLETED = "COMPLETED"
    COMPENSATED = "COMPENSATED"
    FAILED = "FAILED"  # needs an operator: `sagaflow sagas retry <id>` resumes it
    CANCELLED = "CANCELLED"

    @property
    def terminal(self) -> bool:
        return self in _TERMINAL


_TERMINAL = frozenset(
    {SagaStatus.COMPLETED, SagaStatus.COMPENSATED, SagaStatus.FAILED, SagaStatus.CANCELLED}
)


class Timer(BaseModel):
    """The one timer a saga can have pending: a step timeout or a retry back-off."""

    model_config = ConfigDict(frozen=True)

    purpose: Literal["timeout", "retry", "wait"]
    step_index: int
    kind: MessageKind
    attempt: int
    due_at: float


class Branch(BaseModel):
    """One step of a parallel group in progress: its message, attempt and timer."""

    model_config = ConfigDict(frozen=True)

    kind: MessageKind
    attempt: int
    round_start: int
    awaiting: bool
    timer: Timer | None = None
    uncertain: bool = False


class Failure(BaseModel):
    """Why a saga left the happy path."""

    model_config = ConfigDict(frozen=True)

    step: str | None
    reason: str
    cause: Literal[
        "failure", "timeout", "retries_exhausted", "cancelled", "compensation", "deadline"
    ]
    # for a compensation that failed: the failure that made the saga compensate,
    # which becomes the saga's reason again once an operator's retry resumes it
    original: Failure | None = None


class SagaState(BaseModel):
    """Everything the engine needs to decide the next move of one saga.

    ``step_index``/``kind``/``attempt`` name the message the saga is waiting on
    (or about to retry). ``to_compensate`` is the stack of steps still to undo,
    next first. ``round_start`` is the first attempt of the current retry round,
    so an operator's retry gets a fresh budget without reusing attempt numbers.
    ``uncertain`` says an attempt of the current round timed out (it may still
    take effect). ``generation`` counts operator retries after a business
    failure: it renews the command ids, since the participant stored the refusal.
    ``skipped`` lists the steps whose ``when=`` condition was false (never sent,
    never compensated). ``fingerprint`` is the fingerprint of the definition the
    saga started on (empty for sagas started before sagaflow recorded it).
    ``signals`` keeps signals that arrived before the saga reached their wait
    (validated data by signal name); ``signalled`` names the signals a wait has
    taken, with how (``signal`` or ``timeout``), so that a second one is ignored.
    ``branches`` holds the steps of a parallel group in progress, by index (the
    saga's own ``step_index`` is then the group's first step, its ``timer``
    unused). ``waiting_for`` names the signal the saga waits for at its current step.
    ``deadline_at`` is when the saga should be finished; ``overdue`` says the
    deadline passed (after the pivot: recorded, nothing undone).
    ``trace`` is the W3C context of the saga's start span; ``step_traces`` keeps,
    per completed step, the ``traceparent`` its reply came with, so the
    compensation that undoes the step can link to it.
    """

    model_config = ConfigDict(frozen=True)

    saga_id: str
    saga_name: str
    saga_version: int
    status: SagaStatus
    data: dict[str, Any]
    step_index: int = 0
    kind: MessageKind = MessageKind.COMMAND
    attempt: int = 1
    round_start: int = 1
    uncertain: bool = False
    generation: int = 0
    awaiting: bool = False
    completed: tuple[int, ...] = ()
    skipped: tuple[int, ...] = ()
    to_compensate: tuple[int, ...] = ()
    failure: Failure | None = None
    cancelled: bool = False
    timer: Timer | None = None
    trace: dict[str, str] = Field(default_factory=dict)
    step_traces: dict[str, str] = Field(default_factory=dict)
    created_at: float
    updated_at: float
    version: int = 0
    fingerprint: str = ""
    signals: dict[str, dict[str, Any]] = Field(default_factory=dict)
    signalled: dict[str, str] = Field(default_factory=dict)
    waiting_for: str | None = None
    branches: dict[str, Branch] = Field(default_factory=dict)
    deadline_at: float | None = None
    overdue: bool = False

    @property
    def wake_at(self) -> float | None:
        """When the timer loop must look at the saga: its timer or its deadline,
        whichever comes first (one column for the store to scan)."""
        if self.status.terminal:
            return None
        due = None if self.timer is None else self.timer.due_at
        for branch in self.branches.values():
            if branch.timer is not None and (due is None or branch.timer.due_at < due):
                due = branch.timer.due_at
        if self.deadline_at is not None and not self.overdue:
            due = self.deadline_at if due is None else min(due, self.deadline_at)
        return due


class LogEvent(StrEnum):
    """The kinds of entries in a saga's log."""

    STARTED = "saga_started"
    COMMAND_SENT = "command_sent"
    WAITING = "waiting"  # reached a wait: waiting for its signal
    SIGNAL_RECEIVED = "signal_received"  # kept (early) or taken by the wait
    WAIT_TIMED_OUT = "wait_timed_out"
    DEADLINE_PASSED = "deadline_passed"
    STEP_SKIPPED = "step_skipped"  # its when= condition was false
    COMPENSATION_SENT = "compensation_sent"
    REPLY_RECEIVED = "reply_received"
    RETRY_SCHEDULED = "retry_scheduled"
    TIMED_OUT = "timed_out"
    COMPENSATION_STARTED = "compensation_started"
    CANCEL_REQUESTED = "cancel_requested"
    RETRY_REQUESTED = "retry_requested"
    DEAD_LETTER_REPLAYED = "dead_letter_replayed"  # an operator re-sent a dead letter
    COMPLETED = "saga_completed"
    COMPENSATED = "saga_compensated"
    FAILED = "saga_failed"
    CANCELLED = "saga_cancelled"


class LogEntry(BaseModel):
    """One line of a saga's append-only log."""

    model_config = ConfigDict(frozen=True)

    saga_id: str
    at: float
    event: LogEvent
    step: str | None = None
    step_index: int | None = None
    kind: MessageKind | None = None
    attempt: int | None = None
    detail: dict[str, Any] = Field(default_factory=dict)
