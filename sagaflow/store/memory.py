"""The in-memory saga store: supported code for tests and the demo.

They keep the semantics of the PostgreSQL stores (the contract suite runs on
both) without a database:

- A transaction stages its writes and applies them when its block exits
  cleanly, all at once (no ``await`` in between); an exception discards them.
- Row locks are per-key locks owned by a transaction and released when it ends.
  ``lock`` waits for them (in id order), as does ``write`` for the sagas it
  inserts or saves, which in PostgreSQL wait on the row or the primary key;
  ``lock_due`` skips keys locked by another transaction. Unlike PostgreSQL
  there is no deadlock detection: lock in id order.
- ``transaction(connection=...)`` ignores ``connection`` (there is no shared
  database to join) and commits on its own.
- ``wait_for_outbox`` wakes on a commit that queued messages, as the
  PostgreSQL store's commit does.

States and envelopes are immutable pydantic models, so they are stored as they
are: no copies beyond the ``version`` bump of a save.
"""

from __future__ import annotations

import asyncio
import builtins
import heapq
import itertools
import time
from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from types import TracebackType
from typing import Any

from sagaflow.core.errors import ConcurrencyConflict, StoreError
from sagaflow.core.fingerprint import DefinitionRecord
from sagaflow.core.messages import Envelope
from sagaflow.core.ports import Clock, OutboxItem, Pruned, UnitOfWork
from sagaflow.core.state import LogEntry, SagaState, SagaStatus
from sagaflow.store.locks import KeyedLocks, staged

__all__ = ["InMemorySagaStore", "InMemorySagaTransaction"]


# --------------------------------------------------------------------------- saga store


class InMemorySagaTransaction:
    """The :class:`~sagaflow.core.ports.SagaTransaction` of :class:`InMemorySagaStore`."""

    __slots__ = ("_held", "_log", "_outbox", "_states", "_store")

    def __init__(self, store: InMemorySagaStore) -> None:
        self._store = store
        self._states: dict[str, SagaState] = {}
        self._log: list[LogEntry] = []
        self._outbox: list[tuple[int, Envelope]] = []
        self._held: set[str] = set()

    @property
    def connection(self) -> None:
        """Always ``None``: there is no database connection."""
        return None

    async def _acquire(self, saga_id: str) -> None:
        locks = self._store._locks
        if not locks.try_acquire(saga_id, self):
            await locks.acquire(saga_id, self)
        self._held.add(saga_id)

    def _current(self, saga_id: str) -> SagaState | None:
        state = self._states.get(saga_id)
        return self._store._sagas.get(saga_id) if state is None else state

    async def lock(self, saga_ids: Sequence[str]) -> dict[str, SagaState]:
        """Load and lock sagas in id order; unknown ids are absent from the result."""
        found: dict[str, SagaState] = {}
        for saga_id in sorted(set(saga_ids)):
            if self._current(saga_id) is None:
                continue
            await self._acquire(saga_id)
            state = self._current(saga_id)
            if state is not None:
                found[saga_id] = state
        return found

    async def lock_due(
        self, now: float, limit: int, kinds: Sequence[tuple[str, int]]
    ) -> list[SagaState]:
        """Lock up to ``limit`` due sagas of ``kinds``, earliest first, skipping ones
        locked elsewhere."""
        store = self._store
        wanted = set(kinds)
        candidates = store._due(now, limit, self, wanted)
        for saga_id, state in self._states.items():
            if state.wake_at is not None and state.wake_at <= now:
                candidates.add(saga_id)
        due: list[SagaState] = []
        for saga_id in candidates:
            current = self._current(saga_id)
            wake_at = None if current is None else current.wake_at
            if current is None or (current.saga_name, current.saga_version) not in wanted:
                continue
            if wake_at is not None and wake_at <= now:
                due.append(current)
        due.sort(key=lambda s: (s.wake_at, s.saga_id))
        locked: list[SagaState] = []
        for state in due:
            if len(locked) >= limit:
                break
            if store._locks.try_acquire(state.saga_id, self):
                self._held.add(state.saga_id)
                locked.append(state)
        return locked

    async def write(self, unit: UnitOfWork) -> None:
        """Stage ``unit``; it is applied when the transaction commits.

        Raises:
            StoreError: a saga of ``unit.inserts`` exists.
            ConcurrencyConflict: a saga of ``unit.states`` is no longer at its version.
            ValueError: a saga appears twice in ``unit.states``.
        """
        if len({s.saga_id for s in unit.states}) != len(unit.states):
            raise ValueError("write got the same saga twice")
        for state in unit.inserts:
            if state.saga_id not in self._store._sagas:  # else fail at once, like ON CONFLICT
                await self._acquire(state.saga_id)
            if self._current(state.saga_id) is not None:
                raise StoreError(f"saga {state.saga_id!r} already exists")
            self._states[state.saga_id] = state
        for state in unit.states:
            await self._acquire(state.saga_id)
            current = self._current(state.saga_id)
            if current is None or current.version != state.version:
                raise ConcurrencyConflict(
                    f"saga {state.saga_id!r} is no longer at version {state.version}"
                )
            self._states[state.saga_id] = state.model_copy(update={"version": state.version + 1})
        self._log.extend(unit.log)
        self._outbox.extend((next(self._store._ids), envelope) for envelope in unit.messages)

    def _commit(self) -> None:
        store = self._store
        for saga_id, state in self._states.items():
            store._sagas[saga_id] = state
            store._set_wake(saga_id, state.wake_at)
        logs = store._logs
        for entry in self._log:
            entries = logs.get(entry.saga_id)
            if entries is None:
                logs[entry.saga_id] = [entry]
            else:
                entries.append(entry)
        if self._outbox:
            store._outbox.update(self._outbox)
            store._queued_at.update((row_id, store._now()) for row_id, _ in self._outbox)
            store._outbox_event.set()

    def _release(self) -> None:
        locks = self._store._locks
        for saga_id in self._held:
            locks.release(saga_id, self)
        self._held.clear()


class _ClaimContext:
    __slots__ = ("_ids", "_limit", "_store")

    def __init__(self, store: InMemorySagaStore, limit: int) -> None:
        self._store = store
        self._limit = limit
        self._ids: list[int] = []

    async def __aenter__(self) -> list[OutboxItem]:
        store = self._store
        claimed = store._claimed
        free = (row_id for row_id in store._outbox if row_id not in claimed)
        self._ids = heapq.nsmallest(self._limit, free)
        claimed.update(self._ids)
        return [OutboxItem(id=i, envelope=store._outbox[i]) for i in self._ids]

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        store = self._store
        for row_id in self._ids:
            store._claimed.discard(row_id)
            if exc is None:
                store._outbox.pop(row_id, None)
                store._queued_at.pop(row_id, None)


class InMemorySagaStore:
    """The :class:`~sagaflow.core.ports.SagaStore` in memory, for tests and the demo.

    Args:
        clock: Stamps outbox rows when they commit (for :meth:`outbox_stats`);
            the system clock by default.
    """

    def __init__(self, *, clock: Clock | None = None) -> None:
        self._now = time.time if clock is None else clock.now
        self._sagas: dict[str, SagaState] = {}
        self._logs: dict[str, list[LogEntry]] = {}
        self._outbox: dict[int, Envelope] = {}
        self._queued_at: dict[int, float] = {}
        self._claimed: set[int] = set()
        self._ids = itertools.count(1)
        self._locks = KeyedLocks()
        self._wake: dict[str, float] = {}
        self._timers: list[tuple[float, str]] = []  # a heap; entries not in _wake are stale
        self._outbox_event = asyncio.Event()
        self._definitions: dict[tuple[str, int], DefinitionRecord] = {}

    async def start(self) -> None:
        """Nothing to open."""

    async def close(self) -> None:
        """Nothing to close."""

    def transaction(
        self, connection: Any = None
    ) -> AbstractAsyncContextManager[InMemorySagaTransaction]:
        """A transaction; ``connection`` is ignored (this store commits on its own)."""
        return staged(InMemorySagaTransaction(self))

    def claim_outbox(self, limit: int) -> _ClaimContext:
        """Claim up to ``limit`` rows, lowest id first, skipping rows claimed elsewhere.

        They are deleted when the block exits cleanly, released if it raises.
        """
        return _ClaimContext(self, limit)

    async def wait_for_outbox(self, timeout: float) -> None:
        """Return when a transaction committed outbox rows, or after ``timeout``."""
        event = self._outbox_event
        if not event.is_set():
            try:
                async with asyncio.timeout(timeout):
                    await event.wait()
            except TimeoutError:
                pass
        event.clear()

    async def get(self, saga_id: str) -> SagaState | None:
        """The committed state of a saga, or ``None``."""
        return self._sagas.get(saga_id)

    async def list(
        self,
        *,
        status: SagaStatus | None = None,
        name: str | None = None,
        limit: int = 100,
        overdue_at: float | None = None,
    ) -> builtins.list[SagaState]:
        """Sagas, newest first, optionally filtered by status, name and being overdue."""
        states = [
            s
            for s in self._sagas.values()
            if (status is None or s.status == status)
            and (name is None or s.saga_name == name)
            and (overdue_at is None or _overdue(s, overdue_at))
        ]
        return heapq.nlargest(limit, states, key=lambda s: (s.created_at, s.saga_id))

    async def log(self, saga_id: str) -> builtins.list[LogEntry]:
        """A saga's log, oldest first."""
        return builtins.list(self._logs.get(saga_id, ()))

    def next_wake(self) -> float | None:
        """When the earliest pending timer of any saga is due (``None``: no timer)."""
        return min(self._wake.values(), default=None)

    async def outbox_stats(self, now: float) -> tuple[int, float]:
        """Rows waiting and the age in seconds of the oldest (0.0 when none)."""
        queued = self._queued_at.values()
        return len(queued), (max(0.0, now - min(queued)) if queued else 0.0)

    async def record_definitions(
        self, records: Sequence[DefinitionRecord]
    ) -> builtins.list[DefinitionRecord]:
        """Record each definition unless its name and version are recorded; return
        the records held for them."""
        for record in records:
            self._definitions.setdefault((record.name, record.version), record)
        return [self._definitions[(r.name, r.version)] for r in records]

    async def prune(self, statuses: Sequence[SagaStatus], before: float, limit: int) -> Pruned:
        """Delete up to ``limit`` sagas in ``statuses`` last changed before ``before``,
        oldest first, with their log; sagas locked by a transaction are skipped.

        Raises:
            ValueError: a status is not terminal.
        """
        if not statuses or not all(SagaStatus(s).terminal for s in statuses):
            raise ValueError(f"only terminal sagas are pruned, not {list(statuses)}")
        wanted = set(statuses)
        locks = self._locks
        candidates = (
            s
            for s in self._sagas.values()
            if s.status in wanted and s.updated_at < before and locks.owner(s.saga_id) is None
        )
        doomed = heapq.nsmallest(limit, candidates, key=lambda s: (s.updated_at, s.saga_id))
        entries = 0
        for state in doomed:
            del self._sagas[state.saga_id]
            self._set_wake(state.saga_id, None)
            entries += len(self._logs.pop(state.saga_id, ()))
        return Pruned(sagas=len(doomed), log_entries=entries)

    # ----------------------------------------------------------------- internals

    def _set_wake(self, saga_id: str, wake_at: float | None) -> None:
        if self._wake.get(saga_id) == wake_at:
            return
        if wake_at is None:
            del self._wake[saga_id]
            return
        self._wake[saga_id] = wake_at
        heapq.heappush(self._timers, (wake_at, saga_id))
        if len(self._timers) > 2 * len(self._wake) + 1024:  # drop stale entries
            self._timers = [(w, s) for s, w in self._wake.items()]
            heapq.heapify(self._timers)

    def _due(self, now: float, limit: int, txn: object, kinds: set[tuple[str, int]]) -> set[str]:
        """Ids of committed sagas due at ``now``: at least ``limit`` of ``kinds``
        not locked by others."""
        timers, wake, locks = self._timers, self._wake, self._locks
        found: set[str] = set()
        free = 0
        while timers and timers[0][0] <= now and free < limit:
            wake_at, saga_id = heapq.heappop(timers)
            if wake.get(saga_id) != wake_at or saga_id in found:
                continue  # stale or duplicate
            found.add(saga_id)
            saga = self._sagas.get(saga_id)
            if saga is None or (saga.saga_name, saga.saga_version) not in kinds:
                continue
            owner = locks.owner(saga_id)
            if owner is None or owner is txn:
                free += 1
        for saga_id in found:  # still due until a save moves their timer
            heapq.heappush(timers, (wake[saga_id], saga_id))
        return found


def _overdue(state: SagaState, at: float) -> bool:
    if state.overdue:
        return True
    deadline = state.deadline_at
    return deadline is not None and deadline <= at and not state.status.terminal
