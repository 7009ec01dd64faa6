"""The RabbitMQ transport's broker objects: what it declares, with which arguments.

Exchanges ``<prefix>.commands`` (direct, by service), ``<prefix>.replies``
(direct) and ``<prefix>.dlx`` (fanout); a quorum queue per service and one for
replies, each with a delivery limit and the DLX; the dead-letter queue, with a
length and a byte limit that refuse more (``reject-publish``) rather than drop.
A process with a least-privilege user declares nothing (``declare=False``): it
only checks, with passive declares, which need no permission.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractQueue
from aio_pika.exceptions import ChannelPreconditionFailed

from sagaflow.core.ports import Topology
from sagaflow.transport.wire import REPLY_ROUTING_KEY

__all__ = ["DEAD_LETTER_MAX_BYTES", "DEAD_LETTER_MAX_MESSAGES", "Declarations", "close_quietly"]

log = logging.getLogger("sagaflow.transport.rabbitmq")

DEAD_LETTER_MAX_MESSAGES = 10_000
DEAD_LETTER_MAX_BYTES = 256 * 1024 * 1024


class Declarations:
    """Declares (or, with ``declare=False``, checks) one topology's broker objects.

    Args:
        topology: The names and the delivery limit.
        declare: Declare, and repair on every reconnect; False: only check.
        dead_letter_max_messages: The dead-letter queue's ``x-max-length`` (0: none).
        dead_letter_max_bytes: Its ``x-max-length-bytes`` (0: none).
        quorum_initial_group_size: Each quorum queue's ``x-quorum-initial-group-size``
            (``None``: the broker's default, every node of the cluster).
    """

    def __init__(
        self,
        topology: Topology,
        *,
        declare: bool,
        dead_letter_max_messages: int,
        dead_letter_max_bytes: int,
        quorum_initial_group_size: int | None = None,
    ) -> None:
        self.topology = topology
        self.declare_topology = declare
        self.dead_letter_max_messages = dead_letter_max_messages
        self.dead_letter_max_bytes = dead_letter_max_bytes
        self.quorum: dict[str, Any] = {"x-queue-type": "quorum"}
        if quorum_initial_group_size is not None:
            if quorum_initial_group_size < 1:
                raise ValueError("quorum_initial_group_size must be at least 1")
            self.quorum["x-quorum-initial-group-size"] = quorum_initial_group_size
        # set when an existing dead-letter queue has other arguments: kept as it is
        self._dead_letter_queue_as_found = False

    def dead_letter_arguments(self) -> dict[str, Any]:
        """The arguments of the dead-letter queue (quorum, and its limits if any)."""
        arguments: dict[str, Any] = dict(self.quorum)
        if self.dead_letter_max_messages:
            arguments["x-max-length"] = self.dead_letter_max_messages
        if self.dead_letter_max_bytes:
            arguments["x-max-length-bytes"] = self.dead_letter_max_bytes
        if "x-max-length" in arguments or "x-max-length-bytes" in arguments:
            # keep the oldest; what does not fit waits in its own queue (nothing lost)
            arguments["x-overflow"] = "reject-publish"
        return arguments

    def queue_arguments(self) -> dict[str, Any]:
        """The arguments of service and reply queues (quorum, delivery limit, DLX)."""
        return {
            **self.quorum,
            "x-delivery-limit": self.topology.delivery_limit,
            "x-dead-letter-exchange": self.topology.dead_letter_exchange,
            "x-dead-letter-strategy": "at-least-once",
            "x-overflow": "reject-publish",
        }

    def service_of(self, queue: str) -> str | None:
        """The service whose queue ``queue`` is, if it is one."""
        prefix = self.topology.service_queue("")
        if queue.startswith(prefix) and len(queue) > len(prefix):
            return queue[len(prefix) :]
        return None

    async def check_dead_letter_queue(self, connection: AbstractConnection) -> None:
        """Declare the dead-letter queue on a channel of its own: RabbitMQ refuses
        (closing the channel) to redeclare a queue with other arguments, such as
        one declared before it had limits. Such a queue is then kept as it is."""
        if not self.declare_topology:
            return
        channel = await connection.channel(publisher_confirms=False)
        try:
            await channel.declare_queue(
                self.topology.dead_letter_queue,
                durable=True,
                arguments=self.dead_letter_arguments(),
            )
            self._dead_letter_queue_as_found = False
        except ChannelPreconditionFailed as exc:
            if not self._dead_letter_queue_as_found:
                log.warning(
                    "the dead-letter queue %s exists with other arguments than %s, kept as"
                    " it is: RabbitMQ cannot change a queue's arguments. Bound it with a"
                    " policy, or empty, delete and let it be declared again"
                    " (docs/operations.md): %s",
                    self.topology.dead_letter_queue,
                    self.dead_letter_arguments(),
                    exc,
                )
            self._dead_letter_queue_as_found = True
        finally:
            await close_quietly(channel)

    async def declare(self, channel: AbstractChannel, services: Iterable[str]) -> None:
        """Declare (or check) everything: exchanges, the reply and dead-letter
        queues, and a queue per service."""
        t = self.topology
        if not self.declare_topology:  # check only: passive declares need no permission
            for exchange in (t.commands_exchange, t.replies_exchange, t.dead_letter_exchange):
                await channel.declare_exchange(exchange, passive=True)
            for name in (t.replies_queue, t.dead_letter_queue):
                await channel.declare_queue(name, passive=True)
            await self.declare_services(channel, sorted(services))
            return
        direct, fanout = aio_pika.ExchangeType.DIRECT, aio_pika.ExchangeType.FANOUT
        await channel.declare_exchange(t.commands_exchange, direct, durable=True)
        replies = await channel.declare_exchange(t.replies_exchange, direct, durable=True)
        dlx = await channel.declare_exchange(t.dead_letter_exchange, fanout, durable=True)
        if self._dead_letter_queue_as_found:
            dlq = await channel.declare_queue(t.dead_letter_queue, passive=True)
        else:
            dlq = await channel.declare_queue(
                t.dead_letter_queue, durable=True, arguments=self.dead_letter_arguments()
            )
        await dlq.bind(dlx, routing_key="")
        queue = await channel.declare_queue(
            t.replies_queue, durable=True, arguments=self.queue_arguments()
        )
        await queue.bind(replies, routing_key=REPLY_ROUTING_KEY)
        await self.declare_services(channel, sorted(services))

    async def declare_services(self, channel: AbstractChannel, services: Sequence[str]) -> None:
        """Declare (or check) the queue of each service, bound to the commands exchange."""
        for service in services:
            if not self.declare_topology:
                await channel.declare_queue(self.topology.service_queue(service), passive=True)
                continue
            queue = await channel.declare_queue(
                self.topology.service_queue(service), durable=True, arguments=self.queue_arguments()
            )
            await queue.bind(self.topology.commands_exchange, routing_key=service)

    async def declare_for_consume(
        self, channel: AbstractChannel, name: str, services: Iterable[str]
    ) -> AbstractQueue:
        """The queue ``name`` to consume from; ours are (re)declared first."""
        t = self.topology
        if self.service_of(name) is not None or name in (t.replies_queue, t.dead_letter_queue):
            # Ours to (re)create: it may have been deleted (that is why a consumer
            # gets cancelled), and its bindings with it.
            await self.declare(channel, services)
        return await channel.declare_queue(name, passive=True)


async def close_quietly(closable: AbstractChannel | AbstractConnection) -> None:
    """Close a channel or connection, logging (not raising) a failure."""
    try:
        await closable.close()
    except Exception as exc:
        log.debug("closing %r failed: %r", closable, exc)
