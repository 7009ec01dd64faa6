"""The order participant and the one way orders are placed.

``place_order`` inserts the order row and starts the create-order saga in one
transaction (the HTTP API and the embedded demo both call it). The saga then
calls back into this service: ``order.validate`` checks the row,
``order.reject`` (validate's compensation) and ``order.approve`` (the last,
retriable step) settle its status. Tables in the ``order`` schema (quoted:
``order`` is an SQL keyword)::

    "order".orders(order_id pk, customer_id, sku, quantity, amount, destination,
                   status PENDING|APPROVED|REJECTED, saga_id, created_at)

Why an order was rejected is not copied here: the saga's failure records it
(``SagaClient.get(saga_id).failure``) and the API reads it from there.
"""

from __future__ import annotations

from collections.abc import Callable

from sagaflow import HandlerContext, Participant
from sagaflow.examples.shop.participants import (
    MemoryOrders,
    NewOrder,
    Order,
    OrderConflict,
    Orders,
    OrderStatus,
    order_participant,
    place_order,
)
from services import Connection, create_schema, repository

__all__ = [
    "MemoryOrders",
    "NewOrder",
    "Order",
    "OrderConflict",
    "OrderStatus",
    "Orders",
    "PostgresOrders",
    "build",
    "participant",
    "place_order",
]


class PostgresOrders:
    """Orders on a connection inside a transaction."""

    def __init__(self, connection: Connection) -> None:
        self.connection = connection

    async def insert(self, order: Order) -> Order | None:
        inserted = await self.connection.fetchval(
            'INSERT INTO "order".orders (order_id, customer_id, sku, quantity, amount,'
            " destination, status, saga_id, created_at)"
            " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, to_timestamp($9))"
            " ON CONFLICT (order_id) DO NOTHING RETURNING 1",
            order.order_id,
            order.customer_id,
            order.sku,
            order.quantity,
            order.amount,
            order.destination,
            order.status.value,
            order.saga_id,
            order.created_at,
        )
        return None if inserted else await self.get(order.order_id)

    async def get(self, order_id: str) -> Order | None:
        row = await self.connection.fetchrow(
            "SELECT order_id, customer_id, sku, quantity, amount, destination, status, saga_id,"
            ' extract(epoch FROM created_at)::float8 AS created_at FROM "order".orders'
            " WHERE order_id = $1",
            order_id,
        )
        return None if row is None else Order.model_validate(dict(row))

    async def settle(self, order_id: str, status: OrderStatus) -> OrderStatus | None:
        # settling twice is harmless: the second update finds the order no longer PENDING
        after: str | None = await self.connection.fetchval(
            'WITH moved AS (UPDATE "order".orders SET status = $2'
            " WHERE order_id = $1 AND status = 'PENDING' RETURNING status)"
            ' SELECT status FROM moved UNION ALL SELECT status FROM "order".orders'
            " WHERE order_id = $1 AND NOT EXISTS (SELECT 1 FROM moved)",
            order_id,
            status.value,
        )
        return None if after is None else OrderStatus(after)


SCHEMA = """
CREATE TABLE IF NOT EXISTS "order".orders (
    order_id text PRIMARY KEY,
    customer_id text NOT NULL,
    sku text NOT NULL,
    quantity integer NOT NULL CHECK (quantity > 0),
    amount bigint NOT NULL CHECK (amount > 0),
    destination text NOT NULL,
    status text NOT NULL CHECK (status IN ('PENDING', 'APPROVED', 'REJECTED')),
    saga_id text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
"""


async def setup(connection: Connection | None) -> None:
    """Create the ``order`` schema (a no-op in memory)."""
    if connection is not None:
        await create_schema(connection, "order", SCHEMA)


def build(memory: MemoryOrders | None = None) -> Participant:
    """The order participant; ``memory`` holds the orders when run in memory.

    The handlers and ``place_order`` are the example shop's
    (:mod:`sagaflow.examples.shop.participants`); this service adds the
    PostgreSQL storage, its schema and the HTTP API (``services.order.api``).
    """
    orders: Callable[[HandlerContext], Orders] = repository(
        memory or MemoryOrders(), PostgresOrders
    )
    return order_participant(orders, setup=setup)


participant = build()
