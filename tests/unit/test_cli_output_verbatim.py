"""What the CLI prints of user data comes out exactly as stored (issue 13).

Ids such as ``vb-1:hotel:command:1:reply`` contain rich's emoji codes
(``:hotel:``), reasons may contain its markup (``[red]``): an operator copies
them from the output into ``dlq replay`` or a ticket, so no output may rewrite
them, and ``sagas show`` never cuts the saga data.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sagaflow import BusinessFailure, HandlerContext, Participant, SagaStatus
from sagaflow.cli import app, common
from sagaflow.core.ports import DeadLetter
from sagaflow.store import InMemorySagaStore
from sagaflow.testing import SagaTestEnvironment
from sagaflow.transport.memory import InMemoryTransport
from tests.sample import Cmd, Ok, charge, refund, release, reserve, saga

ROOT = Path(__file__).resolve().parents[2]
TRICKY_ID = "vb-1:hotel:command:1:reply"
TRICKY_REASON = "card [red]declined[/red] :warning: for [bold]x"


@pytest.fixture(autouse=True)
def _isolate(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name in list(os.environ):
        if name.upper().startswith("SAGAFLOW_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("SAGAFLOW_LOG_FORMAT", "console")
    yield


def _participants() -> list[Participant]:
    inventory, payment = Participant("inventory"), Participant("payment")

    @inventory.handler(reserve)
    async def do_reserve(cmd: Cmd, ctx: HandlerContext) -> Ok:
        return Ok(ref=":hotel: [b]r-1[/b]")

    @inventory.handler(release)
    async def do_release(cmd: Cmd, ctx: HandlerContext) -> Ok:
        return Ok()

    @payment.handler(charge)
    async def do_charge(cmd: Cmd, ctx: HandlerContext) -> Ok:
        raise BusinessFailure(TRICKY_REASON)

    @payment.handler(refund)
    async def do_refund(cmd: Cmd, ctx: HandlerContext) -> Ok:
        return Ok()

    return [inventory, payment]


LONG_ORDER = "order-" + "x" * 400  # longer than any terminal line


@pytest.fixture
def compensated(monkeypatch: pytest.MonkeyPatch) -> InMemorySagaStore:
    """A compensated saga whose id, data and failure reason look like rich markup."""

    async def run() -> InMemorySagaStore:
        env = SagaTestEnvironment([saga], _participants())
        async with env:
            handle = await env.start_saga(
                saga, {"order_id": LONG_ORDER, "amount": 5}, saga_id=TRICKY_ID
            )
            await env.drain()
            assert (await env.get(handle.saga_id)).status is SagaStatus.COMPENSATED
        return env.store

    memory = asyncio.run(run())
    monkeypatch.setattr(common, "saga_store", lambda settings: memory)
    return memory


def test_sagas_list_prints_ids_and_reasons_verbatim_with_the_step_name(
    compensated: InMemorySagaStore,
) -> None:
    result = CliRunner().invoke(app, ["sagas", "list"])
    assert result.exit_code == 0, result.output
    assert TRICKY_ID in result.stdout
    assert TRICKY_REASON in result.stdout
    assert "🏨" not in result.stdout and "⚠" not in result.stdout
    # the step by its name, not "#1 command"
    assert "charge" in result.stdout
    assert "#1" not in result.stdout
    json = CliRunner().invoke(app, ["sagas", "list", "--json"])
    assert '"step": "charge"' in json.stdout


def test_sagas_show_never_cuts_or_rewrites_the_data(
    compensated: InMemorySagaStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "60")  # a narrow terminal
    result = CliRunner().invoke(app, ["sagas", "show", TRICKY_ID])
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert LONG_ORDER in out  # whole, on one line: copyable
    assert ":hotel: [b]r-1[/b]" in out
    assert TRICKY_ID in out
    assert "🏨" not in out
    assert "…" not in out  # nothing cut to an ellipsis
    # the reason is folded at 60 columns but not shortened
    assert "".join(out.split()).count("".join(TRICKY_REASON.split())) >= 1


class _OneDeadLetter(InMemoryTransport):
    """The in-memory transport holding one dead letter whose id looks like markup."""

    def __init__(self, letter: DeadLetter) -> None:
        super().__init__()
        self.letters = [letter]
        self.replayed: list[str] = []

    async def close(self) -> None:
        pass  # each command closes it; the next one uses it again

    async def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        return self.letters[:limit]

    async def replay_dead_letters(self, ids: Sequence[str] | None = None) -> list[str]:
        chosen = [d.id for d in self.letters if ids is None or d.id in ids]
        self.letters = [d for d in self.letters if d.id not in chosen]
        self.replayed += chosen
        return chosen


def test_dlq_list_prints_the_id_that_dlq_replay_takes(
    compensated: InMemorySagaStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    broker = _OneDeadLetter(
        DeadLetter(
            id=TRICKY_ID,
            reason=TRICKY_REASON,
            source_queue="sagaflow.replies",
            body=b'{"saga_id": "vb-1", "type": "hotel.book"}',
            headers={},
        )
    )
    monkeypatch.setattr(common, "transport", lambda settings, name: broker)
    human = CliRunner().invoke(app, ["dlq", "list"])
    assert human.exit_code == 0, human.output
    assert TRICKY_ID in human.stdout
    assert TRICKY_REASON in human.stdout
    assert "🏨" not in human.stdout
    # the id as printed is the id replay takes
    shown = next(word for word in human.stdout.split() if word.startswith("vb-1:"))
    replayed = CliRunner().invoke(app, ["dlq", "replay", shown, "-r", "copied from the list"])
    assert replayed.exit_code == 0, replayed.output
    assert broker.replayed == [TRICKY_ID]


def test_the_order_service_prints_help_instead_of_starting() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAGAFLOW_")}
    # a broker and database that do not exist: starting would hang or fail, help must not
    env["SAGAFLOW_AMQP_URL"] = "amqp://guest:guest@127.0.0.1:1/"
    env["SAGAFLOW_DATABASE_URL"] = "postgresql://postgres@127.0.0.1:1/none"
    done = subprocess.run(
        [sys.executable, "-m", "services.order", "--help"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "usage: python -m services.order" in done.stdout
    assert "ORDER_HTTP_PORT" in done.stdout
    assert "order service on" not in done.stderr  # it did not start
    bad = subprocess.run(
        [sys.executable, "-m", "services.order", "--bogus"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert bad.returncode == 2
    assert "unrecognized arguments: --bogus" in bad.stderr
