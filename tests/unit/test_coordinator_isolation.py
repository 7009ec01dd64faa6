"""One bad saga or one raising hook holds up nothing else (issue 17, item 3)."""

from __future__ import annotations

from typing import Any

from sagaflow import SagaStatus
from sagaflow.core.engine import Decision
from sagaflow.core.ports import UnitOfWork
from sagaflow.core.state import SagaState, Timer
from sagaflow.runtime.hooks import Hooks
from sagaflow.testing import SagaTestEnvironment
from tests.sample import saga
from tests.unit.test_runtime_memory import World, participants


async def test_a_saga_whose_timer_cannot_be_decided_does_not_hold_up_the_others() -> None:
    world = World()
    world.crash["inventory.reserve"] = 1  # a transient error: the step is retried by timer
    async with SagaTestEnvironment([saga], participants(world)) as env:
        now = env.clock.now()
        # a stored state no engine can decide (its step does not exist), due first
        broken = SagaState(
            saga_id="broken",
            saga_name=saga.name,
            saga_version=saga.version,
            status=SagaStatus.RUNNING,
            data={"order_id": "broken"},
            step_index=99,
            awaiting=True,
            timer=Timer(purpose="timeout", step_index=99, kind="command", attempt=1, due_at=now),
            created_at=now,
            updated_at=now,
        )
        async with env.store.transaction() as tx:
            await tx.write(UnitOfWork(inserts=[broken]))
        good = await env.start_saga(saga, {"order_id": "good"})
        await env.drain()
        for _ in range(5):
            await env.advance(2)
        assert (await env.get(good.saga_id)).status is SagaStatus.COMPLETED
        assert (await env.get("broken")).status is SagaStatus.RUNNING  # left as it is
    assert world.calls["inventory.reserve"] == 2


class _RaisesAfterCommit(Hooks):
    def __init__(self) -> None:
        self.calls = 0

    def decided(self, saga: Any, before: SagaState | None, decision: Decision) -> None:
        self.calls += 1
        raise RuntimeError("a metrics bug")


async def test_a_hook_that_raises_after_commit_undoes_nothing() -> None:
    hooks = _RaisesAfterCommit()
    world = World()
    async with SagaTestEnvironment([saga], participants(world), hooks=hooks) as env:
        handle = await env.start_saga(saga, {"order_id": "o1"})
        await env.drain()
        state = await env.get(handle.saga_id)
        dead = await env.transport.dead_letters()
    assert state.status is SagaStatus.COMPLETED
    assert dead == []
    assert hooks.calls >= 6  # every decision was reported, and each raised
