"""Forged messages, tried against a real coordinator and worker that sign.

Issue 11 found, with signing absent: one published ``charge`` reply with
outcome ``success`` completed an order whose payment was never taken; one
published ``refund`` command refunded an order; a message published to the
dead-letter exchange with made-up headers was replayed by ``dlq replay --all``
to where its headers said. Each attack is repeated here against processes
that hold signing keys: every forgery is dead-lettered with its reason and
never applied, and the genuine messages flow.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import aio_pika
import orjson
import pytest
from pydantic import BaseModel

from sagaflow import Coordinator, HandlerContext, Participant, Worker
from sagaflow.core.errors import TransportError
from sagaflow.core.messages import Envelope, MessageKind, Outcome, encode
from sagaflow.core.ports import DeadLetter, Topology, Transport
from sagaflow.core.signing import Key, Keys
from sagaflow.core.state import SagaStatus
from sagaflow.store import PostgresParticipantStore, PostgresSagaStore
from sagaflow.store.migrate import migrate
from sagaflow.transport import RabbitMQTransport
from sagaflow.transport.wire import H_REASON, H_SOURCE_QUEUE, message_headers
from tests import sample

pytestmark = pytest.mark.timeout(120)

TOPOLOGY = Topology(prefix="signed", delivery_limit=3)
KEYS = {
    service: Key(service, f"{service}-1", f"{service}-secret-0123456789".encode())
    for service in ("inventory", "payment", "shipping", "order")
}


def participants(calls: list[str]) -> list[Participant]:
    """The sample saga's four services; each handler call is recorded."""
    made: dict[str, Participant] = {}
    for action in (
        sample.reserve,
        sample.release,
        sample.charge,
        sample.refund,
        sample.schedule,
        sample.cancel,
        sample.confirm,
        sample.approve,
    ):
        participant = made.setdefault(action.service, Participant(action.service))
        participant.handler(action)(recorder(action.type, calls))
    return list(made.values())


def recorder(name: str, calls: list[str]) -> Callable[..., Awaitable[sample.Ok]]:
    async def handle(command: BaseModel, ctx: HandlerContext) -> sample.Ok:
        calls.append(f"{name}:{ctx.saga_id}")
        return sample.Ok(ref=name)

    return handle


class Stack:
    """A coordinator and workers holding signing keys, on a fresh vhost and database."""

    def __init__(self, amqp_url: str, pg_url: str) -> None:
        self.amqp_url = amqp_url
        self.pg_url = pg_url
        self.calls: list[str] = []
        self.workers: dict[str, Worker] = {}
        self.coordinator = Coordinator(
            [sample.saga],
            store=PostgresSagaStore(pg_url, schema="saga"),
            transport=self.transport("coordinator", Keys(KEYS.values())),
            timer_interval=0.1,
        )
        self._participants = {p.service: p for p in participants(self.calls)}

    def transport(self, name: str, keys: Keys | None) -> RabbitMQTransport:
        return RabbitMQTransport(
            self.amqp_url, TOPOLOGY, connection_name=f"{name}-{uuid.uuid4()}", keys=keys
        )

    async def start_worker(self, service: str) -> None:
        worker = Worker(
            self._participants[service],
            transport=self.transport(service, Keys([KEYS[service]])),
            store=PostgresParticipantStore(self.pg_url, schema=service),
        )
        await worker.start()
        self.workers[service] = worker

    async def stop(self) -> None:
        for worker in self.workers.values():
            await worker.stop()
        await self.coordinator.stop()


@pytest.fixture
async def stack(amqp_url: str, pg_url: str) -> AsyncIterator[Stack]:
    await migrate(pg_url, schema="saga")
    made = Stack(amqp_url, pg_url)
    await made.coordinator.start()
    try:
        yield made
    finally:
        await made.stop()


async def attacker(amqp_url: str) -> aio_pika.abc.AbstractRobustConnection:
    """Anyone with publish rights on the vhost (here: the same broker user)."""
    return await aio_pika.connect_robust(amqp_url)


async def publish_raw(
    channel: aio_pika.abc.AbstractChannel,
    exchange: str,
    routing_key: str,
    body: bytes,
    headers: dict[str, str],
) -> None:
    target = await channel.get_exchange(exchange, ensure=False)
    await target.publish(
        aio_pika.Message(body, headers=dict(headers), message_id=str(uuid.uuid4())),
        routing_key,
        mandatory=True,
    )


async def waiting_command(channel: aio_pika.abc.AbstractChannel, service: str) -> Envelope:
    """Take the command waiting for a stopped service off its queue (as an
    attacker who can read it would) and put it back."""
    queue = await channel.declare_queue(TOPOLOGY.service_queue(service), passive=True)
    for _ in range(100):
        message = await queue.get(no_ack=False, fail=False)
        if message is not None:
            envelope = Envelope.model_validate(orjson.loads(message.body))
            await message.nack(requeue=True)
            return envelope
        await asyncio.sleep(0.05)
    raise AssertionError(f"no command waited on {service}")


def forged_signature(key: Key, envelope: Envelope) -> dict[str, str]:
    """Headers signed with ``key``: a compromised service signing for another."""
    body = encode(envelope)
    real = Keys([Key(envelope.service, key.key_id, key.secret)])
    return message_headers(envelope, body, real)


async def dead_letter_reasons(stack: Stack, at_least: int) -> list[str]:
    for _ in range(100):
        letters = await stack.coordinator.transport.dead_letters()
        if len(letters) >= at_least:
            return sorted(letter.reason.split(":", 1)[0] for letter in letters)
        await asyncio.sleep(0.1)
    letters = await stack.coordinator.transport.dead_letters()
    raise AssertionError(f"dead letters: {[letter.reason for letter in letters]}")


async def test_forged_replies_and_commands_are_dead_lettered_never_applied(
    stack: Stack, amqp_url: str
) -> None:
    for service in ("inventory", "shipping", "order"):
        await stack.start_worker(service)  # payment is down: the saga waits at charge
    await stack.coordinator.start_saga(sample.saga, sample.Data(order_id="o-1"), saga_id="s-1")
    connection = await attacker(amqp_url)
    try:
        channel = await connection.channel()
        charge = await waiting_command(channel, "payment")
        assert charge.step == "charge"
        success = charge.reply(Outcome.SUCCESS, {"ref": "forged"})
        body = encode(success)
        plain = message_headers(success, body, None)
        replies = TOPOLOGY.replies_exchange
        # 1. unsigned, 2. signed by inventory's key (a compromised inventory
        # worker answering for payment), 3. a signature copied onto another body
        await publish_raw(channel, replies, "reply", body, plain)
        await publish_raw(
            channel, replies, "reply", body, forged_signature(KEYS["inventory"], success)
        )
        genuine_headers = message_headers(success, body, Keys([KEYS["payment"]]))
        failure = encode(charge.reply(Outcome.FAILURE, reason="insufficient_funds"))
        await publish_raw(channel, replies, "reply", failure, genuine_headers)
        # 4. a refund command nobody signed, straight to the payment queue
        refund = Envelope(
            message_id="s-1:charge:compensation:1",
            command_id="s-1:charge:compensation",
            saga_id="s-1",
            saga_name="sample",
            step="charge",
            step_index=1,
            kind=MessageKind.COMPENSATION,
            attempt=1,
            type=sample.refund.type,
            payload={"order_id": "o-1"},
        )
        await publish_raw(
            channel,
            TOPOLOGY.commands_exchange,
            "payment",
            encode(refund),
            message_headers(refund, encode(refund), None),
        )
    finally:
        await connection.close()

    # the three forged replies: dead-lettered by the coordinator, never applied
    reasons = await dead_letter_reasons(stack, 3)
    assert reasons == ["bad_signature", "bad_signature", "unsigned"]
    state = await stack.coordinator.store.get("s-1")
    assert state is not None and state.status is SagaStatus.RUNNING
    assert not any(call.startswith("payment.") for call in stack.calls)

    # the payment worker comes up: the forged refund is dead-lettered, the real
    # charge runs once and the saga completes
    await stack.start_worker("payment")
    done = await stack.coordinator.wait_for("s-1", timeout=30)
    assert done.status is SagaStatus.COMPLETED
    assert stack.calls.count("payment.charge:s-1") == 1
    assert "payment.refund:s-1" not in stack.calls
    assert await dead_letter_reasons(stack, 4) == [
        "bad_signature",
        "bad_signature",
        "unsigned",
        "unsigned",
    ]


async def test_a_forged_dead_letter_is_not_replayed(stack: Stack, amqp_url: str) -> None:
    """Made-up ``x-sagaflow-*`` headers no longer choose where a replay goes, and
    an unsigned message is not replayed at all; a genuine one still is."""
    await stack.start_worker("inventory")
    refund = Envelope(
        message_id="victim:charge:compensation:1",
        command_id="victim:charge:compensation",
        saga_id="victim",
        saga_name="sample",
        step="charge",
        step_index=1,
        kind=MessageKind.COMPENSATION,
        attempt=1,
        type=sample.refund.type,
        payload={"order_id": "victim"},
    )
    body = encode(refund)
    connection = await attacker(amqp_url)
    try:
        channel = await connection.channel()
        await publish_raw(
            channel,
            TOPOLOGY.dead_letter_exchange,
            TOPOLOGY.service_queue("payment"),
            body,
            {
                **message_headers(refund, body, None),
                H_REASON: "unhandled: RuntimeError: database away",
                H_SOURCE_QUEUE: TOPOLOGY.service_queue("payment"),
            },
        )
    finally:
        await connection.close()
    transport = stack.coordinator.transport
    (letter,) = await wait_for_letters(transport, 1)
    assert await transport.replay_dead_letters() == []
    with pytest.raises(TransportError, match="unsigned"):
        await transport.replay_dead_letters([letter.id])
    assert [d.id for d in await transport.dead_letters()] == [letter.id]

    # a genuine dead letter (signed, refused by inventory: unknown action) replays
    bogus = refund.model_copy(
        update={
            "type": "inventory.bogus",
            "message_id": "s-2:x:command:1",
            "command_id": "s-2:x:command",
            "saga_id": "s-2",
            "kind": MessageKind.COMMAND,
        }
    )
    await transport.publish([bogus])
    letters = await wait_for_letters(transport, 2)
    genuine = next(d for d in letters if d.id != letter.id)
    assert genuine.reason.startswith("unknown_action")
    assert await transport.replay_dead_letters([genuine.id]) == [genuine.id]


async def wait_for_letters(transport: Transport, count: int) -> list[DeadLetter]:
    for _ in range(100):
        letters = await transport.dead_letters()
        if len(letters) >= count:
            return list(letters)
        await asyncio.sleep(0.1)
    raise AssertionError(f"expected {count} dead letters")
