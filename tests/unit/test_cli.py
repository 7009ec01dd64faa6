"""The ``sagaflow`` command line over in-memory adapters (no broker, no database).

Commands build their adapters through the public seams of
``sagaflow.cli.common`` (``saga_store``, ``transport``); the tests replace those
with in-memory ones.
"""

from __future__ import annotations

import asyncio
import getpass
import logging
import os
import signal
import sys
import textwrap
import types
import uuid
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import orjson
import pytest
from typer.testing import CliRunner

from sagaflow import BusinessFailure, HandlerContext, Hooks, Participant, Saga, SagaStatus
from sagaflow.cli import app, common
from sagaflow.cli.logs import configure_logging
from sagaflow.cli.run import run_coordinator, run_worker, serve
from sagaflow.config import Settings, redact_url
from sagaflow.core.definition import to_mermaid
from sagaflow.core.errors import StoreError
from sagaflow.core.messages import Envelope, MessageKind
from sagaflow.core.ports import DeadLetter, DeliveryCallback, SagaStore, Topology
from sagaflow.core.state import LogEvent
from sagaflow.store import (
    InMemoryParticipantStore,
    InMemorySagaStore,
    PostgresParticipantStore,
    PostgresSagaStore,
)
from sagaflow.testing import SagaTestEnvironment
from sagaflow.transport.memory import InMemoryTransport
from sagaflow.transport.rabbitmq import RabbitMQTransport
from sagaflow.transport.wire import H_REASON, H_SOURCE_QUEUE
from tests.sample import Cmd, Ok, charge, refund, release, reserve, saga

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"


@pytest.fixture(autouse=True)
def _isolate(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No SAGAFLOW_* from the outer environment; logging and sys.path restored after."""
    for name in list(os.environ):
        if name.upper().startswith("SAGAFLOW_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("SAGAFLOW_LOG_FORMAT", "console")
    monkeypatch.setattr(sys, "path", list(sys.path))
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def invoke(runner: CliRunner, *args: str, **kwargs: Any) -> Any:
    return runner.invoke(app, list(args), **kwargs)


@pytest.fixture
def store(monkeypatch: pytest.MonkeyPatch) -> InMemorySagaStore:
    """An in-memory store every command uses."""
    memory = InMemorySagaStore()
    monkeypatch.setattr(common, "saga_store", lambda settings: memory)
    return memory


@pytest.fixture
def write_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[[str], str]:
    """Write a module in a fresh current directory; returns its (unique) name."""
    monkeypatch.chdir(tmp_path)

    def write(source: str) -> str:
        name = f"clitest_{uuid.uuid4().hex[:8]}"
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
        return name

    return write


# --------------------------------------------------------------------------- graph and resolution


def test_graph_prints_the_mermaid_of_a_saga(runner: CliRunner) -> None:
    result = invoke(runner, "graph", "tests.sample:saga")
    assert result.exit_code == 0, result.output
    assert result.stdout == to_mermaid(saga)


def test_graph_of_a_list_found_from_the_current_directory(
    runner: CliRunner, write_module: Callable[[str], str]
) -> None:
    name = write_module(
        """
        from tests.sample import saga
        SAGAS = [saga, saga]
        """
    )
    result = invoke(runner, "graph", f"{name}:SAGAS")
    assert result.exit_code == 0, result.output
    assert result.stdout == to_mermaid(saga)  # the same saga twice is one saga


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("tests.sample", "'tests.sample' is not MODULE:ATTR"),
        ("tests.sample:", "is not MODULE:ATTR"),
        ("no_such_module_here:saga", "cannot import 'no_such_module_here'"),
        ("tests.sample:nope", "'tests.sample' has no attribute 'nope'"),
        ("tests.sample:saga.nope", "'tests.sample:saga' has no attribute 'nope'"),
        ("tests.sample:Data", "'tests.sample:Data' is a class (Data), expected a Saga"),
        ("tests.sample:FAST", "'tests.sample:FAST' is a RetryPolicy, expected a Saga"),
    ],
)
def test_bad_module_attr_is_a_usage_error(runner: CliRunner, spec: str, message: str) -> None:
    result = invoke(runner, "graph", spec)
    assert result.exit_code == 2
    assert message in result.stderr
    assert result.stderr.startswith("error: ")
    assert result.stderr.count("\n") == 1  # one line, no traceback
    assert result.stdout == ""


def test_a_list_holding_something_else_is_a_usage_error(
    runner: CliRunner, write_module: Callable[[str], str]
) -> None:
    name = write_module("from tests.sample import saga\nSAGAS = (saga, 42)\n")
    result = invoke(runner, "graph", f"{name}:SAGAS")
    assert result.exit_code == 2
    assert f"'{name}:SAGAS' holds a int, expected only Sagas" in result.stderr


def test_a_module_that_raises_fails_with_one_line_and_a_traceback_only_with_debug(
    runner: CliRunner, write_module: Callable[[str], str]
) -> None:
    name = write_module("raise RuntimeError('boom at import')\n")
    result = invoke(runner, "graph", f"{name}:saga")
    assert result.exit_code == 1
    assert result.stderr == f"error: cannot import '{name}': RuntimeError: boom at import\n"

    debug = invoke(runner, "--debug", "graph", f"{name}:saga")
    assert debug.exit_code == 1
    assert "Traceback" in debug.stderr
    assert "boom at import" in debug.stderr


def test_worker_needs_a_participant(runner: CliRunner) -> None:
    result = invoke(runner, "worker", "tests.sample:saga")
    assert result.exit_code == 2
    assert "'tests.sample:saga' is a Saga, expected a Participant" in result.stderr


def test_unknown_command_and_missing_argument_are_usage_errors(runner: CliRunner) -> None:
    assert invoke(runner, "nope").exit_code == 2
    assert invoke(runner, "graph").exit_code == 2
    assert invoke(runner, "sagas", "show").exit_code == 2


def test_version(runner: CliRunner) -> None:
    from sagaflow import __version__

    result = invoke(runner, "--version")
    assert result.exit_code == 0
    assert result.stdout.strip() == f"sagaflow {__version__}"


# --------------------------------------------------------------------------- settings


def test_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SAGAFLOW_AMQP_URL", "amqp://app:s3cret@mq:5672/shop")
    monkeypatch.setenv("SAGAFLOW_DATABASE_URL", "postgresql://app:pg-pass@db:5432/shop")
    monkeypatch.setenv("SAGAFLOW_SCHEMA", "coord")
    monkeypatch.setenv("SAGAFLOW_PREFIX", "shop")
    monkeypatch.setenv("SAGAFLOW_DELIVERY_LIMIT", "7")
    monkeypatch.setenv("SAGAFLOW_COORDINATOR_MAX_BATCH", "10")
    monkeypatch.setenv("SAGAFLOW_LOG_LEVEL", "debug")
    settings = Settings()
    assert settings.db_schema == "coord"
    assert settings.topology() == Topology(prefix="shop", delivery_limit=7)
    assert settings.coordinator_max_batch == 10
    assert settings.log_level == "DEBUG"
    assert settings.participant_schema_for("fraud-check") == "fraud_check"
    # keyword arguments win over the environment, by field name
    assert Settings(db_schema="other").db_schema == "other"
    with pytest.raises(ValueError, match="frozen"):
        settings.prefix = "x"  # type: ignore[misc]


def test_settings_are_redacted_wherever_printed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SAGAFLOW_AMQP_URL", "amqp://app:s3cret@mq:5672/shop")
    monkeypatch.setenv("SAGAFLOW_DATABASE_URL", "postgresql://app@db/shop?password=pg-pass")
    settings = Settings()
    redacted = settings.redacted()
    assert redacted["amqp_url"] == "amqp://app:******@mq:5672/shop"
    assert redacted["database_url"] == "postgresql://app@db/shop?password=******"
    for text in (repr(settings), str(settings), str(redacted)):
        assert "s3cret" not in text
        assert "pg-pass" not in text
    assert sorted(settings.secrets()) == ["pg-pass", "s3cret"]
    assert redact_url("amqp://guest@h/") == "amqp://guest@h/"  # no password, nothing to hide


def test_factories_return_concrete_adapters_without_connecting() -> None:
    settings = Settings(prefix="shop", participant_schema=None)
    transport = settings.transport()
    assert isinstance(transport, RabbitMQTransport)
    assert transport.topology.prefix == "shop"
    store = settings.saga_store()
    assert isinstance(store, PostgresSagaStore)
    assert store.schema == "sagaflow"
    inbox = settings.participant_store("inventory")
    assert isinstance(inbox, PostgresParticipantStore)
    assert inbox.schema == "inventory"
    assert Settings(participant_schema="shared").participant_store("x").schema == "shared"


def test_invalid_settings_are_a_usage_error(
    runner: CliRunner, monkeypatch: pytest.MonkeyPatch, store: InMemorySagaStore
) -> None:
    monkeypatch.setenv("SAGAFLOW_DELIVERY_LIMIT", "many")
    result = invoke(runner, "sagas", "list")
    assert result.exit_code == 2
    assert "invalid settings: SAGAFLOW_DELIVERY_LIMIT" in result.stderr


def test_errors_never_show_passwords(runner: CliRunner, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SAGAFLOW_DATABASE_URL", "postgresql://app:hunter2@db/shop")

    class Down(InMemorySagaStore):
        async def start(self) -> None:
            raise StoreError("connect failed for postgresql://app:hunter2@db/shop")

    monkeypatch.setattr(common, "saga_store", lambda settings: Down())
    result = invoke(runner, "sagas", "list")
    assert result.exit_code == 1
    assert result.stderr == "error: connect failed for postgresql://app:******@db/shop\n"


# --------------------------------------------------------------------------- sagas


class _Traced(Hooks):
    def saga_started(self, saga: Saga[Any], saga_id: str) -> dict[str, str]:
        return {"traceparent": TRACEPARENT}


def _payment_refuses_after_one_crash() -> list[Participant]:
    inventory, payment = Participant("inventory"), Participant("payment")
    crashes = [ConnectionError("payment db went away")]

    @inventory.handler(reserve)
    async def do_reserve(cmd: Cmd, ctx: HandlerContext) -> Ok:
        return Ok(ref="r-1")

    @inventory.handler(release)
    async def do_release(cmd: Cmd, ctx: HandlerContext) -> Ok:
        return Ok()

    @payment.handler(charge)
    async def do_charge(cmd: Cmd, ctx: HandlerContext) -> Ok:
        if crashes:
            raise crashes.pop()
        raise BusinessFailure("card_declined")

    @payment.handler(refund)
    async def do_refund(cmd: Cmd, ctx: HandlerContext) -> Ok:
        return Ok()

    return [inventory, payment]


@pytest.fixture
def compensated(monkeypatch: pytest.MonkeyPatch) -> tuple[InMemorySagaStore, str]:
    """A saga that reserved, failed to charge (a crash, then a refusal) and compensated."""

    async def run() -> tuple[InMemorySagaStore, str]:
        env = SagaTestEnvironment([saga], _payment_refuses_after_one_crash(), hooks=_Traced())
        async with env:
            handle = await env.start_saga(saga, {"order_id": "o-1", "amount": 5})
            await env.drain()
            await env.advance(5)  # the retry back-off of the charge
            assert (await env.get(handle.saga_id)).status is SagaStatus.COMPENSATED
        return env.store, handle.saga_id

    memory, saga_id = asyncio.run(run())
    monkeypatch.setattr(common, "saga_store", lambda settings: memory)
    return memory, saga_id


def test_sagas_show_json_derives_the_steps_from_the_log(
    runner: CliRunner, compensated: tuple[InMemorySagaStore, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, saga_id = compensated
    monkeypatch.setenv("SAGAFLOW_JAEGER_URL", "http://jaeger:16686/")
    result = invoke(runner, "sagas", "show", saga_id, "--json")
    assert result.exit_code == 0, result.output
    doc = orjson.loads(result.stdout)
    assert doc["saga_id"] == saga_id
    assert doc["status"] == "COMPENSATED"
    assert doc["data"] == {"order_id": "o-1", "amount": 5, "reservation": "r-1"}
    assert doc["failure"] == {
        "step": "charge",
        "reason": "card_declined",
        "cause": "failure",
        "original": None,
    }
    assert doc["trace_id"] == TRACE_ID
    assert doc["jaeger_url"] == f"http://jaeger:16686/trace/{TRACE_ID}"

    phases = [(s["step"], s["kind"], s["outcome"]) for s in doc["steps"]]
    assert phases == [
        ("reserve", "command", "success"),
        ("charge", "command", "failure"),
        ("reserve", "compensation", "success"),
    ]
    charge_step = doc["steps"][1]
    assert charge_step["type"] == "payment.charge"
    first, second = charge_step["attempts"]
    assert (first["attempt"], first["outcome"]) == (1, "error")
    assert "payment db went away" in first["reason"]
    assert first["retry_delay"] > 0
    assert (second["attempt"], second["outcome"], second["reason"]) == (
        2,
        "failure",
        "card_declined",
    )
    for step in doc["steps"]:
        for attempt in step["attempts"]:
            assert attempt["sent_at"] and attempt["answered_at"]
            assert attempt["duration"] >= 0
    events = [entry["event"] for entry in doc["log"]]
    assert events[0] == LogEvent.STARTED.value
    assert events[-1] == LogEvent.COMPENSATED.value
    assert LogEvent.COMPENSATION_STARTED.value in events


def test_sagas_show_renders_tables_for_people(
    runner: CliRunner, compensated: tuple[InMemorySagaStore, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, saga_id = compensated
    monkeypatch.setenv("SAGAFLOW_JAEGER_URL", "http://jaeger:16686")
    result = invoke(runner, "sagas", "show", saga_id)
    assert result.exit_code == 0, result.output
    out = result.stdout
    for text in (
        "sample v1",
        "COMPENSATED",
        saga_id,
        "card_declined",
        "payment.charge",
        "compensation",
        "compensation_started",
        f"http://jaeger:16686/trace/{TRACE_ID}",
    ):
        assert text in out, text


def test_sagas_show_unknown_id_fails(runner: CliRunner, store: InMemorySagaStore) -> None:
    result = invoke(runner, "sagas", "show", "nope")
    assert result.exit_code == 1
    assert result.stderr == "error: no saga with id 'nope'\n"


def test_sagas_list_filters_and_prints_stable_json(
    runner: CliRunner, compensated: tuple[InMemorySagaStore, str]
) -> None:
    _, saga_id = compensated
    result = invoke(runner, "sagas", "list", "--json")
    assert result.exit_code == 0, result.output
    (row,) = orjson.loads(result.stdout)
    assert list(row) == [
        "saga_id",
        "saga_name",
        "saga_version",
        "status",
        "step",
        "step_index",
        "kind",
        "attempt",
        "awaiting",
        "failure",
        "trace_id",
        "created_at",
        "updated_at",
        "waiting_for",
        "deadline_at",
        "overdue",
    ]
    assert (row["saga_id"], row["status"], row["trace_id"]) == (saga_id, "COMPENSATED", TRACE_ID)

    assert (
        orjson.loads(invoke(runner, "sagas", "list", "--state", "running", "--json").stdout) == []
    )
    assert orjson.loads(invoke(runner, "sagas", "list", "--name", "other", "--json").stdout) == []
    human = invoke(runner, "sagas", "list", "--state", "COMPENSATED")
    assert human.exit_code == 0
    assert saga_id in human.stdout and "COMPENSATED" in human.stdout
    assert invoke(runner, "sagas", "list", "--state", "bogus").exit_code == 2


def test_sagas_list_empty_prints_nothing_on_stdout(
    runner: CliRunner, store: InMemorySagaStore
) -> None:
    result = invoke(runner, "sagas", "list")
    assert result.exit_code == 0
    assert result.stdout == ""
    assert invoke(runner, "sagas", "list", "--json").stdout.strip() == "[]"


# --------------------------------------------------------------------------- start, cancel, retry


def test_start_then_cancel(runner: CliRunner, store: InMemorySagaStore) -> None:
    started = invoke(
        runner, "start", "sample", "--data", '{"order_id": "o-9"}', "-m", "tests.sample:saga"
    )
    assert started.exit_code == 0, started.output
    saga_id = started.stdout.strip()
    state = asyncio.run(store.get(saga_id))
    assert state is not None and state.status is SagaStatus.RUNNING
    assert state.data["order_id"] == "o-9"

    cancelled = invoke(
        runner, "sagas", "cancel", saga_id, "--reason", "customer called", "-m", "tests.sample:saga"
    )
    assert cancelled.exit_code == 0, cancelled.output
    assert "COMPENSATING" in cancelled.stdout
    log = asyncio.run(store.log(saga_id))
    (request,) = [e for e in log if e.event is LogEvent.CANCEL_REQUESTED]
    assert request.detail == {"by": getpass.getuser(), "reason": "customer called"}

    again = invoke(runner, "sagas", "cancel", saga_id, "-r", "twice", "-m", "tests.sample:saga")
    assert again.exit_code == 1
    assert "cannot cancel a saga that is COMPENSATING" in again.stderr


def test_start_json_with_id_and_definitions_from_the_environment(
    runner: CliRunner, store: InMemorySagaStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SAGAFLOW_SAGAS", "tests.sample:saga")
    result = invoke(runner, "start", "sample", "-d", '{"order_id": "o-1"}', "--id", "s-1", "--json")
    assert result.exit_code == 0, result.output
    doc = orjson.loads(result.stdout)
    assert (doc["saga_id"], doc["saga_name"], doc["status"]) == ("s-1", "sample", "RUNNING")
    duplicate = invoke(runner, "start", "sample", "-d", '{"order_id": "o-1"}', "--id", "s-1")
    assert duplicate.exit_code == 1


def test_retry_only_resumes_failed_sagas_and_records_who(
    runner: CliRunner, store: InMemorySagaStore
) -> None:
    started = invoke(
        runner, "start", "sample", "-d", '{"order_id": "o"}', "-m", "tests.sample:saga"
    )
    saga_id = started.stdout.strip()
    result = invoke(
        runner, "sagas", "retry", saga_id, "-r", "fixed", "--by", "ops", "-m", "tests.sample:saga"
    )
    assert result.exit_code == 1
    assert "only a FAILED saga can be retried" in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["start", "sample", "-d", "{nope", "-m", "tests.sample:saga"], "--data is not valid JSON"),
        (["start", "sample", "-d", "[1]", "-m", "tests.sample:saga"], "must be a JSON object"),
        (["start", "sample", "-d", "{}", "-m", "tests.sample:saga"], "order_id: Field required"),
        (["start", "other", "-m", "tests.sample:saga"], "unknown saga 'other' (known: sample@1)"),
        (["start", "sample"], "no saga definitions"),
        (["sagas", "cancel", "x", "-r", " ", "-m", "tests.sample:saga"], "--reason must not be"),
    ],
)
def test_start_and_operate_usage_errors(
    runner: CliRunner, store: InMemorySagaStore, args: list[str], message: str
) -> None:
    result = invoke(runner, *args)
    assert result.exit_code == 2
    assert message in result.stderr


def test_start_reads_data_from_a_file(
    runner: CliRunner, store: InMemorySagaStore, tmp_path: Path
) -> None:
    data = tmp_path / "data.json"
    data.write_text('{"order_id": "from-file", "amount": 3}')
    result = invoke(runner, "start", "sample", "-d", f"@{data}", "-m", "tests.sample:saga")
    assert result.exit_code == 0, result.output
    state = asyncio.run(store.get(result.stdout.strip()))
    assert state is not None and state.data["order_id"] == "from-file"


# --------------------------------------------------------------------------- dlq


class _SharedTransport:
    """An in-memory transport that outlives the commands that start and close it."""

    def __init__(self) -> None:
        self.inner = InMemoryTransport()
        self.topology = self.inner.topology
        self.keys = None

    async def start(self, services: Sequence[str]) -> None:
        await self.inner.start(services)

    async def close(self) -> None:
        pass

    async def publish(self, envelopes: Sequence[Envelope]) -> None:
        await self.inner.publish(envelopes)

    async def consume(self, queue: str, callback: DeliveryCallback, *, prefetch: int) -> None:
        await self.inner.consume(queue, callback, prefetch=prefetch)

    async def dead_letter(self, delivery: Any, reason: str) -> None:
        await self.inner.dead_letter(delivery, reason)

    async def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        return await self.inner.dead_letters(limit)

    async def replay_dead_letters(self, ids: Sequence[str] | None = None) -> list[str]:
        return await self.inner.replay_dead_letters(ids)


@pytest.fixture
def broker(monkeypatch: pytest.MonkeyPatch) -> _SharedTransport:
    shared = _SharedTransport()
    asyncio.run(shared.start(["inventory"]))
    monkeypatch.setattr(common, "transport", lambda settings, name: shared)
    return shared


def _dead_letter(broker: _SharedTransport) -> None:
    envelope = Envelope(
        message_id="m-1",
        command_id="s-1:reserve:command",
        saga_id="s-1",
        saga_name="sample",
        step="reserve",
        step_index=0,
        kind=MessageKind.COMMAND,
        attempt=1,
        type="inventory.reserve",
        payload={"order_id": "o"},
    )
    body = envelope.model_dump_json(by_alias=True).encode()
    headers = {
        H_REASON: "unknown_action: inventory.reserve",
        H_SOURCE_QUEUE: broker.topology.service_queue("inventory"),
    }
    broker.inner.inject(broker.topology.dead_letter_queue, body, headers)


def test_dlq_list_and_replay(
    runner: CliRunner, broker: _SharedTransport, store: InMemorySagaStore
) -> None:
    empty = invoke(runner, "dlq", "list", "--json")
    assert empty.exit_code == 0
    assert orjson.loads(empty.stdout) == []
    assert invoke(runner, "dlq", "list").stdout == ""

    _dead_letter(broker)
    listed = invoke(runner, "dlq", "list", "--json")
    assert listed.exit_code == 0, listed.output
    (letter,) = orjson.loads(listed.stdout)
    assert letter["reason"] == "unknown_action: inventory.reserve"
    assert (letter["saga_id"], letter["type"], letter["step"]) == (
        "s-1",
        "inventory.reserve",
        "reserve",
    )
    assert orjson.loads(letter["body"])["payload"] == {"order_id": "o"}
    human = invoke(runner, "dlq", "list")
    assert letter["id"] in human.stdout and "unknown_action" in human.stdout

    assert invoke(runner, "dlq", "replay", "-r", "x").exit_code == 2  # neither ids nor --all
    assert invoke(runner, "dlq", "replay", letter["id"], "--all", "-r", "x").exit_code == 2
    assert invoke(runner, "dlq", "replay", "--all").exit_code == 2  # no reason
    # the letter's saga exists: the replay is recorded in its log, with who and why
    started = invoke(
        runner,
        "start",
        "sample",
        "--id",
        "s-1",
        "-d",
        '{"order_id": "o"}',
        "-m",
        "tests.sample:saga",
    )
    assert started.exit_code == 0, started.output
    missing = invoke(runner, "dlq", "replay", letter["id"], "nope", "-r", "fixed the handler")
    assert missing.exit_code == 1
    assert "replayed 1 dead letter" in missing.stdout
    assert "recorded in the log of 1 saga" in missing.stdout
    assert "1 of 2 ids were not in the dead-letter queue" in missing.stderr
    assert orjson.loads(invoke(runner, "dlq", "list", "--json").stdout) == []
    (replayed,) = [
        e for e in asyncio.run(store.log("s-1")) if e.event is LogEvent.DEAD_LETTER_REPLAYED
    ]
    assert (replayed.detail["by"], replayed.detail["reason"]) == (
        getpass.getuser(),
        "fixed the handler",
    )
    assert replayed.detail["dead_letter_id"] == letter["id"] and replayed.step == "reserve"


# --------------------------------------------------------------------------- processes


def test_the_product_has_no_fault_switches() -> None:
    """Fault injection lives in tests/faults (``python -m tests.faults.proc``), not
    in environment variables the installed processes read. (The test harness's
    faults, ``sagaflow.testing.faults``, act on its in-memory broker only.)"""
    package = Path(common.__file__).resolve().parent.parent
    mentions = [
        str(path.relative_to(package))
        for path in package.rglob("*.py")
        if ("SAGAFLOW_FAULT" in path.read_text() or "after_commit" in path.read_text())
        and path.parent.name != "testing"
    ]
    assert mentions == []
    assert not (package / "faults.py").exists()


class Component:
    """``serve``'s callbacks, recording what was called; ``ready`` runs ``on_ready``."""

    def __init__(self, on_ready: Callable[[], Awaitable[None]] | None = None) -> None:
        self.calls: list[str] = []
        self.on_ready = on_ready

    async def start(self) -> None:
        self.calls.append("start")

    async def stop(self) -> None:
        self.calls.append("stop")

    async def abort(self) -> None:
        self.calls.append("abort")

    async def ready(self) -> None:
        if self.on_ready is not None:
            await self.on_ready()
        self.calls.append("ready")

    async def serve(self, start: Callable[[], Awaitable[None]] | None = None) -> None:
        await asyncio.wait_for(
            serve("test", start or self.start, self.stop, abort=self.abort, ready=self.ready), 10
        )


async def test_serve_stops_gracefully_on_sigterm() -> None:
    async def signal_soon() -> None:
        asyncio.get_running_loop().call_soon(signal.raise_signal, signal.SIGTERM)

    component = Component(signal_soon)
    await component.serve()
    assert component.calls == ["start", "ready", "stop"]


async def test_serve_stops_gracefully_on_a_signal_while_ready_runs() -> None:
    """The coordinator's autovacuum advice reads the database after the start: a
    SIGTERM then is a graceful stop of a running component, not an abort that
    closes its store under its timers (scenario 9 once hung on exactly that)."""

    async def signal_while_working() -> None:
        signal.raise_signal(signal.SIGTERM)
        await asyncio.sleep(0.05)  # the signal is handled while ready still works

    component = Component(signal_while_working)
    await component.serve()
    assert component.calls == ["start", "ready", "stop"]


async def test_serve_stops_a_component_whose_ready_fails() -> None:
    async def fail() -> None:
        raise StoreError("advice failed")

    component = Component(fail)
    with pytest.raises(StoreError):
        await component.serve()
    assert component.calls == ["start", "stop"]


async def test_serve_abandons_a_start_that_is_still_connecting() -> None:
    async def connecting() -> None:
        asyncio.get_running_loop().call_soon(signal.raise_signal, signal.SIGINT)
        await asyncio.sleep(3600)  # e.g. retrying a database that is down

    component = Component()
    await component.serve(connecting)
    assert component.calls == ["abort"]


async def test_serve_reports_a_failed_start() -> None:
    async def failing() -> None:
        raise StoreError("no database")

    component = Component()
    with pytest.raises(StoreError):
        await component.serve(failing)
    assert component.calls == ["abort"]


def test_coordinator_without_definitions_is_a_usage_error(runner: CliRunner) -> None:
    result = invoke(runner, "coordinator")
    assert result.exit_code == 2
    assert "no saga definitions" in result.stderr


class _StopWhenStarted(logging.Handler):
    """Sends this process SIGTERM when the command logs that it started."""

    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())
        if record.getMessage() in ("coordinator started", "worker started"):
            signal.raise_signal(signal.SIGTERM)


@pytest.fixture
def stop_when_started() -> Iterator[_StopWhenStarted]:
    handler = _StopWhenStarted()
    logger = logging.getLogger("sagaflow.cli")
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)


def test_coordinator_command_runs_until_sigterm(
    runner: CliRunner,
    store: InMemorySagaStore,
    monkeypatch: pytest.MonkeyPatch,
    stop_when_started: _StopWhenStarted,
) -> None:
    monkeypatch.setattr(common, "transport", lambda settings, name: InMemoryTransport())
    result = invoke(runner, "coordinator", "tests.sample:saga")
    assert result.exit_code == 0, result.output
    started = stop_when_started.messages.index("coordinator started")
    assert stop_when_started.messages[started:] == [
        "coordinator started",
        "coordinator stopping",
        "coordinator exited",
    ]


def test_worker_command_runs_until_sigterm(
    runner: CliRunner,
    monkeypatch: pytest.MonkeyPatch,
    write_module: Callable[[str], str],
    stop_when_started: _StopWhenStarted,
) -> None:
    name = write_module(
        """
        from sagaflow import Participant
        inventory = Participant("inventory")
        """
    )
    schemas: list[str] = []

    def inbox(settings: Settings, service: str) -> InMemoryParticipantStore:
        schemas.append(settings.participant_schema_for(service))
        return InMemoryParticipantStore()

    monkeypatch.setattr(common, "participant_store", inbox)
    monkeypatch.setattr(common, "transport", lambda settings, name: InMemoryTransport())
    result = invoke(runner, "worker", f"{name}:inventory")
    assert result.exit_code == 0, result.output
    assert schemas == ["inventory"]
    assert "worker started" in stop_when_started.messages
    assert stop_when_started.messages[-1] == "worker exited"


class _Counting(Hooks):
    pass


def test_run_worker_and_run_coordinator_build_from_the_factories_given(
    monkeypatch: pytest.MonkeyPatch,
    store: InMemorySagaStore,
    stop_when_started: _StopWhenStarted,
) -> None:
    """What a program of its own builds on (the fault suite's entry point does)."""
    built: list[tuple[str, str]] = []

    def transport(settings: Settings, *, name: str) -> InMemoryTransport:
        built.append(("transport", name))
        return InMemoryTransport()

    def inbox(settings: Settings, service: str) -> InMemoryParticipantStore:
        built.append(("store", service))
        return InMemoryParticipantStore()

    def saga_store(settings: Settings) -> SagaStore:
        built.append(("saga store", settings.db_schema))
        return store

    monkeypatch.setattr(common, "transport", lambda settings, name: pytest.fail("not used"))
    common.begin_invocation(debug=False)
    settings = common.current_settings()  # logs "started" as the commands do
    run_worker(
        settings, Participant("inventory"), transport=transport, store=inbox, hooks=[_Counting()]
    )
    run_coordinator(settings, [saga], transport=transport, store=saga_store, hooks=[_Counting()])
    assert built == [
        ("transport", "sagaflow-worker-inventory"),
        ("store", "inventory"),
        ("saga store", "sagaflow"),
        ("transport", "sagaflow-coordinator"),
    ]
    assert stop_when_started.messages.count("worker exited") == 1
    assert stop_when_started.messages[-1] == "coordinator exited"


def test_demo_runs_the_packaged_shop_and_real_runs_services_demo(
    runner: CliRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sagaflow.examples.shop import demo as shop

    for name in ("SAGAFLOW_AMQP_URL", "SAGAFLOW_DATABASE_URL"):
        monkeypatch.delenv(name, raising=False)
    embedded: list[dict[str, object]] = []
    monkeypatch.setattr(shop, "main", lambda **kwargs: embedded.append(kwargs) or 0)
    real: list[dict[str, object]] = []

    async def main(**kwargs: object) -> int:
        real.append(kwargs)
        return 0

    fake = types.ModuleType("services.demo")
    fake.main = main  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "services.demo", fake)
    result = invoke(runner, "demo", "--orders", "3")
    assert result.exit_code == 0, result.output
    assert (embedded, real) == ([{"orders": 3}], [])

    assert invoke(runner, "demo", "--real", "--orders", "2").exit_code == 0
    assert real == [{"real": True, "orders": 2}]
    fake.main = lambda **kwargs: 3  # type: ignore[attr-defined]
    assert invoke(runner, "demo", "--real").exit_code == 3


def test_the_real_demo_says_it_needs_the_repository(
    runner: CliRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "services", None)  # as from an installed wheel
    monkeypatch.setitem(sys.modules, "services.demo", None)
    monkeypatch.setenv("SAGAFLOW_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
    result = invoke(runner, "demo")
    assert result.exit_code == 2
    assert "SAGAFLOW_AMQP_URL set: unset to run it embedded" in result.stderr
    assert "not installed with the package" in result.stderr


# --------------------------------------------------------------------------- logging


def test_json_logs_carry_the_extras(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging(Settings(log_format="json", log_level="INFO"))
    logging.getLogger("sagaflow.cli").info("coordinator started", extra={"pid": 42})
    line = capsys.readouterr().err.strip().splitlines()[-1]
    record = orjson.loads(line)
    assert record["message"] == "coordinator started"
    assert (record["level"], record["logger"], record["pid"]) == ("info", "sagaflow.cli", 42)


def test_console_logs_are_readable(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging(Settings(log_format="console", log_level="WARNING"))
    configure_logging(Settings(log_format="console", log_level="WARNING"))  # idempotent
    log = logging.getLogger("sagaflow.cli")
    log.info("hidden")
    log.warning("dead letters replayed", extra={"by": "ops", "reason": "fixed it"})
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].endswith("sagaflow.cli: dead letters replayed by=ops reason='fixed it'")


def test_store_seam_is_public(store: InMemorySagaStore) -> None:
    built: SagaStore = common.saga_store(Settings())
    assert built is store
