"""Refusals inside a batch, on the real broker and database.

The worker runs a batch of commands in one transaction without savepoints.
A handler that refuses (``BusinessFailure``) must undo only its own writes:
the first refusal of an action rolls the batch back and runs it again one
savepoint each; after that the action runs in a savepoint of its own inside
the fast batch, so a steady refusal rate does not send every batch down the
slow path. Either way each command's effect is applied once or not at all.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager

import asyncpg
import pytest
from pydantic import BaseModel

from sagaflow import Action, BusinessFailure, HandlerContext, Participant, Worker
from sagaflow.core.messages import Envelope, MessageKind, Outcome, decode
from sagaflow.core.ports import Delivery, Topology
from sagaflow.runtime.hooks import Hooks
from sagaflow.store import PostgresParticipantStore
from sagaflow.transport import RabbitMQTransport

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

TOPOLOGY = Topology(prefix="refusals", delivery_limit=5)
COMMANDS = 60


class Charge(BaseModel):
    n: int


class Charged(BaseModel):
    n: int


charge = Action("bank", "charge", Charge, Charged)


async def setup(connection: asyncpg.Connection) -> None:
    await connection.execute("CREATE TABLE IF NOT EXISTS bank.charges (n int PRIMARY KEY)")


participant = Participant("bank", setup=setup)
calls: list[int] = []


@participant.handler(charge)
async def handle(command: Charge, ctx: HandlerContext) -> Charged:
    calls.append(command.n)
    if len(calls) == 1:
        await asyncio.sleep(0.5)  # the rest of the queue arrives meanwhile: full batches
    await ctx.connection.execute("INSERT INTO bank.charges VALUES ($1)", command.n)
    if command.n % 10 == 3:  # written, then refused: the write must be undone
        raise BusinessFailure(f"card {command.n} declined")
    return Charged(n=command.n)


def command(n: int) -> Envelope:
    saga = f"s-{n}"
    return Envelope(
        message_id=f"{saga}:charge:command:1",
        command_id=f"{saga}:charge:command",
        saga_id=saga,
        saga_name="bank",
        step="charge",
        step_index=0,
        kind=MessageKind.COMMAND,
        attempt=1,
        type=charge.type,
        payload={"n": n},
    )


class Handlings(Hooks):
    """Counts each time a command is handled, in the fast batch or once more carefully."""

    def __init__(self) -> None:
        self.count = 0

    @contextmanager
    def processing(self, envelope: Envelope, queue: str) -> Iterator[dict[str, str]]:
        self.count += 1
        yield envelope.trace


@pytest.fixture
async def client(amqp_url: str) -> AsyncIterator[RabbitMQTransport]:
    broker = RabbitMQTransport(amqp_url, TOPOLOGY, connection_name="refusals-test")
    await broker.start(["bank"])
    try:
        yield broker
    finally:
        await broker.close()


async def test_refusals_undo_only_themselves_and_stop_redoing_batches(
    amqp_url: str, pg_url: str, client: RabbitMQTransport
) -> None:
    replies: dict[int, Envelope] = {}
    all_in = asyncio.Event()

    async def on_reply(delivery: Delivery) -> None:
        reply = decode(delivery.body)
        replies[int(reply.saga_id.removeprefix("s-"))] = reply
        await delivery.ack()
        if len(replies) >= COMMANDS:
            all_in.set()

    calls.clear()
    handlings = Handlings()
    await client.consume(TOPOLOGY.replies_queue, on_reply, prefetch=100)
    await client.publish([command(n) for n in range(COMMANDS)])  # waiting in the queue
    worker = Worker(
        participant,
        transport=RabbitMQTransport(amqp_url, TOPOLOGY, connection_name=f"w-{uuid.uuid4()}"),
        store=PostgresParticipantStore(pg_url, schema="bank"),
        hooks=handlings,
        max_batch=10,
        concurrency=1,
    )
    await worker.start()
    try:
        async with asyncio.timeout(60):
            await all_in.wait()
    finally:
        await worker.stop()

    refused = {n for n in range(COMMANDS) if n % 10 == 3}
    assert {n for n, r in replies.items() if r.outcome is Outcome.FAILURE} == refused
    assert all(replies[n].outcome is Outcome.SUCCESS for n in range(COMMANDS) if n not in refused)
    assert replies[13].reason == "card 13 declined"
    # Six refusals in six batches of up to ten: only the first refusal's batch was
    # handled again (carefully); redoing every such batch would be 50 or more.
    again = handlings.count - COMMANDS
    assert 1 <= again <= 10, again
    assert len(calls) - COMMANDS <= 10
    conn = await asyncpg.connect(pg_url)
    try:
        written = {row[0] for row in await conn.fetch("SELECT n FROM bank.charges")}
        inbox = await conn.fetchval("SELECT count(*) FROM bank.inbox WHERE status = 'done'")
        # The careful path claims a command ('pending') and then updates it with its
        # reply; the fast path inserts it done. The worker's backends report their
        # statistics as they exit (it has stopped): wait until all the rows show.
        stats = (
            "SELECT n_tup_ins, n_tup_upd FROM pg_stat_user_tables"
            " WHERE schemaname = 'bank' AND relname = 'inbox'"
        )
        async with asyncio.timeout(10):
            while (row := await conn.fetchrow(stats))[0] < COMMANDS:
                await asyncio.sleep(0.2)
                await conn.execute("SELECT pg_stat_clear_snapshot()")
        careful = row[1]
    finally:
        await conn.close()
    # only the batch of the action's first refusal went the careful way
    assert 1 <= careful <= 10, careful
    assert written == set(range(COMMANDS)) - refused  # each once, the refused undone
    assert inbox == COMMANDS  # every outcome stored, refusals included
