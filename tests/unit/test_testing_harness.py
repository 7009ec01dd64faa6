"""sagaflow.testing in memory: bounded waits, faults that find real bugs, time
travel, the effects-once check, readable assertions and compensation coverage.

A trip saga (hotel, then flight, then a pivot ticket) whose participants keep
their state in memory. Nothing here sleeps: time is the fake clock's."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field

import pytest
from pydantic import BaseModel

from sagaflow import Action, BusinessFailure, HandlerContext, Participant, RetryPolicy, Saga, Step
from sagaflow import SagaStatus as S
from sagaflow.core.messages import Envelope
from sagaflow.core.ports import Tombstone
from sagaflow.store import InMemoryParticipantStore
from sagaflow.store.locks import staged
from sagaflow.store.memory_participant import InMemoryParticipantTransaction, _InboxEntry
from sagaflow.testing import (
    COVERAGE,
    EffectsNotOnce,
    HandlerFailed,
    HarnessTimeout,
    SagaTestEnvironment,
    check_effects_once,
)

pytestmark = pytest.mark.timeout(30)


class Trip(BaseModel):
    trip_id: str
    city: str = "Oslo"
    booking: str | None = None


class Book(BaseModel):
    trip_id: str
    city: str = "Oslo"


class Booked(BaseModel):
    booking: str


class Cancel(BaseModel):
    trip_id: str
    booking: str | None = None


book_hotel = Action("hotel", "book", Book, Booked)
cancel_hotel = Action("hotel", "cancel", Cancel, Booked)
book_flight = Action("flight", "book", Book, Booked)
cancel_flight = Action("flight", "cancel", Cancel, Booked)
ticket = Action("flight", "ticket", Book, Booked)


def trip_saga(
    *, cancel_by_booking: bool = False, undo_retry: RetryPolicy | None = None, name: str = "trip"
) -> Saga[Trip]:
    """``cancel_by_booking``: the hotel's cancel names the booking the reply
    brought (a bug: after a timeout the saga never heard of it)."""
    undo = undo_retry or RetryPolicy(max_attempts=5, initial_backoff=1, jitter=0)
    return Saga(
        name,
        data=Trip,
        steps=[
            Step(
                "hotel",
                book_hotel,
                command=lambda t: Book(trip_id=t.trip_id, city=t.city),
                compensation=cancel_hotel,
                compensation_command=lambda t: Cancel(
                    # the bug: the trip read back from the booking the reply brought
                    trip_id=(t.booking or "").removeprefix("room-")
                    if cancel_by_booking
                    else t.trip_id
                ),
                on_reply=lambda t, r: t.model_copy(update={"booking": r.booking}),
                retry=RetryPolicy(max_attempts=2, initial_backoff=1, jitter=0),
                compensation_retry=undo,
                timeout=10,
            ),
            Step(
                "flight",
                book_flight,
                command=lambda t: Book(trip_id=t.trip_id, city=t.city),
                compensation=cancel_flight,
                timeout=10,
            ),
            Step("ticket", ticket, command=lambda t: Book(trip_id=t.trip_id, city=t.city)),
        ],
    )


TRIP = trip_saga()


@dataclass
class World:
    rooms: dict[str, str] = field(default_factory=dict)  # trip -> city, booked rooms
    seats: dict[str, str] = field(default_factory=dict)
    cancelled: set[str] = field(default_factory=set)
    calls: Counter[str] = field(default_factory=Counter)
    no_flights_to: set[str] = field(default_factory=lambda: {"Atlantis"})


def hotel(world: World, *, counting: bool = False, forgets: bool = False) -> Participant:
    """``counting``: books a room per call, not per trip (not idempotent);
    ``forgets``: books again a trip it cancelled (a late command re-applies)."""
    participant = Participant("hotel")

    @participant.handler(book_hotel)
    async def book(cmd: Book, ctx: HandlerContext) -> Booked:
        world.calls["hotel.book"] += 1
        if cmd.trip_id in world.cancelled and not forgets:
            return Booked(booking=f"room-{cmd.trip_id}")
        key = f"{cmd.trip_id}#{world.calls['hotel.book']}" if counting else cmd.trip_id
        world.rooms.setdefault(key, cmd.city)
        return Booked(booking=f"room-{cmd.trip_id}")

    @participant.handler(cancel_hotel)
    async def cancel(cmd: Cancel, ctx: HandlerContext) -> Booked:
        world.calls["hotel.cancel"] += 1
        world.cancelled.add(cmd.trip_id)
        world.rooms.pop(cmd.trip_id, None)
        return Booked(booking=f"room-{cmd.trip_id}")

    return participant


def flight(world: World) -> Participant:
    participant = Participant("flight")

    @participant.handler(book_flight)
    async def book(cmd: Book, ctx: HandlerContext) -> Booked:
        world.calls["flight.book"] += 1
        if cmd.city in world.no_flights_to:
            raise BusinessFailure("no_flights")
        world.seats.setdefault(cmd.trip_id, cmd.city)
        return Booked(booking=f"seat-{cmd.trip_id}")

    @participant.handler(cancel_flight)
    async def cancel(cmd: Cancel, ctx: HandlerContext) -> Booked:
        world.seats.pop(cmd.trip_id, None)
        return Booked(booking="")

    @participant.handler(ticket)
    async def issue(cmd: Book, ctx: HandlerContext) -> Booked:
        return Booked(booking=f"ticket-{cmd.trip_id}")

    return participant


def env_for(world: World, saga: Saga[Trip] | None = None, **options: object) -> SagaTestEnvironment:
    return SagaTestEnvironment([saga or TRIP], [hotel(world), flight(world)], **options)  # type: ignore[arg-type]


# ------------------------------------------------------------------ readable assertions


async def test_assertions_name_status_steps_compensations_and_events() -> None:
    world = World()
    async with env_for(world) as env:
        handle = await env.start_saga(TRIP, Trip(trip_id="t1", city="Atlantis"))
        await env.drain()

        history = await env.assert_saga(
            handle,
            status=S.COMPENSATED,
            steps=["hotel"],
            compensations=["hotel"],
            events=["command_sent", "compensation_started", "saga_compensated"],
            reason="no_flights",
        )
        with pytest.raises(AssertionError) as wrong:
            await env.assert_saga(handle, status=S.COMPLETED, compensations=[])
    text = str(wrong.value)
    assert f"saga {handle.saga_id}: status is COMPENSATED, expected COMPLETED" in text
    assert "compensations ['hotel'], expected []" in text
    assert "reply_received flight command #1 {'outcome': 'failure', 'reason': 'no_flights'}" in text
    assert history.steps == ("hotel",) and world.rooms == {}


# ------------------------------------------------------------------ no connection in memory


async def test_a_handler_asking_for_a_connection_in_memory_is_told_why() -> None:
    participant = Participant("hotel")

    @participant.handler(book_hotel)
    async def book(cmd: Book, ctx: HandlerContext) -> Booked:
        await ctx.connection.execute("INSERT INTO rooms VALUES ($1)", cmd.trip_id)
        return Booked(booking="x")

    world = World()
    async with SagaTestEnvironment([TRIP], [participant, flight(world)]) as env:
        await env.start_saga(TRIP, Trip(trip_id="t1"))
        with pytest.raises(HandlerFailed) as failed:
            await env.drain(fail_fast=True)
    assert "NoConnection" in str(failed.value)
    assert "in-memory participant store, which has no database connection" in str(failed.value)
    assert "hotel.book" in str(failed.value)


# ------------------------------------------------------------------ bounded waits


async def test_a_handler_that_never_returns_fails_drain_and_the_environment_still_stops() -> None:
    never = asyncio.Event()
    participant = Participant("hotel")

    @participant.handler(book_hotel)
    async def book(cmd: Book, ctx: HandlerContext) -> Booked:
        await never.wait()  # a call that hangs
        return Booked(booking="x")

    world = World()
    env = SagaTestEnvironment([TRIP], [participant, flight(world)], timeout=0.3)
    async with env:
        handle = await env.start_saga(TRIP, Trip(trip_id="t1"))
        with pytest.raises(HarnessTimeout) as stuck:
            await env.drain()
    # the workers stopped within their bound: the hung handler was cancelled
    text = str(stuck.value)
    assert "drain(): the system still moved after 0.3s" in text
    assert "handler of hotel.book (command, step 'hotel', attempt 1)" in text
    assert f"saga {handle.saga_id} (trip) is RUNNING at step 'hotel'" in text
    assert "waiting for the reply to hotel.book (command, attempt 1)" in text
    assert "timeout timer is due in 10s" in text


async def test_until_done_names_the_saga_and_what_it_waits_for() -> None:
    world = World()
    async with env_for(world) as env:
        env.faults.lose_reply("hotel")
        handle = await env.start_saga(TRIP, Trip(trip_id="t1"))
        with pytest.raises(HarnessTimeout) as late:
            await env.until_done(handle, within=5)
        assert (await env.until_done(handle, within=60)).status is S.COMPLETED
    assert f"until_done(): saga {handle.saga_id} not finished within 5s of test time" in str(
        late.value
    )
    assert "waiting for the reply to hotel.book (command, attempt 1)" in str(late.value)


# ------------------------------------------------------------------ time travel


async def test_advance_stops_at_every_due_time_on_the_way() -> None:
    """One advance(100) goes through two timeouts, a back-off and a compensation
    retry, in order, as the time passes."""
    world = World()
    async with env_for(world) as env:
        env.faults.lose_reply("hotel", times=2)
        env.faults.fail_compensation("hotel", times=1)
        handle = await env.start_saga(TRIP, Trip(trip_id="t1"))
        await env.advance(100)

        history = await env.assert_saga(handle, status=S.COMPENSATED, compensations=["hotel"])
    at = {
        e.event.value + (f"#{e.attempt}" if e.attempt else ""): e.at - history.log[0].at
        for e in history.log
    }
    assert at["timed_out#1"] == 10
    assert at["timed_out#2"] == 20  # the retry went out at once, and timed out 10 s later
    assert world.rooms == {}  # the room booked (unheard of) was cancelled


# ------------------------------------------------------------------ faults that find bugs


async def test_a_late_reply_finds_a_compensation_that_needs_the_reply() -> None:
    """The hotel's reply arrives after the step gave up: a compensation built from
    what the reply would have brought cancels nothing, and a room is left booked."""
    for buggy in (True, False):
        world = World()
        saga = trip_saga(cancel_by_booking=buggy)
        async with env_for(world, saga) as env:
            env.faults.delay_reply("hotel", 60, times=2)
            handle = await env.start_saga(saga, Trip(trip_id="t1"))
            state = await env.until_done(handle, within=300)
            assert state.status is S.COMPENSATED
            await env.advance(120)  # the late replies arrive: ignored
            assert (await env.get(handle)).version == state.version
        assert (world.rooms != {}) is buggy, world.rooms


class ForgetfulTransaction(InMemoryParticipantTransaction):
    """A broken inbox: it never finds a command it answered."""

    async def claim(self, command_ids: Sequence[str]) -> dict[str, Envelope | Tombstone]:
        await super().claim(command_ids)
        return {}

    async def complete(self, replies: Sequence[Envelope]) -> None:
        for reply in replies:
            self._writes[reply.command_id] = _InboxEntry("done", reply)


class ForgetfulInbox(InMemoryParticipantStore):
    def transaction(self) -> AbstractAsyncContextManager[InMemoryParticipantTransaction]:
        return staged(ForgetfulTransaction(self))


@pytest.mark.parametrize("fault", ["duplicate", "crash_after_commit", "lose_reply"])
async def test_redeliveries_find_an_inbox_that_forgets(fault: str) -> None:
    """With a real inbox each fault costs no second effect; with one that forgets,
    the counting hotel books a second room: the fault finds it."""
    for broken in (False, True):
        world = World()
        env = SagaTestEnvironment([TRIP], [hotel(world, counting=True), flight(world)])
        if broken:
            env.workers[0].store = ForgetfulInbox()
        async with env:
            getattr(env.faults, fault)("hotel")
            handle = await env.start_saga(TRIP, Trip(trip_id="t1"))
            await env.until_done(handle, within=60)
            await env.assert_saga(handle, status=S.COMPLETED)
        assert len(world.rooms) == (2 if broken else 1), (fault, world.rooms)


async def test_a_failing_compensation_finds_a_retry_policy_too_small() -> None:
    for attempts, ends in ((1, S.FAILED), (3, S.COMPENSATED)):
        world = World()
        saga = trip_saga(undo_retry=RetryPolicy(max_attempts=attempts, initial_backoff=1, jitter=0))
        async with env_for(world, saga) as env:
            env.faults.fail_compensation("hotel", times=2)
            handle = await env.start_saga(saga, Trip(trip_id="t1", city="Atlantis"))
            state = await env.until_done(handle, within=120)
        assert state.status is ends


async def test_an_old_reply_after_the_end_changes_nothing() -> None:
    world = World()
    async with env_for(world) as env:
        handle = await env.start_saga(TRIP, Trip(trip_id="t1", city="Atlantis"))
        await env.drain()
        done = await env.get(handle)
        await env.faults.redeliver_reply(handle.saga_id, "hotel")
        await env.faults.redeliver_reply(handle.saga_id, "hotel", compensation=True)
        await env.drain()
        assert await env.get(handle) == done
        assert len(await env.log(handle)) == len((await env.history(handle)).log)
    assert world.calls["hotel.book"] == 1


async def test_a_fault_that_never_fired_fails_the_test() -> None:
    world = World()
    with pytest.raises(AssertionError, match=r"never fired: lose_reply\('hotle', times=1\)"):
        async with env_for(world) as env:
            env.faults.lose_reply("hotle")  # a typo: no such step
            handle = await env.start_saga(TRIP, Trip(trip_id="t1"))
            await env.drain()
            await env.assert_saga(handle, status=S.COMPLETED)


# ------------------------------------------------------------------ effects once, in memory


async def test_effects_once_finds_a_handler_that_books_twice() -> None:
    world = World()
    with pytest.raises(EffectsNotOnce) as twice:
        await check_effects_once(
            hotel(world, counting=True), book_hotel, Book(trip_id="t1"), state=lambda: world.rooms
        )
    assert "running hotel.book a second time changed what the first run left" in str(twice.value)
    assert "+{'t1#1': 'Oslo', 't1#2': 'Oslo'}" in str(twice.value)

    fine = World()
    report = await check_effects_once(
        hotel(fine),
        book_hotel,
        Book(trip_id="t1"),
        compensation=cancel_hotel,
        compensation_command=Cancel(trip_id="t1"),
        state=lambda: fine.rooms,
    )
    assert report.changed_first
    assert [what for what, _ in report.answers] == [
        "hotel.book #1", "hotel.book #2", "hotel.cancel #1", "hotel.cancel #2", "hotel.book after it",
    ]  # fmt: skip


async def test_effects_once_finds_a_late_command_applied_after_its_compensation() -> None:
    """The hotel books again after the cancel: a late command re-applies the effect."""
    world = World()
    with pytest.raises(EffectsNotOnce, match=r"running hotel\.book again after hotel\.cancel"):
        await check_effects_once(
            hotel(world, forgets=True),
            book_hotel,
            Book(trip_id="t1"),
            compensation=cancel_hotel,
            state=lambda: world.rooms,
        )


# ------------------------------------------------------------------ coverage


async def test_coverage_reports_the_compensations_never_exercised() -> None:
    world = World()
    saga = trip_saga(name="trip-coverage")
    async with env_for(world, saga) as env:
        await env.start_saga(saga, Trip(trip_id="t1", city="Atlantis"))
        await env.drain()
    coverage = COVERAGE.sagas["trip-coverage"]
    assert coverage.compensatable == ("hotel", "flight")
    assert coverage.missing == ["flight"]
    assert coverage.percent == 50.0
    assert any(
        line.startswith("trip-coverage") and "1/2" in line and "never compensated: flight" in line
        for line in COVERAGE.report()
    )
