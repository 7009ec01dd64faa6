"""The outbox is the one way out: a slow broker gets each message once (issue 17, item 2).

Before, the coordinator published right after commit and the relay published
the same outbox rows again once a 5 s grace had passed, while a publish may
take up to 30 s: a broker slower than the grace got every batch twice.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Sequence

from sagaflow import Coordinator
from sagaflow.core.messages import Envelope
from sagaflow.core.ports import Topology
from sagaflow.store import InMemorySagaStore
from sagaflow.testing import FakeClock
from sagaflow.transport.memory import InMemoryTransport
from tests.sample import saga


class SlowBroker(InMemoryTransport):
    """Confirms a publish only when the test opens the gate."""

    def __init__(self) -> None:
        super().__init__(Topology())
        self.gate = asyncio.Event()
        self.waiting = asyncio.Event()
        self.published: Counter[str] = Counter()

    async def publish(self, envelopes: Sequence[Envelope]) -> None:
        self.waiting.set()
        await self.gate.wait()
        await super().publish(envelopes)
        self.published.update(e.message_id for e in envelopes)


async def test_a_publish_slower_than_any_grace_sends_each_message_once() -> None:
    clock = FakeClock()
    broker = SlowBroker()
    coordinator = Coordinator(
        [saga],
        store=InMemorySagaStore(clock=clock),
        transport=broker,
        clock=clock,
        timer_interval=3600,  # no step timeout fires while the clock jumps
    )
    await coordinator.start()
    try:
        handle = await coordinator.start_saga(saga, {"order_id": "slow"})
        await asyncio.wait_for(broker.waiting.wait(), 5)  # the first command is on its way
        clock.advance(60)  # far beyond any grace, while the broker has not confirmed
        # a relay that took the row again would now wait on the broker too
        again = await asyncio.wait_for(coordinator.relay_once(), 2)
        assert again == 0, "the row being published is not claimable"
        broker.gate.set()
        for _ in range(100):
            if broker.published:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        assert await coordinator.relay_once() == 0, "a published row is gone"
    finally:
        broker.gate.set()
        await coordinator.stop()
    assert broker.published == Counter({f"{handle.saga_id}:reserve:command:1": 1})
