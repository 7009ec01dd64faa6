"""The dead-letter queue of the RabbitMQ transport: the copies it dead-letters,
peeking and replaying.

Peeking and replaying work on a short-lived channel of their own; a message
stays unacked on it while it is looked at, so no message is seen twice and none
is lost.
"""

from __future__ import annotations

import logging
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, HeadersType

from sagaflow.core.errors import MessageRejected, TransportError
from sagaflow.core.ports import DeadLetter, Delivery, Topology
from sagaflow.core.signing import Keys
from sagaflow.transport.amqp import Outgoing, RabbitMQDelivery, text_headers
from sagaflow.transport.bounds import bounded_body, refuse_cut
from sagaflow.transport.wire import (
    H_ORIGINAL_EXCHANGE,
    H_ORIGINAL_ROUTING_KEY,
    H_REASON,
    H_SOURCE_QUEUE,
    as_dead_letter,
    dead_letter_id,
    is_death_header,
    replay_route,
    truncate_reason,
)

__all__ = ["copy_message", "dead_letter_copy", "peek", "replay"]

log = logging.getLogger("sagaflow.transport")


def dead_letter_copy(delivery: Delivery, reason: str, exchange: str, max_bytes: int) -> Outgoing:
    """The copy of ``delivery`` to publish to the dead-letter ``exchange``, with
    ``reason`` and where it came from in its headers; a body over ``max_bytes``
    is cut to a prefix, with its size and SHA-256 in headers."""
    source = delivery.queue
    body, cut = bounded_body(delivery.body, max_bytes)
    extra: HeadersType = {H_REASON: truncate_reason(reason), H_SOURCE_QUEUE: source, **cut}
    if isinstance(delivery, RabbitMQDelivery):
        incoming = delivery.message
        ident = dead_letter_id(incoming.message_id, incoming.body)
        extra[H_ORIGINAL_EXCHANGE] = incoming.exchange or ""
        extra[H_ORIGINAL_ROUTING_KEY] = incoming.routing_key or ""
        message = copy_message(incoming, {**incoming.headers, **extra}, message_id=ident)
    else:
        ident = dead_letter_id(None, delivery.body)
        message = aio_pika.Message(
            body,
            headers={**delivery.headers, **extra},
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            message_id=ident,
        )
    return Outgoing(ident, exchange, source, body, message.properties)


async def peek(channel: AbstractChannel, topology: Topology, limit: int) -> list[DeadLetter]:
    """Up to ``limit`` dead letters, left where they are."""
    queue = await channel.declare_queue(topology.dead_letter_queue, passive=True)
    letters: list[DeadLetter] = []
    last: AbstractIncomingMessage | None = None
    # basic.get until empty, not up to the declare-ok message count: on a
    # quorum queue that count can lag messages another channel just returned.
    # Every message stays unacked on this channel while we look, so none is
    # returned twice; the nack below puts them all back, in order.
    while len(letters) < limit:
        message = await queue.get(no_ack=False, fail=False)
        if message is None:
            break
        letters.append(_as_dead_letter(message))
        last = message
    if last is not None:
        await last.nack(multiple=True, requeue=True)
    return letters


async def replay(
    channel: AbstractChannel,
    topology: Topology,
    wanted: set[str] | None,
    timeout: float,
    keys: Keys | None = None,
) -> list[str]:
    """Re-publish dead letters (``wanted`` ids, or all) to where their envelopes say.

    A message that is not a valid envelope (signed by its service's key, when
    ``keys`` are given) stays where it is: skipped when replaying all, an
    error when asked for by id.
    """
    queue = await channel.declare_queue(topology.dead_letter_queue, passive=True)
    replayed: dict[str, None] = {}  # in order
    while True:
        incoming = await queue.get(no_ack=False, fail=False)
        if incoming is None:
            break
        letter = _as_dead_letter(incoming)
        # Skipped messages stay unacked on this channel until it closes, so
        # basic.get never returns them twice. That includes a copy of one
        # replayed in this pass that already failed again: no replay loop.
        if letter.id in replayed or (wanted is not None and letter.id not in wanted):
            continue
        try:
            refuse_cut(letter.headers)
            exchange_name, routing_key = replay_route(topology, letter.body, letter.headers, keys)
        except MessageRejected as exc:
            if wanted is not None:
                raise TransportError(f"dead letter {letter.id} cannot be replayed: {exc}") from None
            log.warning("dead letter %s not replayed: %s", letter.id, exc)
            continue
        headers = {k: v for k, v in incoming.headers.items() if not is_death_header(k)}
        message = copy_message(incoming, headers)
        exchange = (
            channel.default_exchange
            if not exchange_name
            else await channel.get_exchange(exchange_name, ensure=False)
        )
        try:
            await exchange.publish(message, routing_key, mandatory=True, timeout=timeout)
        except Exception as exc:
            raise TransportError(f"dead letter {letter.id} cannot be replayed: {exc!r}") from exc
        await incoming.ack()
        replayed[letter.id] = None
    return list(replayed)


def copy_message(
    incoming: AbstractIncomingMessage, headers: HeadersType, *, message_id: str | None = None
) -> aio_pika.Message:
    """A persistent copy of a received message with new headers (user_id dropped:
    the broker checks it against the connection's user)."""
    return aio_pika.Message(
        incoming.body,
        headers=_sendable(headers),
        content_type=incoming.content_type,
        content_encoding=incoming.content_encoding,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        priority=incoming.priority,
        correlation_id=incoming.correlation_id,
        message_id=message_id or incoming.message_id,
        timestamp=incoming.timestamp,
        type=incoming.type,
        app_id=incoming.app_id,
    )


def _as_dead_letter(message: AbstractIncomingMessage) -> DeadLetter:
    return as_dead_letter(message.message_id, message.body, text_headers(message.headers))


def _sendable(value: Any) -> Any:
    """Header values as AMQP can send them again: a long string that was not UTF-8
    arrives as ``bytes``, which pamqp cannot encode (the copy would never go out
    and the message would stay unsettled for good); it goes out as text."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, dict):
        return {key: _sendable(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_sendable(item) for item in value]
    return value
