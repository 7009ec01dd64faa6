"""A handler's session state does not reach later commands (issue 17, item 7).

Handlers run on pooled connections. The participant pool used to skip
asyncpg's reset on release, so a ``SET``, a ``LISTEN`` or a session advisory
lock taken by one handler stayed on the connection for whichever command used
it next. Now asyncpg's reset runs when a command gives its connection back.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest
from pydantic import BaseModel

from sagaflow import Action, HandlerContext, Participant, Worker
from sagaflow.core.messages import Envelope, MessageKind, decode
from sagaflow.core.ports import Delivery, Topology
from sagaflow.store import PostgresParticipantStore
from sagaflow.transport import RabbitMQTransport

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

TOPOLOGY = Topology(prefix="sessions", delivery_limit=5)


class Probe(BaseModel):
    dirty: bool


class Seen(BaseModel):
    backend: int
    statement_timeout: str
    advisory_locks: int
    listening: int


probe = Action("lab", "probe", Probe, Seen)
participant = Participant("lab")


@participant.handler(probe)
async def handle(command: Probe, ctx: HandlerContext) -> Seen:
    db = ctx.connection
    seen = Seen(
        backend=await db.fetchval("SELECT pg_backend_pid()"),
        statement_timeout=await db.fetchval("SHOW statement_timeout"),
        advisory_locks=await db.fetchval(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()"
        ),
        listening=await db.fetchval("SELECT count(*) FROM pg_listening_channels()"),
    )
    if command.dirty:  # what a handler written without the pool in mind might do
        await db.execute("SET statement_timeout = '4321ms'")
        await db.execute("SELECT pg_advisory_lock(4242)")
        await db.execute("LISTEN sagaflow_leak")
    return seen


def command(n: int, *, dirty: bool) -> Envelope:
    saga = f"s-{n}"
    return Envelope(
        message_id=f"{saga}:probe:command:1",
        command_id=f"{saga}:probe:command",
        saga_id=saga,
        saga_name="lab",
        step="probe",
        step_index=0,
        kind=MessageKind.COMMAND,
        attempt=1,
        type=probe.type,
        payload={"dirty": dirty},
    )


@pytest.fixture
async def client(amqp_url: str) -> AsyncIterator[RabbitMQTransport]:
    broker = RabbitMQTransport(amqp_url, TOPOLOGY, connection_name="sessions-test")
    await broker.start(["lab"])
    try:
        yield broker
    finally:
        await broker.close()


async def test_a_handlers_set_listen_and_advisory_lock_do_not_leak(
    amqp_url: str, pg_url: str, client: RabbitMQTransport
) -> None:
    replies: asyncio.Queue[Envelope] = asyncio.Queue()

    async def on_reply(delivery: Delivery) -> None:
        await replies.put(decode(delivery.body))
        await delivery.ack()

    await client.consume(TOPOLOGY.replies_queue, on_reply, prefetch=10)
    worker = Worker(
        participant,
        transport=RabbitMQTransport(amqp_url, TOPOLOGY, connection_name=f"w-{uuid.uuid4()}"),
        # one connection: the second command surely reuses the first one's
        store=PostgresParticipantStore(pg_url, schema="lab", min_size=1, max_size=1),
        concurrency=1,
    )
    await worker.start()
    try:
        await client.publish([command(1, dirty=True)])
        first = Seen.model_validate((await asyncio.wait_for(replies.get(), 20)).payload)
        await client.publish([command(2, dirty=False)])
        second = Seen.model_validate((await asyncio.wait_for(replies.get(), 20)).payload)
    finally:
        await worker.stop()

    conn = await asyncpg.connect(pg_url)
    try:
        default_timeout = await conn.fetchval("SHOW statement_timeout")
    finally:
        await conn.close()
    assert second.backend == first.backend, "the same pooled connection"
    assert first.statement_timeout == default_timeout
    assert second.statement_timeout == default_timeout
    assert second.advisory_locks == 0
    assert second.listening == 0
