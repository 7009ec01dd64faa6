"""The worker's optimistic batch: when a command that refused before gets a savepoint.

The in-memory participant store is not atomic (a rollback cannot undo a
handler's effects in memory), so the worker never takes the optimistic path
with it. Here a spy store claims atomicity (its handlers write nothing) and
counts savepoints, to pin down the rule: in a batch of several commands an
action that has refused runs in a savepoint of its own; a command alone in its
batch runs without one (its refusal costs one careful redo instead).
"""

from __future__ import annotations

import asyncio
from typing import Any

from pydantic import BaseModel

from sagaflow import Action, BusinessFailure, HandlerContext, Participant, Worker
from sagaflow.core.messages import Envelope, MessageKind, Outcome, decode
from sagaflow.core.ports import Delivery
from sagaflow.store import InMemoryParticipantStore
from sagaflow.store.memory_participant import InMemoryParticipantTransaction
from sagaflow.transport import InMemoryTransport


class Charge(BaseModel):
    n: int


class Charged(BaseModel):
    n: int


charge = Action("bank", "charge", Charge, Charged)
bank = Participant("bank")


@bank.handler(charge)
async def handle(command: Charge, ctx: HandlerContext) -> Charged:
    if command.n % 2:
        raise BusinessFailure("declined")
    return Charged(n=command.n)


class CountingTransaction:
    """The store's transaction, counting the savepoints opened on it."""

    def __init__(self, tx: InMemoryParticipantTransaction, store: SpyStore) -> None:
        self._tx = tx
        self._store = store

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tx, name)

    def savepoint(self) -> Any:
        self._store.savepoints += 1
        return self._tx.savepoint()


class CountingContext:
    def __init__(self, inner: Any, store: SpyStore) -> None:
        self._inner = inner
        self._store = store

    async def __aenter__(self) -> CountingTransaction:
        return CountingTransaction(await self._inner.__aenter__(), self._store)

    async def __aexit__(self, *exc: Any) -> None:
        await self._inner.__aexit__(*exc)


class SpyStore(InMemoryParticipantStore):
    """Atomic as far as the worker knows; counts the savepoints it opens."""

    def __init__(self) -> None:
        super().__init__()
        self.savepoints = 0

    @property
    def atomic(self) -> bool:
        return True

    def transaction(self) -> Any:
        return CountingContext(super().transaction(), self)


def command(n: int) -> Envelope:
    return Envelope(
        message_id=f"saga-{n}:charge:command:1",
        command_id=f"saga-{n}:charge:command",
        saga_id=f"saga-{n}",
        saga_name="pay",
        step="charge",
        step_index=0,
        kind=MessageKind.COMMAND,
        attempt=1,
        type="bank.charge",
        payload={"n": n},
    )


async def test_a_lone_command_of_a_refusing_action_runs_without_a_savepoint() -> None:
    transport = InMemoryTransport()
    store = SpyStore()
    worker = Worker(bank, transport=transport, store=store, concurrency=1)
    replies: asyncio.Queue[Envelope] = asyncio.Queue()

    def collect(delivery: Delivery) -> None:
        replies.put_nowait(decode(delivery.body))
        asyncio.get_running_loop().create_task(delivery.ack())

    await transport.start(["bank"])
    await transport.consume(transport.topology.replies_queue, collect, prefetch=100)
    await worker.start()
    try:

        async def one(n: int) -> Envelope:
            await transport.publish([command(n)])
            return await asyncio.wait_for(replies.get(), 5)

        refused = await one(1)  # the first refusal: the careful way, savepoints there
        assert refused.outcome is Outcome.FAILURE
        before = store.savepoints
        for n in (2, 4, 6):  # alone in their batch: the fast path, no savepoint
            assert (await one(n)).outcome is Outcome.SUCCESS
        assert store.savepoints == before

        refused_again = await one(3)  # alone: a careful redo answers it
        assert refused_again.outcome is Outcome.FAILURE
        assert refused_again.reason == "declined"

        # several in one batch: each charge in its own savepoint, the refusal
        # undoes only itself and the batch stays on the fast path
        before = store.savepoints
        await transport.publish([command(n) for n in (10, 11, 12)])
        got = [await asyncio.wait_for(replies.get(), 5) for _ in range(3)]
        batch = {r.saga_id: r.outcome for r in got}
        assert batch == {
            "saga-10": Outcome.SUCCESS,
            "saga-11": Outcome.FAILURE,
            "saga-12": Outcome.SUCCESS,
        }
        assert store.savepoints == before + 3
    finally:
        await worker.stop()
        await transport.close()
