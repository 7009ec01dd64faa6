"""Which broker node is tried next, and the pauses between tries."""

from __future__ import annotations

import pytest

from sagaflow.core.errors import ConfigurationError
from sagaflow.transport.rabbitmq_nodes import Nodes

CLUSTER = "amqp://u:pw@rmq1:5672,rmq2:5673,rmq3:5674/vh"


def _host(nodes: Nodes) -> str:
    return nodes.url.rsplit("@", 1)[1].split("/")[0]


def test_failures_move_through_every_node_before_backing_off() -> None:
    nodes = Nodes(CLUSTER, (0.2, 1.0))
    seen, pauses = [], []
    for _ in range(9):
        seen.append(_host(nodes))
        nodes.failed()
        pauses.append(nodes.next())
    # each node once per round, in turn
    assert sorted(seen[:3]) == ["rmq1:5672", "rmq2:5673", "rmq3:5674"]
    assert seen[3:6] == seen[:3] and seen[6:] == seen[:3]
    # short pauses inside a round; after a whole round, the back-off, doubled per round
    assert pauses == [0.2, 0.2, 0.2, 0.2, 0.2, 0.4, 0.2, 0.2, 0.8]


def test_a_session_that_ran_starts_a_fresh_round() -> None:
    nodes = Nodes(CLUSTER, (0.2, 1.0))
    for _ in range(6):
        nodes.failed()
        nodes.next()
    assert nodes.backoff == 0.8
    nodes.connected()
    assert nodes.backoff == 0.2 and nodes.next() == 0.2


def test_one_node_is_the_plain_back_off_capped_at_the_longest() -> None:
    nodes = Nodes("amqp://guest:guest@localhost:5672/", (0.5, 2.0))
    pauses = []
    for _ in range(4):
        nodes.failed()
        pauses.append(nodes.next())
    assert pauses == [0.5, 1.0, 2.0, 2.0]
    assert "guest:guest" not in nodes.redacted[0] and "localhost:5672" in nodes.redacted[0]


def test_an_invalid_node_url_is_refused_at_once() -> None:
    with pytest.raises(ConfigurationError, match="invalid AMQP URL"):
        Nodes("amqp://u:pw@rmq1:5672,rmq2:notaport/vh", (0.2, 1.0))
