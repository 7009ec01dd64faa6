"""RabbitMQTransport against the real broker: topology, persistence, and faults.

The restart test stops and starts the RabbitMQ application on this machine
(``rabbitmqctl stop_app`` / ``start_app``); it always starts it again.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import subprocess
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from urllib.parse import unquote, urlsplit

import aio_pika
import pytest

from sagaflow.core.errors import ConfigurationError, TransportError
from sagaflow.core.messages import Envelope, MessageKind, decode
from sagaflow.core.ports import Delivery, Topology
from sagaflow.transport import RabbitMQTransport

pytestmark = pytest.mark.integration

WAIT = 30.0
TOPOLOGY = Topology(prefix="it", delivery_limit=3)


def command(service: str = "inventory", saga: str = "saga-1") -> Envelope:
    return Envelope(
        message_id=f"{saga}:reserve:command:1:{uuid.uuid4().hex[:6]}",
        command_id=f"{saga}:reserve:command",
        saga_id=saga,
        saga_name="create-order",
        step="reserve",
        step_index=0,
        kind=MessageKind.COMMAND,
        attempt=1,
        type=f"{service}.reserve",
        payload={"sku": "A-1"},
        trace={"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"},
    )


def vhost_of(url: str) -> str:
    return unquote(urlsplit(url).path.lstrip("/"))


def rabbitmqctl(*args: str) -> str:
    done = subprocess.run(
        ["rabbitmqctl", "-q", *args], check=True, capture_output=True, text=True, timeout=60
    )
    return done.stdout


async def actl(*args: str) -> str:
    return await asyncio.to_thread(rabbitmqctl, *args)


@pytest.fixture
async def transport(amqp_url: str) -> AsyncIterator[RabbitMQTransport]:
    t = RabbitMQTransport(amqp_url, TOPOLOGY, publish_timeout=20, reconnect_delay=(0.1, 1.0))
    await t.start(["inventory"])
    try:
        yield t
    finally:
        await t.close()


class Collector:
    def __init__(self) -> None:
        self.seen: asyncio.Queue[Delivery] = asyncio.Queue()

    async def __call__(self, delivery: Delivery) -> None:
        await self.seen.put(delivery)

    async def next(self) -> Delivery:
        return await asyncio.wait_for(self.seen.get(), WAIT)


class Proxy:
    """A TCP proxy in front of the broker whose links can be cut on demand, and
    whose traffic from the broker can be held back (``downstream`` cleared)."""

    def __init__(self, target_port: int = 5672) -> None:
        self.target_port = target_port
        self.links: set[asyncio.StreamWriter] = set()
        self.server: asyncio.Server | None = None
        self.accepting = True
        self.downstream = asyncio.Event()
        self.downstream.set()

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self.accepting:
            writer.close()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:  # the broker itself is down: refuse, as it would
            writer.close()
            return
        self.links.update((writer, up_writer))
        await asyncio.gather(
            self._pipe(reader, up_writer), self._pipe(up_reader, writer, self.downstream)
        )

    async def _pipe(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        flowing: asyncio.Event | None = None,
    ) -> None:
        try:
            while data := await reader.read(65536):
                if flowing is not None:
                    await flowing.wait()
                writer.write(data)
                await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()

    def cut(self) -> None:
        for writer in self.links:
            writer.transport.abort()
        self.links.clear()

    async def close(self) -> None:
        self.cut()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


async def test_topology_is_durable_quorum_with_delivery_limit(
    transport: RabbitMQTransport, amqp_url: str
) -> None:
    vhost = vhost_of(amqp_url)

    raw = await actl("list_queues", "-p", vhost, "name", "type", "durable", "arguments",
                     "--formatter", "json")  # fmt: skip
    queues = {q["name"]: q for q in json.loads(raw)}

    for name in (TOPOLOGY.service_queue("inventory"), TOPOLOGY.replies_queue):
        queue = queues[name]
        assert queue["type"] == "quorum"
        assert queue["durable"] is True
        args = {name: value for name, _type, value in queue["arguments"]}
        assert args["x-queue-type"] == "quorum"
        assert args["x-delivery-limit"] == 3
        assert args["x-dead-letter-exchange"] == TOPOLOGY.dead_letter_exchange
        assert args["x-dead-letter-strategy"] == "at-least-once"
        assert args["x-overflow"] == "reject-publish"
    assert queues[TOPOLOGY.dead_letter_queue]["type"] == "quorum"
    assert "x-delivery-limit" not in {a[0] for a in queues[TOPOLOGY.dead_letter_queue]["arguments"]}

    raw = await actl(
        "list_exchanges", "-p", vhost, "name", "type", "durable", "--formatter", "json"
    )
    exchanges = {e["name"]: e for e in json.loads(raw)}
    assert exchanges[TOPOLOGY.commands_exchange]["type"] == "direct"
    assert exchanges[TOPOLOGY.replies_exchange]["type"] == "direct"
    assert exchanges[TOPOLOGY.dead_letter_exchange]["type"] == "fanout"
    assert all(exchanges[n]["durable"] for n in (TOPOLOGY.commands_exchange,))

    raw = await actl("list_bindings", "-p", vhost, "source_name", "destination_name",
                     "routing_key", "--formatter", "json")  # fmt: skip
    bindings = {
        (b["source_name"], b["destination_name"], b["routing_key"]) for b in json.loads(raw)
    }
    assert (
        TOPOLOGY.commands_exchange,
        TOPOLOGY.service_queue("inventory"),
        "inventory",
    ) in bindings
    assert (TOPOLOGY.replies_exchange, TOPOLOGY.replies_queue, "reply") in bindings
    assert (TOPOLOGY.dead_letter_exchange, TOPOLOGY.dead_letter_queue, "") in bindings


async def test_messages_are_persistent_with_wire_properties(
    transport: RabbitMQTransport, amqp_url: str
) -> None:
    sent = command()
    await transport.publish([sent])

    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(TOPOLOGY.service_queue("inventory"), passive=True)
        message = await queue.get(timeout=10)
        await message.ack()

    assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    assert message.message_id == sent.message_id
    assert message.correlation_id == sent.saga_id
    assert message.type == "inventory.reserve"
    assert message.content_type == "application/json"
    assert message.timestamp is not None
    assert message.headers["x-saga-kind"] == "command"
    assert decode(message.body).message_id == sent.message_id


async def test_a_deleted_queue_is_declared_again_and_consumed(
    transport: RabbitMQTransport, amqp_url: str
) -> None:
    collector = Collector()
    name = TOPOLOGY.service_queue("inventory")
    await transport.consume(name, collector, prefetch=5)

    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        # Quorum queues refuse if_unused deletes by closing the connection.
        await channel.queue_delete(name, if_unused=False, if_empty=False)

    sent = command()
    async with asyncio.timeout(WAIT):
        while True:  # until the consumer's cancel handler has re-declared the queue
            try:
                await transport.publish([sent])
                break
            except TransportError:
                await asyncio.sleep(0.1)
    delivery = await collector.next()
    assert decode(delivery.body).message_id == sent.message_id
    await delivery.ack()


@asynccontextmanager
async def behind_proxy(
    amqp_url: str, *, publish_timeout: float = 20, reconnect_delay: float = 0.5
) -> AsyncIterator[tuple[Proxy, RabbitMQTransport]]:
    """A started transport whose link to the broker goes through a ``Proxy``."""
    proxy = Proxy()
    port = await proxy.start()
    url = amqp_url.replace(":5672/", f":{port}/")
    transport = RabbitMQTransport(
        url, TOPOLOGY, publish_timeout=publish_timeout, reconnect_delay=(0.1, reconnect_delay)
    )
    try:
        await transport.start(["inventory"])
        yield proxy, transport
    finally:
        proxy.downstream.set()
        await transport.close()
        await proxy.close()


async def test_a_cut_link_is_restored_and_publish_waits_for_it(amqp_url: str) -> None:
    async with behind_proxy(amqp_url) as (proxy, transport):
        collector = Collector()
        await transport.consume(TOPOLOGY.service_queue("inventory"), collector, prefetch=5)

        proxy.accepting = False
        proxy.cut()
        publishing = asyncio.create_task(transport.publish([command(saga="during")]))
        await asyncio.sleep(0.5)
        assert not publishing.done()  # waiting for the link, not failing
        proxy.accepting = True
        await asyncio.wait_for(publishing, WAIT)

        delivery = await collector.next()
        assert decode(delivery.body).saga_id == "during"
        await delivery.ack()
        assert transport.connections >= 2


async def test_a_publish_whose_confirm_was_lost_is_published_again(amqp_url: str) -> None:
    # One message at a time is awaited without a task of its own: a confirm the
    # closing channel cancels must count as "not confirmed", not as our cancellation.
    async with behind_proxy(amqp_url) as (proxy, transport):
        collector = Collector()
        await transport.consume(TOPOLOGY.service_queue("inventory"), collector, prefetch=5)

        proxy.downstream.clear()  # the broker's confirm never reaches us
        publishing = asyncio.create_task(transport.publish([command(saga="held")]))
        await asyncio.sleep(0.5)
        assert not publishing.done()
        proxy.cut()
        proxy.downstream.set()
        await asyncio.wait_for(publishing, WAIT)  # confirmed on the next link

        delivery = await collector.next()  # once or twice: at least once by design
        assert decode(delivery.body).saga_id == "held"
        await delivery.ack()


async def test_cancelling_a_publish_waiting_for_its_confirm_cancels_it(amqp_url: str) -> None:
    async with behind_proxy(amqp_url) as (proxy, transport):
        proxy.downstream.clear()
        for batch in ([command(saga="one")], [command(saga="a"), command(saga="b")]):
            publishing = asyncio.create_task(transport.publish(batch))
            await asyncio.sleep(0.3)
            assert not publishing.done()
            publishing.cancel()
            with pytest.raises(asyncio.CancelledError):
                await asyncio.wait_for(publishing, WAIT)


async def test_publish_gives_up_after_publish_timeout(amqp_url: str) -> None:
    async with behind_proxy(amqp_url, publish_timeout=1, reconnect_delay=0.2) as (
        proxy,
        transport,
    ):
        proxy.accepting = False
        proxy.cut()
        with pytest.raises(TransportError, match="not connected"):
            await transport.publish([command()])


async def test_start_fails_on_bad_credentials(amqp_url: str) -> None:
    url = amqp_url.replace("guest:guest@", "guest:wrong@")
    transport = RabbitMQTransport(url, TOPOLOGY, start_timeout=20)

    # a refusal, not a failure that heals: start-up must not retry it
    with pytest.raises(ConfigurationError, match="refused the login") as caught:
        await asyncio.wait_for(transport.start(["inventory"]), 15)
    assert "wrong" not in str(caught.value)
    await transport.close()


async def test_start_times_out_when_the_broker_is_unreachable() -> None:
    transport = RabbitMQTransport("amqp://guest:guest@127.0.0.1:1/", TOPOLOGY, start_timeout=1)

    with pytest.raises(TransportError, match="cannot connect"):
        await transport.start(["inventory"])
    await transport.close()


@pytest.mark.faults  # restarts the shared broker: deselect with -m "not faults"
async def test_consumer_and_messages_survive_a_broker_restart(
    transport: RabbitMQTransport,
) -> None:
    deliveries: asyncio.Queue[Delivery] = asyncio.Queue()
    held: list[Delivery] = []

    async def handler(delivery: Delivery) -> None:
        # Hold the first delivery unacked across the restart; ack the rest.
        if not held:
            held.append(delivery)
        else:
            await delivery.ack()
        await deliveries.put(delivery)

    await transport.consume(TOPOLOGY.service_queue("inventory"), handler, prefetch=1)
    await transport.publish([command(saga="in-flight")])
    first = await asyncio.wait_for(deliveries.get(), WAIT)
    assert decode(first.body).saga_id == "in-flight"
    # With prefetch 1 this one waits in the queue: it must survive on disk.
    await transport.publish([command(saga="queued")])

    try:
        await actl("stop_app")
        publishing = asyncio.create_task(transport.publish([command(saga="during")]))
        await asyncio.sleep(0.5)
        assert not publishing.done()
    finally:
        await actl("start_app")
        await actl("await_startup")
    await asyncio.wait_for(publishing, WAIT)
    await transport.publish([command(saga="after")])

    received: dict[str, bool] = {}
    async with asyncio.timeout(WAIT):
        while len(received) < 4:
            delivery = await deliveries.get()
            if delivery is not first:
                received[decode(delivery.body).saga_id] = delivery.redelivered
    assert set(received) == {"in-flight", "queued", "during", "after"}
    assert received["in-flight"] is True  # redelivered after the old channel died
    await first.ack()  # its channel is gone: must not raise
    assert transport.is_connected
    assert transport.connections >= 2


async def test_acks_given_together_ack_exactly_those_deliveries(amqp_url: str) -> None:
    """Acks in one turn of the event loop go out as one ``multiple`` ack where the
    tags allow; a delivery below it that was not acked (held, or nacked) must
    come back, and every acked one must not."""
    queue = TOPOLOGY.service_queue("inventory")
    first = RabbitMQTransport(amqp_url, TOPOLOGY, publish_timeout=20)
    await first.start(["inventory"])
    collector = Collector()
    try:
        await first.consume(queue, collector, prefetch=50)
        await first.publish([command(saga=f"s{i:02d}") for i in range(12)])
        got = [await collector.next() for _ in range(12)]
        by_saga = {decode(d.body).saga_id: d for d in got}
        # acked together with gaps: s03 held, s06 nacked back to the queue
        await by_saga["s06"].nack(requeue=True)
        for name in ("s00", "s01", "s02", "s04", "s05", "s07"):
            await by_saga[name].ack()
        await asyncio.sleep(0.2)
        for name in ("s08", "s10"):  # s09 and s11 held
            await by_saga[name].ack()
        requeued = await collector.next()  # the nacked one, redelivered meanwhile
        assert decode(requeued.body).saga_id == "s06"
        await asyncio.sleep(0.5)  # the acks reach the broker before the channel closes
    finally:
        await first.close()  # unacked deliveries go back to the queue

    second = RabbitMQTransport(amqp_url, TOPOLOGY, publish_timeout=20)
    await second.start(["inventory"])
    again = Collector()
    try:
        await second.consume(queue, again, prefetch=50)
        back = sorted([decode((await again.next()).body).saga_id for _ in range(4)])
        assert back == ["s03", "s06", "s09", "s11"]
        with pytest.raises(TimeoutError):  # and nothing else
            await asyncio.wait_for(again.seen.get(), 1.0)
    finally:
        await second.close()


async def test_acks_in_any_order_never_close_the_channel(
    amqp_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    # Acks given in random order and bursts, while more deliveries arrive. Two
    # coalesced flushes running at once once acked a tag twice (a multiple ack
    # covering a single ack still to be sent): the broker closed the channel
    # with "unknown delivery tag" and every unacked delivery came back.
    caplog.set_level(logging.WARNING, logger="sagaflow.transport.rabbitmq")
    topology = Topology(prefix="any-order", delivery_limit=3)
    transport = RabbitMQTransport(amqp_url, topology, publish_timeout=20)
    await transport.start(["inventory"])
    try:
        taken: asyncio.Queue[Delivery] = asyncio.Queue()
        await transport.consume(topology.service_queue("inventory"), taken.put_nowait, prefetch=100)
        total = 1500

        async def produce() -> None:
            for first in range(0, total, 50):
                await transport.publish([command(saga=f"s{n}") for n in range(first, first + 50)])

        producing = asyncio.create_task(produce())
        rnd = random.Random(7)
        held: list[Delivery] = []
        seen: list[Delivery] = []
        while len(seen) < total:
            delivery = await asyncio.wait_for(taken.get(), WAIT)
            held.append(delivery)
            seen.append(delivery)
            if len(held) >= rnd.randint(1, 40) or taken.empty():
                rnd.shuffle(held)
                cut = rnd.randint(1, len(held))
                for settled in held[:cut]:
                    await settled.ack()
                held = held[cut:]
                if rnd.random() < 0.3:
                    await asyncio.sleep(0)
        for settled in held:
            await settled.ack()
        await producing
        await asyncio.sleep(0.5)  # a late channel error would show up meanwhile

        assert not any(d.redelivered for d in seen)
        assert len({decode(d.body).saga_id for d in seen}) == total
        stopped = [r.getMessage() for r in caplog.records if "stopped" in r.getMessage()]
        assert stopped == []
        assert taken.empty()
    finally:
        await transport.close()
