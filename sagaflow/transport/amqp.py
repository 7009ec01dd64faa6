"""The AMQP side of the RabbitMQ transport: deliveries whose acks are coalesced,
confirmed publishing in waves, and AMQP header values as text.

:mod:`sagaflow.transport.rabbitmq` builds on these; they know nothing of the
topology or of reconnecting.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any, cast

import aio_pika
import aiormq
import orjson
from aio_pika.abc import AbstractIncomingMessage
from aiormq.abc import DeliveredMessage
from pamqp.commands import Basic

__all__ = [
    "Acks",
    "Outgoing",
    "RabbitMQDelivery",
    "confirmed",
    "refusal",
    "refused_for_good",
    "text_headers",
    "waves",
]

log = logging.getLogger("sagaflow.transport.rabbitmq")


@dataclass(eq=False, slots=True)
class Outgoing:
    message_id: str
    exchange: str
    routing_key: str
    body: bytes
    properties: Basic.Properties


class Acks:
    """Coalesces the acks of one channel: the acks given in one turn of the event
    loop go out as one ``basic.ack multiple`` frame up to the highest tag below
    any delivery still unsettled, plus single acks above it.

    Deliveries are registered in tag order (aiormq hands them over in order),
    so a tag below the multiple ack's tag that is not being acked is known here
    and bounds it: nothing is acked that was not asked to be. One flush runs at
    a time: a second one, computing its bound while the first still had frames
    to send, could cover their tags with its multiple ack, and the first's
    single ack of such a tag then made the broker close the channel ("unknown
    delivery tag"): every unacked delivery came back.
    """

    __slots__ = ("_flushing", "_pending", "_track", "unsettled")

    def __init__(self, track: Callable[[asyncio.Task[None]], None]) -> None:
        self.unsettled: set[int] = set()
        self._pending: dict[int, DeliveredMessage] = {}
        self._flushing = False
        self._track = track

    def ack(self, tag: int, message: DeliveredMessage) -> None:
        self._pending[tag] = message
        if not self._flushing:
            self._flushing = True
            self._track(asyncio.create_task(self._flush(), name="acks"))

    async def _flush(self) -> None:
        try:
            while self._pending:
                pending, self._pending = self._pending, {}
                await self._send(pending)
        finally:
            self._flushing = False

    async def _send(self, pending: dict[int, DeliveredMessage]) -> None:
        self.unsettled.difference_update(pending)
        floor = min(self.unsettled, default=None)
        tags = sorted(pending)
        below = [tag for tag in tags if floor is None or tag < floor]
        channel = pending[tags[0]].channel  # one channel per Acks
        try:
            # wait=False: the frames are queued in this order; the ack needs no drain
            if below:
                await channel.basic_ack(below[-1], multiple=True, wait=False)
            for tag in tags[len(below) :]:
                await channel.basic_ack(tag, wait=False)
        except Exception as exc:  # the channel is gone: the broker redelivers them
            log.debug("acks of %d deliveries dropped (channel gone): %r", len(tags), exc)


class RabbitMQDelivery:
    """A message received from RabbitMQ; settle it once with ``ack`` or ``nack``.

    Settling after the channel died is not an error: the broker has already
    put the message back and will deliver it again.

    It wraps aiormq's frame-level message: aio-pika's ``IncomingMessage`` (which
    decodes every property) is built only when ``message`` is asked for.
    """

    __slots__ = ("_acks", "_headers", "_message", "_settled", "_tag", "queue", "raw")

    def __init__(self, raw: DeliveredMessage, queue: str, acks: Acks | None = None) -> None:
        self.raw = raw
        self.queue = queue
        self._acks = acks
        self._headers: dict[str, str] | None = None
        self._message: AbstractIncomingMessage | None = None
        self._settled = False
        tag = raw.delivery_tag
        assert tag is not None  # a consumed message always has one
        self._tag = tag
        if acks is not None:
            acks.unsettled.add(tag)

    @property
    def message(self) -> AbstractIncomingMessage:
        """The delivery as aio-pika's message (for its properties)."""
        if self._message is None:
            self._message = aio_pika.IncomingMessage(self.raw, no_ack=False)
        return self._message

    @property
    def body(self) -> bytes:
        return self.raw.body

    @property
    def headers(self) -> Mapping[str, str]:
        if self._headers is None:
            self._headers = text_headers(self.raw.header.properties.headers or {})
        return self._headers

    @property
    def redelivered(self) -> bool:
        return bool(self.raw.redelivered)

    async def ack(self) -> None:
        """Remove the message from its queue.

        The ack frame goes out once this turn of the event loop ends, together
        with the other acks given meanwhile on the same channel.
        """
        if self._settled:
            return
        self._settled = True
        if self._acks is not None:
            self._acks.ack(self._tag, self.raw)
            return
        try:
            await self.raw.channel.basic_ack(self._tag)
        except Exception as exc:
            log.debug("ack of a delivery from %s dropped (channel gone): %r", self.queue, exc)

    async def nack(self, requeue: bool = True) -> None:
        """Return the message (it counts toward the delivery limit) or dead-letter it."""
        if self._settled:
            return
        self._settled = True
        if self._acks is not None:
            self._acks.unsettled.discard(self._tag)
        try:
            await self.raw.channel.basic_nack(self._tag, requeue=requeue)
        except Exception as exc:
            log.debug("nack of a delivery from %s dropped (channel gone): %r", self.queue, exc)


def waves(items: list[Outgoing]) -> list[list[Outgoing]]:
    """Split a batch so no two in-flight messages share a message id.

    aiormq matches a returned (unroutable) message to its publish by message id;
    two concurrent publishes with the same id would confuse it.
    """
    waves: list[list[Outgoing]] = []
    seen: list[set[str]] = []
    for item in items:
        for wave, ids in zip(waves, seen, strict=True):
            if item.message_id not in ids:
                wave.append(item)
                ids.add(item.message_id)
                break
        else:
            waves.append([item])
            seen.append({item.message_id})
    return waves


async def confirmed(underlay: aiormq.abc.AbstractChannel, wave: list[Outgoing]) -> list[object]:
    """Publish a wave and wait for its confirms: a result per message, the
    exception for one that failed (a CancelledError *result* is a confirm the
    closing channel cancelled; our own cancellation is raised).

    ``wait=False``: a publish does not wait for its frames to be written before
    waiting for its confirm (which cannot come sooner anyway), so the channel's
    lock is not held across a trip through the writer and a wave goes out
    together. A lone message (one saga at a time) is awaited without a task.
    """
    channel = cast(aiormq.Channel, underlay)  # ``wait`` is not on the abstract class
    publishes = [
        channel.basic_publish(
            item.body,
            exchange=item.exchange,
            routing_key=item.routing_key,
            properties=item.properties,
            mandatory=True,
            wait=False,
        )
        for item in wave
    ]
    if len(publishes) > 1:
        return await asyncio.gather(*publishes, return_exceptions=True)
    try:
        return [await publishes[0]]
    except asyncio.CancelledError as exc:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise
        return [exc]
    except Exception as exc:
        return [exc]


# Errors that mean "the broker said no" rather than "the link broke". (A vhost
# the user may not open surfaces as InvalidFrameError: Connection.Close instead
# of OpenOk.)
_REFUSALS = (
    aiormq.exceptions.AuthenticationError,
    aiormq.exceptions.ProbableAuthenticationError,
    aiormq.exceptions.InvalidFrameError,
    aiormq.exceptions.AMQPChannelError,
    ValueError,  # a URL option aio-pika cannot read
)


def refused_for_good(exc: BaseException) -> bool:
    """Whether a first connection that failed with ``exc`` will not heal by
    retrying: the broker refused it (see :func:`refusal`), or the client refused
    the broker's certificate (unknown CA, wrong host name: aiormq raises
    AMQPConnectionError from the ssl error)."""
    return isinstance(exc, _REFUSALS) or isinstance(exc.__cause__, ssl.SSLCertVerificationError)


def refusal(exc: BaseException, *, where: str, vhost: str) -> str:
    """Why the broker turned a first connection down, in one line for an operator.

    Args:
        exc: What aio-pika raised: a login refused, a ``Connection.Close`` in
            answer to ``Connection.Open`` (the vhost), a channel error while
            declaring the topology.
        where: The broker, its password masked (the user shows there).
        vhost: The vhost asked for.
    """
    if isinstance(exc, aiormq.exceptions.ProbableAuthenticationError):
        text = exc.args[0] if exc.args else "ACCESS_REFUSED"
        return f"RabbitMQ at {where} refused the login (check the user and password): {text}"
    if isinstance(exc, aiormq.exceptions.AuthenticationError):
        return f"RabbitMQ at {where} refused the login: {exc!r}"
    if isinstance(exc, aiormq.exceptions.InvalidFrameError) and "Connection.Close" in str(exc):
        # aiormq drops the reply text; RabbitMQ's is "vhost not found" or "access refused"
        return (
            f"RabbitMQ at {where} refused to open vhost {vhost!r}:"
            " it does not exist, or the user has no permissions on it"
        )
    if isinstance(exc, aiormq.exceptions.AMQPChannelError):
        return f"RabbitMQ at {where} refused the topology: {exc!r}"
    return f"cannot connect to RabbitMQ at {where}: {exc.__cause__ or repr(exc)}"


def text_headers(headers: Mapping[str, Any]) -> dict[str, str]:
    """AMQP header values as text (tables such as ``x-death`` as JSON)."""
    return {
        name: value if isinstance(value, str) else _text(value) for name, value in headers.items()
    }


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, bool | int | float | Decimal):
        return str(value)
    if isinstance(value, datetime):
        return value.isoformat()
    if value is None:
        return ""
    return orjson.dumps(_jsonable(value)).decode()


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    return _text(value)
