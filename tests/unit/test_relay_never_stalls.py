"""One message the broker can never take must not stop the outbox (issue 11, item 2).

A command larger than the message limit (a saga's data grew) failed its batch's
publish on every pass: the relay retried it for ever and no other saga's
message went out. It is now dropped, logged and counted; its saga's step times
out and compensates, and the rest flow.
"""

from __future__ import annotations

import pytest

from sagaflow import Coordinator, Hooks
from sagaflow.store import InMemorySagaStore
from sagaflow.testing import FakeClock
from sagaflow.transport.memory import InMemoryTransport
from tests.sample import saga


class Counting(Hooks):
    def __init__(self) -> None:
        self.dead: list[tuple[str, str]] = []

    def dead_lettered(self, queue: str, reason: str) -> None:
        self.dead.append((queue, reason.split(":", 1)[0]))


async def test_a_message_too_large_to_send_is_dropped_and_the_rest_go_out(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = FakeClock()
    store = InMemorySagaStore(clock=clock)
    transport = InMemoryTransport(max_message_bytes=4096)
    hooks = Counting()
    await transport.start(["inventory"])
    coordinator = Coordinator([saga], store=store, transport=transport, clock=clock, hooks=hooks)
    await coordinator.start_saga(saga, {"order_id": "x" * 8000}, saga_id="huge")
    await coordinator.start_saga(saga, {"order_id": "small"}, saga_id="small")

    assert await coordinator.relay.relay_once() == 2
    assert hooks.dead == [("outbox", "too_large")]
    assert "dropping outbox message huge:reserve:command:1" in caplog.text
    queue = transport.topology.service_queue("inventory")
    assert transport.pending(queue) == 1  # the small saga's command
    assert await coordinator.relay.relay_once() == 0  # nothing left behind to retry
