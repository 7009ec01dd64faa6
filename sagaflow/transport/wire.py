"""The wire format both transports share, and how they hand deliveries over.

``RabbitMQTransport`` and ``InMemoryTransport`` build the same AMQP headers,
route the same way, dead-letter with the same headers and replay to the same
place, so a test on the in-memory transport means the same as one on the
broker. Tracing names its spans by :func:`route` too. ``docs/protocol.md``
documents every name here for participants in other languages.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from typing import Any

from sagaflow.core.messages import Envelope, MessageKind, decode
from sagaflow.core.ports import DeadLetter, Delivery, DeliveryCallback, Topology
from sagaflow.core.signing import SIGNATURE_HEADER, Keys

__all__ = [
    "H_COMMAND_ID",
    "H_DELIVERY_COUNT",
    "H_FIRST_DEATH_EXCHANGE",
    "H_FIRST_DEATH_QUEUE",
    "H_FIRST_DEATH_REASON",
    "H_ORIGINAL_EXCHANGE",
    "H_ORIGINAL_ROUTING_KEY",
    "H_REASON",
    "H_SAGA_ATTEMPT",
    "H_SAGA_KIND",
    "H_SAGA_NAME",
    "H_SAGA_STEP",
    "H_SOURCE_QUEUE",
    "MAX_REASON_CHARS",
    "MAX_SHORT_STRING",
    "REPLY_ROUTING_KEY",
    "as_dead_letter",
    "dead_letter_id",
    "deliver",
    "is_death_header",
    "message_headers",
    "replay_route",
    "route",
    "short_property",
    "truncate_reason",
]

log = logging.getLogger("sagaflow.transport")

# --------------------------------------------------------------------------- wire headers

H_SAGA_NAME = "x-saga-name"
H_SAGA_STEP = "x-saga-step"
H_SAGA_ATTEMPT = "x-saga-attempt"
H_SAGA_KIND = "x-saga-kind"
H_COMMAND_ID = "x-saga-command-id"
H_REASON = "x-sagaflow-reason"
H_SOURCE_QUEUE = "x-sagaflow-source-queue"
H_ORIGINAL_EXCHANGE = "x-sagaflow-original-exchange"
H_ORIGINAL_ROUTING_KEY = "x-sagaflow-original-routing-key"
H_FIRST_DEATH_REASON = "x-first-death-reason"
H_FIRST_DEATH_QUEUE = "x-first-death-queue"
H_FIRST_DEATH_EXCHANGE = "x-first-death-exchange"
H_DELIVERY_COUNT = "x-delivery-count"
REPLY_ROUTING_KEY = "reply"
MAX_REASON_CHARS = 1000

# Headers that describe one trip to the dead-letter queue; a replayed message
# starts clean, or a second failure would report the first one's reason.
_DEATH_HEADER_PREFIXES = ("x-death", "x-first-death-", "x-last-death-", "x-sagaflow-")


def message_headers(envelope: Envelope, body: bytes, keys: Keys | None) -> dict[str, str]:
    """The AMQP headers of an envelope: trace context plus the ``x-saga-*`` fields,
    and its signature when ``keys`` are given (``body`` is what is signed).

    Both adapters use this function, so the runtime sees the same headers
    whichever transport carried the message.
    """
    headers = dict(envelope.trace)
    headers[H_SAGA_NAME] = envelope.saga_name
    headers[H_SAGA_STEP] = envelope.step
    headers[H_SAGA_ATTEMPT] = str(envelope.attempt)
    headers[H_SAGA_KIND] = envelope.kind.value
    headers[H_COMMAND_ID] = envelope.command_id
    if keys:
        headers[SIGNATURE_HEADER] = keys.sign(envelope.service, body, headers)
    return headers


MAX_SHORT_STRING = 255
"""AMQP's limit on a property such as ``message_id``, in UTF-8 bytes."""


def short_property(value: str) -> str:
    """``value`` as an AMQP short-string property: itself when it fits, else a
    hash of it (a broker refuses the whole publish for one property too long)."""
    if len(value) <= MAX_SHORT_STRING // 4 or len(value.encode()) <= MAX_SHORT_STRING:
        return value
    return "sha256:" + hashlib.sha256(value.encode()).hexdigest()[:32]


def route(topology: Topology, envelope: Envelope) -> tuple[str, str]:
    """The exchange and routing key an envelope is published to."""
    if envelope.kind is MessageKind.REPLY:
        return topology.replies_exchange, REPLY_ROUTING_KEY
    return topology.commands_exchange, envelope.service


def replay_route(
    topology: Topology, body: bytes, headers: Mapping[str, str], keys: Keys | None
) -> tuple[str, str]:
    """Where a dead letter is re-published: where its envelope says, never where
    its headers do (anyone who can publish to the dead-letter exchange can write
    headers). With ``keys``, the message must carry a valid signature.

    Raises:
        MessageRejected: the body is not a valid (signed) envelope; a message
            that cannot be received cannot be replayed either.
    """
    envelope = decode(body, headers, max_bytes=len(body) + 1, keys=keys)
    return route(topology, envelope)


def is_death_header(name: str) -> bool:
    """True for headers that describe a dead-lettering (dropped on replay)."""
    return name == H_DELIVERY_COUNT or name.startswith(_DEATH_HEADER_PREFIXES)


def dead_letter_id(message_id: str | None, body: bytes) -> str:
    """The operator-facing id of a dead letter: its message id, else a body hash."""
    if message_id:
        return message_id
    return "sha256:" + hashlib.sha256(body).hexdigest()[:32]


def as_dead_letter(message_id: str | None, body: bytes, headers: Mapping[str, str]) -> DeadLetter:
    """How a dead-lettered message looks to an operator, whoever dead-lettered it.

    Our own ``dead_letter()`` writes ``x-sagaflow-*`` headers; RabbitMQ, when it
    dead-letters by itself (delivery limit, rejection), writes ``x-first-death-*``.
    """
    reason = headers.get(H_REASON) or headers.get(H_FIRST_DEATH_REASON) or "unknown"
    source = headers.get(H_SOURCE_QUEUE) or headers.get(H_FIRST_DEATH_QUEUE) or ""
    return DeadLetter(
        id=dead_letter_id(message_id, body),
        reason=reason,
        source_queue=source,
        body=body,
        headers=dict(headers),
    )


def truncate_reason(reason: str) -> str:
    """Keep header values small: brokers and dashboards choke on huge ones."""
    if len(reason) <= MAX_REASON_CHARS:
        return reason
    return reason[: MAX_REASON_CHARS - 3] + "..."


# --------------------------------------------------------------------------- delivery


def deliver(
    callback: DeliveryCallback,
    delivery: Delivery,
    spawn: Callable[[Coroutine[Any, Any, None]], None],
) -> None:
    """Hand ``delivery`` to ``callback`` as ``DeliveryCallback`` says: inline when
    it returns ``None``, in a task made by ``spawn`` when it returns an awaitable.
    A callback that raises has its delivery nacked (requeued)."""
    try:
        pending = callback(delivery)
    except Exception:
        log.exception("delivery callback for %s failed; returning the message", delivery.queue)
        spawn(delivery.nack(requeue=True))
        return
    if pending is not None:
        spawn(_settle_failed(pending, delivery))


async def _settle_failed(pending: Awaitable[None], delivery: Delivery) -> None:
    try:
        await pending
    except Exception:
        log.exception("delivery callback for %s failed; returning the message", delivery.queue)
        await delivery.nack(requeue=True)
