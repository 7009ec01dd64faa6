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
from typing import Any, Generic, TypeVar, overload

from pydantic import BaseModel

from sagaflow.core import engine
from sagaflow.core.definition import Saga
from sagaflow.core.errors import ConfigurationError, SagaflowError
from sagaflow.core.ports import Clock, IdFactory, SagaStore
from sagaflow.core.state import Failure, SagaState, SagaStatus
from sagaflow.runtime.batching import GroupCommit
from sagaflow.runtime.clock import SystemClock, UUIDFactory
from sagaflow.runtime.hooks import Hooks
from sagaflow.runtime.writer import Decided, SagaRegistry, SagaWriter

__all__ = ["SagaClient", "SagaHandle", "SagaView"]

D = TypeVar("D", bound=BaseModel)


@dataclass(frozen=True)
class SagaHandle:
    """A started saga: its id, and the state as committed when it started."""

    saga_id: str
    state: SagaState


@dataclass(frozen=True)
class SagaView(Generic[D]):
    """A saga read through its definition (``SagaClient.get(saga_id, saga)``).

    Attributes:
        data: The saga data, as the definition's data model.
        step: The step the saga is at (or stopped at), by name.
        waiting_for: The signal the saga waits for, if it is at a wait.
        completed: The steps that took effect and would be compensated, in order.
        skipped: The steps skipped because their condition was false.
        deadline_at: When the saga should be finished (seconds since the epoch).
        overdue: The deadline passed (after the pivot: recorded, nothing undone).
        state: The raw state, for everything else.
    """

    saga_id: str
    status: SagaStatus
    data: D
    step: str
    waiting_for: str | None
    completed: tuple[str, ...]
    skipped: tuple[str, ...]
    deadline_at: float | None
    overdue: bool
    failure: Failure | None
    state: SagaState

    @classmethod
    def of(cls, saga: Saga[D], state: SagaState) -> SagaView[D]:
        """Read ``state`` with ``saga``, the definition it runs on.

        Raises:
            SagaflowError: ``state`` is a saga of another name or version.
        """
        if (state.saga_name, state.saga_version) != (saga.name, saga.version):
            raise SagaflowError(
                f"saga {state.saga_id!r} runs {state.saga_name!r} v{state.saga_version}, "
                f"not {saga.name!r} v{saga.version}"
            )
        names = [step.name for step in saga.steps]
        return cls(
            saga_id=state.saga_id,
            status=state.status,
            data=saga.data_model.model_validate(state.data),
            step=names[state.step_index],
            waiting_for=state.waiting_for,
            completed=tuple(names[i] for i in state.completed),
            skipped=tuple(names[i] for i in state.skipped),
            deadline_at=state.deadline_at,
            overdue=state.overdue,
            failure=state.failure,
            state=state,
        )


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
        deadline_at: float | None = None,
    ) -> SagaHandle:
        """Start a saga; with ``connection`` inside the caller's open transaction.

        ``deadline_at`` (seconds since the epoch) overrides the definition's
        ``deadline`` for this saga.

        Its first command goes out once the work commits, published by a
        coordinator's outbox relay. Starts submitted together without a
        ``connection`` share one transaction.

        Raises:
            pydantic.ValidationError: ``data`` does not fit the saga's data model.
            ValueError: ``saga_id`` is empty, longer than 200 characters, or has
                control characters; ``deadline_at`` is in the past.
            ConfigurationError: the saga is not registered with this client.
            StoreError: a saga with this id exists, or the store failed.
        """
        if self.registry.get(saga.name, saga.version) is not saga:
            raise ConfigurationError(f"saga {saga.name!r} v{saga.version} is not registered here")
        sid = self.ids.new_saga_id() if saga_id is None else saga_id
        now = self.clock.now()
        if deadline_at is not None and not deadline_at > now:
            raise ValueError(f"deadline_at {deadline_at:.3f} is in the past (now {now:.3f})")
        decision = engine.start(
            saga, sid, data, now, trace=self.hooks.saga_started(saga, sid), deadline_at=deadline_at
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

    async def signal_saga(
        self,
        saga_id: str,
        name: str,
        data: BaseModel | dict[str, Any] | None = None,
        *,
        by: str,
        reason: str,
        connection: Any = None,
    ) -> SagaState:
        """Send the signal ``name`` to a saga's wait; with ``connection`` inside the
        caller's open transaction (the signal counts only if that commits).

        The data is validated against the wait's model and merged into the saga
        data when the saga is at the wait, or kept until it gets there. A second
        signal of the same name changes nothing (returns the state as it is).

        Raises:
            SagaflowError: no such saga; it is finished or compensating; its
                definition waits for no signal ``name``; the data does not fit the
                wait's model; or the saga is past that wait. Nothing changed.
        """
        event = engine.SignalReceived(name=name, data=data or {}, by=by, reason=reason)
        return await self._event(saga_id, event, connection=connection)

    async def _event(self, saga_id: str, event: engine.Event, connection: Any = None) -> SagaState:
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

        (decided,) = await self.writer.commit(decide, lock=[saga_id], connection=connection)
        return decided.decision.state

    @overload
    async def get(self, saga_id: str) -> SagaState | None: ...

    @overload
    async def get(self, saga_id: str, saga: Saga[D]) -> SagaView[D] | None: ...

    async def get(
        self, saga_id: str, saga: Saga[D] | None = None
    ) -> SagaState | SagaView[D] | None:
        """A saga's committed state, or ``None`` when there is no such saga.

        With its definition, a typed :class:`SagaView`: the data as the
        definition's data model, and where the saga is (its step, the signal it
        waits for, the steps done and skipped, whether it is overdue).

        Raises:
            SagaflowError: the saga runs another definition than ``saga``.
        """
        state = await self.store.get(saga_id)
        if state is None or saga is None:
            return state
        return SagaView.of(saga, state)

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
