"""The contract between the create-order saga and its participants.

The commands, replies and actions ship with sagaflow as the example shop
(:mod:`sagaflow.examples.shop.contracts`), so the embedded demo of an installed
sagaflow and these services speak exactly the same contract; this module
re-exports them under the services' names.
"""

from __future__ import annotations

from sagaflow.examples.shop.contracts import (
    ChargePayment,
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
    validate_order,
)

__all__ = [
    "ChargePayment",
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
    "validate_order",
]
