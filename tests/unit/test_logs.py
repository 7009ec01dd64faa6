"""Saga log fields: every line about a saga carries saga_id, step, attempt and trace_id."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator

import orjson
import pytest
from opentelemetry.sdk.trace import TracerProvider

from sagaflow import BusinessFailure, HandlerContext, Participant, SagaStatus
from sagaflow.cli.logs import JsonFormatter
from sagaflow.config import Settings
from sagaflow.core.state import SagaState
from sagaflow.logs import LoggingHooks, SagaLogFilter, install, saga_fields
from sagaflow.runtime.hooks import CompositeHooks
from sagaflow.telemetry import setup_telemetry
from sagaflow.testing import SagaTestEnvironment
from sagaflow.tracing import TracingHooks, trace_id_of
from tests.sample import Cmd, Ok, cancel, saga, schedule
from tests.unit.test_tracing import World, participants


class Lines(logging.Handler):
    """Collects formatted JSON lines, through the filter as a real handler would."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[dict[str, object]] = []
        self.setFormatter(JsonFormatter())
        install(self)

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(orjson.loads(self.format(record)))


@pytest.fixture
def lines() -> Iterator[Lines]:
    handler = Lines()
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)


async def test_transitions_and_handler_lines_carry_the_saga_fields(lines: Lines) -> None:
    provider = TracerProvider(shutdown_on_exit=False)
    handler_log = logging.getLogger("tests.handler")
    shipping = Participant("shipping")
    others = [p for p in participants(World()) if p.service != "shipping"]

    @shipping.handler(schedule)
    async def refuse(cmd: Cmd, ctx: HandlerContext) -> Ok:
        handler_log.info("no truck for %s", cmd.order_id)  # a participant's own line
        raise BusinessFailure("no_truck")

    @shipping.handler(cancel)
    async def undo(cmd: Cmd, ctx: HandlerContext) -> Ok:
        return Ok()

    hooks = CompositeHooks([TracingHooks(provider), LoggingHooks()])
    async with SagaTestEnvironment(
        [saga], [*others, shipping], hooks=hooks, worker_hooks=hooks
    ) as env:
        handle = await env.start_saga(saga, {"order_id": "o1"})
        await env.drain()
        state = await env.get(handle.saga_id)
    provider.shutdown()
    assert state.status is SagaStatus.COMPENSATED
    trace_id = trace_id_of(state.trace)

    [mine] = [line for line in lines.lines if line["logger"] == "tests.handler"]
    assert mine["message"] == "no truck for o1"
    assert mine["saga_id"] == handle.saga_id
    assert mine["step"] == "schedule" and mine["attempt"] == 1 and mine["kind"] == "command"
    assert mine["trace_id"] == trace_id
    assert len(str(mine["span_id"])) == 16

    about_saga = [line for line in lines.lines if line["logger"] == "sagaflow.saga"]
    started = [line for line in about_saga if line["event"] == "compensation_started"]
    assert len(started) == 1 and started[0]["level"] == "info"
    assert started[0]["step"] == "schedule" and started[0]["trace_id"] == trace_id
    compensated = [line for line in about_saga if line["event"] == "saga_compensated"]
    assert compensated[0]["saga_id"] == handle.saga_id
    for line in about_saga:
        assert line["saga_id"] == handle.saga_id and line["trace_id"] == trace_id


async def test_a_failed_saga_is_an_error_line(lines: Lines) -> None:
    world = World(crash=Counter({"inventory.release": 100}), refuse={"payment.charge"})
    async with SagaTestEnvironment(
        [saga], participants(world), hooks=LoggingHooks(), worker_hooks=LoggingHooks()
    ) as env:
        handle = await env.start_saga(saga, {"order_id": "o2"})
        await env.drain()
        for _ in range(10):
            await env.advance(2)
    [failed] = [line for line in lines.lines if line.get("event") == "saga_failed"]
    assert failed["level"] == "error" and failed["saga_id"] == handle.saga_id
    # the worker's own warning about the transient error has the saga's fields too
    warnings = [
        line
        for line in lines.lines
        if line["logger"] == "sagaflow.worker" and line["level"] == "warning"
    ]
    assert warnings and all(line["saga_id"] == handle.saga_id for line in warnings)
    assert all(line["step"] == "reserve" for line in warnings)


def test_fields_of_an_envelope_and_extras_win() -> None:
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "m", None, None)
    record.saga_id = "given"
    assert SagaLogFilter().filter(record)
    assert record.saga_id == "given"
    assert not hasattr(record, "trace_id")  # no span, no saga: nothing added


def test_setup_without_configuration_installs_only_the_log_hooks(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_TRACES_EXPORTER", "OTEL_METRICS_EXPORTER"):
        monkeypatch.delenv(name, raising=False)
    telemetry = setup_telemetry(Settings(), "coordinator")
    assert not telemetry.tracing and telemetry.metrics is None
    assert isinstance(telemetry.hooks, CompositeHooks)
    assert [type(h) for h in telemetry.hooks.hooks] == [LoggingHooks]
    telemetry.shutdown()


def test_saga_fields_of_a_state() -> None:
    state = SagaState(
        saga_id="s1",
        saga_name="sample",
        saga_version=1,
        status=SagaStatus.RUNNING,
        data={},
        created_at=0.0,
        updated_at=0.0,
    )
    assert saga_fields(state, reason="x") == {
        "saga_id": "s1",
        "saga_name": "sample",
        "status": "RUNNING",
        "step_index": 0,
        "attempt": 1,
        "reason": "x",
    }
