"""The shop's four participants: their handlers and business rules, storage kept apart.

Each participant's handlers get their storage per call from a *repository*
function, ``ctx -> storage``: :func:`in_memory` gives the same in-memory object
every time (the embedded demo, unit tests); the repository's ``services/``
passes one that works on the handler's PostgreSQL connection, so the effect
commits with the inbox record of the command. Everything a handler decides is
here once, whichever storage it runs on.

``place_order`` is the one way an order is placed: it inserts the order and
starts its create-order saga, atomically where the storage has transactions.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol, TypeVar

from pydantic import BaseModel, Field

from sagaflow import BusinessFailure, Coordinator, HandlerContext, Participant, Saga, SagaClient
from sagaflow.examples.shop.contracts import (
    ChargePayment,
    GiftWrapped,
    OrderId,
    OrderRef,
    OrderStatusReply,
    PaymentCharged,
    Reason,
    ReserveStock,
    ScheduleShipment,
    ShipmentScheduled,
    StockReserved,
    Undone,
    approve_order,
    cancel_shipment,
    charge_payment,
    refund_payment,
    reject_order,
    release_stock,
    reserve_stock,
    schedule_shipment,
    unwrap_gift,
    validate_order,
    wrap_gift,
)
from sagaflow.examples.shop.saga import OrderData, create_order

__all__ = [
    "SEED_BALANCES",
    "SEED_DESTINATIONS",
    "SEED_STOCK",
    "Inventory",
    "MemoryInventory",
    "MemoryOrders",
    "MemoryPayments",
    "MemoryShipping",
    "NewOrder",
    "Order",
    "OrderConflict",
    "OrderStatus",
    "Orders",
    "Payments",
    "Setup",
    "Shipping",
    "in_memory",
    "inventory_participant",
    "order_participant",
    "payment_id",
    "payment_participant",
    "place_order",
    "reservation_id",
    "shipment_id",
    "shipping_participant",
    "wrap_id",
]

R = TypeVar("R")

Setup = Callable[[Any], Awaitable[None]]
"""A participant's ``setup``: called once per worker start with its database
connection (``None`` on the in-memory store)."""


def in_memory(storage: R) -> Callable[[HandlerContext], R]:
    """A repository function that always answers ``storage``."""

    def pick(ctx: HandlerContext) -> R:
        return storage

    return pick


# --------------------------------------------------------------------------- inventory

SEED_STOCK: dict[str, int] = {
    "sku-widget": 1_000_000,
    "sku-gadget": 1_000_000,
    "sku-gizmo": 1_000_000,
    "sku-sold-out": 0,
}
"""Stock on hand when the service first starts."""


class Inventory(Protocol):
    """What the inventory handlers need from storage."""

    async def reserve(self, order_id: str, sku: str, quantity: int) -> str:
        """Take ``quantity`` of ``sku`` for the order; returns the reservation id.

        Raises:
            BusinessFailure: ``unknown_sku`` or ``out_of_stock``.
        """
        ...

    async def release(self, order_id: str) -> bool:
        """Put the order's reserved stock back; False when nothing was reserved."""
        ...


def reservation_id(order_id: str) -> str:
    return f"res-{order_id}"


@dataclass
class Reservation:
    sku: str
    quantity: int
    status: str = "reserved"


@dataclass
class MemoryInventory:
    """The inventory in memory; one per participant instance."""

    stock: dict[str, int] = field(default_factory=lambda: dict(SEED_STOCK))
    reservations: dict[str, Reservation] = field(default_factory=dict)

    async def reserve(self, order_id: str, sku: str, quantity: int) -> str:
        if order_id not in self.reservations:
            if sku not in self.stock:
                raise BusinessFailure(Reason.UNKNOWN_SKU)
            if self.stock[sku] < quantity:
                raise BusinessFailure(Reason.OUT_OF_STOCK)
            self.stock[sku] -= quantity
            self.reservations[order_id] = Reservation(sku, quantity)
        return reservation_id(order_id)

    async def release(self, order_id: str) -> bool:
        reservation = self.reservations.get(order_id)
        if reservation is None or reservation.status != "reserved":
            return False
        reservation.status = "released"
        self.stock[reservation.sku] += reservation.quantity
        return True


def inventory_participant(
    inventory: Callable[[HandlerContext], Inventory], *, setup: Setup | None = None
) -> Participant:
    """The inventory participant: ``inventory.reserve`` and ``inventory.release``."""
    participant = Participant("inventory", setup=setup)

    @participant.handler(reserve_stock)
    async def reserve(command: ReserveStock, ctx: HandlerContext) -> StockReserved:
        rid = await inventory(ctx).reserve(command.order_id, command.sku, command.quantity)
        return StockReserved(reservation_id=rid)

    @participant.handler(release_stock)
    async def release(command: OrderRef, ctx: HandlerContext) -> Undone:
        return Undone(undone=await inventory(ctx).release(command.order_id))

    return participant


# --------------------------------------------------------------------------- payment

SEED_BALANCES: dict[str, int] = {
    **{f"cust-{n}": 10_000_000_000 for n in range(1, 6)},
    "cust-broke": 0,
}
"""Account balances in cents when the service first starts."""


class Payments(Protocol):
    """What the payment handlers need from storage."""

    async def charge(self, order_id: str, customer_id: str, amount: int) -> str:
        """Debit the customer for the order; returns the payment id.

        Raises:
            BusinessFailure: ``unknown_customer`` or ``insufficient_funds``.
        """
        ...

    async def refund(self, order_id: str) -> bool:
        """Credit the order's charge back; False when nothing was charged."""
        ...


def payment_id(order_id: str) -> str:
    return f"pay-{order_id}"


@dataclass
class Charge:
    customer_id: str
    amount: int
    status: str = "charged"


@dataclass
class MemoryPayments:
    """Payments in memory; one per participant instance."""

    balances: dict[str, int] = field(default_factory=lambda: dict(SEED_BALANCES))
    charges: dict[str, Charge] = field(default_factory=dict)

    async def charge(self, order_id: str, customer_id: str, amount: int) -> str:
        if order_id not in self.charges:
            if customer_id not in self.balances:
                raise BusinessFailure(Reason.UNKNOWN_CUSTOMER)
            if self.balances[customer_id] < amount:
                raise BusinessFailure(Reason.INSUFFICIENT_FUNDS)
            self.balances[customer_id] -= amount
            self.charges[order_id] = Charge(customer_id, amount)
        return payment_id(order_id)

    async def refund(self, order_id: str) -> bool:
        charge = self.charges.get(order_id)
        if charge is None or charge.status != "charged":
            return False
        charge.status = "refunded"
        self.balances[charge.customer_id] += charge.amount
        return True


def payment_participant(
    payments: Callable[[HandlerContext], Payments], *, setup: Setup | None = None
) -> Participant:
    """The payment participant: ``payment.charge`` and ``payment.refund``."""
    participant = Participant("payment", setup=setup)

    @participant.handler(charge_payment)
    async def charge(command: ChargePayment, ctx: HandlerContext) -> PaymentCharged:
        pid = await payments(ctx).charge(command.order_id, command.customer_id, command.amount)
        return PaymentCharged(payment_id=pid)

    @participant.handler(refund_payment)
    async def refund(command: OrderRef, ctx: HandlerContext) -> Undone:
        return Undone(undone=await payments(ctx).refund(command.order_id))

    return participant


# --------------------------------------------------------------------------- shipping

SEED_DESTINATIONS: frozenset[str] = frozenset({"US", "CA", "GB", "DE", "FR", "JP"})
"""Countries the service ships to; anything else (``AQ``...) is refused."""


class Shipping(Protocol):
    """What the shipping handlers need from storage."""

    async def schedule(self, order_id: str, destination: str) -> str:
        """Schedule the order's shipment; returns the shipment id.

        Raises:
            BusinessFailure: ``unsupported_destination``.
        """
        ...

    async def cancel(self, order_id: str) -> bool:
        """Cancel the order's shipment; False when none was scheduled."""
        ...

    async def wrap(self, order_id: str) -> str:
        """Gift-wrap the order; returns the wrap id."""
        ...

    async def unwrap(self, order_id: str) -> bool:
        """Undo the gift wrap; False when the order was not wrapped."""
        ...


def wrap_id(order_id: str) -> str:
    return f"wrap-{order_id}"


def shipment_id(order_id: str) -> str:
    return f"shp-{order_id}"


@dataclass
class Shipment:
    destination: str
    status: str = "scheduled"


@dataclass
class MemoryShipping:
    """Shipments in memory; one per participant instance."""

    destinations: set[str] = field(default_factory=lambda: set(SEED_DESTINATIONS))
    shipments: dict[str, Shipment] = field(default_factory=dict)
    wrapped: set[str] = field(default_factory=set)
    unwrapped: set[str] = field(default_factory=set)  # undone: a late wrap changes nothing

    async def schedule(self, order_id: str, destination: str) -> str:
        if destination not in self.destinations:
            raise BusinessFailure(Reason.UNSUPPORTED_DESTINATION)
        self.shipments.setdefault(order_id, Shipment(destination))
        return shipment_id(order_id)

    async def cancel(self, order_id: str) -> bool:
        shipment = self.shipments.get(order_id)
        if shipment is None or shipment.status != "scheduled":
            return False
        shipment.status = "cancelled"
        return True

    async def wrap(self, order_id: str) -> str:
        if order_id not in self.unwrapped:  # as the table's row keeps its status
            self.wrapped.add(order_id)
        return wrap_id(order_id)

    async def unwrap(self, order_id: str) -> bool:
        if order_id not in self.wrapped:
            return False
        self.wrapped.discard(order_id)
        self.unwrapped.add(order_id)
        return True


def shipping_participant(
    shipping: Callable[[HandlerContext], Shipping], *, setup: Setup | None = None
) -> Participant:
    """The shipping participant: ``shipping.schedule`` and ``shipping.cancel``,
    ``shipping.wrap`` and ``shipping.unwrap`` (gift wrapping)."""
    participant = Participant("shipping", setup=setup)

    @participant.handler(schedule_shipment)
    async def schedule(command: ScheduleShipment, ctx: HandlerContext) -> ShipmentScheduled:
        sid = await shipping(ctx).schedule(command.order_id, command.destination)
        return ShipmentScheduled(shipment_id=sid)

    @participant.handler(cancel_shipment)
    async def cancel(command: OrderRef, ctx: HandlerContext) -> Undone:
        return Undone(undone=await shipping(ctx).cancel(command.order_id))

    @participant.handler(wrap_gift)
    async def wrap(command: OrderRef, ctx: HandlerContext) -> GiftWrapped:
        return GiftWrapped(wrap_id=await shipping(ctx).wrap(command.order_id))

    @participant.handler(unwrap_gift)
    async def unwrap(command: OrderRef, ctx: HandlerContext) -> Undone:
        return Undone(undone=await shipping(ctx).unwrap(command.order_id))

    return participant


# --------------------------------------------------------------------------- order


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
    gift_wrap: bool = False


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
        # gift_wrap is a saga option, not a column of the order row
        fields = set(NewOrder.model_fields) - {"order_id", "gift_wrap"}
        return self.model_dump(include=fields) == new.model_dump(include=fields)


class OrderConflict(Exception):
    """A client reused an order id with a different order."""


class Orders(Protocol):
    """The order table: read by the API, written by ``place_order`` and the handlers."""

    @property
    def connection(self) -> Any:
        """The database transaction the saga must start in (``None`` in memory)."""
        ...

    async def insert(self, order: Order) -> Order | None:
        """Add an order; returns the existing one instead when its id is taken."""
        ...

    async def get(self, order_id: str) -> Order | None: ...

    async def settle(self, order_id: str, status: OrderStatus) -> OrderStatus | None:
        """Move a PENDING order to ``status``; returns the status after (None: no order)."""
        ...


@dataclass
class MemoryOrders:
    """Orders in memory; one per participant instance."""

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


async def place_order(
    client: SagaClient | Coordinator,
    orders: Orders,
    new: NewOrder,
    *,
    approval_threshold: int | None = None,
    saga: Saga[OrderData] = create_order,
) -> tuple[Order, bool]:
    """Insert the order and start its create-order saga, atomically.

    An order of ``approval_threshold`` cents or more waits for a manager's
    approval (the signal ``approval``) after its payment is charged. ``saga``
    is the definition started: the latest, ``create_order`` (v2), by default.

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
        **new.model_dump(exclude={"order_id", "gift_wrap"}),
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
    data = OrderData.model_validate(
        {
            **order.model_dump(exclude={"status", "saga_id", "created_at"}),
            "gift_wrap": new.gift_wrap,
            "needs_approval": approval_threshold is not None and new.amount >= approval_threshold,
        }
    )
    await client.start_saga(saga, data, saga_id=order.saga_id, connection=orders.connection)
    return order, True


def order_participant(
    orders: Callable[[HandlerContext], Orders], *, setup: Setup | None = None
) -> Participant:
    """The order participant: ``order.validate``, ``order.reject`` and ``order.approve``."""
    participant = Participant("order", setup=setup)

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
