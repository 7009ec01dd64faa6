"""Transports: ``RabbitMQTransport`` for production, ``InMemoryTransport`` for tests."""

from sagaflow.transport.memory import InMemoryTransport, MemoryDelivery
from sagaflow.transport.rabbitmq import RabbitMQDelivery, RabbitMQTransport

__all__ = ["InMemoryTransport", "MemoryDelivery", "RabbitMQDelivery", "RabbitMQTransport"]
