"""Refusals among concurrent commands, on the real broker and database (issue 17, item 4).

The worker used to run a batch of commands in one transaction without
savepoints and, when a handler refused (``BusinessFailure``), roll the whole
batch back and run it again: 50 sagas gave 53 calls of one handler. The
database effects stayed once, but a handler's outside call (a payment gateway,
an e-mail) ran twice. Now each command has its own transaction: a refusal
rolls back only its own writes, and no handler runs twice without a fault.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

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
    calls.append(command.n)  # stands for an outside call: a gateway, an e-mail
    if len(calls) == 1:
        await asyncio.sleep(0.5)  # the rest of the queue arrives meanwhile
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


class Reruns(Hooks):
    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []

    def rerun(self, envelope: Envelope, why: str) -> None:
        self.seen.append((envelope.saga_id, why))


@pytest.fixture
async def client(amqp_url: str) -> AsyncIterator[RabbitMQTransport]:
    broker = RabbitMQTransport(amqp_url, TOPOLOGY, connection_name="refusals-test")
    await broker.start(["bank"])
    try:
        yield broker
    finally:
        await broker.close()


async def test_refusals_undo_only_themselves_and_no_handler_runs_twice(
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
    reruns = Reruns()
    await client.consume(TOPOLOGY.replies_queue, on_reply, prefetch=100)
    await client.publish([command(n) for n in range(COMMANDS)])  # waiting in the queue
    worker = Worker(
        participant,
        transport=RabbitMQTransport(amqp_url, TOPOLOGY, connection_name=f"w-{uuid.uuid4()}"),
        store=PostgresParticipantStore(pg_url, schema="bank"),
        hooks=reruns,
    )  # default settings
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
    assert sorted(calls) == list(range(COMMANDS)), "every handler ran exactly once"
    assert reruns.seen == []
    conn = await asyncpg.connect(pg_url)
    try:
        written = {row[0] for row in await conn.fetch("SELECT n FROM bank.charges")}
        inbox = await conn.fetchval("SELECT count(*) FROM bank.inbox WHERE status = 'done'")
    finally:
        await conn.close()
    assert written == set(range(COMMANDS)) - refused  # each once, the refused undone
    assert inbox == COMMANDS  # every outcome stored, refusals included
