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

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol

from pydantic import BaseModel, Field

from sagaflow import BusinessFailure, HandlerContext, Participant, SagaClient
from services import Connection, create_schema, repository
from services.contracts import (
    OrderId,
    OrderRef,
    OrderStatusReply,
    Reason,
    Undone,
    approve_order,
    reject_order,
    validate_order,
)
from services.order.saga import OrderData, create_order

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


class OrderStatus(StrEnum):
    PENDING = "PENDING"
    APPROVED = "APPROVED"
    REJECTED = "REJECTED"


class NewOrder(BaseModel):
    """An order as a client places it (the body of ``POST /orders``).

    ``order_id`` lets a client retry safely: the same id and body place the
    order once.
    """

    order_id: OrderId | None = None
    customer_id: str = Field(min_length=1, max_length=100)
    sku: str = Field(min_length=1, max_length=100)
    quantity: int = Field(ge=1, le=1000)
    amount: int = Field(ge=1, description="in cents")
    destination: str = Field(min_length=2, max_length=8)


class Order(BaseModel):
    """An order row."""

    order_id: str
    customer_id: str
    sku: str
    quantity: int
    amount: int
    destination: str
    status: OrderStatus
    saga_id: str
    created_at: float

    def same_request(self, new: NewOrder) -> bool:
        return self.model_dump(include=set(NewOrder.model_fields) - {"order_id"}) == new.model_dump(
            exclude={"order_id"}
        )


class OrderConflict(Exception):
    """A client reused an order id with a different order."""


class Orders(Protocol):
    """The order table: read by the API, written by ``place_order`` and the handlers."""

    @property
    def connection(self) -> Connection | None:
        """The transaction the saga must start in (``None`` in memory)."""
        ...

    async def insert(self, order: Order) -> Order | None:
        """Add an order; returns the existing one instead when its id is taken."""
        ...

    async def get(self, order_id: str) -> Order | None: ...

    async def settle(self, order_id: str, status: OrderStatus) -> OrderStatus | None:
        """Move a PENDING order to ``status``; returns the status after (None: no order)."""
        ...


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


@dataclass
class MemoryOrders:
    """Orders in memory; one per participant instance (see :func:`build`)."""

    orders: dict[str, Order] = field(default_factory=dict)
    connection: None = None

    async def insert(self, order: Order) -> Order | None:
        if order.order_id in self.orders:
            return self.orders[order.order_id]
        self.orders[order.order_id] = order
        return None

    async def get(self, order_id: str) -> Order | None:
        return self.orders.get(order_id)

    async def settle(self, order_id: str, status: OrderStatus) -> OrderStatus | None:
        order = self.orders.get(order_id)
        if order is None:
            return None
        if order.status is OrderStatus.PENDING:
            order = self.orders[order_id] = order.model_copy(update={"status": status})
        return order.status


async def place_order(client: SagaClient, orders: Orders, new: NewOrder) -> tuple[Order, bool]:
    """Insert the order and start its create-order saga, atomically.

    With PostgreSQL, ``orders`` works on a connection inside the caller's
    transaction and the saga joins it: both commit or neither does, and the
    coordinator's outbox relay sends the first command once it commits.

    Returns:
        The order and whether it was created now (False: a client retry of an
        order already placed; no second saga is started).

    Raises:
        OrderConflict: the order id is taken by a different order.
    """
    order_id = new.order_id or str(uuid.uuid4())
    order = Order(
        **new.model_dump(exclude={"order_id"}),
        order_id=order_id,
        status=OrderStatus.PENDING,
        saga_id=f"order-{order_id}",
        created_at=time.time(),
    )
    existing = await orders.insert(order)
    if existing is not None:
        if not existing.same_request(new):
            raise OrderConflict(f"order {order_id!r} exists with different contents")
        return existing, False
    data = OrderData.model_validate(order.model_dump(exclude={"status", "saga_id", "created_at"}))
    await client.start_saga(create_order, data, saga_id=order.saga_id, connection=orders.connection)
    return order, True


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
    """The order participant; ``memory`` holds the orders when run in memory."""
    participant = Participant("order", setup=setup)
    orders: Callable[[HandlerContext], Orders] = repository(
        memory or MemoryOrders(), PostgresOrders
    )

    @participant.handler(validate_order)
    async def validate(command: OrderRef, ctx: HandlerContext) -> OrderStatusReply:
        order = await orders(ctx).get(command.order_id)
        if order is None:
            raise BusinessFailure(Reason.UNKNOWN_ORDER)
        if order.status is not OrderStatus.PENDING:
            raise BusinessFailure(Reason.ORDER_NOT_PENDING)
        return OrderStatusReply(status=order.status)

    @participant.handler(reject_order)
    async def reject(command: OrderRef, ctx: HandlerContext) -> Undone:
        after = await orders(ctx).settle(command.order_id, OrderStatus.REJECTED)
        return Undone(undone=after is OrderStatus.REJECTED)

    @participant.handler(approve_order)
    async def approve(command: OrderRef, ctx: HandlerContext) -> OrderStatusReply:
        after = await orders(ctx).settle(command.order_id, OrderStatus.APPROVED)
        if after is None:  # cannot happen once validate passed; retried, then an operator looks
            raise LookupError(f"order {command.order_id!r} vanished")
        return OrderStatusReply(status=after)

    return participant


participant = build()
