"""Test sagas without a broker or a database.

``SagaTestEnvironment`` runs a real ``Coordinator`` and real ``Worker``s over the
in-memory transport and stores, with a fake clock::

    async with SagaTestEnvironment([create_order], [inventory, payment]) as env:
        handle = await env.start_saga(create_order, {"order_id": "o1", ...})
        await env.drain()                 # run until nothing moves
        assert (await env.get(handle.saga_id)).status is SagaStatus.COMPLETED
        await env.advance(60)             # move time: timeouts and back-offs fire
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import Iterable, Sequence
from types import TracebackType
from typing import Any

from pydantic import BaseModel

from sagaflow.core.definition import Saga
from sagaflow.core.errors import SagaflowError
from sagaflow.core.messages import Envelope, Outcome
from sagaflow.core.ports import Topology
from sagaflow.core.state import LogEntry, SagaState
from sagaflow.runtime.client import SagaHandle
from sagaflow.runtime.coordinator import Coordinator
from sagaflow.runtime.hooks import CompositeHooks, Hooks
from sagaflow.runtime.participant import Participant, Worker
from sagaflow.store import InMemoryParticipantStore, InMemorySagaStore
from sagaflow.transport.memory import InMemoryTransport


class FakeClock:
    """A clock that moves only when told to; sleepers wake when time passes them."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self._now = start
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()

    def now(self) -> float:
        return self._now

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self._now + seconds, next(self._seq), future))
        await future

    def advance(self, seconds: float) -> None:
        self._now += seconds
        while self._sleepers and self._sleepers[0][0] <= self._now:
            _, _, future = heapq.heappop(self._sleepers)
            if not future.done():
                future.set_result(None)


class HandlerFailed(SagaflowError):
    """A handler raised during ``drain(fail_fast=True)``."""


class _Recorder(Hooks):
    def __init__(self) -> None:
        self.errors: list[tuple[Envelope, str]] = []

    def handled(self, envelope: Envelope, reply: Envelope | None, seconds: float) -> None:
        if reply is not None and reply.outcome is Outcome.ERROR:
            self.errors.append((envelope, reply.reason or ""))


class SagaTestEnvironment:
    """A coordinator and the given participants, in memory, with a fake clock.

    ``hooks`` go to the coordinator, ``worker_hooks`` to every worker (tracing,
    metrics...).
    """

    def __init__(
        self,
        sagas: Iterable[Saga[Any]],
        participants: Iterable[Participant],
        *,
        clock: FakeClock | None = None,
        hooks: Hooks | None = None,
        worker_hooks: Hooks | None = None,
        **coordinator_options: Any,
    ) -> None:
        self.clock = clock or FakeClock()
        self.transport = InMemoryTransport(Topology())
        self.store = InMemorySagaStore(clock=self.clock)
        self._recorder = _Recorder()
        self.coordinator = Coordinator(
            list(sagas),
            store=self.store,
            transport=self.transport,
            clock=self.clock,
            hooks=hooks,
            **coordinator_options,
        )
        self.participant_stores = {p.service: InMemoryParticipantStore() for p in participants}
        self.workers = [
            Worker(
                p,
                transport=self.transport,
                store=self.participant_stores[p.service],
                hooks=self._recorder
                if worker_hooks is None
                else CompositeHooks([self._recorder, worker_hooks]),
            )
            for p in participants
        ]

    async def __aenter__(self) -> SagaTestEnvironment:
        await self.coordinator.start()
        for worker in self.workers:
            await worker.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for worker in self.workers:
            await worker.stop()
        await self.coordinator.stop()

    async def start_saga(
        self, saga: Saga[Any], data: BaseModel | dict[str, Any], *, saga_id: str | None = None
    ) -> SagaHandle:
        return await self.coordinator.start_saga(saga, data, saga_id=saga_id)

    async def get(self, saga_id: str) -> SagaState:
        state = await self.store.get(saga_id)
        if state is None:
            raise SagaflowError(f"no saga {saga_id!r}")
        return state

    async def log(self, saga_id: str) -> Sequence[LogEntry]:
        return await self.store.log(saga_id)

    async def drain(self, *, fail_fast: bool = False, max_rounds: int = 100_000) -> None:
        """Run until no message, batch or due outbox row is left.

        Args:
            fail_fast: Raise ``HandlerFailed`` on the first handler that raised
                (a transient error, which the saga would otherwise retry).
        """
        quiet = 0
        for _ in range(max_rounds):
            if fail_fast and self._recorder.errors:
                envelope, reason = self._recorder.errors.pop(0)
                raise HandlerFailed(f"{envelope.type} for saga {envelope.saga_id}: {reason}")
            await asyncio.sleep(0)
            busy = not (
                self.transport.is_idle()
                and self.coordinator.idle
                and all(worker.idle for worker in self.workers)
            )
            if busy:
                quiet = 0
                continue
            if await self.coordinator.relay_once() > 0:
                quiet = 0
                continue
            quiet += 1
            if quiet >= 3:
                return
        raise SagaflowError("drain(): the system did not settle")

    async def advance(self, seconds: float, *, fail_fast: bool = False) -> None:
        """Move the fake clock, fire due timers and drain."""
        self.clock.advance(seconds)
        while await self.coordinator.fire_timers() > 0:
            await self.drain(fail_fast=fail_fast)
        await self.drain(fail_fast=fail_fast)
