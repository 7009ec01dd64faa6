"""Starting, cancelling and retrying sagas from application code.

A :class:`SagaClient` writes through the store alone: the first command of a
saga it starts is an outbox row, published by a running coordinator's relay
(woken by the commit's notification). ``start_saga`` with ``connection`` joins
the caller's own transaction, so that a business row and the saga commit
together or not at all.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from sagaflow.core import engine
from sagaflow.core.definition import Saga
from sagaflow.core.errors import ConfigurationError, SagaflowError
from sagaflow.core.ports import Clock, IdFactory, SagaStore
from sagaflow.core.state import SagaState
from sagaflow.runtime.batching import GroupCommit
from sagaflow.runtime.clock import SystemClock, UUIDFactory
from sagaflow.runtime.hooks import Hooks
from sagaflow.runtime.writer import Decided, SagaRegistry, SagaWriter

__all__ = ["SagaClient", "SagaHandle"]


@dataclass(frozen=True)
class SagaHandle:
    """A started saga: its id, and the state as committed when it started."""

    saga_id: str
    state: SagaState


class SagaClient:
    """Starts, cancels and retries sagas through the store.

    Args:
        sagas: The saga definitions this client may start.
        store: Where sagas live (the coordinator's store).
        clock: Time source (a fake one in tests).
        ids: Makes saga ids when the caller gives none.
        hooks: Tracing and metrics.
    """

    def __init__(
        self,
        sagas: Iterable[Saga[Any]] | SagaRegistry,
        *,
        store: SagaStore,
        clock: Clock | None = None,
        ids: IdFactory | None = None,
        hooks: Hooks | None = None,
    ) -> None:
        self.registry = sagas if isinstance(sagas, SagaRegistry) else SagaRegistry(sagas)
        self.store = store
        self.clock: Clock = clock or SystemClock()
        self.ids: IdFactory = ids or UUIDFactory()
        self.hooks = hooks or Hooks()
        self.writer = SagaWriter(self.registry, store, self.hooks)
        self._starts: GroupCommit[Decided] = GroupCommit(self._commit_starts)

    async def start_saga(
        self,
        saga: Saga[Any],
        data: BaseModel | dict[str, Any],
        *,
        saga_id: str | None = None,
        connection: Any = None,
    ) -> SagaHandle:
        """Start a saga; with ``connection`` inside the caller's open transaction.

        Its first command goes out once the work commits, published by a
        coordinator's outbox relay. Starts submitted together without a
        ``connection`` share one transaction.

        Raises:
            pydantic.ValidationError: ``data`` does not fit the saga's data model.
            ValueError: ``saga_id`` is empty, longer than 200 characters, or has
                control characters.
            ConfigurationError: the saga is not registered with this client.
            StoreError: a saga with this id exists, or the store failed.
        """
        if self.registry.get(saga.name, saga.version) is not saga:
            raise ConfigurationError(f"saga {saga.name!r} v{saga.version} is not registered here")
        sid = self.ids.new_saga_id() if saga_id is None else saga_id
        decision = engine.start(
            saga, sid, data, self.clock.now(), trace=self.hooks.saga_started(saga, sid)
        )
        started = Decided(saga, None, decision)
        if connection is None:
            await self._starts.submit(started)
        else:
            await self.writer.commit(lambda _: [started], connection=connection)
        return SagaHandle(sid, decision.state)

    async def _commit_starts(self, starts: Sequence[Decided]) -> None:
        await self.writer.commit(lambda _: starts)

    async def cancel_saga(self, saga_id: str, *, by: str, reason: str) -> SagaState:
        """Compensate a running saga as a business decision (ends CANCELLED)."""
        return await self._event(saga_id, engine.CancelRequested(by=by, reason=reason))

    async def retry_saga(self, saga_id: str, *, by: str, reason: str) -> SagaState:
        """Resume a FAILED saga where it stopped, with a fresh retry budget."""
        return await self._event(saga_id, engine.RetryRequested(by=by, reason=reason))

    async def _event(self, saga_id: str, event: engine.Event) -> SagaState:
        now = self.clock.now()

        def decide(states: Mapping[str, SagaState]) -> list[Decided]:
            state = states.get(saga_id)
            if state is None:
                raise SagaflowError(f"no saga with id {saga_id!r}")
            saga = self.registry.of(state)
            if saga is None:
                raise ConfigurationError(
                    f"saga {state.saga_name!r} v{state.saga_version} is not registered here"
                )
            decision = engine.decide(saga, state, event, now)
            if decision.rejected:
                raise SagaflowError(decision.rejected)
            return [Decided(saga, state, decision)]

        (decided,) = await self.writer.commit(decide, lock=[saga_id])
        return decided.decision.state

    async def get(self, saga_id: str) -> SagaState | None:
        return await self.store.get(saga_id)

    async def wait_for(
        self, saga_id: str, *, timeout: float = 60.0, poll: float = 0.05
    ) -> SagaState:
        """Poll until the saga is terminal."""
        async with asyncio.timeout(timeout):
            while True:
                state = await self.store.get(saga_id)
                if state is not None and state.status.terminal:
                    return state
                await asyncio.sleep(poll)
