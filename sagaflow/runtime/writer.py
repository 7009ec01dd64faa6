"""The one path from an event to the store: lock, decide, write, commit, tell.

Every change to a saga, whoever asks for it (a reply, a due timer, a start,
an operator's cancel or retry), goes through :meth:`SagaWriter.commit`: in one
transaction it locks the sagas concerned (``SELECT ... FOR UPDATE``, in id
order), lets the caller decide on the locked states with the pure engine,
writes the changed states, their log entries and their outgoing messages as
one :class:`~sagaflow.core.ports.UnitOfWork`, and commits. The hooks hear of a
decision only once it has committed. Nothing is published here: the outbox
relay (:mod:`sagaflow.runtime.relay`), woken by the commit, is the one way
out to the broker.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sagaflow.core import engine
from sagaflow.core.definition import Saga
from sagaflow.core.errors import ConfigurationError
from sagaflow.core.messages import Envelope
from sagaflow.core.ports import SagaStore, UnitOfWork
from sagaflow.core.state import LogEntry, SagaState
from sagaflow.runtime.hooks import Hooks

log = logging.getLogger("sagaflow.writer")

__all__ = ["Decided", "SagaRegistry", "SagaWriter"]


class SagaRegistry:
    """The saga definitions a process knows, by name and version."""

    def __init__(self, sagas: Iterable[Saga[Any]]) -> None:
        self._by_key: dict[tuple[str, int], Saga[Any]] = {}
        self._latest: dict[str, Saga[Any]] = {}
        for saga in sagas:
            key = (saga.name, saga.version)
            if key in self._by_key:
                raise ConfigurationError(
                    f"saga {saga.name!r} version {saga.version} registered twice"
                )
            self._by_key[key] = saga
            if saga.name not in self._latest or self._latest[saga.name].version < saga.version:
                self._latest[saga.name] = saga

    def get(self, name: str, version: int | None = None) -> Saga[Any] | None:
        if version is None:
            return self._latest.get(name)
        return self._by_key.get((name, version))

    def of(self, state: SagaState) -> Saga[Any] | None:
        return self.get(state.saga_name, state.saga_version)

    @property
    def services(self) -> list[str]:
        return sorted({s for saga in self._by_key.values() for s in saga.services})

    def __iter__(self) -> Iterator[Saga[Any]]:
        return iter(self._by_key.values())


@dataclass(frozen=True)
class Decided:
    """One decision of a batch: on which saga, from which state (``None``: a start)."""

    saga: Saga[Any]
    before: SagaState | None
    decision: engine.Decision


Decide = Callable[[Mapping[str, SagaState]], Sequence[Decided]]
"""Decides on the locked states (by saga id); pure, and may run again on a retry."""


class SagaWriter:
    """Commits decisions: the runtime's only writer of sagas."""

    def __init__(self, registry: SagaRegistry, store: SagaStore, hooks: Hooks) -> None:
        self.registry = registry
        self.store = store
        self.hooks = hooks

    async def commit(
        self,
        decide: Decide,
        *,
        lock: Sequence[str] = (),
        due: tuple[float, int, Sequence[tuple[str, int]]] | None = None,
        connection: Any = None,
        wait: Callable[[], Awaitable[object]] | None = None,
    ) -> Sequence[Decided]:
        """Lock, decide, write and commit in one transaction; then tell the hooks
        (of every decision but a rejected one).

        Args:
            decide: Gets the locked states and returns the decisions; those that
                change their saga are written (``before is None``: a new saga).
            lock: The ids of the sagas to lock and decide on (none for starts).
            due: ``(now, limit, kinds)``: lock up to ``limit`` sagas of ``kinds``
                (name, version) whose timer is due instead, skipping those
                another transaction holds.
            connection: The caller's connection, inside its open transaction: the
                work commits with it.
            wait: Awaited once the sagas are locked, before ``decide``: a group's
                first reply waits here, in its transaction, for its siblings'
                (:mod:`sagaflow.runtime.siblings`), which then pay no lock or
                ``BEGIN`` of their own. A retried transaction awaits it again
                (an ``asyncio.Event``'s ``wait`` then returns at once).

        Returns:
            Every decision ``decide`` returned, changed or not.

        Raises:
            StoreError: the store failed or a started saga exists; nothing was
                written. Whatever ``decide`` raises, likewise.
        """
        async with self.store.transaction(connection) as tx:
            if due is not None:
                states = {state.saga_id: state for state in await tx.lock_due(*due)}
            else:
                states = await tx.lock(lock) if lock else {}
            if wait is not None:
                await wait()
            decided = decide(states)
            unit = _unit(decided)
            if unit:
                await tx.write(unit)
        for one in decided:
            if one.decision.rejected is None:  # an ignored (duplicate) reply is counted too
                try:
                    self.hooks.decided(one.saga, one.before, one.decision)
                except Exception:  # committed already: a hook's bug must not undo it
                    log.exception("a hook raised on a committed decision (ignored)")
        return decided


def _unit(decided: Sequence[Decided]) -> UnitOfWork:
    """What the changed decisions write; a saga decided twice is saved once, at its
    last state (the version it was read at is that of the first)."""
    inserts: list[SagaState] = []
    states: dict[str, SagaState] = {}
    log: list[LogEntry] = []
    messages: list[Envelope] = []
    for one in decided:
        decision = one.decision
        if not decision.changed:
            continue
        if one.before is None:
            inserts.append(decision.state)
        else:
            states[decision.state.saga_id] = decision.state
        log.extend(decision.log)
        messages.extend(decision.messages)
    return UnitOfWork(inserts=inserts, states=list(states.values()), log=log, messages=messages)
