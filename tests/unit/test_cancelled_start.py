"""A start cancelled part way leaves no task running.

``sagaflow coordinator`` and ``sagaflow worker`` cancel a start on SIGTERM and
then close the store and the broker connection (``serve``'s abort). A task the
start had already launched would go on using them: scenario 9 once saw a
coordinator's timer loop retry a closed store forever, and the process never
exit. Consuming is the last thing a start waits for; its tasks come after it.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from sagaflow import Coordinator, Participant, Worker
from sagaflow.core.ports import DeliveryCallback
from sagaflow.store import InMemoryParticipantStore, InMemorySagaStore
from sagaflow.transport.memory import InMemoryTransport
from tests.sample import Cmd, Ok, reserve, saga

pytestmark = pytest.mark.timeout(20)


class SlowToConsume(InMemoryTransport):
    """A broker that has not yet answered ``basic.consume`` when the stop comes."""

    def __init__(self) -> None:
        super().__init__()
        self.consuming = asyncio.Event()

    async def consume(self, queue: str, callback: DeliveryCallback, *, prefetch: int) -> None:
        self.consuming.set()
        await asyncio.sleep(3600)


def _others() -> set[asyncio.Task[Any]]:
    return asyncio.all_tasks() - {asyncio.current_task()}  # type: ignore[operator]


async def _cancel_while_consuming(start: Any, transport: SlowToConsume) -> None:
    before = _others()
    starting = asyncio.ensure_future(start())
    await asyncio.wait_for(transport.consuming.wait(), 5)
    starting.cancel()
    await asyncio.wait({starting})
    await asyncio.sleep(0)  # a task created by the start would have run by now
    assert {task.get_name() for task in _others() - before} == set()


async def test_a_coordinator_start_cancelled_while_consuming_leaves_no_task() -> None:
    transport = SlowToConsume()
    coordinator = Coordinator([saga], store=InMemorySagaStore(), transport=transport)
    await _cancel_while_consuming(coordinator.start, transport)


async def test_a_worker_start_cancelled_while_consuming_leaves_no_lane() -> None:
    inventory = Participant("inventory")

    @inventory.handler(reserve)
    async def do_reserve(cmd: Cmd, ctx: Any) -> Ok:
        return Ok()

    transport = SlowToConsume()
    worker = Worker(inventory, transport=transport, store=InMemoryParticipantStore())
    await _cancel_while_consuming(worker.start, transport)
