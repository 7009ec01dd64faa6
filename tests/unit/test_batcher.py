"""Batcher: deliveries become batches; stop lets the batch in hand finish."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence

from sagaflow.runtime.batching import Batcher


class FakeDelivery:
    def __init__(self, name: str) -> None:
        self.name = name
        self.body = name.encode()
        self.headers: Mapping[str, str] = {}
        self.queue = "q"
        self.redelivered = False
        self.settled: str | None = None
        self.done = asyncio.Event()

    async def ack(self) -> None:
        self.settled = "ack"
        self.done.set()

    async def nack(self, requeue: bool = True) -> None:
        self.settled = "requeued" if requeue else "rejected"
        self.done.set()


class Handler:
    def __init__(self) -> None:
        self.batches: list[list[str]] = []
        self.entered = asyncio.Event()
        self.gate = asyncio.Event()
        self.gate.set()
        self.finished: list[list[str]] = []

    async def __call__(self, batch: Sequence[FakeDelivery]) -> None:  # type: ignore[override]
        names = [d.name for d in batch]
        self.batches.append(names)
        self.entered.set()
        await self.gate.wait()
        for delivery in batch:
            await delivery.ack()
        self.finished.append(names)


async def test_what_arrives_during_a_batch_is_the_next_batch() -> None:
    handler = Handler()
    batcher = Batcher(handler, max_batch=3)  # type: ignore[arg-type]
    batcher.start()
    handler.gate.clear()
    batcher.put(FakeDelivery("a"))  # type: ignore[arg-type]
    await asyncio.wait_for(handler.entered.wait(), 1)
    rest = [FakeDelivery(name) for name in "bcde"]
    for delivery in rest:
        batcher.put(delivery)  # type: ignore[arg-type]
    handler.gate.set()
    await asyncio.wait_for(rest[-1].done.wait(), 1)
    assert handler.batches == [["a"], ["b", "c", "d"], ["e"]]
    assert batcher.idle
    await batcher.stop()


async def test_stop_lets_the_batch_in_hand_finish() -> None:
    handler = Handler()
    batcher = Batcher(handler, max_batch=10, concurrency=2)  # type: ignore[arg-type]
    batcher.start()
    handler.gate.clear()
    held = FakeDelivery("held")
    batcher.put(held)  # type: ignore[arg-type]
    await asyncio.wait_for(handler.entered.wait(), 1)
    assert not batcher.idle

    stopping = asyncio.create_task(batcher.stop())
    await asyncio.sleep(0.05)
    assert not stopping.done(), "stop must wait for the batch being handled"
    handler.gate.set()
    await asyncio.wait_for(stopping, 1)  # the idle loop was cancelled, the busy one finished

    assert held.settled == "ack"
    assert handler.finished == [["held"]]
    late = FakeDelivery("late")
    batcher.put(late)  # type: ignore[arg-type]
    await asyncio.sleep(0.05)
    assert late.settled is None, "a stopped batcher takes no new batch"


async def test_a_batch_whose_handler_raises_is_returned() -> None:
    async def broken(batch: Sequence[FakeDelivery]) -> None:
        raise RuntimeError("bug")

    batcher = Batcher(broken, max_batch=10)  # type: ignore[arg-type]
    batcher.start()
    deliveries = [FakeDelivery(n) for n in "xy"]
    for delivery in deliveries:
        batcher.put(delivery)  # type: ignore[arg-type]
    await asyncio.wait_for(asyncio.gather(*(d.done.wait() for d in deliveries)), 1)
    assert [d.settled for d in deliveries] == ["requeued", "requeued"]
    await batcher.stop()
