"""Several broker nodes in one ``SAGAFLOW_AMQP_URL``: how the URL is read, shown
and turned into quorum-queue arguments (docs/scaling.md)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from sagaflow.config import Settings, broker_urls, redact_url
from sagaflow.core.ports import Topology
from sagaflow.transport.rabbitmq_topology import Declarations

CLUSTER = "amqp://app:s3cr%40t@rmq1:5672,rmq2:5673,rmq3/shop?heartbeat=10"


def test_one_host_is_left_as_it_is() -> None:
    url = "amqps://app:pw@broker:5671/shop?cafile=/ca.pem"
    assert broker_urls(url) == [url]


def test_each_node_keeps_the_user_vhost_and_options() -> None:
    assert broker_urls(CLUSTER) == [
        "amqp://app:s3cr%40t@rmq1:5672/shop?heartbeat=10",
        "amqp://app:s3cr%40t@rmq2:5673/shop?heartbeat=10",
        "amqp://app:s3cr%40t@rmq3/shop?heartbeat=10",
    ]


def test_a_password_with_a_comma_is_not_a_host_list() -> None:
    # the user info ends at the last "@": a comma before it is the password's
    assert broker_urls("amqp://app:a,b@rmq1,rmq2/") == [
        "amqp://app:a,b@rmq1/",
        "amqp://app:a,b@rmq2/",
    ]


def test_no_vhost_and_no_user() -> None:
    assert broker_urls("amqp://h1:1,h2:2") == ["amqp://h1:1", "amqp://h2:2"]


def test_settings_list_the_nodes_and_redact_them_all() -> None:
    settings = Settings(amqp_url=CLUSTER)
    assert [u.split("@")[1].split("/")[0] for u in settings.amqp_urls()] == [
        "rmq1:5672",
        "rmq2:5673",
        "rmq3",
    ]
    assert "s3cr" not in str(settings.redacted())
    assert redact_url(CLUSTER) == "amqp://app:******@rmq1:5672,rmq2:5673,rmq3/shop?heartbeat=10"


def test_a_bad_port_of_any_node_is_refused() -> None:
    with pytest.raises(ValidationError, match="port 'x'"):
        Settings(amqp_url="amqp://u:p@rmq1:5672,rmq2:x/")


def test_the_transport_takes_every_node() -> None:
    transport = Settings(amqp_url=CLUSTER).transport()
    assert sorted(u.rsplit("@", 1)[1] for u in transport.nodes) == [
        "rmq1:5672/shop?heartbeat=10",
        "rmq2:5673/shop?heartbeat=10",
        "rmq3/shop?heartbeat=10",
    ]
    assert "s3cr" not in transport.safe_url + "".join(transport.nodes)


def test_quorum_group_size_goes_on_every_quorum_queue() -> None:
    arguments = Settings(quorum_initial_group_size=3).transport()
    assert arguments.queue_arguments()["x-quorum-initial-group-size"] == 3
    assert arguments.dead_letter_arguments()["x-quorum-initial-group-size"] == 3


def test_without_a_group_size_the_broker_default_applies() -> None:
    declarations = Declarations(
        Topology(), declare=True, dead_letter_max_messages=0, dead_letter_max_bytes=0
    )
    assert "x-quorum-initial-group-size" not in declarations.queue_arguments()
    # no limits: no overflow argument either (as before)
    assert declarations.dead_letter_arguments() == {"x-queue-type": "quorum"}


def test_group_size_must_be_positive() -> None:
    with pytest.raises(ValidationError):
        Settings(quorum_initial_group_size=0)
