"""A handler's deadlock is the batch's conflict, not the step's transient failure.

Found by scenario 6: the worker runs a batch of commands in one transaction,
and two batches in flight at once (``concurrency=2``, or two replicas) that
update the same hot rows in opposite orders deadlock. PostgreSQL aborts one
statement of one of them after ``deadlock_timeout``. Replying ERROR for that
command spends the saga's retry budget on contention (enough of them and a
valid order is rejected with ``retries_exhausted``), and the victim keeps the
locks of the rest of its batch while it goes on. The worker must instead roll
its whole batch back and run it again: every command succeeds, once.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest
from pydantic import BaseModel

from sagaflow import Action, HandlerContext, Participant, Worker
from sagaflow.core.messages import Envelope, MessageKind, Outcome, decode
from sagaflow.core.ports import Delivery, Topology
from sagaflow.store import PostgresParticipantStore
from sagaflow.transport import RabbitMQTransport

pytestmark = [pytest.mark.faults, pytest.mark.timeout(120)]

TOPOLOGY = Topology(prefix="deadlock", delivery_limit=5)
COMMANDS = 24


class Transfer(BaseModel):
    first: str
    second: str


class Done(BaseModel):
    ok: bool


transfer = Action("bank", "transfer", Transfer, Done)


async def setup(connection: asyncpg.Connection) -> None:
    await connection.execute(
        "CREATE TABLE IF NOT EXISTS bank.counters (k text PRIMARY KEY, n int NOT NULL);"
        " INSERT INTO bank.counters VALUES ('a', 0), ('b', 0) ON CONFLICT DO NOTHING"
    )


participant = Participant("bank", setup=setup)


@participant.handler(transfer)
async def handle(command: Transfer, ctx: HandlerContext) -> Done:
    db = ctx.connection
    await db.execute("UPDATE bank.counters SET n = n + 1 WHERE k = $1", command.first)
    await asyncio.sleep(0.05)  # hold the first row while the other batch takes the second
    await db.execute("UPDATE bank.counters SET n = n + 1 WHERE k = $1", command.second)
    return Done(ok=True)


def command(n: int) -> Envelope:
    saga = f"s-{n}"
    first, second = ("a", "b") if n % 2 else ("b", "a")
    return Envelope(
        message_id=f"{saga}:transfer:command:1",
        command_id=f"{saga}:transfer:command",
        saga_id=saga,
        saga_name="bank",
        step="transfer",
        step_index=0,
        kind=MessageKind.COMMAND,
        attempt=1,
        type=transfer.type,
        payload={"first": first, "second": second},
    )


@pytest.fixture
async def client(amqp_url: str) -> AsyncIterator[RabbitMQTransport]:
    broker = RabbitMQTransport(amqp_url, TOPOLOGY, connection_name="deadlock-test")
    await broker.start(["bank"])
    try:
        yield broker
    finally:
        await broker.close()


async def test_a_deadlocked_batch_is_retried_whole(
    amqp_url: str, pg_url: str, client: RabbitMQTransport
) -> None:
    replies: list[Envelope] = []
    got_all = asyncio.Event()

    async def on_reply(delivery: Delivery) -> None:
        replies.append(decode(delivery.body))
        await delivery.ack()
        if len(replies) >= COMMANDS:
            got_all.set()

    await client.consume(TOPOLOGY.replies_queue, on_reply, prefetch=100)
    # the commands wait in the queue, so the worker takes them as batches at once
    await client.publish([command(n) for n in range(COMMANDS)])
    worker = Worker(
        participant,
        transport=RabbitMQTransport(amqp_url, TOPOLOGY, connection_name=f"w-{uuid.uuid4()}"),
        store=PostgresParticipantStore(pg_url, schema="bank"),
        concurrency=2,
    )
    await worker.start()
    try:
        async with asyncio.timeout(60):
            await got_all.wait()
    finally:
        await worker.stop()

    outcomes = [
        (r.saga_id, r.outcome, r.reason) for r in replies if r.outcome is not Outcome.SUCCESS
    ]
    assert outcomes == []
    assert len({r.saga_id for r in replies}) == COMMANDS
    conn = await asyncpg.connect(pg_url)
    try:
        counters = dict(await conn.fetch("SELECT k, n FROM bank.counters"))
    finally:
        await conn.close()
    assert counters == {"a": COMMANDS, "b": COMMANDS}


# --------------------------------------------------------------------------- hot rows

HOT = Participant("hot", setup=None)
HOT_COMMANDS = 960
touch = Action("hot", "touch", Transfer, Done)


@HOT.handler(touch)
async def touch_one(command: Transfer, ctx: HandlerContext) -> Done:
    """One row per command, as a reservation takes stock of one SKU: never a
    deadlock alone, but a lane's batch takes the rows of several commands."""
    await ctx.connection.execute(
        "INSERT INTO hot.counters VALUES ($1, 1) ON CONFLICT (k) DO UPDATE SET n = counters.n + 1",
        command.first,
    )
    await asyncio.sleep(0.005)
    return Done(ok=True)


def touch_command(n: int) -> Envelope:
    saga = f"h-{n}"
    return command(n).model_copy(
        update={
            "message_id": f"{saga}:touch:command:1",
            "command_id": f"{saga}:touch:command",
            "saga_id": saga,
            "step": "touch",
            "type": touch.type,
            "payload": {"first": "abc"[n % 3], "second": ""},
        }
    )


async def test_a_lost_deadlock_stops_the_batches_that_caused_it(
    amqp_url: str, pg_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A backlog of commands on three hot rows (as after a database restart):
    lanes batching them in opposite orders deadlock, and each deadlock stalls
    every lane for ``deadlock_timeout``. After the first one the worker must
    stop putting several commands in one transaction, or the backlog drains
    at one batch a second and steps time out (seen in scenario 4)."""
    conn = await asyncpg.connect(pg_url)
    try:
        await conn.execute(
            "CREATE SCHEMA IF NOT EXISTS hot;"
            " CREATE TABLE IF NOT EXISTS hot.counters (k text PRIMARY KEY, n int NOT NULL)"
        )
    finally:
        await conn.close()
    client = RabbitMQTransport(amqp_url, TOPOLOGY, connection_name="hot-test")
    await client.start(["hot"])
    replies: list[Envelope] = []
    got_all = asyncio.Event()

    async def on_reply(delivery: Delivery) -> None:
        replies.append(decode(delivery.body))
        await delivery.ack()
        if len({r.saga_id for r in replies}) >= HOT_COMMANDS:
            got_all.set()

    await client.consume(TOPOLOGY.replies_queue, on_reply, prefetch=100)
    await client.publish([touch_command(n) for n in range(HOT_COMMANDS)])
    worker = Worker(
        HOT,
        transport=RabbitMQTransport(amqp_url, TOPOLOGY, connection_name=f"w-{uuid.uuid4()}"),
        store=PostgresParticipantStore(pg_url, schema="hot"),
        concurrency=4,
    )
    caplog.set_level("WARNING", logger="sagaflow")
    await worker.start()
    try:
        async with asyncio.timeout(90):
            await got_all.wait()
    finally:
        await worker.stop()
        await client.close()

    assert all(r.outcome is Outcome.SUCCESS for r in replies)
    lost = [r for r in caplog.records if "DeadlockDetected" in r.getMessage()]
    # after the first deadlock only the batches already in flight can deadlock
    assert len(lost) <= worker.concurrency, [r.getMessage()[:120] for r in lost]
    conn = await asyncpg.connect(pg_url)
    try:
        counters = dict(await conn.fetch("SELECT k, n FROM hot.counters"))
    finally:
        await conn.close()
    assert counters == {k: HOT_COMMANDS // 3 for k in "abc"}
