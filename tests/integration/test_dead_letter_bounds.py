"""The dead-letter queue is bounded, on the real broker (issue 11, "Unbounded growth").

The review found the DLQ without a limit and holding whole copies of oversized
messages: twenty 5 MB replies were 100 MB there. Now a message over
``max_message_bytes`` is dead-lettered as a prefix with its size and SHA-256,
and the DLQ has a length and a byte limit with ``reject-publish``: when it is
full, a message to dead-letter stays in its own queue, parked (not delivered
again), instead of pushing out an older dead letter.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import subprocess
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import unquote, urlsplit

import aio_pika
import pytest

from sagaflow import Coordinator
from sagaflow.core.ports import DeadLetter, Delivery, Topology
from sagaflow.store import PostgresSagaStore, migrate
from sagaflow.transport import RabbitMQTransport
from sagaflow.transport.bounds import H_ORIGINAL_SHA256, H_ORIGINAL_SIZE, KEPT_BYTES
from tests.sample import saga

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

TOPOLOGY = Topology(prefix="bounds", delivery_limit=3)
WAIT = 30.0


def vhost_of(url: str) -> str:
    return unquote(urlsplit(url).path.lstrip("/"))


async def rabbitmqctl(*args: str) -> str:
    def run() -> str:
        done = subprocess.run(
            ["rabbitmqctl", "-q", *args], check=True, capture_output=True, text=True, timeout=60
        )
        return done.stdout

    return await asyncio.to_thread(run)


async def queue_stats(amqp_url: str) -> dict[str, dict[str, Any]]:
    raw = await rabbitmqctl("list_queues", "-p", vhost_of(amqp_url), "name", "messages",
                            "messages_ready", "arguments", "--formatter", "json")  # fmt: skip
    return {q["name"]: q for q in json.loads(raw)}


async def eventually(check: Callable[[], Any], timeout: float = WAIT) -> Any:
    """Poll ``check`` (async) until it returns something truthy."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        result = await check()
        if result or asyncio.get_running_loop().time() > deadline:
            return result
        await asyncio.sleep(0.2)


async def publish_raw(amqp_url: str, bodies: list[bytes]) -> None:
    """Publish straight to the replies queue, past the transport's own size check."""
    connection = await aio_pika.connect(amqp_url)
    try:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(TOPOLOGY.replies_exchange)
        for n, body in enumerate(bodies):
            message = aio_pika.Message(
                body, message_id=f"raw-{n}", delivery_mode=aio_pika.DeliveryMode.PERSISTENT
            )
            await exchange.publish(message, routing_key="reply")
    finally:
        await connection.close()


async def until_the_limit_holds(amqp_url: str, queue: str) -> None:
    """RabbitMQ applies a policy to a queue asynchronously (for a quorum queue, a
    command to its leader after the policy is stored): fill ``queue`` until it
    refuses a message, then empty it. CI once published before the limit held."""
    connection = await aio_pika.connect(amqp_url)
    try:
        channel = await connection.channel(publisher_confirms=True)
        deadline = asyncio.get_running_loop().time() + WAIT
        while True:
            try:
                await channel.default_exchange.publish(aio_pika.Message(b"probe"), queue)
            except aio_pika.exceptions.DeliveryError:
                break  # refused: the limit holds
            assert asyncio.get_running_loop().time() < deadline, "the policy never applied"
            await asyncio.sleep(0.05)
        await (await channel.get_queue(queue, ensure=False)).purge()
    finally:
        await connection.close()


@asynccontextmanager
async def started(amqp_url: str, **options: Any) -> AsyncIterator[RabbitMQTransport]:
    transport = RabbitMQTransport(amqp_url, TOPOLOGY, reconnect_delay=(0.1, 1.0), **options)
    await transport.start([])
    try:
        yield transport
    finally:
        await transport.close()


async def take(transport: RabbitMQTransport, count: int) -> list[Delivery]:
    """``count`` deliveries of the replies queue, left unsettled."""
    seen: asyncio.Queue[Delivery] = asyncio.Queue()
    await transport.consume(TOPOLOGY.replies_queue, seen.put_nowait, prefetch=count + 10)
    return [await asyncio.wait_for(seen.get(), WAIT) for _ in range(count)]


async def all_letters(transport: RabbitMQTransport, expected: int) -> list[DeadLetter]:
    async def enough() -> list[DeadLetter] | None:
        letters = await transport.dead_letters(1000)
        return letters if len(letters) >= expected else None

    return await eventually(enough) or await transport.dead_letters(1000)


async def test_an_oversized_message_is_dead_lettered_as_a_prefix_with_size_and_digest(
    amqp_url: str,
) -> None:
    body = b'{"saga_id": "s-1", "padding": "' + b"x" * (1024 * 1024) + b'"}'
    async with started(amqp_url, max_message_bytes=64 * 1024) as transport:
        await publish_raw(amqp_url, [body])
        [delivery] = await take(transport, 1)
        await transport.dead_letter(delivery, "too_large: 1 MiB")

        [letter] = await all_letters(transport, 1)
    assert letter.body == body[:KEPT_BYTES]
    assert letter.headers[H_ORIGINAL_SIZE] == str(len(body))
    assert letter.headers[H_ORIGINAL_SHA256] == hashlib.sha256(body).hexdigest()
    assert letter.reason == "too_large: 1 MiB"
    assert letter.source_queue == TOPOLOGY.replies_queue


async def test_a_message_within_the_limit_is_dead_lettered_whole(amqp_url: str) -> None:
    body = b'{"saga_id": "s-1"}' + b" " * 2000
    async with started(amqp_url, max_message_bytes=64 * 1024) as transport:
        await publish_raw(amqp_url, [body])
        [delivery] = await take(transport, 1)
        await transport.dead_letter(delivery, "invalid")
        [letter] = await all_letters(transport, 1)
    assert letter.body == body
    assert H_ORIGINAL_SIZE not in letter.headers


async def test_twenty_5mb_replies_leave_twenty_small_dead_letters(
    amqp_url: str, pg_url: str
) -> None:
    """The review's case, on a running coordinator with the default limit (256 KiB)."""
    await migrate(pg_url)
    coordinator = Coordinator(
        [saga],
        store=PostgresSagaStore(pg_url),
        transport=RabbitMQTransport(amqp_url, TOPOLOGY, reconnect_delay=(0.1, 1.0)),
    )
    await coordinator.start()
    try:
        big = b'{"kind": "reply", "pad": "' + b"y" * (5 * 1024 * 1024) + b'"}'
        await publish_raw(amqp_url, [big] * 20)
        letters = await all_letters(coordinator.transport, 20)
    finally:
        await coordinator.stop()
    assert len(letters) == 20
    assert all(len(letter.body) == KEPT_BYTES for letter in letters)
    assert all(letter.reason.startswith("too_large") for letter in letters)
    assert sum(len(letter.body) for letter in letters) == 20 * KEPT_BYTES  # was 100 MiB


@pytest.mark.parametrize(
    ("options", "argument", "value"),
    [
        ({"dead_letter_max_messages": 3, "dead_letter_max_bytes": 0}, "x-max-length", 3),
        (
            {"dead_letter_max_messages": 0, "dead_letter_max_bytes": 3000},
            "x-max-length-bytes",
            3000,
        ),
    ],
    ids=["messages", "bytes"],
)
async def test_a_full_dead_letter_queue_refuses_and_the_message_stays_parked_in_its_queue(
    amqp_url: str, options: dict[str, int], argument: str, value: int
) -> None:
    bodies = [f'{{"n": {n}, "pad": "{"z" * 900}"}}'.encode() for n in range(6)]  # ~1 KB each
    async with started(amqp_url, **options) as transport:
        queues = await queue_stats(amqp_url)
        args = {name: v for name, _type, v in queues[TOPOLOGY.dead_letter_queue]["arguments"]}
        assert args[argument] == value
        assert args["x-overflow"] == "reject-publish"
        assert ("x-max-length" in args) == (argument == "x-max-length")

        await publish_raw(amqp_url, bodies)
        deliveries = await take(transport, len(bodies))
        for delivery in deliveries:
            await transport.dead_letter(delivery, "invalid: test")  # never raises here

        letters = await transport.dead_letters(100)
        # a quorum queue refuses once it is over its limit: it may hold one more
        assert 3 <= len(letters) <= 4
        parked = len(bodies) - len(letters)

        async def settled() -> dict[str, Any] | None:
            replies = (await queue_stats(amqp_url))[TOPOLOGY.replies_queue]
            return replies if replies["messages"] == parked else None

        # nothing lost: the refused ones are still in the replies queue, but
        # parked for dead-lettering, not ready for a consumer
        replies = await eventually(settled)
        assert replies is not None, await queue_stats(amqp_url)
        assert replies["messages_ready"] == 0
    # the oldest dead letters are the ones kept (no drop-head)
    assert [json.loads(letter.body)["n"] for letter in letters] == list(range(len(letters)))


async def test_an_existing_unbounded_dead_letter_queue_is_kept_and_a_policy_bounds_it(
    amqp_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A deployment from before the limit: its DLQ was declared without one, and
    RabbitMQ refuses to redeclare a queue with other arguments. The transport
    starts anyway and says so; a policy applies the limit without a redeclare."""
    connection = await aio_pika.connect(amqp_url)
    channel = await connection.channel()
    await channel.declare_queue(
        TOPOLOGY.dead_letter_queue, durable=True, arguments={"x-queue-type": "quorum"}
    )
    await connection.close()
    policy = json.dumps({"max-length": 2, "overflow": "reject-publish"})
    await rabbitmqctl("set_policy", "-p", vhost_of(amqp_url), "--apply-to", "queues",
                      "sagaflow-dlq", f"^{TOPOLOGY.dead_letter_queue}$", policy)  # fmt: skip
    await until_the_limit_holds(amqp_url, TOPOLOGY.dead_letter_queue)

    with caplog.at_level(logging.WARNING, logger="sagaflow.transport.rabbitmq"):
        async with started(amqp_url) as transport:
            await publish_raw(amqp_url, [b'{"n": %d}' % n for n in range(5)])
            for delivery in await take(transport, 5):
                await transport.dead_letter(delivery, "invalid: test")
            letters = await transport.dead_letters(100)
    assert 2 <= len(letters) <= 3
    warned = [r.getMessage() for r in caplog.records if "dead-letter queue" in r.getMessage()]
    assert warned and "policy" in warned[0]
    args = (await queue_stats(amqp_url))[TOPOLOGY.dead_letter_queue]["arguments"]
    assert {name for name, _type, _v in args} == {"x-queue-type"}
