"""What a saga's page shows, derived from its state, its log and its definition.

The definition (from the code the dashboard was given, else the shape the
store recorded when a coordinator first ran that version) is drawn as its steps in
order, each with its live state: ``done``, ``running``, ``failed``,
``compensating``, ``compensated``, ``skipped`` (its ``when=`` was false),
``waiting`` (for its signal),
``pending`` (not reached) or ``not run``
(never reached: the saga ended before it). Without the definition the steps
are those the log names.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

import orjson

from sagaflow.cli.render import saga_document, undoing
from sagaflow.core.definition import Saga
from sagaflow.core.messages import MessageKind
from sagaflow.core.state import LogEntry, SagaState, SagaStatus

__all__ = ["saga_view", "step_states"]

_OPERATOR_EVENTS = {"cancel_requested", "retry_requested", "dead_letter_replayed"}


Definition = Sequence[tuple[str, bool]]
"""A definition as the drawing needs it: each step's name and whether it can be undone."""


def definition_of(saga: Saga[Any] | None, shape: dict[str, Any] | None) -> Definition | None:
    """From the saga's code, else from the shape the store recorded for its version."""
    if saga is not None:
        # read by name, not by type: a step kind sagaflow learns later still draws
        return [
            (str(getattr(step, "name", step)), getattr(step, "compensation", None) is not None)
            for step in saga.steps
        ]
    if shape is not None and isinstance(shape.get("steps"), list):
        return [
            (str(step.get("name")), step.get("compensation") is not None)
            for step in shape["steps"]
            if isinstance(step, dict)
        ]
    return None


def step_states(
    definition: Definition | None, state: SagaState, phases: Sequence[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Each step of the saga with its live state, in declaration order."""
    forward = {p["step_index"]: p for p in phases if p["kind"] == MessageKind.COMMAND.value}
    undo = {p["step_index"]: p for p in phases if p["kind"] == MessageKind.COMPENSATION.value}
    if definition is not None:
        names = [(i, name, undoable) for i, (name, undoable) in enumerate(definition)]
    else:
        seen = sorted({p["step_index"] for p in phases if p["step_index"] is not None})
        names = [
            (i, forward.get(i, undo.get(i, {})).get("step") or f"#{i}", i in undo) for i in seen
        ]
    terminal = state.status.terminal
    drawn = []
    for index, name, undoable in names:
        drawn.append(
            {
                "index": index,
                "name": name,
                "undoable": undoable,
                "state": _state_of(
                    index, name, state, forward.get(index), undo.get(index), terminal
                ),
                "attempts": len(forward[index]["attempts"]) if index in forward else 0,
                "compensation_attempts": len(undo[index]["attempts"]) if index in undo else 0,
            }
        )
    return drawn


def _state_of(
    index: int,
    name: str,
    state: SagaState,
    forward: dict[str, Any] | None,
    undo: dict[str, Any] | None,
    terminal: bool,
) -> str:
    if undo is not None:
        if undo["outcome"] == "success":
            return "compensated"
        if state.status is SagaStatus.FAILED and state.step_index == index:
            return "failed"
        return "compensating"
    if forward is not None and forward["outcome"] == "skipped":
        return "skipped"  # its when= condition was false
    if state.failure is not None and state.failure.step == name and state.step_index == index:
        return "failed"
    if state.waiting_for is not None and not terminal and state.step_index == index:
        return "waiting"  # for its signal
    if index in state.completed:
        return "done"
    if forward is not None and not terminal and state.step_index == index:
        return "running"
    if forward is not None and forward["outcome"] == "success":
        return "done"
    if forward is not None and forward["outcome"] in ("failure", "error", "timeout", "no_reply"):
        return "failed"  # refused, or abandoned after its attempts
    return "not run" if terminal else "pending"


def _offset(start: str | None, at: str | None) -> str:
    if start is None or at is None:
        return ""
    delta = datetime.fromisoformat(at) - datetime.fromisoformat(start)
    return f"+{delta.total_seconds():.3f}s"


def _rest(detail: dict[str, Any]) -> str:
    rest = {k: v for k, v in detail.items() if k not in ("by", "reason", "outcome")}
    return orjson.dumps(rest).decode() if rest else ""


def _signal_names(signals: Sequence[str], state: SagaState) -> list[str]:
    """The signals the saga can still take: the one it waits for first."""
    names = [state.waiting_for] if state.waiting_for else []
    names += [n for n in signals if n not in names and state.signalled.get(n) is None]
    return names


def saga_view(
    definition: Definition | None,
    state: SagaState,
    log: Sequence[LogEntry],
    *,
    jaeger_url: str | None,
    saga_signals: Sequence[str] = (),
) -> dict[str, Any]:
    """The saga's document (as ``sagas show --json``) plus the drawing and the timeline."""
    doc = saga_document(state, log, jaeger_url=jaeger_url)
    # the data as stored, for people: not through a template's HTML-safe JSON,
    # which would show "<" as "\u003c"
    doc["data_json"] = orjson.dumps(doc["data"], option=orjson.OPT_INDENT_2).decode()
    doc["undoing"] = undoing(doc)
    doc["drawing"] = step_states(definition, state, doc["steps"])
    doc["timeline"] = [
        {
            **entry,
            "offset": _offset(doc["created_at"], entry["at"]),
            "operator": entry["event"] in _OPERATOR_EVENTS,
            "by": entry["detail"].get("by"),
            "why": entry["detail"].get("reason"),
            "outcome": entry["detail"].get("outcome"),
            # the rest of the entry (a command's type, a retry's delay, a signal's
            # data...), as stored
            "extra": _rest(entry["detail"]),
        }
        for entry in doc["log"]
    ]
    doc["can_retry"] = state.status is SagaStatus.FAILED
    doc["can_cancel"] = state.status is SagaStatus.RUNNING
    doc["can_signal"] = state.status is SagaStatus.RUNNING
    doc["signal_names"] = _signal_names(saga_signals, state)
    doc["definition_known"] = definition is not None
    return doc
