"""One saga, one trace, across real processes: the example shop exporting to an OTLP receiver.

The coordinator, the three workers and the order service run as OS processes
(``services.stack.Stack``) with ``OTEL_EXPORTER_OTLP_ENDPOINT`` pointing at an
OTLP/HTTP receiver this test runs on loopback; the spans are decoded with
opentelemetry-proto, as Jaeger would receive them, and the whole tree is
checked. Waits poll for a condition (spans arrived, a saga settled), never for
a duration.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from sagaflow import SagaStatus
from sagaflow.tracing import trace_id_of
from services.stack import Stack, free_port
from tests.e2e.otlp_receiver import OtlpReceiver, ReceivedSpan

pytestmark = pytest.mark.e2e

COMMANDS = "sagaflow.commands"
REPLIES = "sagaflow.replies"
_OWN = {"BEGIN", "BEGIN;", "COMMIT", "COMMIT;", "SAVEPOINT", "RELEASE", "ROLLBACK"}
SAGA = "create-order"
STEPS = {  # step -> participant service, in saga order
    "validate": "order",
    "reserve": "inventory",
    "charge": "payment",
    "schedule": "shipping",
    "approve": "order",
}
COORDINATOR = "sagaflow-coordinator"
GOOD = {"customer_id": "cust-1", "sku": "sku-widget", "quantity": 1, "amount": 1000}


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as running:
        yield running


def otel_env(receiver: OtlpReceiver) -> dict[str, str]:
    return {
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
        "OTEL_BSP_SCHEDULE_DELAY": "200",
        "OTEL_METRIC_EXPORT_INTERVAL": "1000",
        "OTEL_TRACES_SAMPLER": "parentbased_always_on",
    }


class Trace:
    """The spans of one trace as received, with the lookups the assertions need."""

    def __init__(self, spans: list[ReceivedSpan]) -> None:
        self.spans = spans
        self.by_id = {s.span_id: s for s in spans}

    def find(self, name: str, **attributes: Any) -> list[ReceivedSpan]:
        return [
            s
            for s in self.spans
            if s.name == name and all(s.attr(k) == v for k, v in attributes.items())
        ]

    def one(self, name: str, **attributes: Any) -> ReceivedSpan:
        found = self.find(name, **attributes)
        assert len(found) == 1, (name, attributes, [(s.service, s.attributes) for s in found])
        return found[0]

    def parent(self, span: ReceivedSpan) -> ReceivedSpan:
        assert span.parent_id in self.by_id, f"{span.name}: parent {span.parent_id} not in trace"
        return self.by_id[span.parent_id]

    def roots(self) -> list[ReceivedSpan]:
        return [s for s in self.spans if s.parent_id not in self.by_id]


def message_chain_names(step: str) -> list[str]:
    service = STEPS[step]
    return [
        f"send {COMMANDS}:{service}",
        f"process {COMMANDS}:{service}:sagaflow.service.{service}",
        f"send {REPLIES}:reply",
        f"process {REPLIES}:reply:{REPLIES}",
    ]


def has_chain(spans: list[ReceivedSpan], saga_id: str, step: str, kind: str) -> bool:
    names = message_chain_names(step)
    key = "saga.kind"
    found = 0
    for i, name in enumerate(names):
        wanted = {"saga.id": saga_id, "saga.step": step}
        wanted["saga.reply_to" if i >= 2 else key] = kind
        if any(s.name == name and all(s.attr(k) == v for k, v in wanted.items()) for s in spans):
            found += 1
    return found == len(names)


def complete(
    spans: list[ReceivedSpan], saga_id: str, end: str, chains: list[tuple[str, str]]
) -> bool:
    """Every span the saga's trace must hold has arrived (from every process)."""
    return any(s.name == end and s.attr("saga.id") == saga_id for s in spans) and all(
        has_chain(spans, saga_id, step, kind) for step, kind in chains
    )


def check_chain(t: Trace, start: ReceivedSpan, saga_id: str, step: str, kind: str) -> None:
    """send -> process (worker, SQL beneath) -> send reply -> process reply, parented in turn."""
    service = STEPS[step]
    names = message_chain_names(step)
    ident = {"saga.id": saga_id, "saga.step": step}
    sends = t.find(names[0], **ident, **{"saga.kind": kind})
    assert sends, (step, kind)
    for send in sends:  # a retried or re-published command has more than one
        assert send.kind == "PRODUCER" and send.service == COORDINATOR
        assert t.parent(send) is start
        assert send.attr("messaging.system") == "rabbitmq"
        assert send.attr("messaging.operation.type") == "send"
        assert send.attr("messaging.destination.name") == f"{COMMANDS}:{service}"
        assert send.attr("messaging.rabbitmq.destination.routing_key") == service
        assert send.attr("messaging.message.conversation_id") == saga_id
        assert (
            send.attr("messaging.message.id")
            == f"{saga_id}:{step}:{kind}:{send.attr('saga.attempt')}"
        )
        assert send.attr("saga.name") == SAGA
    # at-least-once: a redelivered command or reply is one more span, parented alike
    processes = t.find(names[1], **ident, **{"saga.kind": kind})
    assert any(p.attr("saga.outcome") == "success" for p in processes), (step, kind)
    for process in processes:
        assert process.kind == "CONSUMER" and process.service == service
        assert t.parent(process) in sends
        assert process.attr("messaging.operation.type") == "process"
        assert process.attr("messaging.destination.name") == (
            f"{COMMANDS}:{service}:sagaflow.service.{service}"
        )
        queries = [s for s in t.spans if s.parent_id == process.span_id and s.kind == "CLIENT"]
        assert queries, f"no database spans beneath {process.name}"
        for query in queries:
            assert query.service == service
            assert "postgresql" in (query.attr("db.system"), query.attr("db.system.name"))
            assert not any("parameters" in key for key in query.attributes), query.attributes
            statement = str(query.attr("db.statement") or query.attr("db.query.text"))
            # the handler's own queries, not the worker's transaction or inbox
            assert ".inbox" not in statement and query.name not in _OWN, statement
    replies = t.find(names[2], **ident, **{"saga.reply_to": kind})
    assert replies, (step, kind)
    for reply in replies:
        assert reply.kind == "PRODUCER" and reply.service == service
        assert t.parent(reply) in processes
        assert reply.attr("messaging.destination.name") == f"{REPLIES}:reply"
    handled = t.find(names[3], **ident, **{"saga.reply_to": kind})
    assert any(h.attr("saga.outcome") == "success" for h in handled), (step, kind)
    for span in handled:
        assert span.kind == "CONSUMER" and span.service == COORDINATOR
        assert t.parent(span) in replies
        assert span.attr("messaging.destination.name") == f"{REPLIES}:reply:{REPLIES}"


def the_trace(receiver: OtlpReceiver, state_trace: dict[str, str], saga_id: str) -> Trace:
    trace_id = trace_id_of(state_trace)
    assert trace_id is not None, "the saga stored no trace context"
    spans = receiver.trace(trace_id)
    # every span about this saga, from every process, is in its one trace
    strays = [
        s.name for s in receiver.spans if s.attr("saga.id") == saga_id and s.trace_id != trace_id
    ]
    assert not strays, strays
    return Trace(spans)


def check_rooted_at_the_request(t: Trace, saga_id: str) -> ReceivedSpan:
    [root] = t.roots()
    assert root.name == "POST /orders" and root.kind == "SERVER" and root.service == "order"
    assert root.parent_id == ""
    start = t.one(f"saga start {SAGA}")
    assert t.parent(start) is root and start.service == "order"
    assert start.attr("saga.id") == saga_id
    return start


async def test_completed_and_compensated_sagas_are_one_trace_each(
    amqp_url: str, pg_url: str, tmp_path: Path, receiver: OtlpReceiver
) -> None:
    async with Stack(
        amqp_url, pg_url, log_dir=tmp_path / "logs", env_extra=otel_env(receiver)
    ) as stack:
        ok = await stack.place_order(**GOOD, destination="US")
        bad = await stack.place_order(**GOOD, destination="ZZ")  # shipping refuses
        states = await stack.wait_settled([ok["saga_id"], bad["saga_id"]], timeout=60)
        assert states[ok["saga_id"]].status is SagaStatus.COMPLETED
        assert states[bad["saga_id"]].status is SagaStatus.COMPENSATED
        forward = [(step, "command") for step in STEPS]
        undo = [(step, "compensation") for step in ("charge", "reserve", "validate")]
        await receiver.wait_for(
            lambda spans: (
                complete(spans, ok["saga_id"], f"saga completed {SAGA}", forward)
                and complete(spans, bad["saga_id"], f"saga compensated {SAGA}", forward[:4] + undo)
            )
        )

    # -- the completed saga
    sid = ok["saga_id"]
    t = the_trace(receiver, states[sid].trace, sid)
    assert {s.service for s in t.spans} >= {
        COORDINATOR,
        "order",
        "inventory",
        "payment",
        "shipping",
    }
    start = check_rooted_at_the_request(t, sid)
    for step in STEPS:
        check_chain(t, start, sid, step, "command")
    end = t.one(f"saga completed {SAGA}")
    assert t.parent(end) is start and end.kind == "INTERNAL" and end.service == COORDINATOR
    assert end.attr("saga.outcome") == "COMPLETED"
    assert not [s.name for s in t.spans if s.name.startswith("saga compensate")]

    # -- the compensated saga
    sid = bad["saga_id"]
    t = the_trace(receiver, states[sid].trace, sid)
    start = check_rooted_at_the_request(t, sid)
    for step in ("validate", "reserve", "charge"):
        check_chain(t, start, sid, step, "command")
    # A worker runs a batch without savepoints first; a handler that refuses
    # rolls that attempt back (its span ends in error, no outcome) and the batch
    # runs again one savepoint each: the span with the outcome is the real one.
    name = f"process {COMMANDS}:shipping:sagaflow.service.shipping"
    refused = t.one(name, **{"saga.id": sid, "saga.outcome": "failure"})
    for attempt in t.spans:
        if attempt.name == name and attempt.attr("saga.id") == sid and attempt is not refused:
            assert attempt.attr("saga.outcome") is None and attempt.status_code == 2  # ERROR
    assert refused.attr("saga.reason") == "unsupported_destination"
    failure = t.one(
        f"process {REPLIES}:reply:{REPLIES}", **{"saga.step": "schedule", "saga.outcome": "failure"}
    )
    rollback = t.one(f"saga rollback {SAGA}/schedule")
    assert t.parent(rollback) is start
    # reserve and charge ran in one parallel group (either may have answered
    # first): undone together, then validate
    undo = rollback.attr("saga.undo")
    assert set(undo[:2]) == {"charge", "reserve"} and undo[2:] == ("validate",), undo
    compensations = sorted(
        (s for s in t.spans if s.name.startswith(f"saga compensate {SAGA}/")),
        key=lambda s: s.start_ns,
    )
    # after the failure, in reverse order of the steps that completed: the
    # group's two compensations are sent by one decision, then validate's
    steps = [s.attr("saga.step") for s in compensations]
    assert set(steps[:2]) == {"charge", "reserve"} and steps[2:] == ["validate"], steps
    assert failure.start_ns <= rollback.start_ns <= compensations[0].start_ns
    for span in compensations:
        step = span.attr("saga.step")
        assert t.parent(span) is start and span.service == COORDINATOR
        # linked to the reply that reported the step done, in the participant's process
        undone = t.one(f"send {REPLIES}:reply", **{"saga.step": step, "saga.reply_to": "command"})
        assert undone.service == STEPS[step]
        assert [(link.trace_id, link.span_id) for link in span.links] == [
            (undone.trace_id, undone.span_id)
        ]
        check_chain(t, start, sid, step, "compensation")
        worker_span = t.one(
            message_chain_names(step)[1], **{"saga.step": step, "saga.kind": "compensation"}
        )
        assert [link.span_id for link in worker_span.links] == [undone.span_id]
    end = t.one(f"saga compensated {SAGA}")
    assert compensations[-1].start_ns <= end.start_ns
    assert end.attr("saga.outcome") == "COMPENSATED"


async def test_a_coordinator_killed_mid_saga_continues_the_same_trace(
    amqp_url: str, pg_url: str, tmp_path: Path, receiver: OtlpReceiver
) -> None:
    async with Stack(
        amqp_url, pg_url, log_dir=tmp_path / "logs", env_extra=otel_env(receiver)
    ) as stack:
        await stack.stop("shipping")  # the saga will wait at its schedule step
        first_pid = stack.pid("coordinator")
        placed = await stack.place_order(**GOOD, destination="US")
        sid = placed["saga_id"]
        await receiver.wait_for(
            lambda spans: any(
                s.name == f"send {COMMANDS}:shipping" and s.attr("saga.id") == sid for s in spans
            )
        )
        await stack.kill("coordinator")  # SIGKILL: nothing flushed, nothing cleaned up
        # (shipping is down on purpose: the stack's readiness wait would call it dead)
        await stack.restart("coordinator", wait=False)
        await stack.restart("shipping")  # and wait until both consume
        states = await stack.wait_settled([sid], timeout=60)
        assert states[sid].status is SagaStatus.COMPLETED
        second_pid = stack.pid("coordinator")
        await receiver.wait_for(
            lambda spans: complete(
                spans, sid, f"saga completed {SAGA}", [(s, "command") for s in STEPS]
            )
        )

    assert first_pid != second_pid
    t = the_trace(receiver, states[sid].trace, sid)
    start = check_rooted_at_the_request(t, sid)
    # connected: one root, and every other span's parent is in the trace
    assert [s.name for s in t.roots()] == ["POST /orders"]
    for step in STEPS:
        check_chain(t, start, sid, step, "command")
    pids = {s.resource.get("process.pid") for s in t.spans if s.service == COORDINATOR}
    assert pids == {first_pid, second_pid}
    # the restarted coordinator took the saga over, in the same trace
    schedule_reply = t.one(f"process {REPLIES}:reply:{REPLIES}", **{"saga.step": "schedule"})
    assert schedule_reply.resource.get("process.pid") == second_pid
    assert t.parent(t.one(f"saga completed {SAGA}")) is start


# --------------------------------------------------------------------------- metrics


def scrape(text: str, name: str, **labels: str) -> float:
    """The value of one Prometheus sample (0 when absent)."""
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        head, _, value = line.rpartition(" ")
        found = dict(
            part.split("=", 1) for part in head[len(name) + 1 : -1].split(",") if "=" in part
        )
        if all(found.get(k) == f'"{v}"' for k, v in labels.items()):
            return float(value)
    return 0.0


async def poll_metrics(url: str, ready: Any, timeout: float = 30.0) -> str:
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient() as http:
        while True:
            try:
                text = (await http.get(url)).text
            except httpx.HTTPError:
                text = ""
            if ready(text):
                return text
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url}: condition unmet:\n{text[-3000:]}")
            await asyncio.sleep(0.2)


async def test_the_prometheus_endpoints_count_the_outcomes(
    amqp_url: str, pg_url: str, tmp_path: Path
) -> None:
    stack = Stack(amqp_url, pg_url, log_dir=tmp_path / "logs")
    ports = {name: free_port() for name in ("coordinator", "order", "shipping")}
    for name, port in ports.items():
        # one port per process: Stack gives every process the same environment
        stack.processes[name].argv[:0] = ["env", f"SAGAFLOW_METRICS_PORT={port}"]
    async with stack:
        placed = [await stack.place_order(**GOOD, destination="US") for _ in range(3)]
        placed += [await stack.place_order(**GOOD, destination="ZZ") for _ in range(2)]
        states = await stack.wait_settled([p["saga_id"] for p in placed], timeout=60)
        outcomes = [s.status for s in states.values()]
        assert outcomes.count(SagaStatus.COMPLETED) == 3
        assert outcomes.count(SagaStatus.COMPENSATED) == 2

        url = f"http://127.0.0.1:{ports['coordinator']}/metrics"
        text = await poll_metrics(
            url,
            lambda text: (
                scrape(text, "sagaflow_sagas_completed_total", saga=SAGA) == 3
                and scrape(text, "sagaflow_sagas_compensated_total", saga=SAGA) == 2
            ),
        )
        assert scrape(text, "sagaflow_sagas_failed_total", saga=SAGA) == 0
        assert (
            scrape(text, "sagaflow_saga_duration_seconds_count", saga=SAGA, status="completed") == 3
        )
        assert (
            scrape(
                text,
                "sagaflow_step_duration_seconds_count",
                saga=SAGA,
                step="schedule",
                kind="command",
                outcome="failure",
            )
            == 2
        )
        assert (
            scrape(
                text,
                "sagaflow_step_duration_seconds_count",
                saga=SAGA,
                step="charge",
                kind="compensation",
                outcome="success",
            )
            == 2
        )
        assert "sagaflow_outbox_backlog" in text  # refreshed by the coordinator's monitor

        # the order service starts the sagas: it counts them
        text = await poll_metrics(
            f"http://127.0.0.1:{ports['order']}/metrics",
            lambda text: scrape(text, "sagaflow_sagas_started_total", saga=SAGA) == 5,
        )
        # workers count the commands they handled
        text = await poll_metrics(
            f"http://127.0.0.1:{ports['shipping']}/metrics",
            lambda text: (
                scrape(
                    text,
                    "sagaflow_commands_handled_total",
                    type="shipping.schedule",
                    outcome="failure",
                )
                == 2
            ),
        )
        assert (
            scrape(
                text, "sagaflow_commands_handled_total", type="shipping.schedule", outcome="success"
            )
            == 3
        )
