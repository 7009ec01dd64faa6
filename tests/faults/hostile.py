"""Hostile messages for scenario 8, published straight to the framework's queues.

Each :class:`Hostile` names the queue it goes to and what must become of it:
dead-lettered with a reason code (``not_json``, ``too_large``...), or ignored
(acked, no effect). They bypass the framework's publisher, as a buggy or
malicious client would, with aio-pika.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from typing import Any

import aio_pika
import httpx
import orjson

from sagaflow.core.ports import Topology
from sagaflow.core.signing import SIGNATURE_HEADER, Keys
from services.order.saga import create_order


@dataclass(frozen=True)
class Hostile:
    """One message: where it goes and the dead-letter reason code it must get
    (``None``: it must be ignored)."""

    name: str
    queue: str
    body: bytes
    reason: str | None
    signer: str | None = "own"
    """Whose key signs it: ``own`` (its action's service: an insider's message,
    checked for what it says), another service's name, or ``None`` (unsigned)."""

    @property
    def message_id(self) -> str:
        return f"hostile-{self.name}"


def reply(
    saga_id: str, step: str, index: int, *, attempt: int = 1, **changes: Any
) -> dict[str, Any]:
    """A well-formed reply of create-order (the version the order API starts, v2,
    unless ``saga_version`` says otherwise)."""
    body: dict[str, Any] = {
        "schema": 1,
        "message_id": f"{saga_id}:{step}:command:{attempt}:reply:{uuid.uuid4().hex[:6]}",
        "command_id": f"{saga_id}:{step}:command",
        "saga_id": saga_id,
        "saga_name": "create-order",
        "saga_version": create_order.version,
        "step": step,
        "step_index": index,
        "kind": "reply",
        "for_kind": "command",
        "attempt": attempt,
        "type": "order.validate",
        "payload": {"status": "PENDING"},
        "outcome": "success",
    }
    body.update(changes)
    return body


def command(service: str, action: str, payload: dict[str, Any], **changes: Any) -> dict[str, Any]:
    """A well-formed command envelope for ``service.action`` of a saga that does not exist."""
    saga = f"hostile-{uuid.uuid4().hex[:8]}"
    body: dict[str, Any] = {
        "schema": 1,
        "message_id": f"{saga}:{action}:command:1",
        "command_id": f"{saga}:{action}:command",
        "saga_id": saga,
        "saga_name": "create-order",
        "saga_version": 1,
        "step": action,
        "step_index": 1,
        "kind": "command",
        "attempt": 1,
        "type": f"{service}.{action}",
        "payload": payload,
    }
    body.update(changes)
    return body


def first_wave(topology: Topology, finished_saga: str, max_bytes: int) -> list[Hostile]:
    """What the coordinator (``create-order`` v1 and v2 only) and the workers receive mid-run.

    Args:
        topology: The queue names.
        finished_saga: A COMPLETED saga: a reply for one of its steps is ignored.
        max_bytes: The message size limit: one body exceeds it.
    """
    replies = topology.replies_queue
    inventory = topology.service_queue("inventory")
    payment = topology.service_queue("payment")
    reserve = {"order_id": "hostile-order", "sku": "sku-widget", "quantity": 1}
    huge = {"padding": "x" * (max_bytes + 1024)}
    return [
        Hostile("random-bytes-replies", replies, os.urandom(512), "not_json"),
        Hostile(
            "huge-reply",
            replies,
            orjson.dumps(reply("order-huge", "validate", 0, payload=huge)),
            "too_large",
        ),
        Hostile(
            "wrong-types-reply",
            replies,
            orjson.dumps(reply("order-x", "validate", 0, attempt="three", step_index=-1)),
            "invalid",
        ),
        Hostile("json-array-reply", replies, b"[1, 2, 3]", "invalid"),
        Hostile(
            "unknown-saga",
            replies,
            orjson.dumps(reply("order-x", "validate", 0, saga_name="no-such-saga")),
            "unknown_saga",
        ),
        Hostile(
            "unknown-saga-id",
            replies,
            orjson.dumps(reply(f"order-nobody-{uuid.uuid4().hex[:6]}", "validate", 0)),
            "unknown_saga_id",
        ),
        Hostile(
            "unknown-step",
            replies,
            orjson.dumps(reply(finished_saga, "teleport", 9)),
            "rejected",
        ),
        Hostile(
            "command-on-replies",
            replies,
            orjson.dumps(command("inventory", "reserve", reserve)),
            "not_a_reply",
        ),
        Hostile(
            "reply-for-finished-step",
            replies,
            orjson.dumps(reply(finished_saga, "validate", 0)),
            None,
        ),
        Hostile("random-bytes-command", inventory, os.urandom(300), "not_json"),
        Hostile(
            "reply-on-service-queue",
            inventory,
            orjson.dumps(reply("order-x", "validate", 0)),
            "not_a_command",
        ),
        Hostile(
            "unknown-action",
            inventory,
            orjson.dumps(command("inventory", "teleport", reserve)),
            "unknown_action",
        ),
        Hostile(
            "wrong-payload-types",
            inventory,
            orjson.dumps(command("inventory", "reserve", {**reserve, "quantity": "many"})),
            "invalid_command",
        ),
        Hostile(
            "wrong-service",
            inventory,
            orjson.dumps(
                command("payment", "charge", {"order_id": "o", "customer_id": "c", "amount": 1})
            ),
            "wrong_service",
        ),
        Hostile(
            "huge-command", payment, orjson.dumps(command("payment", "charge", huge)), "too_large"
        ),
        Hostile(
            "unsigned-reply",
            replies,
            orjson.dumps(reply(finished_saga, "validate", 0)),
            "unsigned",
            signer=None,
        ),
        Hostile(
            "reply-signed-by-another-service",
            replies,
            orjson.dumps(reply(finished_saga, "validate", 0)),
            "bad_signature",
            signer="payment",
        ),
        Hostile(
            "unsigned-command",
            payment,
            orjson.dumps(command("payment", "refund", {"order_id": "o"})),
            "unsigned",
            signer=None,
        ),
    ]


def second_wave(topology: Topology, waiting_saga: str) -> list[Hostile]:
    """Replies for a saga waiting for its ``validate`` reply (attempt 1), version 3."""
    replies = topology.replies_queue
    return [
        Hostile(
            "forged-attempt",
            replies,
            orjson.dumps(reply(waiting_saga, "validate", 0, attempt=42, saga_version=3)),
            "rejected",
        ),
        Hostile(
            "reply-for-step-not-reached",
            replies,
            orjson.dumps(
                reply(
                    waiting_saga,
                    "reserve",
                    1,
                    saga_version=3,
                    type="inventory.reserve",
                    payload={"reservation_id": "forged"},
                )
            ),
            None,
        ),
    ]


async def publish(amqp_url: str, messages: list[Hostile], keys: Keys) -> None:
    """Publish straight to each message's queue (default exchange), confirmed,
    signed as each message says (a body without an action type goes unsigned)."""
    connection = await aio_pika.connect(amqp_url)
    try:
        channel = await connection.channel(publisher_confirms=True)
        for message in messages:
            await channel.default_exchange.publish(
                aio_pika.Message(
                    message.body,
                    headers=dict(_signature(message, keys)),
                    message_id=message.message_id,
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                ),
                routing_key=message.queue,
            )
    finally:
        await connection.close()


def _signature(message: Hostile, keys: Keys) -> dict[str, str]:
    try:
        action = orjson.loads(message.body)["type"]
    except (orjson.JSONDecodeError, TypeError, KeyError):
        return {}
    if message.signer is None or not isinstance(action, str):
        return {}
    service = action.split(".", 1)[0]
    if message.signer == "own":
        return {SIGNATURE_HEADER: keys.sign(service, message.body, {})}
    # another service's key, presented as if it were this one's
    stolen = keys.sign(message.signer, message.body, {})
    return {SIGNATURE_HEADER: stolen}


async def scrape(port: int, metric: str) -> dict[str, float]:
    """A Prometheus counter's samples by their label text (``{queue="...",reason="..."}``)."""
    async with httpx.AsyncClient() as client:
        text = (await client.get(f"http://127.0.0.1:{port}/metrics", timeout=5.0)).text
    samples: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(metric + "{"):
            labels, _, value = line[len(metric) :].rpartition(" ")
            samples[labels] = float(value)
    return samples


def by_reason(samples: dict[str, float]) -> dict[str, float]:
    """Counter samples summed by their ``reason`` label."""
    totals: dict[str, float] = {}
    for labels, value in samples.items():
        reason = labels.split('reason="', 1)[1].split('"', 1)[0] if 'reason="' in labels else ""
        totals[reason] = totals.get(reason, 0.0) + value
    return totals
