"""A parallel group's replies commit in one transaction, on the real servers (issue 12).

The two log entries of a group's replies are written by the same PostgreSQL
transaction when the coordinator held the first for its sibling: they share
one ``xmin``. With holding off and one branch slower than the other, they do
not (the check can fail). The first held reply waits in a transaction opened
for it (the saga is locked meanwhile) and a graceful stop decides it there;
another held at the same time waits unacknowledged and unlocked, and a stop
leaves it to the broker. The next coordinator decides each reply once.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable

import asyncpg
import pytest
from pydantic import BaseModel

from sagaflow import (
    Action,
    Coordinator,
    Group,
    HandlerContext,
    Participant,
    Saga,
    SagaStatus,
    Step,
    Worker,
)
from sagaflow.core.ports import Topology
from sagaflow.store import PostgresParticipantStore, PostgresSagaStore
from sagaflow.store.migrate import migrate
from sagaflow.transport import RabbitMQTransport

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

TOPOLOGY = Topology(prefix="siblings", delivery_limit=5)


class Booking(BaseModel):
    ref: str


class Trip(BaseModel):
    ref: str
    with_flight: bool = True


def _participant(
    service: str, delay: float, when: Callable[[Trip], bool] | None = None
) -> tuple[Participant, Step[Trip]]:
    book = Action(service, "book", Booking, Booking)
    unbook = Action(service, "unbook", Booking, Booking)
    participant = Participant(service)

    @participant.handler(book)
    async def do_book(command: Booking, ctx: HandlerContext) -> Booking:
        await asyncio.sleep(delay)
        return command

    @participant.handler(unbook)
    async def do_unbook(command: Booking, ctx: HandlerContext) -> Booking:
        return command

    step = Step(
        service, book, lambda d: Booking(ref=d.ref), compensation=unbook, timeout=30, when=when
    )
    return participant, step


hotel, hotel_step = _participant("hotel", 0.0)
# answers well after the hotel; skipped for a trip without a flight
flight, flight_step = _participant("flight", 0.2, when=lambda d: d.with_flight)
trip = Saga("trip", data=Trip, steps=[Group("book", [hotel_step, flight_step])])


class Stack:
    def __init__(self, amqp_url: str, pg_url: str) -> None:
        self.amqp_url = amqp_url
        self.pg_url = pg_url

    def coordinator(self, linger: float) -> Coordinator:
        return Coordinator(
            [trip],
            store=PostgresSagaStore(self.pg_url),
            transport=self._transport("c"),
            group_linger=linger,
        )

    def worker(self, participant: Participant) -> Worker:
        return Worker(
            participant,
            transport=self._transport(participant.service),
            store=PostgresParticipantStore(self.pg_url, schema=participant.service),
        )

    def _transport(self, name: str) -> RabbitMQTransport:
        return RabbitMQTransport(
            self.amqp_url, TOPOLOGY, connection_name=f"{name}-{uuid.uuid4().hex[:8]}"
        )

    async def locked(self, saga_id: str) -> bool:
        """Whether another transaction holds the saga's row lock."""
        conn = await asyncpg.connect(self.pg_url)
        try:
            async with conn.transaction():
                await conn.execute(
                    "SELECT 1 FROM sagaflow.sagas WHERE saga_id = $1 FOR UPDATE NOWAIT", saga_id
                )
        except asyncpg.LockNotAvailableError:
            return True
        finally:
            await conn.close()
        return False

    async def transactions_of_replies(self, saga_id: str) -> list[int]:
        """The ``xmin`` of each reply's log entry, in log order."""
        conn = await asyncpg.connect(self.pg_url)
        try:
            rows = await conn.fetch(
                "SELECT xmin::text::bigint AS tx FROM sagaflow.saga_log "
                "WHERE saga_id = $1 AND event = 'reply_received' ORDER BY id",
                saga_id,
            )
        finally:
            await conn.close()
        return [row["tx"] for row in rows]


@pytest.fixture
async def stack(amqp_url: str, pg_url: str) -> Stack:
    await migrate(pg_url)
    return Stack(amqp_url, pg_url)


async def _run(
    stack: Stack, linger: float, sagas: int, *, with_flight: bool = True
) -> list[list[int]]:
    coordinator = stack.coordinator(linger)
    workers = [stack.worker(hotel), stack.worker(flight)]
    for worker in workers:
        await worker.start()
    await coordinator.start()
    try:
        ended = [
            await coordinator.run_saga(
                trip, Trip(ref=f"{linger}-{n}", with_flight=with_flight), timeout=60
            )
            for n in range(sagas)
        ]
    finally:
        await coordinator.stop()
        for worker in workers:
            await worker.stop()
    assert [state.status for state in ended] == [SagaStatus.COMPLETED] * sagas
    return [await stack.transactions_of_replies(state.saga_id) for state in ended]


async def test_held_for_its_sibling_a_groups_replies_commit_in_one_transaction(
    stack: Stack,
) -> None:
    # a linger far above the flight's 0.2 s: the hotel's reply always waits for it
    for replies in await _run(stack, linger=5.0, sagas=5):
        assert len(replies) == 2
        assert replies[0] == replies[1], "both replies written by one transaction"


async def test_without_holding_a_slow_siblings_reply_commits_on_its_own(stack: Stack) -> None:
    for replies in await _run(stack, linger=0.0, sagas=5):
        assert len(replies) == 2
        assert replies[0] != replies[1]


async def test_a_sibling_skipped_by_its_condition_costs_the_linger_then_goes_on(
    stack: Stack,
) -> None:
    # the flight branch is skipped: the hotel's reply waits for a sibling that never
    # answers, is given back after the linger and decided alone
    for replies in await _run(stack, linger=0.3, sagas=3, with_flight=False):
        assert len(replies) == 1


async def test_a_held_reply_waits_in_an_open_transaction_or_is_left_to_the_broker(
    stack: Stack,
) -> None:
    """Two sagas whose hotel replied and whose flight cannot (its worker is not
    running). The first saga's reply waits in a transaction opened for it: the
    saga is locked meanwhile, and a graceful stop decides the reply in it. The
    second's waits unlocked (one open transaction at a time): the stop leaves
    it unacknowledged. The next coordinator decides each reply once."""
    first = stack.coordinator(linger=60.0)
    hotel_worker = stack.worker(hotel)
    await hotel_worker.start()
    await first.start()
    try:
        handles = [await first.start_saga(trip, Trip(ref=f"held-{n}")) for n in range(2)]
        for _ in range(400):
            if first._siblings.holding == 2:
                break
            await asyncio.sleep(0.025)
        assert first._siblings.holding == 2
        locked = {h.saga_id: await stack.locked(h.saga_id) for h in handles}
        assert sorted(locked.values()) == [False, True]
    finally:
        await first.stop()
    decided = {h.saga_id: len(await stack.transactions_of_replies(h.saga_id)) for h in handles}
    assert decided == {saga_id: int(lock) for saga_id, lock in locked.items()}

    second = stack.coordinator(linger=0.0)
    flight_worker = stack.worker(flight)
    await flight_worker.start()
    await second.start()
    try:
        states = [await second.wait_for(h.saga_id, timeout=60) for h in handles]
    finally:
        await second.stop()
        await flight_worker.stop()
        await hotel_worker.stop()
    assert [state.status for state in states] == [SagaStatus.COMPLETED] * 2
    for handle in handles:
        assert len(await stack.transactions_of_replies(handle.saga_id)) == 2
