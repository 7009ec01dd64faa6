"""Batcher: deliveries become batches; stop lets the batch in hand finish; a poison
message is given back alone. retry_healing and give_back: what heals is retried,
what does not is returned and, on its last delivery, dead-lettered with its reason."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence

import pytest

from sagaflow.core.errors import StoreError
from sagaflow.runtime.batching import Batcher, give_back, retry_healing


class FakeDelivery:
    def __init__(self, name: str, headers: Mapping[str, str] | None = None) -> None:
        self.name = name
        self.body = name.encode()
        self.headers: Mapping[str, str] = headers or {}
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


async def _never(delivery: FakeDelivery, exc: Exception) -> None:
    raise AssertionError(f"no delivery should fail: {exc!r}")


async def test_what_arrives_during_a_batch_is_the_next_batch() -> None:
    handler = Handler()
    batcher = Batcher(handler, failed=_never, max_batch=3)  # type: ignore[arg-type]
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
    batcher = Batcher(handler, failed=_never, max_batch=10, concurrency=2)  # type: ignore[arg-type]
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


async def test_a_poison_message_is_given_back_alone_and_the_rest_of_its_batch_goes_on() -> None:
    handled: list[list[str]] = []
    failed: list[tuple[str, str]] = []

    async def handle(batch: Sequence[FakeDelivery]) -> None:
        handled.append([d.name for d in batch])
        if any(d.name == "poison" for d in batch):
            raise RuntimeError("bug")
        for delivery in batch:
            await delivery.ack()

    async def give(delivery: FakeDelivery, exc: Exception) -> None:
        failed.append((delivery.name, repr(exc)))
        delivery.done.set()

    batcher = Batcher(handle, failed=give, max_batch=10)  # type: ignore[arg-type]
    deliveries = [FakeDelivery(n) for n in ("a", "poison", "b")]
    for delivery in deliveries:  # queued before the loop starts: one batch of three
        batcher.put(delivery)  # type: ignore[arg-type]
    batcher.start()
    await asyncio.wait_for(asyncio.gather(*(d.done.wait() for d in deliveries)), 1)
    assert handled == [["a", "poison", "b"], ["a"], ["poison"], ["b"]]
    assert failed == [("poison", "RuntimeError('bug')")]
    assert [d.settled for d in deliveries] == ["ack", None, "ack"]
    await batcher.stop()


async def test_retry_healing_retries_a_store_error_until_it_heals() -> None:
    calls = 0

    async def flaky() -> str:
        nonlocal calls
        calls += 1
        if calls < 3:
            raise StoreError("database restarting")
        return "done"

    async def no_sleep(seconds: float) -> None:
        pass

    assert await retry_healing(flaky, what="test", sleep=no_sleep) == "done"
    assert calls == 3


async def test_retry_healing_raises_a_bug_at_once() -> None:
    calls = 0

    async def buggy() -> None:
        nonlocal calls
        calls += 1
        raise KeyError("bug")

    with pytest.raises(KeyError):
        await retry_healing(buggy, what="test")
    assert calls == 1


@pytest.mark.parametrize(
    ("count", "expected"),
    [(None, "requeued"), ("3", "requeued"), ("4", "requeued"), ("5", "dead-lettered")],
)
async def test_give_back_requeues_until_the_last_delivery_then_dead_letters_with_the_reason(
    count: str | None, expected: str
) -> None:
    """With a delivery limit of 5 the broker dead-letters on the sixth return: the
    delivery that has been returned five times already is the last one."""
    delivery = FakeDelivery("m", {} if count is None else {"x-delivery-count": count})
    reasons: list[str] = []

    async def dead_letter(d: FakeDelivery, reason: str) -> None:
        reasons.append(reason)

    await give_back(delivery, ValueError("bad"), limit=5, dead_letter=dead_letter)  # type: ignore[arg-type]
    if expected == "requeued":
        assert delivery.settled == "requeued" and reasons == []
    else:
        assert delivery.settled is None
        assert reasons == ["unhandled: ValueError: bad"]
