"""GroupCommit: concurrent requests share one write; a bad one fails alone."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from sagaflow.runtime.batching import GroupCommit


class Store:
    def __init__(self) -> None:
        self.writes: list[list[str]] = []
        self.gate = asyncio.Event()
        self.gate.set()

    async def write(self, items: Sequence[str]) -> None:
        await self.gate.wait()
        if "bad" in items:
            raise ValueError(f"refused {list(items)}")
        self.writes.append(list(items))


async def test_requests_arriving_during_a_write_share_the_next_one() -> None:
    store = Store()
    group = GroupCommit(store.write)
    store.gate.clear()
    first = asyncio.create_task(group.submit("a"))
    await asyncio.sleep(0)  # "a" is being written, held at the gate
    rest = [asyncio.create_task(group.submit(x)) for x in ("b", "c", "d")]
    await asyncio.sleep(0)
    store.gate.set()
    await asyncio.gather(first, *rest)
    assert store.writes == [["a"], ["b", "c", "d"]]


async def test_a_lone_request_is_written_at_once() -> None:
    store = Store()
    group = GroupCommit(store.write)
    await group.submit("a")
    await group.submit("b")
    assert store.writes == [["a"], ["b"]]


async def test_one_bad_request_fails_alone() -> None:
    store = Store()
    group = GroupCommit(store.write)
    store.gate.clear()
    tasks = [asyncio.create_task(group.submit(x)) for x in ("a", "b", "bad", "c")]
    await asyncio.sleep(0)
    store.gate.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert results[:2] == [None, None] and results[3] is None
    assert isinstance(results[2], ValueError)
    assert sorted(x for w in store.writes for x in w) == ["a", "b", "c"]


async def test_a_cancelled_caller_does_not_stop_the_others() -> None:
    store = Store()
    group = GroupCommit(store.write)
    store.gate.clear()
    a = asyncio.create_task(group.submit("a"))
    b = asyncio.create_task(group.submit("b"))
    await asyncio.sleep(0)
    a.cancel()
    store.gate.set()
    await b
    with pytest.raises(asyncio.CancelledError):
        await a
    assert store.writes == [["a", "b"]]
