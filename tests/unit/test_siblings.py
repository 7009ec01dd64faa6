"""A parallel group's replies are held until their siblings arrive (issue 12).

The coordinator decides the replies of a group's branches in one transaction
when they arrive close together (:mod:`sagaflow.runtime.siblings`). What is
held is only ever success replies to a group member's command; anything else
goes at once and takes the held replies of its saga with it; a held reply
goes back to the batcher once ``linger`` passed and is then never held again.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

from pydantic import BaseModel

from sagaflow import Action, Group, Saga, Step
from sagaflow.core.messages import Envelope, MessageKind, Outcome
from sagaflow.runtime.siblings import Event, Siblings
from sagaflow.runtime.writer import SagaRegistry


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
