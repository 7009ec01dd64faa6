"""One contract for every ``Transport``: the in-memory double and RabbitMQ.

The same tests run against ``InMemoryTransport`` and against
``RabbitMQTransport`` on a fresh vhost, so the double cannot drift from the
broker's behaviour (delivery limit, redelivery flag, dead-letter reasons,
prefetch, headers).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

import pytest

from sagaflow.core.errors import TransportError
from sagaflow.core.messages import Envelope, MessageKind, Outcome, decode, encode
from sagaflow.core.ports import DeadLetter, Delivery, Topology, Transport
from sagaflow.transport import InMemoryTransport, RabbitMQTransport

WAIT = 15.0  # seconds any single wait may take before the test fails
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"

MakeTransport = Callable[..., Awaitable[Transport]]


@pytest.fixture(params=["memory", pytest.param("rabbitmq", marks=pytest.mark.integration)])
async def make_transport(request: pytest.FixtureRequest) -> AsyncIterator[MakeTransport]:
    url = request.getfixturevalue("amqp_url") if request.param == "rabbitmq" else None
    created: list[Transport] = []

    async def make(services: Sequence[str] = ("inventory",), delivery_limit: int = 2) -> Transport:
        topology = Topology(prefix="contract", delivery_limit=delivery_limit)
        transport: Transport
        if url is None:
            transport = InMemoryTransport(topology)
        else:
            transport = RabbitMQTransport(url, topology, publish_timeout=10, start_timeout=10)
        await transport.start(services)
        created.append(transport)
        return transport

    yield make
    for transport in created:
        await transport.close()


def command(service: str = "inventory", *, saga: str = "saga-1", attempt: int = 1) -> Envelope:
    kind = MessageKind.COMMAND
    return Envelope(
        message_id=f"{saga}:reserve:{kind.value}:{attempt}:{uuid.uuid4().hex[:6]}",
        command_id=f"{saga}:reserve:{kind.value}",
        saga_id=saga,
        saga_name="create-order",
        step="reserve",
        step_index=0,
        kind=kind,
        attempt=attempt,
        type=f"{service}.reserve",
        payload={"sku": "A-1", "qty": 2},
        trace={"traceparent": TRACEPARENT, "tracestate": "vendor=1"},
    )


class Inbox:
    """A consumer callback that records deliveries, acking them unless told not to."""

    def __init__(self, *, ack: bool = True) -> None:
        self.ack = ack
        self.deliveries: asyncio.Queue[Delivery] = asyncio.Queue()
        self.count = 0

    async def __call__(self, delivery: Delivery) -> None:
        self.count += 1
        if self.ack:
            await delivery.ack()
        await self.deliveries.put(delivery)

    async def next(self) -> Delivery:
        return await asyncio.wait_for(self.deliveries.get(), WAIT)

    async def nothing_more(self, seconds: float = 0.5) -> None:
        await asyncio.sleep(seconds)
        assert self.deliveries.empty(), "unexpected extra delivery"


async def wait_dead_letters(transport: Transport, count: int) -> list[DeadLetter]:
    """Dead-lettering by the broker is asynchronous: poll until ``count`` arrive."""
    async with asyncio.timeout(WAIT):
        while True:
            letters = await transport.dead_letters()
            if len(letters) >= count:
                return letters
            await asyncio.sleep(0.05)


async def test_command_reaches_its_service_queue(make_transport: MakeTransport) -> None:
    transport = await make_transport(["inventory", "payment"])
    inventory, payment = Inbox(), Inbox()
    await transport.consume(transport.topology.service_queue("inventory"), inventory, prefetch=5)
    await transport.consume(transport.topology.service_queue("payment"), payment, prefetch=5)
    sent = command("inventory")

    await transport.publish([sent])

    delivery = await inventory.next()
    assert delivery.queue == transport.topology.service_queue("inventory")
    assert not delivery.redelivered
    assert decode(delivery.body, delivery.headers).message_id == sent.message_id
    assert decode(delivery.body) == sent.model_copy(update={"trace": {}})
    await payment.nothing_more(0.2)


async def test_reply_reaches_the_replies_queue(make_transport: MakeTransport) -> None:
    transport = await make_transport()
    replies = Inbox()
    await transport.consume(transport.topology.replies_queue, replies, prefetch=5)
    reply = command().reply(Outcome.SUCCESS, {"reserved": True})

    await transport.publish([reply])

    delivery = await replies.next()
    assert delivery.queue == transport.topology.replies_queue
    received = decode(delivery.body)
    assert received.kind is MessageKind.REPLY
    assert received.outcome is Outcome.SUCCESS
    assert received.payload == {"reserved": True}


async def test_a_batch_is_delivered_whole(make_transport: MakeTransport) -> None:
    transport = await make_transport()
    inbox = Inbox()
    await transport.consume(transport.topology.service_queue("inventory"), inbox, prefetch=50)
    batch = [command(saga=f"saga-{i}") for i in range(20)]

    await transport.publish(batch)

    received = {decode((await inbox.next()).body).message_id for _ in batch}
    assert received == {e.message_id for e in batch}


async def test_publish_to_an_undeclared_service_raises(make_transport: MakeTransport) -> None:
    transport = await make_transport(["inventory"])

    with pytest.raises(TransportError, match="unroutable"):
        await transport.publish([command("shipping")])


async def test_headers_carry_trace_context_and_saga_fields(make_transport: MakeTransport) -> None:
    transport = await make_transport()
    inbox = Inbox()
    await transport.consume(transport.topology.service_queue("inventory"), inbox, prefetch=5)
    sent = command(attempt=3)

    await transport.publish([sent])

    delivery = await inbox.next()
    headers = delivery.headers
    assert headers["traceparent"] == TRACEPARENT
    assert headers["tracestate"] == "vendor=1"
    assert headers["x-saga-name"] == "create-order"
    assert headers["x-saga-step"] == "reserve"
    assert headers["x-saga-attempt"] == "3"
    assert headers["x-saga-kind"] == "command"
    assert headers["x-saga-command-id"] == sent.command_id
    # The body is the envelope's own JSON; the headers restore its trace context.
    assert delivery.body == encode(sent)
    assert decode(delivery.body, headers).trace["traceparent"] == TRACEPARENT


async def test_nack_with_requeue_redelivers(make_transport: MakeTransport) -> None:
    transport = await make_transport(delivery_limit=5)
    inbox = Inbox(ack=False)
    await transport.consume(transport.topology.service_queue("inventory"), inbox, prefetch=1)
    sent = command()
    await transport.publish([sent])

    first = await inbox.next()
    assert not first.redelivered
    await first.nack(requeue=True)
    second = await inbox.next()

    assert second.redelivered
    assert second.body == first.body
    assert "x-delivery-count" not in first.headers
    assert second.headers["x-delivery-count"] == "1"  # the quorum queue's return count
    await second.ack()
    await inbox.nothing_more()


async def test_a_failing_callback_returns_its_message(make_transport: MakeTransport) -> None:
    transport = await make_transport(delivery_limit=5)
    seen: asyncio.Queue[bool] = asyncio.Queue()

    async def flaky(delivery: Delivery) -> None:
        await seen.put(delivery.redelivered)
        if not delivery.redelivered:
            raise RuntimeError("transient")
        await delivery.ack()

    await transport.consume(transport.topology.service_queue("inventory"), flaky, prefetch=1)
    await transport.publish([command()])

    assert await asyncio.wait_for(seen.get(), WAIT) is False
    assert await asyncio.wait_for(seen.get(), WAIT) is True


async def test_a_synchronous_callback_takes_deliveries_to_settle_later(
    make_transport: MakeTransport,
) -> None:
    # What the coordinator and the worker do: a plain function puts each
    # delivery on a queue and a batch loop settles it afterwards.
    transport = await make_transport()
    taken: asyncio.Queue[Delivery] = asyncio.Queue()
    await transport.consume(
        transport.topology.service_queue("inventory"), taken.put_nowait, prefetch=2
    )
    await transport.publish([command(saga=f"saga-{i}") for i in range(3)])

    held = [await asyncio.wait_for(taken.get(), WAIT) for _ in range(2)]
    await asyncio.sleep(0.3)
    assert taken.empty(), "prefetch 2 must hold the third back until one is settled"
    await held[0].ack()
    await held[1].nack(requeue=True)

    rest = [await asyncio.wait_for(taken.get(), WAIT) for _ in range(2)]
    for delivery in rest:
        await delivery.ack()
    assert sorted(decode(d.body).saga_id for d in rest) == ["saga-1", "saga-2"]
    assert [d.redelivered for d in rest if decode(d.body).saga_id == "saga-1"] == [True]


async def test_a_synchronous_callback_that_raises_returns_its_message(
    make_transport: MakeTransport,
) -> None:
    transport = await make_transport(delivery_limit=5)
    seen: list[bool] = []
    acked = asyncio.Event()

    def flaky(delivery: Delivery) -> None:
        seen.append(delivery.redelivered)
        if not delivery.redelivered:
            raise RuntimeError("transient")
        asyncio.get_running_loop().create_task(delivery.ack()).add_done_callback(
            lambda _: acked.set()
        )

    await transport.consume(transport.topology.service_queue("inventory"), flaky, prefetch=1)
    await transport.publish([command()])

    await asyncio.wait_for(acked.wait(), WAIT)
    assert seen == [False, True]
    assert await transport.dead_letters() == []


async def test_delivery_limit_dead_letters_the_message(make_transport: MakeTransport) -> None:
    transport = await make_transport(delivery_limit=2)
    inbox = Inbox(ack=False)
    queue = transport.topology.service_queue("inventory")
    await transport.consume(queue, inbox, prefetch=1)
    sent = command()
    await transport.publish([sent])

    # A quorum queue dead-letters on the return that exceeds the limit: the
    # message is delivered limit + 1 times.
    for _ in range(transport.topology.delivery_limit + 1):
        await (await inbox.next()).nack(requeue=True)

    [letter] = await wait_dead_letters(transport, 1)
    assert letter.id == sent.message_id
    assert letter.reason == "delivery_limit"
    assert letter.source_queue == queue
    assert letter.body == encode(sent)
    await inbox.nothing_more()


async def test_nack_without_requeue_dead_letters_as_rejected(
    make_transport: MakeTransport,
) -> None:
    transport = await make_transport()
    inbox = Inbox(ack=False)
    await transport.consume(transport.topology.service_queue("inventory"), inbox, prefetch=1)
    await transport.publish([command()])

    await (await inbox.next()).nack(requeue=False)

    [letter] = await wait_dead_letters(transport, 1)
    assert letter.reason == "rejected"


async def test_dead_letter_and_replay_round_trip(make_transport: MakeTransport) -> None:
    transport = await make_transport()
    queue = transport.topology.service_queue("inventory")
    deliveries: asyncio.Queue[Delivery] = asyncio.Queue()
    dead_letter_first = True

    async def handler(delivery: Delivery) -> None:
        nonlocal dead_letter_first
        if dead_letter_first:
            dead_letter_first = False
            await transport.dead_letter(delivery, "invalid: payload.qty must be > 0")
        else:
            await delivery.ack()
        await deliveries.put(delivery)

    await transport.consume(queue, handler, prefetch=1)
    sent, other = command(saga="saga-dl"), command(saga="saga-ok")
    await transport.publish([sent])
    await asyncio.wait_for(deliveries.get(), WAIT)

    letters = await wait_dead_letters(transport, 1)
    again = await transport.dead_letters()  # peeking leaves them in place
    assert [letter.id for letter in again] == [letter.id for letter in letters]
    [letter] = letters
    assert letter.id == sent.message_id
    assert letter.reason == "invalid: payload.qty must be > 0"
    assert letter.source_queue == queue
    assert letter.headers["x-sagaflow-reason"] == letter.reason
    assert letter.headers["x-sagaflow-source-queue"] == queue
    assert letter.headers["traceparent"] == TRACEPARENT

    assert await transport.replay_dead_letters(["no-such-id"]) == []
    assert await transport.replay_dead_letters([letter.id]) == [letter.id]

    replayed = await asyncio.wait_for(deliveries.get(), WAIT)
    assert decode(replayed.body).message_id == sent.message_id
    assert "x-sagaflow-reason" not in replayed.headers
    assert replayed.headers["x-saga-kind"] == "command"
    assert await transport.dead_letters() == []
    await transport.publish([other])
    assert decode((await asyncio.wait_for(deliveries.get(), WAIT)).body).saga_id == "saga-ok"


async def test_replay_all_returns_every_dead_letter(make_transport: MakeTransport) -> None:
    transport = await make_transport(["inventory"])
    inbox = Inbox(ack=False)
    queue = transport.topology.service_queue("inventory")
    await transport.consume(queue, inbox, prefetch=10)
    await transport.publish([command(saga="a"), command(saga="b")])
    for _ in range(2):
        await (await inbox.next()).nack(requeue=False)
    await wait_dead_letters(transport, 2)

    assert len(await transport.replay_dead_letters()) == 2

    sagas = {decode((await inbox.next()).body).saga_id for _ in range(2)}
    assert sagas == {"a", "b"}
    assert await transport.dead_letters() == []


async def test_prefetch_limits_unacked_deliveries(make_transport: MakeTransport) -> None:
    transport = await make_transport()
    inbox = Inbox(ack=False)
    await transport.consume(transport.topology.service_queue("inventory"), inbox, prefetch=2)
    await transport.publish([command(saga=f"saga-{i}") for i in range(5)])

    held = [await inbox.next(), await inbox.next()]
    await inbox.nothing_more(0.5)
    assert inbox.count == 2

    for delivery in held:
        await delivery.ack()
    rest = [await inbox.next() for _ in range(2)]
    for delivery in rest:
        await delivery.ack()
    last = await inbox.next()
    await last.ack()
    assert inbox.count == 5


async def test_settling_twice_is_harmless(make_transport: MakeTransport) -> None:
    transport = await make_transport()
    inbox = Inbox(ack=False)
    await transport.consume(transport.topology.service_queue("inventory"), inbox, prefetch=1)
    await transport.publish([command(saga="one"), command(saga="two")])

    first = await inbox.next()
    await first.ack()
    await first.ack()
    await first.nack(requeue=True)
    second = await inbox.next()
    await second.ack()

    assert decode(second.body).saga_id == "two"
    await inbox.nothing_more()


async def test_close_lets_running_callbacks_finish_and_publish(
    make_transport: MakeTransport,
) -> None:
    transport = await make_transport()
    entered, release = asyncio.Event(), asyncio.Event()
    outcome: list[str] = []

    async def handler(delivery: Delivery) -> None:
        entered.set()
        await release.wait()
        try:
            await transport.publish([decode(delivery.body).reply(Outcome.SUCCESS)])
            outcome.append("published")
        except TransportError as exc:
            outcome.append(f"failed: {exc}")
        await delivery.ack()

    await transport.consume(transport.topology.service_queue("inventory"), handler, prefetch=1)
    await transport.publish([command()])
    await asyncio.wait_for(entered.wait(), WAIT)

    closing = asyncio.create_task(transport.close())
    await asyncio.sleep(0.1)
    release.set()
    await asyncio.wait_for(closing, WAIT)

    assert outcome == ["published"]


async def test_close_is_idempotent(make_transport: MakeTransport) -> None:
    transport = await make_transport()
    await transport.close()
    await transport.close()

    with pytest.raises(TransportError):
        await transport.publish([command()])


# --------------------------------------------------------------------------- in-memory extras
# Not part of the contract: the test helpers only InMemoryTransport offers.


async def test_memory_inject_and_dead_letter_a_malformed_message() -> None:
    transport = InMemoryTransport(Topology(prefix="mem"))
    await transport.start(["inventory"])
    queue = transport.topology.service_queue("inventory")
    inbox = Inbox(ack=False)
    await transport.consume(queue, inbox, prefetch=1)

    transport.inject(queue, b"{not json", {"x-saga-kind": "command"})
    delivery = await inbox.next()
    assert delivery.body == b"{not json"
    await transport.dead_letter(delivery, "not_json: unexpected character")

    [letter] = await transport.dead_letters()
    assert letter.id.startswith("sha256:")
    assert letter.reason == "not_json: unexpected character"
    assert letter.source_queue == queue
    assert transport.pending(queue) == 0
    assert transport.pending(transport.topology.dead_letter_queue) == 1
    with pytest.raises(TransportError):
        transport.inject("no-such-queue", b"{}")
    await transport.close()


async def test_memory_idleness_tracks_queues_unacked_and_running_callbacks() -> None:
    transport = InMemoryTransport(Topology(prefix="mem"))
    await transport.start(["inventory"])
    replies = Inbox(ack=False)

    async def participant(delivery: Delivery) -> None:
        await transport.publish([decode(delivery.body).reply(Outcome.SUCCESS)])
        await delivery.ack()

    await transport.consume(transport.topology.service_queue("inventory"), participant, prefetch=4)
    await transport.consume(transport.topology.replies_queue, replies, prefetch=4)
    assert transport.is_idle()

    await transport.publish([command(saga=f"s{i}") for i in range(3)])
    assert not transport.is_idle()
    with pytest.raises(TimeoutError):
        await transport.wait_idle(timeout=0.2)  # three replies are held unacked
    assert transport.pending(transport.topology.replies_queue) == 3

    for _ in range(3):
        await (await replies.next()).ack()
    await transport.wait_idle(timeout=WAIT)
    assert transport.pending(transport.topology.replies_queue) == 0
    await transport.close()


async def test_memory_close_returns_unacked_messages() -> None:
    transport = InMemoryTransport(Topology(prefix="mem"))
    await transport.start(["inventory"])
    queue = transport.topology.service_queue("inventory")
    inbox = Inbox(ack=False)
    await transport.consume(queue, inbox, prefetch=1)
    await transport.publish([command()])
    await inbox.next()

    await transport.close()

    assert transport.pending(queue) == 1
