"""A URL naming several broker nodes, against the real broker: a node that does
not answer is skipped for the next, whichever the transport tried first.

The node that dies mid-run is the cluster scenarios' subject
(tests/faults/test_cluster_rabbitmq.py); here the other nodes are ports
nobody listens on.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import uuid

import pytest

from sagaflow.core.errors import TransportError
from sagaflow.core.messages import Envelope, MessageKind
from sagaflow.core.ports import Delivery, Topology
from sagaflow.transport import RabbitMQTransport
from services.stack import free_port

pytestmark = pytest.mark.integration

TOPOLOGY = Topology(prefix="nodes", delivery_limit=3)


def with_dead_nodes(amqp_url: str, dead: int) -> str:
    scheme, rest = amqp_url.split("://", 1)
    userinfo, _, after = rest.rpartition("@")
    host, _, vhost = after.partition("/")
    hosts = [f"127.0.0.1:{free_port()}" for _ in range(dead)] + [host]
    return f"{scheme}://{userinfo}@{','.join(hosts)}/{vhost}"


async def test_the_live_node_is_found_among_dead_ones(amqp_url: str) -> None:
    url = with_dead_nodes(amqp_url, dead=2)
    received: asyncio.Queue[Delivery] = asyncio.Queue()
    for _ in range(3):  # the first node tried is random: try it a few times
        transport = RabbitMQTransport(url, TOPOLOGY, start_timeout=20, reconnect_delay=(0.05, 0.5))
        await transport.start(["inventory"])
        try:
            assert transport.is_connected
            await transport.consume(
                TOPOLOGY.service_queue("inventory"), received.put_nowait, prefetch=10
            )
            envelope = Envelope(
                message_id=f"m-{uuid.uuid4().hex[:8]}",
                command_id="c",
                saga_id="saga-1",
                saga_name="s",
                step="reserve",
                step_index=0,
                kind=MessageKind.COMMAND,
                attempt=1,
                type="inventory.reserve",
                payload={},
            )
            await transport.publish([envelope])
            delivery = await asyncio.wait_for(received.get(), 20)
            assert delivery.message.message_id == envelope.message_id
            await delivery.ack()
            assert transport.safe_url.split("@")[1].startswith(amqp_url.split("@")[1].split("/")[0])
        finally:
            await transport.close()


async def test_no_node_answering_fails_start_in_time(
    amqp_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    url = with_dead_nodes(amqp_url, dead=3).rsplit(",", 1)[0] + "/"
    ports = [host.rsplit(":", 1)[1] for host in url.split("@")[1].rstrip("/").split(",")]
    transport = RabbitMQTransport(url, TOPOLOGY, start_timeout=2, reconnect_delay=(0.05, 0.2))
    with (
        caplog.at_level(logging.WARNING, "sagaflow.transport.rabbitmq"),
        pytest.raises(TransportError, match="cannot connect to RabbitMQ"),
    ):
        await transport.start(["inventory"])
    # every node was tried, each in turn
    tried = [
        r.getMessage().split("@127.0.0.1:")[1].split("/")[0]
        for r in caplog.records
        if "cannot connect to RabbitMQ at" in r.getMessage()
    ]
    assert set(tried) == set(ports)
    assert all(a != b for a, b in itertools.pairwise(tried))
