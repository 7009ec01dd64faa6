"""What the in-memory stores do beyond the shared contract: lock hand-over under
cancellation, the timer heap, and importing without asyncpg."""

from __future__ import annotations

import asyncio
import subprocess
import sys

from hypothesis import given, settings
from hypothesis import strategies as st

from sagaflow.core.messages import MessageKind
from sagaflow.core.ports import UnitOfWork
from sagaflow.core.state import SagaState, SagaStatus, Timer
from sagaflow.store import InMemoryParticipantStore, InMemorySagaStore

KINDS = [("create-order", 1)]


def saga(saga_id: str, wake_at: float | None = None) -> SagaState:
    timer = None
    if wake_at is not None:
        timer = Timer(
            purpose="retry", step_index=0, kind=MessageKind.COMMAND, attempt=1, due_at=wake_at
        )
    return SagaState(
        saga_id=saga_id,
        saga_name="create-order",
        saga_version=1,
        status=SagaStatus.RUNNING,
        data={},
        timer=timer,
        created_at=1.0,
        updated_at=1.0,
    )


async def test_a_cancelled_waiter_does_not_keep_the_lock() -> None:
    store = InMemorySagaStore()
    async with store.transaction() as tx:
        await tx.write(UnitOfWork(inserts=[saga("s-1")]))
    held = asyncio.Event()
    release = asyncio.Event()

    async def holder() -> None:
        async with store.transaction() as tx:
            await tx.lock(["s-1"])
            held.set()
            await release.wait()

    async def waiter() -> None:
        async with store.transaction() as tx:
            await tx.lock(["s-1"])
            await asyncio.sleep(3600)

    hold = asyncio.create_task(holder())
    await held.wait()
    waiting = asyncio.create_task(waiter())
    await asyncio.sleep(0.01)
    waiting.cancel()
    release.set()
    await hold
    await asyncio.gather(waiting, return_exceptions=True)
    async with store.transaction() as tx:
        assert [s.saga_id for s in await tx.lock_due(10.0, 10, [("create-order", 1)])] == []
        assert await asyncio.wait_for(tx.lock(["s-1"]), 1) == {"s-1": saga("s-1")}


async def test_a_lock_granted_to_a_cancelled_waiter_passes_on() -> None:
    store = InMemoryParticipantStore()
    order: list[str] = []
    held = asyncio.Event()
    release = asyncio.Event()

    async def holder() -> None:
        async with store.transaction() as tx:
            await tx.claim("c-1")
            held.set()
            await release.wait()

    async def claimer(name: str) -> None:
        async with store.transaction() as tx:
            await tx.claim("c-1")
            order.append(name)

    hold = asyncio.create_task(holder())
    await held.wait()
    first = asyncio.create_task(claimer("first"))
    second = asyncio.create_task(claimer("second"))
    await asyncio.sleep(0.01)
    release.set()
    await asyncio.sleep(0)  # the holder commits and hands the lock to `first`...
    assert hold.done() and not first.done()
    first.cancel()  # ...which is cancelled before it runs
    await asyncio.wait_for(asyncio.gather(first, second, return_exceptions=True), 1)
    assert first.cancelled()
    assert order == ["second"]


@settings(max_examples=50, deadline=None)
@given(
    moves=st.lists(
        st.tuples(st.integers(0, 30), st.none() | st.integers(0, 100)), min_size=1, max_size=300
    ),
    now=st.integers(0, 100),
    limit=st.integers(1, 10),
)
def test_lock_due_matches_a_full_scan(
    moves: list[tuple[int, int | None]], now: int, limit: int
) -> None:
    async def run() -> None:
        store = InMemorySagaStore()
        store._timers.extend((float(w), "stale") for w in range(2000))  # forces compaction
        for key, wake in moves:
            saga_id = f"s-{key:02d}"
            async with store.transaction() as tx:
                current = (await tx.lock([saga_id])).get(saga_id)
                wake_at = None if wake is None else float(wake)
                if current is None:
                    await tx.write(UnitOfWork(inserts=[saga(saga_id, wake_at)]))
                else:
                    moved = saga(saga_id, wake_at).model_copy(update=dict(version=current.version))
                    await tx.write(UnitOfWork(states=[moved]))
        states = await store.list(limit=1000)
        expected = sorted(
            (s.wake_at, s.saga_id) for s in states if s.wake_at is not None and s.wake_at <= now
        )
        async with store.transaction() as tx:
            got = [(s.wake_at, s.saga_id) for s in await tx.lock_due(float(now), limit, KINDS)]
        assert got == expected[:limit]
        async with store.transaction() as tx:  # nothing was lost from the heap
            again = [(s.wake_at, s.saga_id) for s in await tx.lock_due(float(now), 1000, KINDS)]
        assert again == expected

    asyncio.run(run())


def test_memory_stores_import_without_asyncpg() -> None:
    code = (
        "import sys; sys.modules['asyncpg'] = None\n"
        "from sagaflow.store import InMemorySagaStore, InMemoryParticipantStore, migrate\n"
        "assert 'asyncpg' not in [m for m in sys.modules if sys.modules[m] is not None]\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
