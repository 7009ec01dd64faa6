"""Retention in memory: settings, the coordinator's and the worker's prune tasks,
``sagaflow db prune``, and dead letters kept small (issue 11, "Unbounded growth")."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest
from pydantic import ValidationError
from typer.testing import CliRunner

from sagaflow import Coordinator, Participant, Worker
from sagaflow.cli import common
from sagaflow.cli.app import app
from sagaflow.config import Settings, parse_duration
from sagaflow.core.errors import StoreError, TransportError
from sagaflow.core.messages import Envelope, MessageKind, Outcome
from sagaflow.core.ports import Pruned, Topology, UnitOfWork
from sagaflow.core.state import LogEntry, LogEvent, SagaState, SagaStatus
from sagaflow.runtime.retention import DAY, Retention
from sagaflow.store import InMemoryParticipantStore, InMemorySagaStore
from sagaflow.testing import FakeClock, SagaTestEnvironment
from sagaflow.transport import InMemoryTransport, RabbitMQTransport
from sagaflow.transport.bounds import H_ORIGINAL_SHA256, H_ORIGINAL_SIZE, KEPT_BYTES
from tests.sample import saga

HOUR = 3600.0


@pytest.fixture(autouse=True)
def _no_environment(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name in list(os.environ):
        if name.upper().startswith("SAGAFLOW_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("SAGAFLOW_LOG_FORMAT", "console")
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def state(saga_id: str, status: SagaStatus, updated_at: float) -> SagaState:
    return SagaState(
        saga_id=saga_id,
        saga_name="sample",
        saga_version=1,
        status=status,
        data={"order_id": saga_id},
        created_at=updated_at - 60,
        updated_at=updated_at,
    )


async def insert(store: InMemorySagaStore, *states: SagaState) -> None:
    log = [LogEntry(saga_id=s.saga_id, at=s.updated_at, event=LogEvent.STARTED) for s in states]
    async with store.transaction() as tx:
        await tx.write(UnitOfWork(inserts=states, log=log))


async def until(
    check: Callable[[], Awaitable[bool]], clock: FakeClock | None = None, step: float = 60.0
) -> None:
    """Let background tasks run (moving ``clock`` by ``step`` a turn) until ``check``."""
    for _ in range(500):
        if await check():
            return
        if clock is not None:
            clock.advance(step)
        await asyncio.sleep(0.001)
    raise AssertionError("never happened")


# --------------------------------------------------------------------------- settings


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30d", 30 * DAY), ("12h", 12 * HOUR), ("1d12h", 36 * HOUR), ("90m", 5400.0),
     ("45s", 45.0), ("3600", 3600.0), (" 1.5h ", 5400.0), ("forever", None), ("OFF", None)],
)  # fmt: skip
def test_durations(text: str, seconds: float | None) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "3x", "d", "1d 2", "12hh", "-1d", "1d-2h"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration(text)


def test_retention_settings_defaults_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    defaults = Settings().retention_policy()
    assert defaults == Retention(finished=30 * DAY, failed=None, inbox=7 * DAY)
    assert (defaults.interval, defaults.batch) == (300.0, 1000)

    monkeypatch.setenv("SAGAFLOW_RETENTION", "forever")
    monkeypatch.setenv("SAGAFLOW_FAILED_RETENTION", "90d")
    monkeypatch.setenv("SAGAFLOW_INBOX_RETENTION", "2d")
    monkeypatch.setenv("SAGAFLOW_PRUNE_INTERVAL", "1m")
    monkeypatch.setenv("SAGAFLOW_PRUNE_BATCH", "500")
    monkeypatch.setenv("SAGAFLOW_DEAD_LETTER_MAX_MESSAGES", "0")
    settings = Settings()
    assert settings.retention_policy() == Retention(
        finished=None, failed=90 * DAY, inbox=2 * DAY, interval=60.0, batch=500
    )
    transport = settings.transport()
    assert transport.dead_letter_arguments() == {
        "x-queue-type": "quorum",
        "x-max-length-bytes": 256 * 1024 * 1024,
        "x-overflow": "reject-publish",
    }


@pytest.mark.parametrize("value", ["12h", "3600", "23h59m"])
def test_an_inbox_retention_under_a_day_is_refused(value: str) -> None:
    with pytest.raises(ValidationError, match="at least 1d"):
        Settings(inbox_retention=value)


@pytest.mark.parametrize("field", ["retention", "failed_retention", "prune_interval"])
def test_retention_durations_are_positive(field: str) -> None:
    with pytest.raises(ValidationError):
        Settings(**{field: "0"})


def test_dead_letter_queue_arguments() -> None:
    def arguments(**limits: int) -> dict[str, Any]:
        return RabbitMQTransport("amqp://x", **limits).dead_letter_arguments()

    assert arguments() == {
        "x-queue-type": "quorum",
        "x-max-length": 10_000,
        "x-max-length-bytes": 256 * 1024 * 1024,
        "x-overflow": "reject-publish",
    }
    # for a queue bounded by a policy: declared as before the limits existed
    assert arguments(dead_letter_max_messages=0, dead_letter_max_bytes=0) == {
        "x-queue-type": "quorum"
    }
    with pytest.raises(ValueError):
        arguments(dead_letter_max_messages=-1)


# --------------------------------------------------------------------------- the coordinator


async def test_the_coordinator_prunes_finished_sagas_on_its_clock() -> None:
    env = SagaTestEnvironment([saga], [], retention=Retention(finished=DAY, interval=HOUR))
    t0 = env.clock.now()
    await insert(
        env.store,
        state("done", SagaStatus.COMPLETED, t0),
        state("failed", SagaStatus.FAILED, t0),
        state("running", SagaStatus.RUNNING, t0),
    )
    async with env:
        env.clock.advance(2 * HOUR)
        await asyncio.sleep(0.01)
        assert await env.store.get("done") is not None  # not a day old yet

        async def gone() -> bool:
            return await env.store.get("done") is None

        await until(gone, env.clock, step=HOUR)
        assert env.clock.now() - t0 > DAY
        assert await env.store.log("done") == []
        assert await env.store.get("failed") is not None
        assert await env.store.get("running") is not None


class Flaky(InMemorySagaStore):
    """A store whose first prune fails as a database that went away does."""

    def __init__(self, clock: FakeClock) -> None:
        super().__init__(clock=clock)
        self.prunes = 0

    async def prune(self, statuses: Any, before: float, limit: int) -> Pruned:
        self.prunes += 1
        if self.prunes == 1:
            raise StoreError("prune failed: connection lost")
        return await super().prune(statuses, before, limit)


async def test_a_failed_prune_is_logged_and_tried_again_at_the_next_interval(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = FakeClock()
    store = Flaky(clock)
    coordinator = Coordinator(
        [saga],
        store=store,
        transport=InMemoryTransport(Topology()),
        clock=clock,
        retention=Retention(finished=HOUR, interval=600),
    )
    await insert(store, state("done", SagaStatus.COMPLETED, clock.now() - 2 * HOUR))
    await coordinator.start()
    try:

        async def gone() -> bool:
            return await store.get("done") is None

        with caplog.at_level(logging.WARNING, logger="sagaflow.retention"):
            await until(gone, clock)
        assert store.prunes >= 2
        assert "saga retention failed, trying again" in caplog.text
    finally:
        await coordinator.stop()


async def test_without_retention_the_coordinator_prunes_nothing() -> None:
    env = SagaTestEnvironment([saga], [])
    await insert(env.store, state("done", SagaStatus.COMPLETED, env.clock.now() - 1000 * DAY))
    async with env:
        for _ in range(20):
            env.clock.advance(DAY)
            await asyncio.sleep(0.001)
    assert await env.store.get("done") is not None


# --------------------------------------------------------------------------- the worker


def reply(command_id: str) -> Envelope:
    return Envelope(
        message_id=f"{command_id}:reply:1",
        command_id=command_id,
        saga_id=command_id.split(":")[0],
        saga_name="sample",
        step="reserve",
        step_index=0,
        kind=MessageKind.REPLY,
        attempt=1,
        type="hotel.book",
        payload={},
        outcome=Outcome.SUCCESS,
        for_kind=MessageKind.COMMAND,
    )


async def test_the_worker_prunes_its_inbox_by_age() -> None:
    past = FakeClock(start=1_000_000.0)  # rows written long ago, by this clock
    inbox = InMemoryParticipantStore(clock=past)
    async with inbox.transaction() as tx:
        await tx.claim(["old:book:command"])
        await tx.complete([reply("old:book:command")])
    worker = Worker(
        Participant("hotel"),
        transport=InMemoryTransport(Topology()),
        store=inbox,
        retention=Retention(inbox=DAY, interval=0.01),
    )
    await worker.start()
    try:

        async def gone() -> bool:
            async with inbox.transaction() as tx:
                return await tx.claim(["old:book:command"]) == {}

        await until(gone)
    finally:
        await worker.stop()


# --------------------------------------------------------------------------- the command


def test_db_prune_deletes_finished_sagas_and_reports(monkeypatch: pytest.MonkeyPatch) -> None:
    store = InMemorySagaStore()
    monkeypatch.setattr(common, "saga_store", lambda settings: store)
    now = time.time()
    asyncio.run(
        insert(
            store,
            *(state(f"old-{n}", SagaStatus.COMPLETED, now - 31 * DAY) for n in range(5)),
            state("failed", SagaStatus.FAILED, now - 31 * DAY),
            state("young", SagaStatus.COMPENSATED, now - 29 * DAY),
        )
    )
    runner = CliRunner()

    result = runner.invoke(app, ["db", "prune", "--json", "--batch", "2"])

    assert result.exit_code == 0, result.output
    report = orjson.loads(result.stdout)
    assert (report["sagas"], report["log_entries"], report["failed_before"]) == (5, 5, None)
    assert {s.saga_id for s in asyncio.run(store.list())} == {"failed", "young"}

    result = runner.invoke(app, ["db", "prune", "--failed-older-than", "30d"])
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("deleted 1 sagas and 1 log entries (finished before ")

    result = runner.invoke(app, ["db", "prune", "--older-than", "soon"])
    assert result.exit_code == 2
    assert "--older-than: 'soon' is not a duration" in result.stderr


def test_db_prune_with_everything_kept_forever_does_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SAGAFLOW_RETENTION", "forever")
    monkeypatch.setenv("SAGAFLOW_INBOX_RETENTION", "forever")
    runner = CliRunner()
    result = runner.invoke(app, ["db", "prune"])
    assert result.exit_code == 0 and "kept forever" in result.stdout
    result = runner.invoke(app, ["db", "prune", "--participant", "hotel"])
    assert result.exit_code == 0 and "kept forever" in result.stdout


def test_db_prune_of_an_inbox(monkeypatch: pytest.MonkeyPatch) -> None:
    inbox = InMemoryParticipantStore(clock=FakeClock(start=1_000_000.0))
    monkeypatch.setattr(common, "participant_store", lambda settings, service: inbox)

    async def handled() -> None:
        async with inbox.transaction() as tx:
            await tx.claim(["a:book:command", "b:book:command"])
            await tx.complete([reply("a:book:command"), reply("b:book:command")])

    asyncio.run(handled())
    result = CliRunner().invoke(app, ["db", "prune", "--participant", "hotel", "--json"])
    assert result.exit_code == 0, result.output
    report = orjson.loads(result.stdout)
    assert (report["participant"], report["schema"], report["inbox_rows"]) == ("hotel", "hotel", 2)

    result = CliRunner().invoke(
        app, ["db", "prune", "--participant", "hotel", "--older-than", "1h"]
    )
    assert result.exit_code == 2 and "at least 1d" in result.stderr


# --------------------------------------------------------------------------- dead letters


@dataclass
class Received:
    """A delivery from a foreign publisher, past the transport's own size check."""

    body: bytes
    queue: str = "sagaflow.replies"
    headers: dict[str, str] = field(default_factory=dict)
    redelivered: bool = False
    acked: bool = False

    async def ack(self) -> None:
        self.acked = True

    async def nack(self, requeue: bool = True) -> None:
        raise AssertionError("not expected")


async def test_an_oversized_message_is_dead_lettered_as_a_prefix_and_never_replayed() -> None:
    transport = InMemoryTransport(Topology(), max_message_bytes=2048)
    await transport.start(["hotel"])
    body = b'{"saga_id": "s-1", "pad": "' + b"p" * 100_000 + b'"}'
    delivery = Received(body)

    await transport.dead_letter(delivery, "too_large: 100 KB")

    assert delivery.acked
    [letter] = await transport.dead_letters()
    assert KEPT_BYTES > 2048 and letter.body == body[:2048]  # at most the limit
    assert letter.headers[H_ORIGINAL_SIZE] == str(len(body))
    assert letter.headers[H_ORIGINAL_SHA256] == hashlib.sha256(body).hexdigest()
    with pytest.raises(TransportError, match="only a prefix"):
        await transport.replay_dead_letters([letter.id])
    await transport.replay_dead_letters()  # all: the cut one is skipped
    assert [d.id for d in await transport.dead_letters()] == [letter.id]
    await transport.close()


def test_the_dead_letter_headers_and_arguments_are_in_the_protocol_page() -> None:
    from pathlib import Path

    page = (Path(__file__).resolve().parents[2] / "docs" / "protocol.md").read_text()
    for header in (H_ORIGINAL_SIZE, H_ORIGINAL_SHA256):
        assert f"`{header}`" in page
    for name, value in RabbitMQTransport("amqp://x").dead_letter_arguments().items():
        assert f"`{name}: {value}`" in page
