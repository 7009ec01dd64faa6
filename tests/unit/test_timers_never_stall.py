"""No saga can stop the timers of the others (issue 11, item 4).

A saga whose timer could not be decided (its definition, or the engine, raised)
used to be skipped and stay due: enough of them filled every scan, and each
logged an error each scan. It is now postponed; the other sagas' timeouts fire.
"""

from __future__ import annotations

from typing import Any

import pytest

from sagaflow import Coordinator
from sagaflow.core import engine
from sagaflow.runtime.coordinator import UNDECIDABLE_RETRY
from sagaflow.store import InMemorySagaStore
from sagaflow.testing import FakeClock
from sagaflow.transport.memory import InMemoryTransport
from tests.sample import saga


async def test_a_saga_whose_timer_cannot_be_decided_is_postponed_and_the_others_fire(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    decide = engine.decide

    def buggy(definition: Any, state: Any, event: Any, now: float) -> engine.Decision:
        if state.saga_id.startswith("bad"):
            raise RuntimeError("a bug in the saga definition")
        return decide(definition, state, event, now)

    monkeypatch.setattr(engine, "decide", buggy)
    clock = FakeClock()
    store = InMemorySagaStore(clock=clock)
    transport = InMemoryTransport()
    await transport.start(["inventory"])
    coordinator = Coordinator([saga], store=store, transport=transport, clock=clock)
    for n in range(3):
        await coordinator.start_saga(saga, {"order_id": f"bad-{n}"}, saga_id=f"bad-{n}")
    await coordinator.start_saga(saga, {"order_id": "good"}, saga_id="good")
    clock.advance(6)  # every first attempt timed out

    assert await coordinator.fire_timers(limit=2) == 2  # two bad ones, postponed
    assert await coordinator.fire_timers(limit=2) == 2  # the third, and the good one
    good = await store.get("good")
    assert good is not None and good.updated_at == clock.now()  # its timeout was decided
    assert good.timer is not None and good.timer.attempt == 2  # sent again
    for n in range(3):
        bad = await store.get(f"bad-{n}")
        assert bad is not None and bad.timer is not None and bad.timer.attempt == 1
        assert bad.wake_at == clock.now() + UNDECIDABLE_RETRY
    assert await coordinator.fire_timers() == 0  # nothing more is due until then
