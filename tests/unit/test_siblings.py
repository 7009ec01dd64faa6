"""A parallel group's replies are held until their siblings arrive (issue 12).

The coordinator decides the replies of a group's branches in one transaction
when they arrive close together (:mod:`sagaflow.runtime.siblings`). What is
held is only ever success replies to a group member's command; anything else
goes at once and takes the held replies of its saga with it; a held reply
goes back to the batcher once ``linger`` passed and is then never held again.
The first held reply of a saga opens its transaction at once (one such
transaction at a time); its siblings join it instead of being decided apart.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

import pytest
from pydantic import BaseModel

from sagaflow import Action, Coordinator, Group, Saga, Step
from sagaflow.core.messages import Envelope, MessageKind, Outcome, encode
from sagaflow.runtime.siblings import Event, Siblings
from sagaflow.runtime.writer import SagaRegistry
from sagaflow.store import InMemorySagaStore
from sagaflow.transport import InMemoryTransport


class Cmd(BaseModel):
    ref: str


class Data(BaseModel):
    ref: str


def _step(service: str) -> Step[Data]:
    action = Action(service, "book", Cmd, Cmd)
    undo = Action(service, "unbook", Cmd, Cmd)
    return Step(service, action, lambda d: Cmd(ref=d.ref), compensation=undo)


trip = Saga(
    "trip",
    data=Data,
    steps=[
        _step("car"),
        Group("both", [_step("hotel"), _step("flight")]),
        Group("three", [_step("museum"), _step("tour"), _step("dinner")]),
    ],
)
CAR, HOTEL, FLIGHT, MUSEUM, TOUR, DINNER = range(6)


class FakeDelivery:
    def __init__(self, name: str) -> None:
        self.name = name
        self.body = name.encode()
        self.headers: Mapping[str, str] = {}
        self.queue = "replies"
        self.redelivered = False

    async def ack(self) -> None:  # pragma: no cover - never settled here
        raise AssertionError("siblings never settle a delivery")

    async def nack(self, requeue: bool = True) -> None:  # pragma: no cover
        raise AssertionError("siblings never settle a delivery")


def reply(
    index: int,
    *,
    saga_id: str = "s1",
    outcome: Outcome = Outcome.SUCCESS,
    for_kind: MessageKind = MessageKind.COMMAND,
) -> Event:
    step = trip.steps[index]
    envelope = Envelope(
        message_id=f"{saga_id}:{step.name}:{for_kind.value}:reply",
        command_id=f"{saga_id}:{step.name}",
        saga_id=saga_id,
        saga_name=trip.name,
        step=step.name,
        step_index=index,
        kind=MessageKind.REPLY,
        attempt=1,
        type=f"{step.name}.book",
        for_kind=for_kind,
        outcome=outcome,
    )
    return FakeDelivery(f"{saga_id}/{step.name}/{outcome.value}"), envelope


def names(events: list[Event]) -> list[str]:
    return [delivery.name for delivery, _ in events]  # type: ignore[attr-defined]


class Released:
    def __init__(self) -> None:
        self.deliveries: list[FakeDelivery] = []
        self.came = asyncio.Event()

    def __call__(self, delivery: object) -> None:
        assert isinstance(delivery, FakeDelivery)
        self.deliveries.append(delivery)
        self.came.set()


def siblings(linger: float = 60.0) -> tuple[Siblings, Released]:
    released = Released()
    return Siblings(SagaRegistry([trip]), linger=linger, release=released), released


async def test_a_branch_reply_waits_for_its_sibling_then_both_go_together() -> None:
    held, released = siblings()
    hotel, flight = reply(HOTEL), reply(FLIGHT)
    assert held.gather([hotel]) == []
    assert held.holding == 1
    assert names(held.gather([flight])) == ["s1/hotel/success", "s1/flight/success"]
    assert held.holding == 0
    await asyncio.sleep(0)
    assert released.deliveries == []


async def test_siblings_in_one_batch_are_not_held() -> None:
    held, _ = siblings()
    together = [reply(FLIGHT), reply(HOTEL)]
    assert held.gather(together) == together


async def test_a_group_of_three_waits_for_all_three() -> None:
    held, _ = siblings()
    assert held.gather([reply(TOUR)]) == []
    assert held.gather([reply(DINNER)]) == []
    assert held.holding == 2
    assert names(held.gather([reply(MUSEUM)])) == [
        "s1/tour/success",
        "s1/dinner/success",
        "s1/museum/success",
    ]


async def test_a_refusal_or_an_error_goes_at_once_and_takes_the_held_reply_along() -> None:
    for outcome in (Outcome.FAILURE, Outcome.ERROR):
        held, _ = siblings()
        assert held.gather([reply(HOTEL)]) == []
        assert names(held.gather([reply(FLIGHT, outcome=outcome)])) == [
            "s1/hotel/success",
            f"s1/flight/{outcome.value}",
        ]


async def test_what_is_not_a_branch_success_is_never_held() -> None:
    held, _ = siblings()
    others = [
        reply(CAR),  # not in a group
        reply(HOTEL, saga_id="s2", outcome=Outcome.FAILURE),
        reply(HOTEL, saga_id="s3", outcome=Outcome.ERROR),
        reply(HOTEL, saga_id="s4", for_kind=MessageKind.COMPENSATION),  # undoing runs unheld
    ]
    for event in others:
        assert held.gather([event]) == [event]
    assert held.holding == 0


async def test_other_sagas_are_decided_while_one_is_held() -> None:
    held, _ = siblings()
    mine, other = reply(HOTEL), reply(CAR, saga_id="s2")
    assert held.gather([mine, other]) == [other]
    assert held.holding == 1


async def test_a_reply_whose_sibling_was_decided_here_before_is_not_held() -> None:
    held, _ = siblings()
    first = reply(HOTEL)
    assert held.gather([first, reply(FLIGHT)]) != []  # both decided
    retried = reply(FLIGHT)  # e.g. a retried attempt's reply
    assert held.gather([retried]) == [retried]


async def test_after_linger_the_reply_goes_back_once_and_is_not_held_again() -> None:
    held, released = siblings(linger=0.01)
    hotel = reply(HOTEL)
    assert held.gather([hotel]) == []
    await asyncio.wait_for(released.came.wait(), 5)
    assert released.deliveries == [hotel[0]]
    assert held.holding == 0
    # it comes back through the batcher: decided alone now
    assert held.gather([hotel]) == [hotel]
    # and its sibling, arriving later, does not wait for it either
    flight = reply(FLIGHT)
    assert held.gather([flight]) == [flight]


async def test_a_sibling_after_linger_is_not_held_for_the_one_given_back() -> None:
    held, released = siblings(linger=0.01)
    assert held.gather([reply(HOTEL)]) == []
    await asyncio.wait_for(released.came.wait(), 5)
    flight = reply(FLIGHT)  # arrives before the given-back hotel reply is decided
    assert held.gather([flight]) == [flight]


async def test_no_linger_holds_nothing() -> None:
    held, _ = siblings(linger=0)
    hotel = reply(HOTEL)
    assert held.gather([hotel]) == [hotel]


async def test_close_forgets_what_is_held_without_giving_it_back() -> None:
    held, released = siblings(linger=0.01)
    assert held.gather([reply(HOTEL)]) == []
    held.close()
    assert held.holding == 0
    await asyncio.sleep(0.05)
    assert released.deliveries == []  # left unacknowledged: the broker delivers it again


class Opened:
    """A ``together`` that records what its transaction decided, once let go."""

    def __init__(self, *, fail: bool = False) -> None:
        self.calls = 0
        self.decided: list[list[str]] = []
        self.fail = fail
        self.done = asyncio.Event()

    async def __call__(self, events: list[Event], arrived: asyncio.Event) -> None:
        self.calls += 1
        try:
            if self.fail:  # as the coordinator does: gives back what it holds, returns
                return
            await arrived.wait()
            self.decided.append(names(events))
        finally:
            self.done.set()


def opening(linger: float = 60.0, **kw: bool) -> tuple[Siblings, Released, Opened]:
    released, opened = Released(), Opened(**kw)
    held = Siblings(SagaRegistry([trip]), linger=linger, release=released, together=opened)
    return held, released, opened


async def test_the_first_held_reply_opens_a_transaction_that_its_sibling_joins() -> None:
    held, released, opened = opening()
    hotel, flight = reply(HOTEL), reply(FLIGHT)
    assert held.gather([hotel]) == []
    await asyncio.sleep(0)
    assert opened.calls == 1 and opened.decided == []  # open, waiting for the flight
    assert held.gather([flight]) == []  # joins it: not decided apart
    await asyncio.wait_for(opened.done.wait(), 5)
    assert opened.decided == [["s1/hotel/success", "s1/flight/success"]]
    await asyncio.sleep(0)
    assert held.holding == 0 and released.deliveries == []


async def test_a_refusal_joins_the_open_transaction_too() -> None:
    held, _, opened = opening()
    assert held.gather([reply(HOTEL)]) == []
    assert held.gather([reply(FLIGHT, outcome=Outcome.FAILURE)]) == []
    await asyncio.wait_for(opened.done.wait(), 5)
    assert opened.decided == [["s1/hotel/success", "s1/flight/failure"]]


async def test_one_transaction_is_open_at_a_time_the_others_wait_unlocked() -> None:
    held, _, opened = opening()
    assert held.gather([reply(HOTEL, saga_id="a")]) == []
    assert held.gather([reply(HOTEL, saga_id="b")]) == []
    assert held.holding == 2
    await asyncio.sleep(0)
    assert opened.calls == 1
    # b's hold is a plain one: its sibling takes it along to be decided now
    assert names(held.gather([reply(FLIGHT, saga_id="b")])) == [
        "b/hotel/success",
        "b/flight/success",
    ]


async def test_after_linger_the_open_transaction_decides_the_reply_alone() -> None:
    held, released, opened = opening(linger=0.01)
    assert held.gather([reply(HOTEL)]) == []
    await asyncio.wait_for(opened.done.wait(), 5)
    assert opened.decided == [["s1/hotel/success"]]
    assert released.deliveries == []  # not given back to the batcher: decided
    flight = reply(FLIGHT)  # late: decided on its own
    assert held.gather([flight]) == [flight]


async def test_a_batch_run_again_does_not_bring_back_what_is_held() -> None:
    """A batch that failed is run again one message at a time (the batcher): a
    reply held, or joined to an open transaction, must not be decided twice."""
    plain, _ = siblings()
    hotel = reply(HOTEL)
    assert plain.gather([hotel]) == []
    assert plain.gather([hotel]) == []
    assert plain.holding == 1
    assert names(plain.gather([reply(FLIGHT)])) == ["s1/hotel/success", "s1/flight/success"]

    held, _, opened = opening()
    hotel, flight = reply(HOTEL), reply(FLIGHT)
    assert held.gather([hotel]) == []
    assert held.gather([flight]) == []
    assert held.gather([flight]) == [] and held.gather([hotel]) == []
    await asyncio.wait_for(opened.done.wait(), 5)
    assert opened.decided == [["s1/hotel/success", "s1/flight/success"]]


async def test_settle_lets_the_open_transaction_decide_what_it_holds() -> None:
    held, _, opened = opening()
    assert held.gather([reply(HOTEL)]) == []
    await asyncio.wait_for(held.settle(), 5)
    assert opened.decided == [["s1/hotel/success"]]
    assert held.holding == 0


async def test_an_open_transaction_that_failed_holds_nothing_any_more() -> None:
    held, _, opened = opening(fail=True)
    assert held.gather([reply(HOTEL)]) == []
    await asyncio.wait_for(opened.done.wait(), 5)
    await asyncio.sleep(0)
    assert held.holding == 0
    # its coordinator gave the hotel's reply back to the broker, which delivers it
    # again: the flight's reply is not handed to the transaction that is gone, it
    # is held anew (and opens another)
    assert held.gather([reply(FLIGHT)]) == []
    assert held.holding == 1
    await asyncio.sleep(0)
    assert opened.calls == 2


# --------------------------------------------------------------------------- in a coordinator


class Box:
    """A reply as the coordinator's batcher hands it over, recording its settling."""

    def __init__(self, envelope: Envelope) -> None:
        self.body = encode(envelope)
        self.headers: Mapping[str, str] = {}
        self.queue = "replies"
        self.redelivered = False
        self.settled: list[str] = []

    async def ack(self) -> None:
        self.settled.append("ack")

    async def nack(self, requeue: bool = True) -> None:
        self.settled.append("nack")


async def _at_first_group(saga_ids: list[str]) -> tuple[Coordinator, InMemorySagaStore, dict]:
    """A coordinator (holding for a minute) whose sagas wait for hotel and flight."""
    store = InMemorySagaStore()
    coordinator = Coordinator([trip], store=store, transport=InMemoryTransport(), group_linger=60.0)
    for saga_id in saga_ids:
        await coordinator.start_saga(trip, Data(ref=saga_id), saga_id=saga_id)
    commands: dict[tuple[str, str], Envelope] = {}

    async def sent() -> None:
        async with store.claim_outbox(100) as items:
            for item in items:
                commands[(item.envelope.saga_id, item.envelope.step)] = item.envelope

    await sent()
    cars = [Box(commands[(s, "car")].reply(Outcome.SUCCESS, {"ref": s})) for s in saga_ids]
    await coordinator._handle_batch(cars)
    await sent()
    return coordinator, store, commands


def _answer(commands: dict, saga_id: str, step: str) -> Box:
    return Box(commands[(saga_id, step)].reply(Outcome.SUCCESS, {"ref": saga_id}))


async def test_in_a_coordinator_the_siblings_reply_joins_the_locked_saga() -> None:
    coordinator, store, commands = await _at_first_group(["a"])
    hotel, flight = _answer(commands, "a", "hotel"), _answer(commands, "a", "flight")
    await coordinator._handle_batch([hotel])
    await asyncio.sleep(0.01)
    assert store._locks.owner("a") is not None  # the open transaction holds the saga
    assert hotel.settled == []
    await coordinator._handle_batch([flight])
    for _ in range(100):
        if not coordinator._siblings.holding:
            break
        await asyncio.sleep(0.01)
    assert hotel.settled == flight.settled == ["ack"]
    state = await store.get("a")
    assert state is not None and set(state.completed) == {CAR, HOTEL, FLIGHT}


async def test_a_held_reply_that_joined_a_failed_batch_is_given_back() -> None:
    """The batcher returns a failed batch's own messages; a reply held from an
    earlier batch that joined it is the coordinator's to give back."""
    coordinator, _, commands = await _at_first_group(["a", "b"])
    await coordinator._handle_batch([_answer(commands, "a", "hotel")])  # the open one
    held = _answer(commands, "b", "hotel")  # waits unlocked
    await coordinator._handle_batch([held])
    assert held.settled == []

    async def broken(*args: object, **kw: object) -> None:
        raise RuntimeError("a bug in a hook")

    coordinator.writer.commit = broken  # type: ignore[method-assign]
    sibling = _answer(commands, "b", "flight")
    with pytest.raises(RuntimeError):
        await coordinator._handle_batch([sibling])
    assert held.settled == ["nack"]
    assert sibling.settled == []  # the batcher's to return
    coordinator._siblings.close()
