"""An in-process ``Transport`` with RabbitMQ's semantics, for tests and demos.

``InMemoryTransport`` is supported code: users run their saga tests on it. It
mirrors what the RabbitMQ adapter and a quorum queue do, so a test that passes
here means the same thing as one that passes on the broker:

- commands and compensations go to ``topology.service_queue(service)``,
  replies to ``topology.replies_queue``; publishing to a service whose queue was
  never declared raises ``TransportError`` (a ``mandatory`` publish);
- bodies are the real ``encode(envelope)`` bytes and headers are built by the
  same function as on the wire (:func:`message_headers`);
- a consumer holds at most ``prefetch`` unacknowledged deliveries; a returned
  (nacked) message comes back first with ``redelivered=True`` and counts toward
  ``topology.delivery_limit``: on the return that exceeds it the message is
  dead-lettered with reason ``delivery_limit`` (the broker's own reason);
- ``nack(requeue=False)`` dead-letters with reason ``rejected``.

The header names and routing both adapters share live in
:mod:`sagaflow.transport.wire`.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sagaflow.core.errors import MessageRejected, TransportError
from sagaflow.core.messages import DEFAULT_MAX_MESSAGE_BYTES, Envelope, encode
from sagaflow.core.ports import DeadLetter, Delivery, DeliveryCallback, Topology
from sagaflow.core.signing import Keys
from sagaflow.transport.bounds import bounded_body, refuse_cut
from sagaflow.transport.wire import (
    H_DELIVERY_COUNT,
    H_FIRST_DEATH_EXCHANGE,
    H_FIRST_DEATH_QUEUE,
    H_FIRST_DEATH_REASON,
    H_ORIGINAL_EXCHANGE,
    H_ORIGINAL_ROUTING_KEY,
    H_REASON,
    H_SOURCE_QUEUE,
    REPLY_ROUTING_KEY,
    as_dead_letter,
    deliver,
    is_death_header,
    message_headers,
    replay_route,
    route,
    truncate_reason,
)

__all__ = ["InMemoryTransport", "MemoryDelivery"]

# --------------------------------------------------------------------------- state


@dataclass(eq=False)
class _Message:
    body: bytes
    headers: dict[str, str]
    message_id: str | None
    exchange: str
    routing_key: str
    returns: int = 0  # the quorum queue's delivery count
    redelivered: bool = False


@dataclass(eq=False)
class _Queue:
    name: str
    ready: deque[_Message] = field(default_factory=deque)
    # Returned messages are served before new ones, as in a quorum queue.
    returned: deque[_Message] = field(default_factory=deque)
    consumers: list[_Consumer] = field(default_factory=list)
    unacked: int = 0

    def pop(self) -> _Message | None:
        if self.returned:
            return self.returned.popleft()
        if self.ready:
            return self.ready.popleft()
        return None

    def has_ready(self) -> bool:
        return bool(self.returned or self.ready)

    def wake(self) -> None:
        for consumer in self.consumers:
            consumer.wakeup.set()


@dataclass(eq=False)
class _Consumer:
    queue: _Queue
    callback: DeliveryCallback
    prefetch: int
    unacked: int = 0
    outstanding: set[MemoryDelivery] = field(default_factory=set)
    wakeup: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None


class MemoryDelivery:
    """A delivery from :class:`InMemoryTransport`; settle it once."""

    __slots__ = (
        "_consumer",
        "_message",
        "_settled",
        "_transport",
        "headers",
        "queue",
        "redelivered",
    )

    def __init__(
        self, transport: InMemoryTransport, consumer: _Consumer, message: _Message
    ) -> None:
        self._transport = transport
        self._consumer = consumer
        self._message = message
        self._settled = False
        self.queue = consumer.queue.name
        self.redelivered = message.redelivered
        headers = dict(message.headers)
        if message.returns:
            headers[H_DELIVERY_COUNT] = str(message.returns)
        self.headers: Mapping[str, str] = headers

    @property
    def body(self) -> bytes:
        return self._message.body

    async def ack(self) -> None:
        """Remove the message from its queue."""
        if self._settle():
            self._transport._changed()

    async def nack(self, requeue: bool = True) -> None:
        """Return the message (``requeue``) or dead-letter it as ``rejected``."""
        if not self._settle():
            return
        message, transport = self._message, self._transport
        # The dead-letter queue has neither a delivery limit nor a DLX of its own.
        dead_letter_queue = self.queue == transport.topology.dead_letter_queue
        if not requeue:
            if not dead_letter_queue:
                transport._dead_letter_message(message, self.queue, "rejected", broker=True)
        else:
            message.returns += 1
            if message.returns > transport.topology.delivery_limit and not dead_letter_queue:
                transport._dead_letter_message(message, self.queue, "delivery_limit", broker=True)
            else:
                message.redelivered = True
                self._consumer.queue.returned.append(message)
                self._consumer.queue.wake()
        transport._changed()

    def _settle(self) -> bool:
        # A second settle is a no-op (RabbitMQ would close the channel for it:
        # the RabbitMQ adapter guards the same way).
        if self._settled or self._transport._closed:
            return False
        self._settled = True
        self._consumer.outstanding.discard(self)
        self._consumer.unacked -= 1
        self._consumer.queue.unacked -= 1
        self._consumer.wakeup.set()
        return True


# --------------------------------------------------------------------------- transport


class InMemoryTransport:
    """A ``Transport`` whose queues live in this process.

    Args:
        topology: names of the exchanges and queues (and the delivery limit).
        max_message_bytes: publishing a larger body raises ``MessageRejected``
            (``too_large``): no retry can send it.
        keys: sign what is published, and replay only dead letters signed.
        close_timeout: seconds ``close()`` lets running callbacks finish.
    """

    def __init__(
        self,
        topology: Topology = Topology(),  # noqa: B008 - frozen dataclass, safe default
        *,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        close_timeout: float = 5.0,
        keys: Keys | None = None,
    ) -> None:
        self.topology = topology
        self.keys = keys
        self.max_message_bytes = max_message_bytes
        self.close_timeout = close_timeout
        self._queues: dict[str, _Queue] = {}
        self._consumers: list[_Consumer] = []
        self._running: set[asyncio.Task[None]] = set()
        self._started = False
        self._closing = False
        self._closed = False
        self._change = asyncio.Event()

    # ----------------------------------------------------------------- Transport

    async def start(self, services: Sequence[str]) -> None:
        """Declare the replies and dead-letter queues and one queue per service."""
        if self._closing:
            raise TransportError("the transport is closed")
        self._started = True
        for name in (self.topology.replies_queue, self.topology.dead_letter_queue):
            self._declare(name)
        for service in services:
            self._declare(self.topology.service_queue(service))

    async def close(self) -> None:
        """Stop consumers, let running callbacks finish briefly, return unacked messages."""
        if self._closing:
            return
        self._closing = True
        for consumer in self._consumers:
            if consumer.task is not None:
                consumer.task.cancel()
        if self._running:
            _, pending = await asyncio.wait(set(self._running), timeout=self.close_timeout)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)
        tasks = [c.task for c in self._consumers if c.task is not None]
        if tasks:
            # asyncio.wait, not ``await task``: our own cancellation must propagate.
            await asyncio.wait(tasks)
        for consumer in self._consumers:
            # As when a channel closes: unacked deliveries go back to the queue.
            for delivery in list(consumer.outstanding):
                delivery._settle()
                delivery._message.redelivered = True
                consumer.queue.returned.append(delivery._message)
        self._closed = True
        self._consumers.clear()
        self._changed()

    async def publish(self, envelopes: Sequence[Envelope]) -> None:
        """Enqueue every envelope, or none of them.

        Raises:
            TransportError: not started, a message is too large, or a service
                queue does not exist (the broker would return it unroutable).
        """
        self._check_open()
        routed: list[tuple[_Queue, _Message]] = []
        for envelope in envelopes:
            body = encode(envelope)
            if len(body) > self.max_message_bytes:
                raise MessageRejected(
                    f"too_large: message {envelope.message_id} is {len(body)} bytes, "
                    f"over the limit of {self.max_message_bytes}"
                )
            exchange, routing_key = route(self.topology, envelope)
            queue_name = (
                self.topology.replies_queue
                if envelope.is_reply
                else self.topology.service_queue(routing_key)
            )
            queue = self._queues.get(queue_name)
            if queue is None:
                raise TransportError(
                    f"message {envelope.message_id} is unroutable: "
                    f"no queue for service {envelope.service!r}"
                )
            message = _Message(
                body=body,
                headers=message_headers(envelope, body, self.keys),
                message_id=envelope.message_id,
                exchange=exchange,
                routing_key=routing_key,
            )
            routed.append((queue, message))
        for queue, message in routed:
            self._enqueue(queue, message)

    async def consume(self, queue: str, callback: DeliveryCallback, *, prefetch: int) -> None:
        """Deliver messages of ``queue`` to ``callback``, at most ``prefetch`` unacked.

        A callback returning an awaitable runs in its own task, one returning
        ``None`` inline, as with the RabbitMQ adapter (see ``DeliveryCallback``).
        A callback that raises has its delivery nacked (requeued), so it counts
        toward the delivery limit instead of holding a prefetch slot forever.
        """
        self._check_open()
        if prefetch < 1:
            raise ValueError("prefetch must be at least 1")
        target = self._queues.get(queue)
        if target is None:
            if not self._is_framework_queue(queue):
                raise TransportError(f"cannot consume from {queue!r}: no such queue")
            target = self._declare(queue)
        consumer = _Consumer(queue=target, callback=callback, prefetch=prefetch)
        target.consumers.append(consumer)
        self._consumers.append(consumer)
        consumer.task = asyncio.create_task(self._dispatch(consumer), name=f"consume:{queue}")

    async def dead_letter(self, delivery: Delivery, reason: str) -> None:
        """Move ``delivery`` to the dead-letter queue with ``reason``, then ack it."""
        if isinstance(delivery, MemoryDelivery) and delivery._transport is self:
            message = delivery._message
        else:
            message = _Message(
                body=delivery.body,
                headers=dict(delivery.headers),
                message_id=None,
                exchange="",
                routing_key=delivery.queue,
            )
        body, cut = bounded_body(message.body, self.max_message_bytes)
        if cut:  # an oversized body is kept as a prefix, as RabbitMQTransport does
            headers = {**message.headers, **cut}
            message = _Message(
                body, headers, message.message_id, message.exchange, message.routing_key
            )
        self._dead_letter_message(message, delivery.queue, reason, broker=False)
        await delivery.ack()

    async def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        """The first ``limit`` messages of the dead-letter queue, left in place."""
        dlq = self._queues.get(self.topology.dead_letter_queue)
        if dlq is None:
            return []
        messages = [*dlq.returned, *dlq.ready][:limit]
        return [_as_dead_letter(m) for m in messages]

    async def replay_dead_letters(self, ids: Sequence[str] | None = None) -> list[str]:
        """Re-publish dead letters (all, or those with the given ids) where they came from.

        Raises:
            TransportError: a message's original queue no longer exists; it
                stays in the dead-letter queue.
        """
        self._check_open()
        dlq = self._queues.get(self.topology.dead_letter_queue)
        if dlq is None:
            return []
        wanted = None if ids is None else set(ids)
        replayed: list[str] = []
        for source in (dlq.returned, dlq.ready):
            for message in list(source):
                letter = _as_dead_letter(message)
                if wanted is not None and letter.id not in wanted:
                    continue
                try:
                    refuse_cut(message.headers)
                    exchange, routing_key = replay_route(
                        self.topology, message.body, message.headers, self.keys
                    )
                except MessageRejected as exc:
                    if wanted is not None:
                        raise TransportError(
                            f"dead letter {letter.id} cannot be replayed: {exc}"
                        ) from None
                    continue
                target = self._route_raw(exchange, routing_key)
                if target is None:
                    raise TransportError(
                        f"dead letter {letter.id} cannot be replayed: "
                        f"{letter.source_queue!r} does not exist"
                    )
                source.remove(message)
                headers = {k: v for k, v in message.headers.items() if not is_death_header(k)}
                self._enqueue(
                    target,
                    _Message(message.body, headers, message.message_id, exchange, routing_key),
                )
                replayed.append(letter.id)
        self._changed()
        return replayed

    # ----------------------------------------------------------------- test helpers

    def inject(self, queue: str, body: bytes, headers: Mapping[str, str] | None = None) -> None:
        """Put raw bytes in ``queue``, e.g. a malformed message for a rejection test.

        Raises:
            TransportError: ``queue`` was not declared.
        """
        target = self._queues.get(queue)
        if target is None:
            raise TransportError(f"cannot inject into {queue!r}: no such queue")
        self._enqueue(target, _Message(body, dict(headers or {}), None, "", queue))

    def pending(self, queue: str) -> int:
        """Messages in ``queue`` that are ready or delivered but not yet acked."""
        target = self._queues.get(queue)
        if target is None:
            return 0
        return len(target.ready) + len(target.returned) + target.unacked

    def is_idle(self) -> bool:
        """True when nothing can move on its own any more.

        That is: no callback is running, nothing is unacked, and no queue that
        has a consumer holds a message. Queues nobody consumes (the dead-letter
        queue, a service without a worker) do not count: their messages wait for
        an operator or a test, and would otherwise keep a harness from ever
        reaching quiescence. Use :meth:`pending` to look at them.
        """
        if self._running:
            return False
        return not any(
            queue.unacked or (queue.consumers and queue.has_ready())
            for queue in self._queues.values()
        )

    async def wait_idle(self, timeout: float | None = None) -> None:
        """Wait until :meth:`is_idle` holds.

        Raises:
            TimeoutError: still busy after ``timeout`` seconds.
        """
        async with asyncio.timeout(timeout):
            while not self.is_idle():
                self._change.clear()
                await self._change.wait()

    def queues(self) -> list[str]:
        """Names of the declared queues."""
        return sorted(self._queues)

    # ----------------------------------------------------------------- internals

    def _check_open(self) -> None:
        if self._closed:
            raise TransportError("the transport is closed")
        if not self._started:
            raise TransportError("the transport is not started: call start() first")

    def _is_framework_queue(self, name: str) -> bool:
        t = self.topology
        return name in (t.replies_queue, t.dead_letter_queue) or (
            name.startswith(t.service_queue("")) and name != t.service_queue("")
        )

    def _declare(self, name: str) -> _Queue:
        queue = self._queues.get(name)
        if queue is None:
            queue = self._queues[name] = _Queue(name)
        return queue

    def _route_raw(self, exchange: str, routing_key: str) -> _Queue | None:
        t = self.topology
        if exchange == t.replies_exchange:
            return self._queues.get(t.replies_queue) if routing_key == REPLY_ROUTING_KEY else None
        if exchange == t.commands_exchange:
            return self._queues.get(t.service_queue(routing_key))
        if exchange == "":
            return self._queues.get(routing_key)
        return None

    def _enqueue(self, queue: _Queue, message: _Message) -> None:
        queue.ready.append(message)
        queue.wake()
        self._changed()

    def _dead_letter_message(
        self, message: _Message, source_queue: str, reason: str, *, broker: bool
    ) -> None:
        headers = dict(message.headers)
        if broker:
            # What RabbitMQ adds when it dead-letters by itself.
            headers.setdefault(H_FIRST_DEATH_REASON, reason)
            headers.setdefault(H_FIRST_DEATH_QUEUE, source_queue)
            headers.setdefault(H_FIRST_DEATH_EXCHANGE, message.exchange)
        else:
            headers[H_REASON] = truncate_reason(reason)
            headers[H_SOURCE_QUEUE] = source_queue
            headers[H_ORIGINAL_EXCHANGE] = message.exchange
            headers[H_ORIGINAL_ROUTING_KEY] = message.routing_key
        dlq = self._declare(self.topology.dead_letter_queue)
        self._enqueue(
            dlq,
            _Message(message.body, headers, message.message_id, message.exchange, source_queue),
        )

    def _changed(self) -> None:
        self._change.set()

    async def _dispatch(self, consumer: _Consumer) -> None:
        queue = consumer.queue
        try:
            while True:
                while consumer.unacked < consumer.prefetch:
                    message = queue.pop()
                    if message is None:
                        break
                    consumer.unacked += 1
                    queue.unacked += 1
                    delivery = MemoryDelivery(self, consumer, message)
                    consumer.outstanding.add(delivery)
                    deliver(consumer.callback, delivery, self._spawn)
                consumer.wakeup.clear()
                await consumer.wakeup.wait()
        finally:
            queue.consumers.remove(consumer)

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._running.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._running.discard(task)
        self._changed()


def _as_dead_letter(message: _Message) -> DeadLetter:
    return as_dead_letter(message.message_id, message.body, message.headers)
