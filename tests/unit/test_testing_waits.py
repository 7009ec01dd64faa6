"""The harness through issue 12's shapes: ``advance()`` stops at a wait's timeout
and at a deadline, ``env.signal()`` sends a signal, a saga stuck at a wait is
reported as waiting for its signal, and faults reach a branch of a parallel group."""

from __future__ import annotations

import pytest
from pydantic import BaseModel

from sagaflow import Group, Saga, SagaStatus, Step, Wait
from sagaflow.testing import HarnessTimeout, SagaTestEnvironment
from tests.unit.test_testing_harness import (
    Book,
    Cancel,
    Trip,
    World,
    book_flight,
    book_hotel,
    cancel_flight,
    cancel_hotel,
    flight,
    hotel,
    ticket,
)

pytestmark = pytest.mark.timeout(30)


class Approval(BaseModel):
    approved_by: str


class ApprovedTrip(Trip):
    approved_by: str | None = None


def approved_trip(
    *, wait: float | None = 3600, deadline: float | None = None
) -> Saga[ApprovedTrip]:
    return Saga(
        "approved-trip",
        data=ApprovedTrip,
        steps=[
            Step(
                "hotel",
                book_hotel,
                command=lambda t: Book(trip_id=t.trip_id),
                compensation=cancel_hotel,
                compensation_command=lambda t: Cancel(trip_id=t.trip_id),
                timeout=10,
            ),
            Wait("approval", model=Approval, timeout=wait),
            Step("ticket", ticket, command=lambda t: Book(trip_id=t.trip_id)),
        ],
        deadline=deadline,
    )


WAITING = approved_trip()
DEADLINE = approved_trip(wait=None, deadline=600)


async def test_a_signal_lets_the_saga_go_on() -> None:
    world = World()
    async with SagaTestEnvironment([WAITING], [hotel(world), flight(world)]) as env:
        handle = await env.start_saga(WAITING, ApprovedTrip(trip_id="t1"))
        await env.drain()
        with pytest.raises(HarnessTimeout) as waiting:
            await env.until_done(handle, within=60)

        await env.signal(handle, "approval", Approval(approved_by="ann"))

        await env.assert_saga(
            handle,
            status=SagaStatus.COMPLETED,
            steps=["hotel", "ticket"],
            events=["waiting", "signal_received", "saga_completed"],
        )
        assert (await env.get(handle)).data["approved_by"] == "ann"
    text = str(waiting.value)
    assert "at step 'approval', waiting for the signal 'approval'" in text
    assert "its wait timer is due in 3600s of test time" in text


async def test_advance_through_a_wait_that_times_out_compensates() -> None:
    world = World()
    async with SagaTestEnvironment([WAITING], [hotel(world), flight(world)]) as env:
        handle = await env.start_saga(WAITING, ApprovedTrip(trip_id="t1"))
        await env.advance(3599)
        assert (await env.get(handle)).status is SagaStatus.RUNNING

        await env.advance(1)

        await env.assert_saga(
            handle,
            status=SagaStatus.COMPENSATED,
            compensations=["hotel"],
            events=["waiting", "wait_timed_out", "saga_compensated"],
        )
    assert world.rooms == {}


async def test_advance_through_a_deadline_cancels_and_compensates() -> None:
    world = World()
    async with SagaTestEnvironment([DEADLINE], [hotel(world), flight(world)]) as env:
        handle = await env.start_saga(DEADLINE, ApprovedTrip(trip_id="t1"))
        await env.drain()
        assert "its deadline is in 600s" in await env.report()

        state = await env.until_done(handle, within=3600)

        assert state.status is SagaStatus.COMPENSATED
        assert state.failure is not None and state.failure.cause == "deadline"
        await env.assert_saga(handle, compensations=["hotel"], events=["deadline_passed"])
        assert env.clock.now() - state.created_at == 600  # it stopped at the deadline
    assert world.rooms == {}


def book_both(*, flight_timeout: float = 10) -> Saga[Trip]:
    return Saga(
        "parallel-trip",
        data=Trip,
        steps=[
            Group(
                "book",
                [
                    Step(
                        "hotel",
                        book_hotel,
                        command=lambda t: Book(trip_id=t.trip_id, city=t.city),
                        compensation=cancel_hotel,
                        compensation_command=lambda t: Cancel(trip_id=t.trip_id),
                        timeout=10,
                    ),
                    Step(
                        "flight",
                        book_flight,
                        command=lambda t: Book(trip_id=t.trip_id, city=t.city),
                        compensation=cancel_flight,
                        compensation_command=lambda t: Cancel(trip_id=t.trip_id),
                        timeout=flight_timeout,
                    ),
                ],
            ),
            Step("ticket", ticket, command=lambda t: Book(trip_id=t.trip_id)),
        ],
    )


PARALLEL = book_both()


async def test_faults_and_time_travel_reach_a_branch_of_a_parallel_group() -> None:
    """A branch's lost reply times out on the branch's own timer and its retry is
    answered from the inbox; a branch's refusal undoes the other branch."""
    world = World()
    async with SagaTestEnvironment([PARALLEL], [hotel(world), flight(world)]) as env:
        env.faults.lose_reply("flight")
        env.faults.duplicate("hotel")
        handle = await env.start_saga(PARALLEL, Trip(trip_id="t1"))
        await env.drain()
        assert (await env.get(handle)).status is SagaStatus.RUNNING

        await env.advance(10)

        await env.assert_saga(handle, status=SagaStatus.COMPLETED, events=["timed_out"])
        assert set((await env.history(handle)).steps) == {"hotel", "flight", "ticket"}

        refused = await env.start_saga(PARALLEL, Trip(trip_id="t2", city="Atlantis"))
        await env.drain()
        await env.assert_saga(
            refused, status=SagaStatus.COMPENSATED, reason="no_flights", compensations=["hotel"]
        )
    assert world.calls["hotel.book"] == 2 and world.calls["flight.book"] == 2
    assert world.rooms == {"t1": "Oslo"} and world.seats == {"t1": "Oslo"}
