"""What sagaflow relies on in other libraries beyond their documented API.

Each test names what uses it and what to change if it fails: after upgrading
OpenTelemetry, aiormq or aio-pika, a failure here is the place to start, not a
mysterious hang or a missing span in production.
"""

from __future__ import annotations

import inspect

import aio_pika
import aiormq
import aiormq.abc
from opentelemetry import context


def test_opentelemetry_suppression_key() -> None:
    """``TracingHooks.queries`` (sagaflow/tracing.py) sets OpenTelemetry's private
    suppression key to switch the asyncpg instrumentation off for the worker's
    own statements and back on (``False``) for a handler's queries. The public
    ``suppress_instrumentation()`` can only switch it off."""
    from opentelemetry.instrumentation.utils import (
        is_instrumentation_enabled,
        suppress_instrumentation,
    )

    key = getattr(context, "_SUPPRESS_INSTRUMENTATION_KEY", None)
    assert key is not None, (
        "opentelemetry.context._SUPPRESS_INSTRUMENTATION_KEY is gone: change "
        "TracingHooks.queries in sagaflow/tracing.py to the new way to suppress instrumentation"
    )
    with suppress_instrumentation():
        assert context.get_value(key) is True, "suppress_instrumentation() uses another key"
    token = context.attach(context.set_value(key, True))
    try:
        assert not is_instrumentation_enabled(), "the key no longer suppresses instrumentation"
        inner = context.attach(context.set_value(key, False))
        try:
            assert is_instrumentation_enabled(), "a False key no longer re-enables instrumentation"
        finally:
            context.detach(inner)
    finally:
        context.detach(token)


def test_aiormq_publish_and_ack_take_wait() -> None:
    """``confirmed`` and ``Acks._send`` (sagaflow/transport/amqp.py) pass
    ``wait=False`` to the concrete ``aiormq.Channel`` (it is not on the abstract
    class): frames are queued without waiting for the writer."""
    for method in ("basic_publish", "basic_ack", "basic_nack"):
        parameters = inspect.signature(getattr(aiormq.Channel, method)).parameters
        assert "wait" in parameters, (
            f"aiormq.Channel.{method} lost its wait= parameter: drop wait=False in "
            "sagaflow/transport/amqp.py (and re-measure the publish path)"
        )


def test_aiormq_consumer_cancel_callbacks() -> None:
    """``RabbitMQTransport._subscribe`` learns of a broker's consumer cancel (a deleted
    queue) through the underlying channel's ``on_consumer_cancel_callbacks``."""
    annotations = inspect.get_annotations(aiormq.abc.AbstractChannel)
    assert "on_consumer_cancel_callbacks" in annotations, (
        "aiormq channels no longer expose on_consumer_cancel_callbacks: the RabbitMQ "
        "adapter would not re-subscribe after a queue is deleted (see _subscribe)"
    )


def test_aiormq_matches_returned_messages_by_message_id() -> None:
    """``waves`` (sagaflow/transport/amqp.py) keeps two messages with one id out
    of the same wave because aiormq matches a returned (unroutable) message to its
    publish by message id. If that changed, ``_waves`` may be unnecessary: check."""
    source = inspect.getsource(aiormq.Channel)
    assert "message_id_delivery_tag" in source, (
        "aiormq no longer matches returns by message id: revisit _waves in "
        "sagaflow/transport/amqp.py"
    )


def test_aio_pika_wraps_aiormq_deliveries() -> None:
    """``RabbitMQDelivery`` reads aiormq's ``DeliveredMessage`` directly and builds
    ``aio_pika.IncomingMessage(raw, no_ack=False)`` only when asked; channels give
    their aiormq channel through ``get_underlay_channel``."""
    fields = (
        set(inspect.get_annotations(aiormq.abc.DeliveredMessage))
        | set(getattr(aiormq.abc.DeliveredMessage, "_fields", ()))
        | set(getattr(aiormq.abc.DeliveredMessage, "__slots__", ()))
    )
    for name in ("delivery", "header", "body", "channel"):
        assert name in fields, f"aiormq's DeliveredMessage lost {name!r}: see RabbitMQDelivery"
    parameters = inspect.signature(aio_pika.IncomingMessage).parameters
    assert list(parameters)[:2] == ["message", "no_ack"], (
        "aio_pika.IncomingMessage(message, no_ack) changed: see RabbitMQDelivery.message"
    )
    assert hasattr(aio_pika.abc.AbstractChannel, "get_underlay_channel"), (
        "aio-pika channels lost get_underlay_channel(): the RabbitMQ adapter publishes, "
        "acks and consumes on the aiormq channel it returns"
    )
