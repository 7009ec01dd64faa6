"""Slow handlers of different sagas run at once (issue 17, item 5).

A step's timeout counts from the moment its command is sent, so it includes
the time the command waits for the worker. The worker used to run the
handlers of a batch one after another: with a 1 s handler, a 5 s timeout and
20 sagas started at once, 16 of them compensated on timeout although the
participant answered all 20. With default settings they all complete.
"""

from __future__ import annotations

import asyncio
import uuid

import pytest
from pydantic import BaseModel

from sagaflow import (
    Action,
    Coordinator,
    HandlerContext,
    Participant,
    RetryPolicy,
    Saga,
    SagaStatus,
    Step,
    Worker,
)
from sagaflow.core.ports import Topology
from sagaflow.store import PostgresParticipantStore, PostgresSagaStore
from sagaflow.store.migrate import migrate
from sagaflow.transport import RabbitMQTransport

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

TOPOLOGY = Topology(prefix="slow", delivery_limit=5)
SAGAS = 20


class Booking(BaseModel):
    ref: str


class Booked(BaseModel):
    ref: str


book = Action("hotel", "book", Booking, Booked)
unbook = Action("hotel", "unbook", Booking, Booked)
hotel = Participant("hotel")


@hotel.handler(book)
async def slow_book(command: Booking, ctx: HandlerContext) -> Booked:
    await asyncio.sleep(1.0)  # an outside call that takes a second
    return Booked(ref=command.ref)


@hotel.handler(unbook)
async def do_unbook(command: Booking, ctx: HandlerContext) -> Booked:
    return Booked(ref=command.ref)


class Trip(BaseModel):
    ref: str


trip = Saga(
    "trip",
    data=Trip,
    steps=[
        Step(
            "book",
            book,
            lambda d: Booking(ref=d.ref),
            compensation=unbook,
            retry=RetryPolicy(max_attempts=1),
            timeout=5,
        )
    ],
)


async def test_twenty_slow_handlers_answer_within_a_five_second_timeout(
    amqp_url: str, pg_url: str
) -> None:
    await migrate(pg_url)
    coordinator = Coordinator(
        [trip],
        store=PostgresSagaStore(pg_url),
        transport=RabbitMQTransport(amqp_url, TOPOLOGY, connection_name=f"c-{uuid.uuid4()}"),
    )
    worker = Worker(  # default settings
        hotel,
        transport=RabbitMQTransport(amqp_url, TOPOLOGY, connection_name=f"w-{uuid.uuid4()}"),
        store=PostgresParticipantStore(pg_url, schema="hotel"),
    )
    await worker.start()
    await coordinator.start()
    try:
        ended = await asyncio.gather(
            *(coordinator.run_saga(trip, Trip(ref=f"r-{n}"), timeout=60) for n in range(SAGAS))
        )
    finally:
        await coordinator.stop()
        await worker.stop()
    statuses = [state.status for state in ended]
    assert statuses == [SagaStatus.COMPLETED] * SAGAS
