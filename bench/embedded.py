"""Embedded mode: the real coordinator and workers in one process, in memory.

No broker, no database: ``InMemoryTransport`` and the in-memory stores carry
the same saga flow as the full benchmark, so this measures what sagaflow's own
Python code costs per saga (engine, envelopes, validation, batching) on one
core. It needs no servers: ``python -m bench --embedded``.
"""

from __future__ import annotations

import asyncio
import os
import resource
import time
import uuid
from typing import Any

from bench.workload import (
    SERVICES,
    EffectCounter,
    Starts,
    chain_saga,
    expected,
    participant,
    percentiles,
    saga_data,
)
from sagaflow import Coordinator, Hooks, SagaStatus, Worker
from sagaflow.store import InMemoryParticipantStore, InMemorySagaStore
from sagaflow.transport import InMemoryTransport


class _Finish(Hooks):
    """Records when each saga reaches a terminal state (the coordinator calls it)."""

    def __init__(self) -> None:
        self.finished: dict[str, tuple[float, str]] = {}
        self.wake = asyncio.Event()

    def decided(self, saga: Any, before: Any, decision: Any) -> None:
        state = decision.state
        if before is not None and state.status.terminal and not before.status.terminal:
            self.finished[state.saga_id] = (time.perf_counter(), state.status.value)
            self.wake.set()


async def run_embedded(
    *,
    mode: str,
    sagas: int,
    inflight: int,
    steps: int,
    fail_rate: float,
    duration: float = 0.0,
    timeout: float = 300.0,
) -> dict[str, Any]:
    """Run the workload in memory and return the measurements (unverified)."""
    saga = chain_saga(steps)
    finish = _Finish()
    counter = EffectCounter()
    transport = InMemoryTransport()
    store = InMemorySagaStore()
    coordinator = Coordinator([saga], store=store, transport=transport, hooks=finish)
    workers = [
        Worker(participant(s, counter), transport=transport, store=InMemoryParticipantStore())
        for s in SERVICES
    ]
    await coordinator.start()
    for worker in workers:
        await worker.start()
    run = uuid.uuid4().hex[:6]
    started_at: dict[str, float] = {}
    soak = mode == "soak"
    cpu0 = time.process_time()
    wall0 = time.perf_counter()
    deadline = wall0 + duration

    def more() -> bool:
        return time.perf_counter() < deadline if soak else len(started_at) < sagas

    starts = Starts(failed=finish.wake)
    try:
        async with asyncio.timeout(timeout):
            while True:
                # concurrently, as the server-mode driver and the raw one do: a
                # start does not wait for the previous one's commit
                while more() and len(started_at) - len(finish.finished) < inflight:
                    data = saga_data(len(started_at), run, steps, fail_rate)
                    started_at[data.order_id] = time.perf_counter()
                    starts.add(coordinator.start_saga(saga, data, saga_id=data.order_id))
                starts.check()
                if not more() and len(finish.finished) >= len(started_at):
                    break
                finish.wake.clear()
                await finish.wake.wait()
    finally:
        await starts.settle()
        wall = time.perf_counter() - wall0
        cpu = time.process_time() - cpu0
        for worker in workers:
            await worker.stop()
        await coordinator.stop()
    n = len(started_at)
    statuses: dict[str, int] = {}
    for status in SagaStatus:
        count = len(await store.list(status=status, limit=n + 1))
        if count:
            statuses[status.value] = count
    latencies = [(finish.finished[sid][0] - t) * 1000 for sid, t in started_at.items()]
    want = expected(n, steps, fail_rate)
    return {
        "sagas": n,
        "statuses": statuses,
        "effects": {s: tuple(v) for s, v in counter.counts.items()},
        "wall_s": wall,
        "latency_ms": percentiles(latencies),
        "cpu_seconds": {"process": cpu},
        "peak_rss_bytes": {"process": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024},
        "messages": want.messages,
        "pid": os.getpid(),
    }
