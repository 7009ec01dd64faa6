"""The test environment: a real coordinator and real workers, in one process.

``SagaTestEnvironment`` runs a real ``Coordinator`` and real ``Worker``s over the
in-memory transport and saga store, with a fake clock. The participants keep
their inbox in memory, or, given a ``database``, in PostgreSQL: then each
handler gets a real connection inside its inbox transaction, as in production::

    async with SagaTestEnvironment([create_order], [inventory, payment]) as env:
        handle = await env.start_saga(create_order, {"order_id": "o1", ...})
        await env.drain()                 # run until nothing moves
        await env.assert_saga(handle, status=SagaStatus.COMPLETED)
        await env.advance(60)             # move time: timeouts and back-offs fire

Every wait is bounded (``timeout`` wall-clock seconds, ``within`` fake ones)
and fails with :class:`HarnessTimeout`, naming each unfinished saga, its state
and what it waits for.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from types import TracebackType
from typing import Any

from pydantic import BaseModel

from sagaflow.core.definition import Saga
from sagaflow.core.errors import SagaflowError
from sagaflow.core.messages import Envelope, Outcome
from sagaflow.core.ports import ParticipantStore, Topology
from sagaflow.core.state import LogEntry, SagaState, SagaStatus
from sagaflow.runtime.client import SagaHandle
from sagaflow.runtime.coordinator import Coordinator
from sagaflow.runtime.hooks import CompositeHooks, Hooks
from sagaflow.runtime.participant import Participant, Worker
from sagaflow.store import InMemoryParticipantStore, InMemorySagaStore
from sagaflow.testing.clock import FakeClock
from sagaflow.testing.coverage import COVERAGE
from sagaflow.testing.faults import Faults, FaultyTransport
from sagaflow.testing.history import SagaHistory, describe

__all__ = ["HandlerFailed", "HarnessTimeout", "SagaTestEnvironment"]

DEFAULT_TIMEOUT = 5.0
"""Wall-clock seconds a wait of the harness (``drain()``, stopping a worker) may take."""
START_TIMEOUT = 30.0
"""Seconds a worker may take to reach its database at start (migrations, setup)."""
MAX_TIMER_STEPS = 10_000
"""Due times ``advance()`` stops at, at most, in one call."""


class HandlerFailed(SagaflowError):
    """A handler raised during ``drain(fail_fast=True)``."""


class HarnessTimeout(SagaflowError, AssertionError):
    """A wait of the test harness ran out; the message says what was still waiting."""


class _Recorder(Hooks):
    """What the workers did: errors for ``fail_fast``, handlers still running."""

    def __init__(self) -> None:
        self.errors: list[tuple[Envelope, str]] = []
        self.running: dict[str, tuple[Envelope, float]] = {}

    def handled(self, envelope: Envelope, reply: Envelope | None, seconds: float) -> None:
        if reply is not None and reply.outcome is Outcome.ERROR:
            self.errors.append((envelope, reply.reason or ""))

    def processing(self, envelope: Envelope, queue: str) -> AbstractContextManager[dict[str, str]]:
        return self._processing(envelope)

    @contextmanager
    def _processing(self, envelope: Envelope) -> Iterator[dict[str, str]]:
        key = f"{envelope.command_id}#{envelope.attempt}"
        self.running[key] = (envelope, time.monotonic())
        try:
            yield envelope.trace  # the context passes on unchanged
        finally:
            self.running.pop(key, None)


class SagaTestEnvironment:
    """A coordinator and the given participants, in one process, with a fake clock.

    Args:
        sagas: The saga definitions under test.
        participants: The participants whose handlers run (each in a real Worker).
        database: A PostgreSQL URL (or a :class:`~sagaflow.testing.TestDatabase`):
            each participant keeps its inbox in its own schema there and its
            handlers get a real connection in ``ctx.connection``; ``None``:
            everything in memory (``ctx.connection`` raises ``NoConnection``).
        clock: The fake clock (a new one by default).
        timeout: Wall-clock seconds any one wait of the harness may take.
        hooks: Given to the coordinator; ``worker_hooks`` to every worker.
        coordinator_options: Passed on to :class:`~sagaflow.Coordinator`. Its
            ``group_linger`` is 0 here: each reply is decided on arrival, so a
            test sees the same batches run after run (holding a group's replies
            for their siblings changes when they commit, never what they decide).
    """

    def __init__(
        self,
        sagas: Iterable[Saga[Any]],
        participants: Iterable[Participant],
        *,
        database: Any = None,
        clock: FakeClock | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        hooks: Hooks | None = None,
        worker_hooks: Hooks | None = None,
        **coordinator_options: Any,
    ) -> None:
        self.sagas = list(sagas)
        participants = list(participants)
        self.clock = clock or FakeClock()
        self.timeout = timeout
        self.faults = Faults(self.clock)
        self.transport = FaultyTransport(Topology(), self.faults)
        self.store = InMemorySagaStore(clock=self.clock)
        self._recorder = _Recorder()
        self.coordinator = Coordinator(
            self.sagas,
            store=self.store,
            transport=self.transport,
            clock=self.clock,
            hooks=hooks,
            **{"group_linger": 0.0, **coordinator_options},
        )
        self.database_url: str | None = (
            None if database is None else str(getattr(database, "url", database))
        )
        self.participant_stores: dict[str, ParticipantStore] = {
            p.service: self._participant_store(p) for p in participants
        }
        worker_options: dict[str, Any] = {} if self.database_url is None else {"concurrency": 2}
        self.workers = [
            Worker(
                p,
                transport=self.transport,
                store=self.participant_stores[p.service],
                hooks=self._recorder
                if worker_hooks is None
                else CompositeHooks([self._recorder, worker_hooks]),
                stop_timeout=timeout,
                start_timeout=max(timeout, START_TIMEOUT),
                **worker_options,
            )
            for p in participants
        ]
        self._started: list[Worker] = []
        self._open = False
        attach = getattr(database, "attach", None)
        if attach is not None:  # a ThrowawayDatabase closes us before it is dropped
            attach(self)

    def _participant_store(self, participant: Participant) -> ParticipantStore:
        if self.database_url is None:
            return InMemoryParticipantStore(clock=self.clock)
        from sagaflow.store.postgres_participant import PostgresParticipantStore

        schema = participant.service.replace("-", "_")
        return PostgresParticipantStore(self.database_url, schema=schema, min_size=1, max_size=2)

    # ------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> SagaTestEnvironment:
        self._open = True
        await self.coordinator.start()
        try:
            for worker in self.workers:
                await worker.start()
                self._started.append(worker)
        except BaseException:
            await self._stop()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()
        if exc is None:
            self.faults.check_all_fired()

    async def aclose(self) -> None:
        """Stop the workers (each within ``timeout``) and the coordinator, and
        report to the compensation coverage; a second call does nothing."""
        if not self._open:
            return
        self._open = False
        try:
            await self._record_coverage()
        finally:
            await self._stop()

    async def _stop(self) -> None:
        for worker in self._started:
            await worker.stop()
        self._started = []
        await self.coordinator.stop()

    async def _record_coverage(self) -> None:
        for saga in self.sagas:
            COVERAGE.define(saga)
        for state in await self.store.list(limit=1_000_000):
            history = SagaHistory.of(state, await self.store.log(state.saga_id))
            COVERAGE.exercised(state.saga_name, history.compensations)

    # ------------------------------------------------------------------ sagas

    async def start_saga(
        self, saga: Saga[Any], data: BaseModel | dict[str, Any], *, saga_id: str | None = None
    ) -> SagaHandle:
        return await self.coordinator.start_saga(saga, data, saga_id=saga_id)

    async def get(self, saga_id: str | SagaHandle) -> SagaState:
        saga_id = _id(saga_id)
        state = await self.store.get(saga_id)
        if state is None:
            raise SagaflowError(f"no saga {saga_id!r}")
        return state

    async def log(self, saga_id: str | SagaHandle) -> Sequence[LogEntry]:
        return await self.store.log(_id(saga_id))

    async def signal(
        self,
        saga_id: str | SagaHandle,
        name: str,
        data: BaseModel | dict[str, Any] | None = None,
        *,
        by: str = "test",
        reason: str = "sent by the test",
    ) -> SagaState:
        """Send the signal ``name`` to the saga's wait (as ``SagaClient.signal_saga``
        does), then drain; returns the state after."""
        await self.coordinator.signal_saga(_id(saga_id), name, data, by=by, reason=reason)
        await self.drain()
        return await self.get(saga_id)

    async def history(self, saga_id: str | SagaHandle) -> SagaHistory:
        """The saga's status, the steps and compensations that ran, its events."""
        state = await self.get(saga_id)
        return SagaHistory.of(state, await self.store.log(state.saga_id))

    async def assert_saga(
        self,
        saga_id: str | SagaHandle,
        *,
        status: SagaStatus | None = None,
        steps: Sequence[str] | None = None,
        compensations: Sequence[str] | None = None,
        events: Sequence[str] | None = None,
        reason: str | None = None,
    ) -> SagaHistory:
        """Check what the saga did; an ``AssertionError`` shows its whole history.

        Args:
            status: Its status now.
            steps: The steps that succeeded, in order.
            compensations: The steps whose compensation succeeded, in order.
            events: The log's events in order (``"command_sent"``, ...), or a
                part of them: every one given, in that order, among the others.
            reason: Why it left the happy path (``state.failure.reason``).
        """
        history = await self.history(saga_id)
        wrong = history.mismatches(
            status=status, steps=steps, compensations=compensations, events=events, reason=reason
        )
        if wrong:
            raise AssertionError("\n".join([*wrong, "", history.render()]))
        return history

    # ------------------------------------------------------------------ running

    async def drain(self, *, fail_fast: bool = False, timeout: float | None = None) -> None:
        """Run until no message, batch or due outbox row is left.

        Args:
            fail_fast: Raise ``HandlerFailed`` on the first handler that raised
                (a transient error, which the saga would otherwise retry).
            timeout: Wall-clock seconds to settle in (the environment's ``timeout``).

        Raises:
            HarnessTimeout: Still busy after ``timeout`` (a handler that does not
                return, messages that never stop): the message says which.
        """
        limit = self.timeout if timeout is None else timeout
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limit
        quiet = 0
        spins = 0
        while True:
            if fail_fast and self._recorder.errors:
                envelope, reason = self._recorder.errors.pop(0)
                raise HandlerFailed(f"{envelope.type} for saga {envelope.saga_id}: {reason}")
            if loop.time() > deadline:
                raise HarnessTimeout(
                    f"drain(): the system still moved after {limit:g}s\n" + await self.report()
                )
            # a handler waiting on its database needs the loop to poll: after a
            # burst of plain yields, give it a millisecond at a time
            await asyncio.sleep(0 if spins < 200 else 0.001)
            busy = not (
                self.transport.is_idle()
                and self.coordinator.idle
                and all(worker.idle for worker in self.workers)
            )
            if busy:
                quiet = 0
                spins += 1
                continue
            spins = 0
            if await self.coordinator.relay_once() > 0:
                quiet = 0
                continue
            quiet += 1
            if quiet >= 3:
                return

    async def advance(self, seconds: float, *, fail_fast: bool = False) -> None:
        """Move the fake clock by ``seconds``, stopping at every due time on the
        way (step timeouts, retry back-offs, delayed replies, waits and
        deadlines) to fire it and drain, as if the time had really passed."""
        if seconds < 0:
            raise ValueError("advance() moves time forward only")
        target = self.clock.now() + seconds
        await self.drain(fail_fast=fail_fast)
        for _ in range(MAX_TIMER_STEPS):
            due = self._next_due()
            if due is None or due > target:
                break
            now = self.clock.now()
            if due > now:
                self.clock.advance(due - now)
            if not await self._fire(fail_fast) and due <= now:
                break  # due but nothing fired (a postponed timer): move on in time
        else:
            raise HarnessTimeout(
                f"advance({seconds:g}): more than {MAX_TIMER_STEPS} due times on the way\n"
                + await self.report()
            )
        if target > self.clock.now():
            self.clock.advance(target - self.clock.now())
        await self._fire(fail_fast)

    async def until_done(
        self, saga_id: str | SagaHandle, *, within: float = 3600.0, fail_fast: bool = False
    ) -> SagaState:
        """Move time (at most ``within`` fake seconds) until the saga is finished.

        Raises:
            HarnessTimeout: it is still running after ``within`` seconds; the
                message says its state and what it waits for.
        """
        await self.drain(fail_fast=fail_fast)
        end = self.clock.now() + within
        while True:
            state = await self.get(saga_id)
            if state.status.terminal:
                return state
            due = self._next_due()
            if due is None or due > end:
                raise HarnessTimeout(
                    f"until_done(): saga {state.saga_id} not finished within {within:g}s"
                    f" of test time\n{await self.report([state.saga_id])}"
                )
            await self.advance(max(0.0, due - self.clock.now()), fail_fast=fail_fast)

    async def _fire(self, fail_fast: bool) -> bool:
        fired = await self.transport.release_due()
        while await self.coordinator.fire_timers() > 0:
            fired = True
            await self.drain(fail_fast=fail_fast)
        await self.drain(fail_fast=fail_fast)
        return fired

    def _next_due(self) -> float | None:
        dues = [d for d in (self.store.next_wake(), self.transport.next_release()) if d is not None]
        return min(dues, default=None)

    # ------------------------------------------------------------------ reports

    async def report(self, saga_ids: Iterable[str] | None = None) -> str:
        """What is still going on: handlers running, sagas not finished and what
        each waits for (the text of every :class:`HarnessTimeout`)."""
        lines: list[str] = []
        now = time.monotonic()
        for envelope, started in self._recorder.running.values():
            lines.append(
                f"- handler of {envelope.type} ({envelope.kind.value}, step {envelope.step!r},"
                f" attempt {envelope.attempt}) for saga {envelope.saga_id} has been running"
                f" for {now - started:.1f}s"
            )
        if saga_ids is None:
            states = [s for s in await self.store.list(limit=1_000_000) if not s.status.terminal]
        else:
            states = [await self.get(saga_id) for saga_id in saga_ids]
        registry = {(s.name, s.version): s for s in self.sagas}
        for state in sorted(states, key=lambda s: s.created_at):
            saga = registry.get((state.saga_name, state.saga_version))
            lines.append("- " + describe(state, saga, self.clock.now()))
        held = self.transport.held()
        if held:
            lines.append(f"- {held} repl{'y' if held == 1 else 'ies'} held back by a fault")
        return "\n".join(lines) if lines else "- nothing is running and no saga is unfinished"


def _id(saga_id: str | SagaHandle) -> str:
    return saga_id if isinstance(saga_id, str) else saga_id.saga_id
