"""The participant worker on the in-memory adapters: each command on its own,
concurrently, its handler run once (issue 17, items 3, 4 and 5)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from pydantic import BaseModel

from sagaflow import Action, BusinessFailure, HandlerContext, Participant, Worker
from sagaflow.core.errors import ConcurrencyConflict, StoreError
from sagaflow.core.messages import Envelope, MessageKind, Outcome, decode
from sagaflow.core.ports import Delivery, ParticipantTransaction, Topology
from sagaflow.runtime import participant as participant_module
from sagaflow.runtime.hooks import Hooks
from sagaflow.store import InMemoryParticipantStore
from sagaflow.transport import InMemoryTransport

pytestmark = pytest.mark.timeout(20)


class Charge(BaseModel):
    n: int


class Charged(BaseModel):
    n: int


charge = Action("bank", "charge", Charge, Charged)
refund = Action("bank", "refund", Charge, Charged)


def command(n: int, *, kind: MessageKind = MessageKind.COMMAND, attempt: int = 1) -> Envelope:
    saga = f"saga-{n}"
    action = charge if kind is MessageKind.COMMAND else refund
    return Envelope(
        message_id=f"{saga}:charge:{kind.value}:{attempt}",
        command_id=f"{saga}:charge:{kind.value}",
        saga_id=saga,
        saga_name="pay",
        step="charge",
        step_index=0,
        kind=kind,
        attempt=attempt,
        type=action.type,
        payload={"n": n},
    )


class Recorder(Hooks):
    def __init__(self) -> None:
        self.reruns: list[tuple[str, str]] = []
        self.handled_ids: list[str] = []
        self.rolled: list[str] = []

    def rerun(self, envelope: Envelope, why: str) -> None:
        self.reruns.append((envelope.saga_id, why))

    def handled(self, envelope: Envelope, reply: Envelope | None, seconds: float) -> None:
        self.handled_ids.append(envelope.saga_id)

    def rolled_back(self, envelope: Envelope) -> None:
        self.rolled.append(envelope.saga_id)


class Bench:
    """A worker on an in-memory broker, and the replies it sends."""

    def __init__(self, transport: InMemoryTransport) -> None:
        self.transport = transport
        self.replies: asyncio.Queue[Envelope] = asyncio.Queue()

    def collect(self, delivery: Delivery) -> None:
        self.replies.put_nowait(decode(delivery.body))
        asyncio.get_running_loop().create_task(delivery.ack())

    async def send(self, *envelopes: Envelope) -> list[Envelope]:
        await self.transport.publish(list(envelopes))
        return [await asyncio.wait_for(self.replies.get(), 5) for _ in envelopes]


@asynccontextmanager
async def running(worker: Worker) -> AsyncIterator[Bench]:
    transport = worker.transport
    assert isinstance(transport, InMemoryTransport)
    bench = Bench(transport)
    await transport.start(["bank"])
    await transport.consume(transport.topology.replies_queue, bench.collect, prefetch=100)
    await worker.start()
    try:
        yield bench
    finally:
        await worker.stop()


async def test_handlers_of_different_sagas_run_at_once() -> None:
    """Two commands that wait for each other finish only if they run concurrently."""
    bank = Participant("bank")
    arrived = {1: asyncio.Event(), 2: asyncio.Event()}

    @bank.handler(charge)
    async def meet(cmd: Charge, ctx: HandlerContext) -> Charged:
        arrived[cmd.n].set()
        await arrived[3 - cmd.n].wait()
        return Charged(n=cmd.n)

    worker = Worker(bank, transport=InMemoryTransport(), store=InMemoryParticipantStore())
    async with running(worker) as bench:
        got = await bench.send(command(1), command(2))
    assert {r.saga_id: r.outcome for r in got} == {
        "saga-1": Outcome.SUCCESS,
        "saga-2": Outcome.SUCCESS,
    }


async def test_a_refusal_runs_its_handler_once_and_is_stored() -> None:
    bank = Participant("bank")
    calls: list[int] = []

    @bank.handler(charge)
    async def pay(cmd: Charge, ctx: HandlerContext) -> Charged:
        calls.append(cmd.n)
        if cmd.n % 2:
            raise BusinessFailure("declined")
        return Charged(n=cmd.n)

    hooks = Recorder()
    worker = Worker(
        bank, transport=InMemoryTransport(), store=InMemoryParticipantStore(), hooks=hooks
    )
    async with running(worker) as bench:
        got = await bench.send(*(command(n) for n in range(10)))
        again = await bench.send(command(3))  # redelivered: answered from the inbox
    assert sorted(calls) == list(range(10))
    assert {r.saga_id: r.outcome for r in got} == {
        f"saga-{n}": Outcome.FAILURE if n % 2 else Outcome.SUCCESS for n in range(10)
    }
    assert again[0].outcome is Outcome.FAILURE and again[0].reason == "declined"
    assert hooks.reruns == []


async def test_a_transient_error_is_an_error_reply_that_is_not_stored() -> None:
    bank = Participant("bank")
    calls: list[int] = []

    @bank.handler(charge)
    async def flaky(cmd: Charge, ctx: HandlerContext) -> Charged:
        calls.append(cmd.n)
        if len(calls) == 1:
            raise ConnectionError("gateway down")
        return Charged(n=cmd.n)

    worker = Worker(bank, transport=InMemoryTransport(), store=InMemoryParticipantStore())
    async with running(worker) as bench:
        (first,) = await bench.send(command(1))
        (second,) = await bench.send(command(1, attempt=2))  # the step's retry
    assert first.outcome is Outcome.ERROR and first.reason == "ConnectionError: gateway down"
    assert second.outcome is Outcome.SUCCESS
    assert calls == [1, 1]


async def test_a_compensation_cannot_refuse() -> None:
    bank = Participant("bank")

    @bank.handler(charge)
    async def pay(cmd: Charge, ctx: HandlerContext) -> Charged:
        return Charged(n=cmd.n)

    @bank.handler(refund)
    async def stubborn(cmd: Charge, ctx: HandlerContext) -> Charged:
        raise BusinessFailure("no")

    worker = Worker(bank, transport=InMemoryTransport(), store=InMemoryParticipantStore())
    async with running(worker) as bench:
        (skipped,) = await bench.send(command(1, kind=MessageKind.COMPENSATION))
        await bench.send(command(2))
        (undo,) = await bench.send(command(2, kind=MessageKind.COMPENSATION))
    assert skipped.outcome is Outcome.SUCCESS  # nothing to undo: the command never ran
    assert undo.outcome is Outcome.ERROR and undo.reason == "compensation refused: no"


async def test_a_command_and_its_compensation_in_one_lane_batch_are_both_answered() -> None:
    """A parallel group's abandoned branch: its compensation comes right after the
    command, and one lane takes both into one transaction. The command took
    effect there, so the compensation undoes it (before, the compensation's
    tombstone made storing the command's reply fail on every retry: the lane
    never moved again)."""
    bank = Participant("bank")
    balance: dict[int, int] = {}

    @bank.handler(charge)
    async def pay(cmd: Charge, ctx: HandlerContext) -> Charged:
        balance[cmd.n] = balance.get(cmd.n, 0) + 1
        return Charged(n=cmd.n)

    @bank.handler(refund)
    async def give_back(cmd: Charge, ctx: HandlerContext) -> Charged:
        balance[cmd.n] -= 1
        return Charged(n=cmd.n)

    transport = InMemoryTransport()
    worker = Worker(bank, transport=transport, store=InMemoryParticipantStore(), concurrency=1)
    gate = asyncio.Event()
    batches: list[int] = []
    transact = worker._transact

    async def gated(commands: Any) -> None:
        await gate.wait()  # the first batch waits until both messages are in
        batches.append(len(commands))
        await transact(commands)

    worker._transact = gated  # type: ignore[method-assign]
    async with running(worker) as bench:
        await transport.publish([command(1)])
        await asyncio.sleep(0.05)  # the lane took the command and waits at the gate
        await transport.publish([command(2), command(2, kind=MessageKind.COMPENSATION)])
        await asyncio.sleep(0.05)
        gate.set()
        replies = [await asyncio.wait_for(bench.replies.get(), 5) for _ in range(3)]
    assert 2 in batches, f"the command and its compensation shared a batch: {batches}"
    assert sorted((r.saga_id, r.for_kind, r.outcome) for r in replies) == [
        ("saga-1", MessageKind.COMMAND, Outcome.SUCCESS),
        ("saga-2", MessageKind.COMMAND, Outcome.SUCCESS),
        ("saga-2", MessageKind.COMPENSATION, Outcome.SUCCESS),
    ]
    compensation = next(r for r in replies if r.for_kind is MessageKind.COMPENSATION)
    assert compensation.reason is None, "undone, not 'nothing to undo'"
    assert balance == {1: 1, 2: 0}


class FlakyStore(InMemoryParticipantStore):
    """Fails the commit of its first ``failures`` transactions, as a restart would."""

    def __init__(self, failures: int) -> None:
        super().__init__()
        self.failures = failures

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[ParticipantTransaction]:  # type: ignore[override]
        async with super().transaction() as tx:
            yield tx
            if self.failures > 0:
                self.failures -= 1
                raise StoreError("commit failed: the database restarted")


async def test_a_failed_commit_runs_the_handler_again_and_counts_it() -> None:
    bank = Participant("bank")
    calls: list[int] = []

    @bank.handler(charge)
    async def pay(cmd: Charge, ctx: HandlerContext) -> Charged:
        calls.append(cmd.n)
        return Charged(n=cmd.n)

    hooks = Recorder()
    worker = Worker(bank, transport=InMemoryTransport(), store=FlakyStore(1), hooks=hooks)
    async with running(worker) as bench:
        (reply,) = await bench.send(command(1))
    assert reply.outcome is Outcome.SUCCESS
    assert calls == [1, 1]
    assert hooks.reruns == [("saga-1", "store")]
    assert hooks.rolled == ["saga-1"] and hooks.handled_ids == ["saga-1"]


class ScriptedStore(InMemoryParticipantStore):
    """Fails the commits of its first transactions with the given errors, and
    records how many handlers ran in each transaction (``ran``)."""

    def __init__(self, *failures: StoreError) -> None:
        super().__init__()
        self.failures = list(failures)
        self.sizes: list[int] = []

    def ran(self) -> None:
        self.sizes[-1] += 1

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[ParticipantTransaction]:  # type: ignore[override]
        async with super().transaction() as tx:
            self.sizes.append(0)
            yield tx
            if self.failures:
                raise self.failures.pop(0)


async def test_a_batch_that_deadlocks_on_a_retry_runs_one_command_per_transaction() -> None:
    """After the database came back, a lane's batch retried whole can lose a
    deadlock to another lane's: it then runs one command per transaction, and
    so do the lanes' next batches for a while (scenario 4 found whole batches
    deadlocking each other once a second for ten seconds after a restart)."""
    bank = Participant("bank")

    store = ScriptedStore(
        StoreError("commit failed: the database restarted"),
        ConcurrencyConflict("handler failed: DeadlockDetectedError: deadlock detected"),
    )

    @bank.handler(charge)
    async def pay(cmd: Charge, ctx: HandlerContext) -> Charged:
        store.ran()
        return Charged(n=cmd.n)

    worker = Worker(bank, transport=InMemoryTransport(), store=store, concurrency=1)
    async with running(worker) as bench:
        first = await bench.send(*(command(n) for n in range(4)))
        later = await bench.send(*(command(n) for n in range(4, 8)))
    assert all(r.outcome is Outcome.SUCCESS for r in first + later)
    # whole, whole (deadlocked), split; then the next batch one by one too
    assert store.sizes == [4, 4, 1, 1, 1, 1, 1, 1, 1, 1]


class BrokenHook(Hooks):
    """A user's hook with a bug: it raises for one saga."""

    def handled(self, envelope: Envelope, reply: Envelope | None, seconds: float) -> None:
        if envelope.saga_id == "saga-13":
            raise RuntimeError("bug in a hook")


async def test_a_command_whose_handling_raises_outside_the_handler_is_dead_lettered() -> None:
    """A bug outside the handler gives the command back until its last delivery,
    then dead-letters it with the error as the reason; the others flow."""
    bank = Participant("bank")
    calls: list[int] = []

    @bank.handler(charge)
    async def pay(cmd: Charge, ctx: HandlerContext) -> Charged:
        calls.append(cmd.n)
        return Charged(n=cmd.n)

    transport = InMemoryTransport(Topology(delivery_limit=2))
    worker = Worker(bank, transport=transport, store=InMemoryParticipantStore(), hooks=BrokenHook())
    async with running(worker) as bench:
        await transport.publish([command(n) for n in range(10, 20)])
        got = [await asyncio.wait_for(bench.replies.get(), 5) for _ in range(9)]
        for _ in range(100):
            if await transport.dead_letters():
                break
            await asyncio.sleep(0.01)
        letters = await transport.dead_letters()
    assert sorted(r.saga_id for r in got) == [f"saga-{n}" for n in range(10, 20) if n != 13]
    assert [d.reason for d in letters] == ["unhandled: RuntimeError: bug in a hook"]
    assert calls.count(13) == 1  # the handler's effect committed once; later tries found it


async def test_a_command_that_cannot_be_read_does_not_end_its_lane(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The header fuzzer found ``decode`` raising something other than
    ``MessageRejected``: the exception ended the lane silently, the delivery
    left unacknowledged, and ``concurrency`` such messages stopped the worker.
    Whatever reading a command raises, it is given back (dead-lettered on its
    last delivery) and the lane goes on."""
    real = participant_module.decode

    def flawed(body: bytes, *args: Any) -> Envelope:
        if b"saga-13" in body:
            raise TypeError("a bug in reading it")
        return real(body, *args)

    monkeypatch.setattr(participant_module, "decode", flawed)
    bank = Participant("bank")

    @bank.handler(charge)
    async def pay(cmd: Charge, ctx: HandlerContext) -> Charged:
        return Charged(n=cmd.n)

    transport = InMemoryTransport(Topology(delivery_limit=2))
    worker = Worker(bank, transport=transport, store=InMemoryParticipantStore(), concurrency=1)
    async with running(worker) as bench:
        await transport.publish([command(n) for n in range(10, 20)])
        got = [await asyncio.wait_for(bench.replies.get(), 5) for _ in range(9)]
        for _ in range(100):
            if await transport.dead_letters():
                break
            await asyncio.sleep(0.01)
        letters = await transport.dead_letters()
        (later,) = await bench.send(command(30))  # the one lane still works
    assert sorted(r.saga_id for r in got) == [f"saga-{n}" for n in range(10, 20) if n != 13]
    assert [d.reason for d in letters] == ["unhandled: TypeError: a bug in reading it"]
    assert later.outcome is Outcome.SUCCESS
