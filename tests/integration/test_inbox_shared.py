"""A Python worker and the Node.js one take turns on one inbox (docs/protocol.md,
"The inbox"): each answers a duplicate from what the other stored, and a
compensation finds the other's stored reply, so a service can move between
languages (or run both at once) without a second effect or a lost answer.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aio_pika
import orjson
import pytest

from sagaflow.core.messages import Envelope, MessageKind, Outcome, decode, encode
from sagaflow.transport import RabbitMQTransport, wire
from services.stack import Stack

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


def _command(order: str, kind: MessageKind) -> Envelope:
    payload: dict[str, Any] = {"order_id": order}
    if kind is MessageKind.COMMAND:
        payload |= {"sku": "sku-widget", "quantity": 2}
    saga = f"{order}-saga"
    cid = f"{saga}:reserve:{kind.value}"
    return Envelope(
        message_id=f"{cid}:1",
        command_id=cid,
        saga_id=saga,
        saga_name="create-order",
        step="reserve",
        step_index=1,
        kind=kind,
        attempt=1,
        type="inventory.reserve" if kind is MessageKind.COMMAND else "inventory.release",
        payload=payload,
    )


class _Conversation:
    """Publishes commands and collects replies, as a coordinator would."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.replies: asyncio.Queue[Envelope] = asyncio.Queue()

    async def __aenter__(self) -> _Conversation:
        admin = RabbitMQTransport(self.url)  # the replies queue, as a coordinator declares it
        await admin.start(["inventory"])
        await admin.close()
        self.connection = await aio_pika.connect(self.url)
        self.channel = await self.connection.channel(publisher_confirms=True)
        queue = await self.channel.declare_queue("sagaflow.replies", passive=True)
        await queue.consume(self._on_reply)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.connection.close()

    async def _on_reply(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        await message.ack()
        headers = {k: v for k, v in (message.headers or {}).items() if isinstance(v, str)}
        await self.replies.put(decode(message.body, headers))

    async def ask(self, command: Envelope, timeout: float = 20.0) -> Envelope:
        exchange = await self.channel.get_exchange("sagaflow.commands", ensure=False)
        body = encode(command)
        await exchange.publish(
            aio_pika.Message(
                body,
                headers=dict(wire.message_headers(command, body, None)),
                message_id=command.message_id,
                content_type="application/json",
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            ),
            routing_key="inventory",
            mandatory=True,
        )
        return await asyncio.wait_for(self.replies.get(), timeout)


def _plain(reply: Envelope) -> dict[str, Any]:
    return orjson.loads(encode(reply))  # the body: no trace, no null fields


async def _stack(amqp_url: str, pg_url: str, logs: Path, node: bool) -> Stack:
    stack = Stack(
        amqp_url,
        pg_url,
        coordinators=0,
        participants=["inventory"],
        order_service=False,
        node=["inventory"] if node else [],
        log_dir=logs,
    )
    await stack.start()
    return stack


@pytest.mark.parametrize("first", ["node", "python"])
async def test_python_and_node_workers_take_turns_on_one_inbox(
    amqp_url: str, pg_url: str, tmp_path: Path, first: str
) -> None:
    command = _command("turns-1", MessageKind.COMMAND)
    compensation = _command("turns-1", MessageKind.COMPENSATION)
    late = _command("turns-2", MessageKind.COMMAND)
    early = _command("turns-2", MessageKind.COMPENSATION)

    one = await _stack(amqp_url, pg_url, tmp_path / "one", node=first == "node")
    try:
        async with _Conversation(amqp_url) as talk:
            answered = await talk.ask(command)
            assert answered.outcome is Outcome.SUCCESS, answered
            nothing = await talk.ask(early)  # tombstones turns-2's reserve
            assert nothing.outcome is Outcome.SUCCESS
    finally:
        await one.terminate_all()

    two = await _stack(amqp_url, pg_url, tmp_path / "two", node=first != "node")
    try:
        assert (two.processes["inventory"].argv[0] == "node") is (first != "node")
        async with _Conversation(amqp_url) as talk:
            again = await talk.ask(command)  # answered from the other's stored reply
            assert _plain(again) == _plain(answered)
            undone = await talk.ask(compensation)  # finds the other's success: undoes it
            assert undone.outcome is Outcome.SUCCESS and undone.payload == {"undone": True}
            await talk.ask(late, timeout=3.0)  # the other's tombstone: never answered
            raise AssertionError("a tombstoned command was answered")
    except TimeoutError:
        pass
    finally:
        await two.terminate_all()
    import asyncpg

    conn = await asyncpg.connect(pg_url)
    try:
        rows = await conn.fetch("SELECT order_id, status FROM inventory.reservations")
        statuses = dict(await conn.fetch("SELECT command_id, status FROM inventory.inbox"))
    finally:
        await conn.close()
    assert [tuple(r) for r in rows] == [("turns-1", "released")]
    assert statuses[late.command_id] == "tombstone"
