"""The RabbitMQ ``Transport`` (aio-pika), built to outlive broker restarts.

It does not use aio-pika's robust connection: its implicit restore has lost
consumers and bindings before (aio-pika #231, #334, #536). Instead one
supervisor task owns the connection and, on every (re)connect, declares the
whole topology from this adapter's own registry; each consumer has a task that
re-opens its channel, re-declares its queue and consumes again whenever the
channel closes, the connection drops, or the broker cancels the consumer (the
queue was deleted). Reconnection retries with back-off, forever, until
``close()``.

The broker objects it declares, and their arguments (quorum queues, delivery
limits, a bounded dead-letter queue), are in ``rabbitmq_topology.py``; peeking,
replaying and the copies it dead-letters, in ``rabbitmq_dlq.py``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from typing import Any, TypeVar

import aio_pika
from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
)
from aio_pika.exceptions import (
    AMQPChannelError,
    ChannelInvalidStateError,
    DeliveryError,
    PublishError,
)
from aiormq.abc import DeliveredMessage
from aiormq.exceptions import ChannelAccessRefused
from pamqp.commands import Basic
from yarl import URL

from sagaflow.core.errors import ConfigurationError, MessageRejected, TransportError
from sagaflow.core.messages import CONTENT_TYPE, DEFAULT_MAX_MESSAGE_BYTES, Envelope, encode
from sagaflow.core.ports import DeadLetter, Delivery, DeliveryCallback, Topology
from sagaflow.core.signing import Keys
from sagaflow.transport.amqp import (
    Acks,
    Outgoing,
    RabbitMQDelivery,
    confirmed,
    refusal,
    refused_for_good,
    waves,
)
from sagaflow.transport.rabbitmq_dlq import dead_letter_copy, peek, replay
from sagaflow.transport.rabbitmq_nodes import Nodes
from sagaflow.transport.rabbitmq_topology import (
    DEAD_LETTER_MAX_BYTES,
    DEAD_LETTER_MAX_MESSAGES,
    Declarations,
    close_quietly,
)
from sagaflow.transport.wire import (
    deliver,
    message_headers,
    route,
    short_property,
)

__all__ = ["RabbitMQDelivery", "RabbitMQTransport"]

log = logging.getLogger(__name__)
_T = TypeVar("_T")


_PERSISTENT = int(aio_pika.DeliveryMode.PERSISTENT)


@dataclass(eq=False)
class _Consumer:
    queue: str
    callback: DeliveryCallback
    prefetch: int
    task: asyncio.Task[None] | None = None
    channel: AbstractChannel | None = None
    tag: str | None = None
    acks: Acks | None = None  # of the current channel
    first_attempt_done: asyncio.Event = field(default_factory=asyncio.Event)
    error: BaseException | None = None
    refused: bool = False


class RabbitMQTransport:
    """A ``Transport`` over RabbitMQ with quorum queues and publisher confirms.

    Args:
        url: ``amqp://user:password@host:port/vhost`` (query parameters such as
            ``heartbeat`` are passed to aio-pika). A cluster's nodes go in the
            host part, comma-separated: :mod:`.rabbitmq_nodes` says which is
            tried when; the topology is declared again on each.
        topology: names of the broker objects and the delivery limit.
        max_message_bytes: publishing a larger body raises ``MessageRejected``
            (``too_large``): no retry can send it.
        publish_timeout: seconds a publish (or ``consume``) waits for the broker,
            including a reconnection, before raising ``TransportError``.
        start_timeout: seconds ``start()`` waits for the first connection.
        connect_timeout: seconds one connection attempt may take.
        reconnect_delay: first and longest pause between reconnection attempts.
        close_timeout: seconds ``close()`` lets running callbacks finish.
        connection_name: shown in the RabbitMQ management UI.
        dead_letter_max_messages: the dead-letter queue's ``x-max-length``
            (``0``: none).
        dead_letter_max_bytes: its ``x-max-length-bytes`` (``0``: none). With
            both ``0`` it is declared without a limit, for one set by a policy.
        keys: sign what is published, and replay only dead letters signed
            (see :mod:`sagaflow.core.signing`).
        declare: declare the topology (and repair it on every reconnect); when
            False only check that it exists, with passive declares, which need
            no permission: for least-privilege users (docs/security.md).
        user_id: set as every published message's ``user_id``; the broker
            refuses it unless it is the connection's user.
        quorum_initial_group_size: replicas of each quorum queue it declares
            (``x-quorum-initial-group-size``); ``None``: the broker's default
            (every cluster node). A queue that exists keeps its membership.
    """

    def __init__(
        self,
        url: str,
        topology: Topology = Topology(),  # noqa: B008 - frozen dataclass, safe default
        *,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        publish_timeout: float = 30.0,
        start_timeout: float = 30.0,
        connect_timeout: float = 10.0,
        reconnect_delay: tuple[float, float] = (0.2, 5.0),
        close_timeout: float = 5.0,
        connection_name: str = "sagaflow",
        keys: Keys | None = None,
        declare: bool = True,
        user_id: str | None = None,
        dead_letter_max_messages: int = DEAD_LETTER_MAX_MESSAGES,
        dead_letter_max_bytes: int = DEAD_LETTER_MAX_BYTES,
        quorum_initial_group_size: int | None = None,
    ) -> None:
        self._nodes = Nodes(url, reconnect_delay)
        if dead_letter_max_messages < 0 or dead_letter_max_bytes < 0:
            raise ValueError("dead-letter limits must be 0 (none) or more")
        self.topology = topology
        self._broker = Declarations(
            topology,
            declare=declare,
            dead_letter_max_messages=dead_letter_max_messages,
            dead_letter_max_bytes=dead_letter_max_bytes,
            quorum_initial_group_size=quorum_initial_group_size,
        )
        self.keys = keys
        self.user_id = user_id
        self.max_message_bytes = max_message_bytes
        self.publish_timeout = publish_timeout
        self.start_timeout = start_timeout
        self.connect_timeout = connect_timeout
        self.reconnect_delay = reconnect_delay
        self.close_timeout = close_timeout
        self._connection_name = connection_name
        self._services: set[str] = set()
        self._consumers: list[_Consumer] = []
        self._handlers: set[asyncio.Task[None]] = set()
        self._connection: AbstractConnection | None = None
        self._channel: AbstractChannel | None = None
        self._channel_lock = asyncio.Lock()
        self._ready = asyncio.Event()
        self._refused = asyncio.Event()
        self._stopping = asyncio.Event()
        self._supervisor: asyncio.Task[None] | None = None
        self._last_error: BaseException | None = None
        self._closing = False
        self.connections = 0
        """How many times a connection was established (reconnects = this - 1)."""

    @property
    def nodes(self) -> list[str]:
        """The broker nodes it may connect to, passwords masked."""
        return self._nodes.redacted

    @property
    def is_connected(self) -> bool:
        """True while a connection with the topology declared is up."""
        return self._ready.is_set()

    # ----------------------------------------------------------------- lifecycle

    async def start(self, services: Sequence[str]) -> None:
        """Connect and declare the topology with a queue per service.

        Calling it again adds services. Connection attempts continue in the
        background for as long as the transport is open.

        Raises:
            ConfigurationError: the broker refused the first connection: the
                login, the vhost, or the topology (waiting will not help).
            TransportError: no connection within ``start_timeout``.
        """
        if self._closing:
            raise TransportError("the transport is closed")
        added = set(services) - self._services
        self._services.update(services)
        first = self._supervisor is None
        if first:
            self._refused.clear()
            self._supervisor = asyncio.create_task(self._supervise(), name="sagaflow-amqp")
        elif added and self._ready.is_set():
            await self._with_channel(partial(self._broker.declare_services, services=sorted(added)))
        await _wait_first((self._ready, self._refused), self.start_timeout)
        if not self._ready.is_set():
            if first:  # leave no background task behind a failed start
                await self._stop_supervisor()
            if self._refused.is_set():
                raise ConfigurationError(self._refusal()) from self._last_error
            raise TransportError(
                f"cannot connect to RabbitMQ at {self.safe_url}: {self._last_error!r}"
            ) from self._last_error

    async def close(self) -> None:
        """Stop consuming, let running callbacks finish briefly, and disconnect.

        Idempotent. Deliveries still unacked when it returns go back to their
        queues (the broker redelivers them).
        """
        if self._closing:
            return
        self._closing = True
        for consumer in self._consumers:
            await self._cancel_subscription(consumer)
        if self._handlers:
            _, pending = await asyncio.wait(set(self._handlers), timeout=self.close_timeout)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)
        tasks = [c.task for c in self._consumers if c.task is not None]
        for task in tasks:
            task.cancel()
        if tasks:
            # asyncio.wait, not ``await task``: our own cancellation must propagate.
            await asyncio.wait(tasks)
        self._consumers.clear()
        self._stopping.set()  # only now: the callbacks above may still publish
        await self._stop_supervisor()

    def _refusal(self) -> str:
        url = URL(self._nodes.url)
        vhost = "/" if url.path in ("", "/") else url.path[1:]  # as aiormq reads it
        error = self._last_error or TransportError("refused")
        return refusal(error, where=self.safe_url, vhost=vhost)

    @property
    def safe_url(self) -> str:
        """The broker URL with the password masked, for logs and errors."""
        url = URL(self._nodes.url)
        return str(url.with_password("******")) if url.password else str(url)

    # ----------------------------------------------------------------- publishing

    async def publish(self, envelopes: Sequence[Envelope]) -> None:
        """Publish persistently and return once the broker confirmed every message.

        The batch goes out concurrently and its confirms are awaited together.
        Messages unconfirmed because the link failed are published again once
        reconnected (duplicates are expected by design), within
        ``publish_timeout``.

        Raises:
            TransportError: a message was nacked, unroutable (no queue for its
                service), too large, or not confirmed in time.
        """
        if not envelopes:
            return
        now = datetime.now(UTC)
        await self._send([self._outgoing(envelope, now) for envelope in envelopes])

    def _outgoing(self, envelope: Envelope, now: datetime) -> Outgoing:
        body = encode(envelope)
        if len(body) > self.max_message_bytes:
            raise MessageRejected(
                f"too_large: message {envelope.message_id} is {len(body)} bytes, "
                f"over the limit of {self.max_message_bytes}"
            )
        exchange, routing_key = route(self.topology, envelope)
        # the wire properties as aiormq sends them (no aio_pika.Message: a third of
        # the cost of a publish went into building and locking one)
        properties = Basic.Properties(
            content_type=CONTENT_TYPE,
            headers={**message_headers(envelope, body, self.keys)},
            delivery_mode=_PERSISTENT,
            correlation_id=short_property(envelope.saga_id),
            message_id=short_property(envelope.message_id),
            timestamp=now,
            message_type=envelope.type,
            user_id=self.user_id,
        )
        return Outgoing(envelope.message_id, exchange, routing_key, body, properties)

    async def _send(self, items: list[Outgoing]) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.publish_timeout
        while True:
            channel = await self._publisher(deadline)
            failed = await self._publish_on(channel, items, deadline)
            if not failed:
                return
            for item, exc in failed:
                if isinstance(exc, PublishError):
                    raise TransportError(
                        f"message {item.message_id} is unroutable: no queue bound to "
                        f"{item.exchange!r} with key {item.routing_key!r}"
                    ) from exc
                # ACCESS_REFUSED (no write permission) closes the channel: not a link failure
                if isinstance(exc, DeliveryError | ChannelAccessRefused):
                    raise TransportError(
                        f"message {item.message_id} was refused by the broker: {exc!r}"
                    ) from exc
            if loop.time() >= deadline:
                item, exc = failed[0]
                raise TransportError(
                    f"message {item.message_id} (and {len(failed) - 1} more) not confirmed: {exc!r}"
                ) from exc
            # The link broke mid-batch: publish the unconfirmed ones again.
            items = [item for item, _ in failed]
            log.info("re-publishing %d unconfirmed messages after a link failure", len(items))
            await asyncio.sleep(min(self.reconnect_delay[0], max(0.0, deadline - loop.time())))

    async def _publish_on(
        self, channel: AbstractChannel, items: list[Outgoing], deadline: float
    ) -> list[tuple[Outgoing, BaseException]]:
        failed: list[tuple[Outgoing, BaseException]] = []
        for wave in waves(items):
            try:
                if channel.is_closed:
                    raise ChannelInvalidStateError(f"{channel!r} closed")
                underlay = await channel.get_underlay_channel()
            except Exception as exc:  # closed meanwhile: retried on the next channel
                failed.extend((item, exc) for item in wave)
                continue
            try:
                async with asyncio.timeout_at(deadline):
                    results = await confirmed(underlay, wave)
            except TimeoutError as exc:
                raise TransportError(
                    f"message {wave[0].message_id} not confirmed within {self.publish_timeout}s"
                ) from exc
            failed.extend(
                (item, result)
                for item, result in zip(wave, results, strict=True)
                if isinstance(result, BaseException)
            )
        return failed

    async def _publisher(self, deadline: float) -> AbstractChannel:
        """The publishing channel, re-opened if it closed, waiting for a reconnection."""
        loop = asyncio.get_running_loop()
        while True:
            if self._stopping.is_set() or self._supervisor is None:
                raise TransportError("the transport is not started or is closed")
            channel, connection = self._channel, self._connection
            if self._ready.is_set() and channel is not None and not channel.is_closed:
                return channel
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TransportError(
                    f"not connected to RabbitMQ at {self.safe_url} after "
                    f"{self.publish_timeout}s: {self._last_error!r}"
                ) from self._last_error
            if not self._ready.is_set() or connection is None:
                await _wait_first((self._ready, self._stopping), remaining)
                continue
            async with self._channel_lock:  # the connection is up, only the channel died
                if self._channel is channel:
                    try:
                        self._channel = await self._open_publisher(connection)
                        continue
                    except Exception as exc:
                        self._last_error = exc
            await asyncio.sleep(min(self.reconnect_delay[0], remaining))

    async def _open_publisher(self, connection: AbstractConnection) -> AbstractChannel:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        try:
            # Re-declaring is cheap and repairs a topology deleted behind our back.
            await self._broker.declare(channel, self._services)
        except BaseException:
            await close_quietly(channel)
            raise
        return channel

    # ----------------------------------------------------------------- consuming

    async def consume(self, queue: str, callback: DeliveryCallback, *, prefetch: int) -> None:
        """Start a consumer that survives reconnects and consumer cancellation.

        At most ``prefetch`` deliveries are unsettled at a time. A callback
        returning an awaitable runs in its own task, one returning ``None``
        inline (see ``DeliveryCallback``). A callback that raises has its
        delivery nacked (requeued, counting toward the delivery limit).
        Framework queues are declared (and bound) first.

        Raises:
            TransportError: the broker refused the queue, or no subscription
                within ``publish_timeout``.
        """
        if prefetch < 1:
            raise ValueError("prefetch must be at least 1")
        if self._closing or self._supervisor is None:
            raise TransportError("the transport is not started or is closed")
        consumer = _Consumer(queue=queue, callback=callback, prefetch=prefetch)
        service = self._broker.service_of(queue)
        if service is not None:
            self._services.add(service)
        self._consumers.append(consumer)
        consumer.task = asyncio.create_task(self._run_consumer(consumer), name=f"consume:{queue}")
        try:
            async with asyncio.timeout(self.publish_timeout):
                await consumer.first_attempt_done.wait()
        except TimeoutError:
            consumer.refused = True
        if consumer.refused:
            consumer.task.cancel()
            await asyncio.wait([consumer.task])
            self._consumers.remove(consumer)
            raise TransportError(
                f"cannot consume from {queue!r}: {consumer.error!r}"
            ) from consumer.error

    async def _run_consumer(self, consumer: _Consumer) -> None:
        delay = self.reconnect_delay[0]
        while not self._closing:
            connection = await self._wait_connection()
            try:
                stopped = await self._subscribe(connection, consumer)
            except Exception as exc:
                consumer.error = exc
                if not consumer.first_attempt_done.is_set() and isinstance(exc, AMQPChannelError):
                    consumer.refused = True  # e.g. no such queue: report it to consume()
                    consumer.first_attempt_done.set()
                    return
                log.warning(
                    "cannot consume from %s: %r; retrying in %.1fs", consumer.queue, exc, delay
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.reconnect_delay[1])
                continue
            consumer.first_attempt_done.set()
            delay = self.reconnect_delay[0]
            why = await stopped
            channel, consumer.channel, consumer.tag = consumer.channel, None, None
            if self._closing:
                return
            log.warning("consumer of %s stopped (%s); subscribing again", consumer.queue, why)
            if channel is not None:
                await close_quietly(channel)

    async def _subscribe(
        self, connection: AbstractConnection, consumer: _Consumer
    ) -> asyncio.Future[str]:
        """Open a channel, declare the queue and consume; the future says why it stopped."""
        channel = await connection.channel(publisher_confirms=False)
        stopped: asyncio.Future[str] = asyncio.get_running_loop().create_future()

        def on_close(_: object, exc: BaseException | None) -> None:
            if not stopped.done():
                stopped.set_result(f"channel closed: {exc!r}")

        def on_cancel(frame: Basic.Cancel) -> None:
            # The broker cancels a consumer when its queue is deleted.
            if not stopped.done():
                stopped.set_result(f"cancelled by the broker ({frame.consumer_tag})")

        try:
            channel.close_callbacks.add(on_close)
            underlay = await channel.get_underlay_channel()
            underlay.on_consumer_cancel_callbacks.add(on_cancel)
            await channel.set_qos(prefetch_count=consumer.prefetch)
            queue = await self._broker.declare_for_consume(channel, consumer.queue, self._services)
            consumer.channel = channel
            consumer.acks = Acks(self._track)
            ok = await underlay.basic_consume(queue.name, partial(self._on_message, consumer))
            consumer.tag = ok.consumer_tag
        except BaseException:
            consumer.channel = None
            await close_quietly(channel)
            raise
        return stopped

    async def _on_message(self, consumer: _Consumer, message: DeliveredMessage) -> None:
        # aiormq runs this in a task per message. An asynchronous callback gets a
        # task of our own: aiormq's is cancelled when its channel closes, and a
        # handler halfway through a database transaction should finish, not be
        # interrupted (its ack will simply not arrive and the message is
        # redelivered). A synchronous one (the batch queues) runs right here.
        delivery = RabbitMQDelivery(message, consumer.queue, consumer.acks)
        deliver(consumer.callback, delivery, self._spawn)

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        self._track(asyncio.create_task(work))

    def _track(self, task: asyncio.Task[None]) -> None:
        """Keep a task until it is done; ``close`` waits for the ones still running."""
        self._handlers.add(task)
        task.add_done_callback(self._handlers.discard)

    async def _cancel_subscription(self, consumer: _Consumer) -> None:
        channel, tag = consumer.channel, consumer.tag
        if channel is None or tag is None or channel.is_closed:
            return
        try:
            underlay = await channel.get_underlay_channel()
            await underlay.basic_cancel(tag, timeout=self.close_timeout)
        except Exception as exc:
            log.debug("cancelling the consumer of %s failed: %r", consumer.queue, exc)

    async def _wait_connection(self) -> AbstractConnection:
        while True:
            await self._ready.wait()
            if self._connection is not None:
                return self._connection
            await asyncio.sleep(self.reconnect_delay[0])

    # ----------------------------------------------------------------- dead letters

    async def dead_letter(self, delivery: Delivery, reason: str) -> None:
        """Publish a copy to the dead-letter exchange (confirmed), then ack the original.

        A body over ``max_message_bytes`` is copied as a prefix, with its size and
        SHA-256 in headers. When the dead-letter queue is full and refuses the
        copy, the original is rejected: the broker dead-letters it itself once
        there is room, and until then it stays in its queue without being
        delivered again.

        Raises:
            TransportError: the copy was not confirmed; the original is left
                unsettled for the caller to nack.
        """
        source = delivery.queue
        copy = dead_letter_copy(
            delivery, reason, self.topology.dead_letter_exchange, self.max_message_bytes
        )
        ident = copy.message_id
        try:
            await self._send([copy])
        except TransportError as exc:
            refused = isinstance(exc.__cause__, DeliveryError)
            if not (refused and self._dead_letters_itself(source)):
                raise
            log.warning(
                "the dead-letter queue refused message %s from %s (full?): it stays in %s,"
                " parked until the dead-letter queue has room (docs/operations.md)",
                ident,
                source,
                source,
            )
            await delivery.nack(requeue=False)
            return
        await delivery.ack()

    def _dead_letters_itself(self, queue: str) -> bool:
        """Whether the broker dead-letters what ``queue`` rejects (ours do, to the DLX)."""
        return queue == self.topology.replies_queue or self._broker.service_of(queue) is not None

    async def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        """Peek at up to ``limit`` dead letters; they stay in the queue, in order."""
        return await self._with_channel(partial(peek, topology=self.topology, limit=limit))

    async def replay_dead_letters(self, ids: Sequence[str] | None = None) -> list[str]:
        """Re-publish dead letters (all, or those with the given ids) to where they came from.

        Each is confirmed before its dead-letter copy is acked.

        Raises:
            TransportError: a message could not be re-published; it stays in the
                dead-letter queue (those replayed before it are gone from it).
        """
        wanted = None if ids is None else set(ids)
        return await self._with_channel(
            partial(
                replay,
                topology=self.topology,
                wanted=wanted,
                timeout=self.publish_timeout,
                keys=self.keys,
            )
        )

    async def _with_channel(self, work: Callable[[AbstractChannel], Awaitable[_T]]) -> _T:
        """Run ``work`` on a short-lived confirming channel of the current connection."""
        deadline = asyncio.get_running_loop().time() + self.publish_timeout
        await self._publisher(deadline)  # waits for a connection
        connection = self._connection
        if connection is None:
            raise TransportError("not connected to RabbitMQ")
        try:
            channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        except Exception as exc:
            raise TransportError(f"cannot open a channel: {exc!r}") from exc
        try:
            return await work(channel)
        except TransportError:
            raise
        except Exception as exc:
            raise TransportError(f"RabbitMQ refused the operation: {exc!r}") from exc
        finally:
            await close_quietly(channel)

    # ----------------------------------------------------------------- topology

    def dead_letter_arguments(self) -> dict[str, Any]:
        """The arguments of the dead-letter queue (quorum, and its limits if any)."""
        return self._broker.dead_letter_arguments()

    def queue_arguments(self) -> dict[str, Any]:
        """The arguments of service and reply queues (quorum, delivery limit, DLX)."""
        return self._broker.queue_arguments()

    # ----------------------------------------------------------------- connection

    async def _supervise(self) -> None:
        """Own the connection: connect, declare, wait for the loss, repeat.

        With several nodes, a lost connection or a failed attempt moves on to
        the next node at once; the pause grows only after a whole round of them
        failed.
        """
        nodes = self._nodes
        while not self._closing:
            try:
                await self._session()
                nodes.connected()
            except Exception as exc:
                self._last_error = exc
                nodes.failed()
                if self.connections == 0 and refused_for_good(exc):
                    self._refused.set()  # start() raises it: no retry to announce
                    log.debug("RabbitMQ at %s refused the connection: %r", self.safe_url, exc)
                    nodes.skip()
                    await asyncio.sleep(nodes.backoff)
                    continue
                log.warning(
                    "cannot connect to RabbitMQ at %s: %r; retrying in %.1fs",
                    self.safe_url,
                    exc,
                    nodes.pause,
                )
            await asyncio.sleep(nodes.next())

    async def _session(self) -> None:
        """One connection's life: declare everything, serve, return when it is lost."""
        connection = await aio_pika.connect(
            self._nodes.url,
            timeout=self.connect_timeout,
            client_properties={"connection_name": self._connection_name},
        )
        lost = asyncio.Event()
        connection.close_callbacks.add(lambda *_: lost.set())
        try:
            await self._broker.check_dead_letter_queue(connection)
            channel = await self._open_publisher(connection)
            self._connection, self._channel = connection, channel
            self.connections += 1
            self._ready.set()
            if self.connections > 1:
                log.warning("reconnected to RabbitMQ at %s", self.safe_url)
            await lost.wait()
            log.warning("lost the connection to RabbitMQ at %s", self.safe_url)
        finally:
            self._ready.clear()
            self._connection = self._channel = None
            await close_quietly(connection)

    async def _stop_supervisor(self) -> None:
        task, self._supervisor = self._supervisor, None
        if task is not None:
            task.cancel()
            await asyncio.wait([task])


# --------------------------------------------------------------------------- helpers


async def _wait_first(events: Sequence[asyncio.Event], timeout: float) -> None:
    """Return when any of ``events`` is set, or after ``timeout`` seconds."""
    waiters = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
