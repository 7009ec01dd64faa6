"""What ``sagaflow sagas`` shows: a saga's steps derived from its log, as JSON or tables.

The JSON documents built here are the stable shape scripts read (``--json``);
the rich tables are drawn from the same documents, so the two views never
disagree.

A saga's *steps* are the phases of its log in order: each forward command and
each compensation that was sent, with every attempt (when it was sent, when and
how it was answered, whether it timed out, the back-off before the next one),
and each step skipped because its ``when=`` condition was false (outcome
``skipped``, no attempts).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import orjson
from rich.console import Console
from rich.table import Table
from rich.text import Text

from sagaflow.cli.common import iso
from sagaflow.config import redact_url
from sagaflow.core.messages import MessageKind
from sagaflow.core.state import LogEntry, LogEvent, SagaState, SagaStatus

__all__ = [
    "jaeger_link",
    "render_list",
    "render_show",
    "saga_document",
    "saga_summary",
    "step_name",
    "steps",
    "trace_id",
    "undoing",
]

_TRACEPARENT = re.compile(r"^[0-9a-f]{2}-([0-9a-f]{32})-[0-9a-f]{16}-[0-9a-f]{2}$")
_ATTEMPT_EVENTS = frozenset(
    {
        LogEvent.STEP_SKIPPED,
        LogEvent.WAITING,
        LogEvent.WAIT_TIMED_OUT,
        LogEvent.COMMAND_SENT,
        LogEvent.COMPENSATION_SENT,
        LogEvent.REPLY_RECEIVED,
        LogEvent.TIMED_OUT,
        LogEvent.RETRY_SCHEDULED,
    }
)
_STATUS_STYLE = {
    SagaStatus.RUNNING: "cyan",
    SagaStatus.COMPENSATING: "yellow",
    SagaStatus.COMPLETED: "green",
    SagaStatus.COMPENSATED: "magenta",
    SagaStatus.FAILED: "bold red",
    SagaStatus.CANCELLED: "dim",
}
_OUTCOME_STYLE = {
    "success": "green",
    "failure": "red",
    "error": "yellow",
    "skipped": "dim",
    "signalled": "green",
    "timeout": "yellow",
    "pending": "cyan",
    "no_reply": "dim",
}


# --------------------------------------------------------------------------- documents


def trace_id(state: SagaState) -> str | None:
    """The W3C trace id of the saga (from its stored ``traceparent``), if any."""
    match = _TRACEPARENT.match(state.trace.get("traceparent", "").strip().lower())
    if match is None or set(match.group(1)) == {"0"}:
        return None
    return match.group(1)


def jaeger_link(jaeger_url: str | None, trace: str | None) -> str | None:
    """``{jaeger_url}/trace/{trace}`` when both are known, its password masked.

    The link is printed and pasted into tickets; a browser asks for the
    password of a protected Jaeger itself.
    """
    if not jaeger_url or not trace:
        return None
    return f"{redact_url(jaeger_url).rstrip('/')}/trace/{trace}"


def step_name(state: SagaState, log: Sequence[LogEntry]) -> str | None:
    """The name of the step the saga is at (or failed at), from its log.

    The state keeps only the step's index; the log names each step it sent a
    command or compensation for. A failure names its step itself.
    """
    for entry in reversed(log):
        if entry.step is not None and entry.step_index == state.step_index:
            return entry.step
    if state.failure is not None and state.failure.step is not None:
        return state.failure.step
    return None


def saga_summary(state: SagaState, *, step: str | None = None) -> dict[str, Any]:
    """One saga as ``sagas list --json`` prints it.

    Args:
        state: The saga.
        step: The name of its current step (:func:`step_name`), when known.
    """
    return {
        "saga_id": state.saga_id,
        "saga_name": state.saga_name,
        "saga_version": state.saga_version,
        "status": state.status.value,
        "step": step,
        "step_index": state.step_index,
        "kind": state.kind.value,
        "attempt": state.attempt,
        "awaiting": state.awaiting,
        "failure": None if state.failure is None else state.failure.model_dump(mode="json"),
        "trace_id": trace_id(state),
        "created_at": iso(state.created_at),
        "updated_at": iso(state.updated_at),
        "waiting_for": state.waiting_for,
        "deadline_at": iso(state.deadline_at) if state.deadline_at is not None else None,
        "overdue": state.overdue,
    }


def _seconds(start: float | None, end: float | None) -> float | None:
    if start is None or end is None:
        return None
    return round(max(0.0, end - start), 3)


class _Phase:
    """A step's command, or its compensation, with the attempts the log shows."""

    def __init__(self, entry: LogEntry) -> None:
        self.step = entry.step
        self.index = entry.step_index
        self.kind = entry.kind
        self.type: str | None = None
        self.attempts: dict[int, dict[str, Any]] = {}
        self.skipped_at: float | None = None  # its when= condition was false

    def attempt(self, number: int) -> dict[str, Any]:
        if number not in self.attempts:
            self.attempts[number] = {
                "attempt": number,
                "sent": None,
                "answered": None,
                "outcome": None,
                "reason": None,
                "timed_out": False,
                "retry_delay": None,
            }
        return self.attempts[number]

    def add(self, entry: LogEntry) -> None:
        number = entry.attempt or 1
        detail = entry.detail
        if entry.event is LogEvent.STEP_SKIPPED:
            self.skipped_at = entry.at
        elif entry.event is LogEvent.WAITING:
            self.type = f"signal {detail.get('signal')}"
            self.attempt(1)["sent"] = entry.at
        elif entry.event is LogEvent.SIGNAL_RECEIVED:
            record = self.attempt(1)
            record["answered"] = entry.at
            record["outcome"] = "signalled"
            record["reason"] = (
                "sent before the saga reached the wait"
                if detail.get("early")
                else f"by {detail.get('by')}: {detail.get('reason')}"
            )
        elif entry.event is LogEvent.WAIT_TIMED_OUT:
            record = self.attempt(1)
            record["answered"] = entry.at
            record["timed_out"] = True
            record["outcome"] = "timeout"
            default = detail.get("default")
            record["reason"] = f"no signal within {detail.get('timeout')}s" + (
                ", took the default" if default is not None else ""
            )
        elif entry.event in (LogEvent.COMMAND_SENT, LogEvent.COMPENSATION_SENT):
            self.type = detail.get("type") or self.type
            record = self.attempt(number)
            record["sent"] = record["sent"] if record["sent"] is not None else entry.at
        elif entry.event is LogEvent.REPLY_RECEIVED:
            record = self.attempt(number)
            record["answered"] = entry.at
            record["outcome"] = detail.get("outcome")
            record["reason"] = detail.get("reason")
        elif entry.event is LogEvent.TIMED_OUT:
            record = self.attempt(number)
            record["timed_out"] = True
            record["outcome"] = record["outcome"] or "timeout"
            record["reason"] = record["reason"] or f"no reply within {detail.get('timeout')}s"
        elif entry.event is LogEvent.RETRY_SCHEDULED:
            # logged with the attempt to come; the delay follows the one that failed
            previous = self.attempt(max(1, number - 1))
            previous["retry_delay"] = detail.get("delay")
            if previous["reason"] is None:
                previous["reason"] = detail.get("reason")

    def document(self, state: SagaState) -> dict[str, Any]:
        attempts = []
        for number in sorted(self.attempts):
            record = self.attempts[number]
            outcome = record["outcome"]
            if outcome is None:
                branch = state.branches.get(str(self.index))
                waiting = not state.status.terminal and (
                    (
                        branch is not None
                        and branch.awaiting
                        and branch.kind is self.kind
                        and branch.attempt == number
                    )
                    or (
                        not state.branches
                        and state.awaiting
                        and state.step_index == self.index
                        and state.kind is self.kind
                        and state.attempt == number
                    )
                )
                outcome = "pending" if waiting else "no_reply"
            attempts.append(
                {
                    "attempt": number,
                    "sent_at": iso(record["sent"]),
                    "answered_at": iso(record["answered"]),
                    "duration": _seconds(record["sent"], record["answered"]),
                    "outcome": outcome,
                    "reason": record["reason"],
                    "timed_out": record["timed_out"],
                    "retry_delay": record["retry_delay"],
                }
            )
        if self.skipped_at is not None:
            return {
                "step": self.step,
                "step_index": self.index,
                "kind": self.kind.value if self.kind is not None else None,
                "type": None,
                "outcome": "skipped",
                "attempts": [],
                "started_at": None,
                "finished_at": iso(self.skipped_at),
                "duration": None,
            }
        sent = [r["sent"] for r in self.attempts.values() if r["sent"] is not None]
        last = self.attempts[max(self.attempts)] if self.attempts else None
        finished = last["answered"] if last is not None else None
        return {
            "step": self.step,
            "step_index": self.index,
            "kind": self.kind.value if self.kind is not None else None,
            "type": self.type,
            "outcome": attempts[-1]["outcome"] if attempts else "pending",
            "attempts": attempts,
            "started_at": iso(min(sent)) if sent else None,
            "finished_at": iso(finished),
            "duration": _seconds(min(sent) if sent else None, finished),
        }


def steps(state: SagaState, log: Sequence[LogEntry]) -> list[dict[str, Any]]:
    """The saga's commands and compensations in the order they began, with attempts."""
    phases: dict[tuple[int | None, MessageKind | None], _Phase] = {}
    for entry in log:
        taken = entry.event is LogEvent.SIGNAL_RECEIVED and not entry.detail.get("kept")
        if entry.event not in _ATTEMPT_EVENTS and not taken:
            continue
        key = (entry.step_index, entry.kind)
        if key not in phases:
            phases[key] = _Phase(entry)
        phases[key].add(entry)
    return [phase.document(state) for phase in phases.values()]


def _log_entry(entry: LogEntry) -> dict[str, Any]:
    return {
        "at": iso(entry.at),
        "event": entry.event.value,
        "step": entry.step,
        "step_index": entry.step_index,
        "kind": entry.kind.value if entry.kind is not None else None,
        "attempt": entry.attempt,
        "detail": entry.detail,
    }


def _timer(state: SagaState) -> dict[str, Any] | None:
    if state.timer is None:
        return None
    timer = state.timer.model_dump(mode="json")
    timer["due_at"] = iso(state.timer.due_at)
    return timer


def saga_document(
    state: SagaState, log: Sequence[LogEntry], *, jaeger_url: str | None = None
) -> dict[str, Any]:
    """One saga as ``sagas show --json`` prints it: state, steps and the raw log."""
    trace = trace_id(state)
    document = saga_summary(state, step=step_name(state, log))
    document.update(
        {
            "data": state.data,
            "completed_steps": list(state.completed),
            "skipped_steps": list(state.skipped),
            "fingerprint": state.fingerprint,
            "to_compensate": list(state.to_compensate),
            "cancelled": state.cancelled,
            "timer": _timer(state),
            "version": state.version,
            "jaeger_url": jaeger_link(jaeger_url, trace),
            "steps": steps(state, log),
            "log": [_log_entry(entry) for entry in log],
        }
    )
    return document


# --------------------------------------------------------------------------- tables


def _status(status: str) -> Text:
    return Text(status, style=_STATUS_STYLE.get(SagaStatus(status), ""))


def render_list(console: Console, summaries: Sequence[dict[str, Any]]) -> None:
    """A table of sagas (``sagas list``)."""
    if not summaries:
        console.print("no sagas", style="dim")
        return
    table = Table(box=None, header_style="bold", pad_edge=False)

    def widest(key: str) -> int:
        return max(len(str(row[key])) for row in summaries)

    # ids, names and statuses are what people copy and scan: never cut them
    table.add_column("SAGA ID", no_wrap=True, min_width=widest("saga_id"))
    table.add_column("NAME", no_wrap=True, min_width=widest("saga_name"))
    table.add_column("VER", no_wrap=True)
    table.add_column("STATUS", no_wrap=True, min_width=widest("status"))
    table.add_column("STEP", overflow="fold")
    table.add_column("TRY", no_wrap=True)
    table.add_column("UPDATED", no_wrap=True)
    table.add_column("REASON", overflow="fold")
    for row in summaries:
        failure = row["failure"]
        table.add_row(
            row["saga_id"],
            row["saga_name"],
            str(row["saga_version"]),
            _status(row["status"]),
            _step_cell(row),
            str(row["attempt"]),
            row["updated_at"].replace("T", " ")[:19],
            "" if failure is None else failure["reason"],
        )
    console.print(table)


def undoing(summary: dict[str, Any]) -> bool:
    """Whether the saga's step is being (or failed to be) compensated, not run."""
    return summary["kind"] == MessageKind.COMPENSATION.value and summary["status"] in (
        SagaStatus.COMPENSATING.value,
        SagaStatus.FAILED.value,
    )


def _step_cell(row: dict[str, Any]) -> str:
    """``reserve_hotel``, or ``reserve_hotel (compensation)`` while undoing it."""
    name = row["step"] if row["step"] is not None else f"#{row['step_index']}"
    if row.get("waiting_for"):
        return f"{name} (waiting for {row['waiting_for']})"
    return f"{name} (compensation)" if undoing(row) else name


def _offset(start: str | None, at: str | None) -> str:
    """``+1.234s`` from the saga's creation, from the ISO strings of the document."""
    if start is None or at is None:
        return ""
    delta = datetime.fromisoformat(at) - datetime.fromisoformat(start)
    return f"+{delta.total_seconds():.3f}s"


def render_show(console: Console, doc: dict[str, Any]) -> None:
    """A saga's header, data, steps and operator-visible events (``sagas show``)."""
    head = Text()
    head.append(f"{doc['saga_name']} v{doc['saga_version']}  ", style="bold")
    head.append_text(_status(doc["status"]))
    console.print(head)
    facts = Table.grid(padding=(0, 2))
    facts.add_column(style="dim")
    facts.add_column(overflow="fold")
    facts.add_row("saga id", doc["saga_id"])
    facts.add_row("created", doc["created_at"])
    facts.add_row("updated", doc["updated_at"])
    failure = doc["failure"]
    if failure is not None:
        where = f"step {failure['step']}: " if failure.get("step") else ""
        facts.add_row("failure", Text(f"{where}{failure['reason']} ({failure['cause']})", "red"))
    if doc["trace_id"]:
        facts.add_row("trace id", doc["trace_id"])
    if doc["jaeger_url"]:
        facts.add_row("jaeger", doc["jaeger_url"])
    console.print(facts)
    # the data whole, one field a line, never wrapped into or cut by a table cell:
    # operators copy values out of it
    console.print("data", style="dim")
    data = orjson.dumps(doc["data"], option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS)
    for line in data.decode().splitlines():
        console.print(Text(line), soft_wrap=True)

    console.print()
    table = Table(title="steps", title_justify="left", header_style="bold", show_lines=False)
    for column in ("#", "STEP", "KIND", "ACTION", "ATTEMPT", "SENT", "TOOK", "OUTCOME", "REASON"):
        # long values fold onto the next line; nothing is cut to "…"
        table.add_column(column, overflow="fold")
    for step in doc["steps"]:
        if step["outcome"] == "skipped":
            table.add_row(
                str(step["step_index"]),
                step["step"] or "",
                step["kind"] or "",
                "",
                "",
                _offset(doc["created_at"], step["finished_at"]),
                "",
                Text("skipped", style="dim"),
                "condition (when=) was false",
            )
        for attempt in step["attempts"]:
            took = "" if attempt["duration"] is None else f"{attempt['duration']:.3f}s"
            reason = attempt["reason"] or ""
            if attempt["retry_delay"] is not None:
                reason = f"{reason} (retry in {attempt['retry_delay']}s)".strip()
            table.add_row(
                str(step["step_index"]),
                step["step"] or "",
                step["kind"] or "",
                step["type"] or "",
                str(attempt["attempt"]),
                _offset(doc["created_at"], attempt["sent_at"]),
                took,
                Text(attempt["outcome"], style=_OUTCOME_STYLE.get(attempt["outcome"], "")),
                reason,
            )
    console.print(table)

    notable = [e for e in doc["log"] if e["event"] not in {ev.value for ev in _ATTEMPT_EVENTS}]
    if notable:
        events = Table(title="events", title_justify="left", header_style="bold")
        for column in ("AT", "EVENT", "STEP", "DETAIL"):
            events.add_column(column, overflow="fold")
        for entry in notable:
            detail = {k: v for k, v in entry["detail"].items() if k != "data"}
            events.add_row(
                _offset(doc["created_at"], entry["at"]),
                entry["event"],
                entry["step"] or "",
                orjson.dumps(detail).decode() if detail else "",
            )
        console.print(events)
