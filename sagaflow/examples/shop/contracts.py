"""The contract between the create-order saga and its participants.

Commands and replies are pydantic models; each ``Action`` names the service
that serves it. The saga (:mod:`sagaflow.examples.shop.saga`) and the
participants (:mod:`sagaflow.examples.shop.participants`, and the repository's
``services/``) both import this module, so a command the saga builds is
exactly what the handler receives, validated on both sides.

Compensations take an :class:`OrderRef` and answer :class:`Undone`: undoing is
keyed by the order id alone, which every participant stores as its natural key.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated

from pydantic import BaseModel, Field

from sagaflow import Action

__all__ = [
    "ChargePayment",
    "GiftWrapped",
    "ManagerApproval",
    "OrderId",
    "OrderRef",
    "OrderStatusReply",
    "PaymentCharged",
    "Reason",
    "ReserveStock",
    "ScheduleShipment",
    "ShipmentScheduled",
    "StockReserved",
    "Undone",
    "approve_order",
    "cancel_shipment",
    "charge_payment",
    "refund_payment",
    "reject_order",
    "release_stock",
    "reserve_stock",
    "schedule_shipment",
    "unwrap_gift",
    "validate_order",
    "wrap_gift",
]

OrderId = Annotated[str, Field(min_length=1, max_length=100)]


class Reason(StrEnum):
    """Business failure reasons the participants report (``BusinessFailure(reason)``)."""

    UNKNOWN_ORDER = "unknown_order"
    ORDER_NOT_PENDING = "order_not_pending"
    UNKNOWN_SKU = "unknown_sku"
    OUT_OF_STOCK = "out_of_stock"
    UNKNOWN_CUSTOMER = "unknown_customer"
    INSUFFICIENT_FUNDS = "insufficient_funds"
    UNSUPPORTED_DESTINATION = "unsupported_destination"


# --------------------------------------------------------------------------- shared


class OrderRef(BaseModel):
    """Names an order: the command of order actions and of every compensation."""

    order_id: OrderId


class Undone(BaseModel):
    """A compensation's reply: whether there was something to undo."""

    undone: bool


# --------------------------------------------------------------------------- order


class OrderStatusReply(BaseModel):
    """The order's status after an order action."""

    status: str


validate_order = Action("order", "validate", OrderRef, OrderStatusReply)
reject_order = Action("order", "reject", OrderRef, Undone)
approve_order = Action("order", "approve", OrderRef, OrderStatusReply)

# --------------------------------------------------------------------------- inventory


class ReserveStock(BaseModel):
    order_id: OrderId
    sku: str = Field(min_length=1, max_length=100)
    quantity: int = Field(ge=1)


class StockReserved(BaseModel):
    reservation_id: str


reserve_stock = Action("inventory", "reserve", ReserveStock, StockReserved)
release_stock = Action("inventory", "release", OrderRef, Undone)

# --------------------------------------------------------------------------- payment


class ChargePayment(BaseModel):
    order_id: OrderId
    customer_id: str = Field(min_length=1, max_length=100)
    amount: int = Field(ge=1, description="in cents")


class PaymentCharged(BaseModel):
    payment_id: str


charge_payment = Action("payment", "charge", ChargePayment, PaymentCharged)
refund_payment = Action("payment", "refund", OrderRef, Undone)

# --------------------------------------------------------------------------- shipping


class ScheduleShipment(BaseModel):
    order_id: OrderId
    destination: str = Field(min_length=2, max_length=8)


class ShipmentScheduled(BaseModel):
    shipment_id: str


schedule_shipment = Action("shipping", "schedule", ScheduleShipment, ShipmentScheduled)
cancel_shipment = Action("shipping", "cancel", OrderRef, Undone)


class GiftWrapped(BaseModel):
    wrap_id: str


# a conditional step: only for orders that ask for it
wrap_gift = Action("shipping", "wrap", OrderRef, GiftWrapped)
unwrap_gift = Action("shipping", "unwrap", OrderRef, Undone)

# --------------------------------------------------------------------------- signals


class ManagerApproval(BaseModel):
    """The signal ``approval``: a manager approved a large order (not a message:
    sent through the order API or ``sagaflow sagas signal``)."""

    approved_by: str = Field(min_length=1, max_length=100)
    note: str = Field(default="", max_length=500)
