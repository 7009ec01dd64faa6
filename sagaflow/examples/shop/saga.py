"""The create-order saga, declared as data.

::

    validate  (order)      compensation: reject   (order)
    in parallel (the group reserve-and-charge):
      reserve (inventory)  compensation: release  (inventory)
      charge  (payment)    compensation: refund   (payment)
    approval  (wait)       for orders above a threshold: the signal ``approval``
                           from a manager; none within APPROVAL_TIMEOUT: compensate
    gift-wrap (shipping)   only when asked; compensation: unwrap (shipping)
    schedule  (shipping)   compensation: cancel   (shipping)
    approve   (order)      retriable: cannot fail once the rest succeeded

That is ``create_order``, version 2. Version 1 (``create_order_v1``) reserved,
then charged, one after the other; it stays declared, unchanged, so that
sagas started on it finish on it. The coordinator loads both:
``sagaflow coordinator sagaflow.examples.shop.saga:SAGAS`` (or
``services.order.saga:SAGAS``, the same objects).
``chain_saga(n)`` builds longer sagas from the same actions for the benchmark.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, Field

from sagaflow import Action, Group, RetryPolicy, Saga, Step, Wait
from sagaflow.examples.shop.contracts import (
    ChargePayment,
    GiftWrapped,
    ManagerApproval,
    OrderId,
    OrderRef,
    PaymentCharged,
    ReserveStock,
    ScheduleShipment,
    ShipmentScheduled,
    StockReserved,
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

__all__ = [
    "APPROVAL_TIMEOUT",
    "CHAIN_SAGAS",
    "COMPENSATION_RETRY",
    "SAGAS",
    "STEP_RETRY",
    "STEP_TIMEOUT",
    "OrderData",
    "chain_3",
    "chain_6",
    "chain_12",
    "chain_saga",
    "create_order",
    "create_order_v1",
]

STEP_TIMEOUT = 10.0
"""Seconds a participant has to answer before the attempt counts as failed."""

STEP_RETRY = RetryPolicy(max_attempts=3, initial_backoff=0.2, max_backoff=2.0)
"""Transient errors (a database hiccup in a handler) are retried twice."""

COMPENSATION_RETRY = RetryPolicy(max_attempts=8, initial_backoff=0.5, max_backoff=10.0)
"""Compensations must succeed: about a minute of retries before an operator is needed."""

APPROVAL_TIMEOUT = 24 * 3600.0
"""Seconds a large order waits for a manager's approval before it is rolled back."""


class OrderData(BaseModel):
    """The create-order saga's data: the order, plus what the participants answered."""

    order_id: OrderId
    customer_id: str
    sku: str
    quantity: int = Field(ge=1)
    amount: int = Field(ge=1, description="in cents")
    destination: str
    reservation_id: str | None = None
    payment_id: str | None = None
    shipment_id: str | None = None
    needs_approval: bool = False  # set when the order is placed (its amount, a threshold)
    approved_by: str | None = None
    gift_wrap: bool = False
    wrap_id: str | None = None


def _order(d: OrderData) -> OrderRef:
    return OrderRef(order_id=d.order_id)


def _reserve(d: OrderData) -> ReserveStock:
    return ReserveStock(order_id=d.order_id, sku=d.sku, quantity=d.quantity)


def _charge(d: OrderData) -> ChargePayment:
    return ChargePayment(order_id=d.order_id, customer_id=d.customer_id, amount=d.amount)


def _schedule(d: OrderData) -> ScheduleShipment:
    return ScheduleShipment(order_id=d.order_id, destination=d.destination)


def _reserved(d: OrderData, reply: StockReserved) -> OrderData:
    return d.model_copy(update={"reservation_id": reply.reservation_id})


def _charged(d: OrderData, reply: PaymentCharged) -> OrderData:
    return d.model_copy(update={"payment_id": reply.payment_id})


def _scheduled(d: OrderData, reply: ShipmentScheduled) -> OrderData:
    return d.model_copy(update={"shipment_id": reply.shipment_id})


def _wrapped(d: OrderData, reply: GiftWrapped) -> OrderData:
    return d.model_copy(update={"wrap_id": reply.wrap_id})


def _needs_approval(d: OrderData) -> bool:
    return d.needs_approval


def _wants_gift_wrap(d: OrderData) -> bool:
    return d.gift_wrap


_validate_step: Step[OrderData] = Step(
    "validate",
    validate_order,
    _order,
    compensation=reject_order,
    retry=STEP_RETRY,
    compensation_retry=COMPENSATION_RETRY,
    timeout=STEP_TIMEOUT,
)
_reserve_step: Step[OrderData] = Step(
    "reserve",
    reserve_stock,
    _reserve,
    compensation=release_stock,
    compensation_command=_order,
    on_reply=_reserved,
    retry=STEP_RETRY,
    compensation_retry=COMPENSATION_RETRY,
    timeout=STEP_TIMEOUT,
)
_charge_step: Step[OrderData] = Step(
    "charge",
    charge_payment,
    _charge,
    compensation=refund_payment,
    compensation_command=_order,
    on_reply=_charged,
    retry=STEP_RETRY,
    compensation_retry=COMPENSATION_RETRY,
    timeout=STEP_TIMEOUT,
)
# everything after the payment, the same in both versions. Shared steps: a change
# of shape here (an action, a kind, a condition) would change version 1 too, and a
# coordinator would refuse it (tests/unit/test_shop_shapes.py pins v1's fingerprint);
# declare such a change as version 3 instead
_after_payment: list[Step[OrderData] | Wait[OrderData]] = [
    Wait(
        "approval",
        model=ManagerApproval,
        timeout=APPROVAL_TIMEOUT,
        when=_needs_approval,
    ),
    Step(
        "gift-wrap",
        wrap_gift,
        _order,
        compensation=unwrap_gift,
        on_reply=_wrapped,
        retry=STEP_RETRY,
        compensation_retry=COMPENSATION_RETRY,
        timeout=STEP_TIMEOUT,
        when=_wants_gift_wrap,
    ),
    Step(
        "schedule",
        schedule_shipment,
        _schedule,
        compensation=cancel_shipment,
        compensation_command=_order,
        on_reply=_scheduled,
        retry=STEP_RETRY,
        compensation_retry=COMPENSATION_RETRY,
        timeout=STEP_TIMEOUT,
    ),
    # after the last compensatable step: approving cannot be refused, only retried
    Step("approve", approve_order, _order, retriable=True, retry=STEP_RETRY, timeout=STEP_TIMEOUT),
]

create_order: Saga[OrderData] = Saga(
    "create-order",
    version=2,
    data=OrderData,
    steps=[
        _validate_step,
        # reserving stock and charging the card do not depend on each other: sent
        # together, and undone together when either (or a later step) fails
        Group("reserve-and-charge", [_reserve_step, _charge_step]),
        *_after_payment,
    ],
)
"""The saga new orders start: version 2, its reservation and payment in one group."""

create_order_v1: Saga[OrderData] = Saga(
    "create-order",
    version=1,
    data=OrderData,
    steps=[_validate_step, _reserve_step, _charge_step, *_after_payment],
)
"""The first version, reservation then payment, left as it was: a coordinator
loads it next to version 2 so that sagas started on it finish on it (a
definition never changes under a recorded fingerprint; docs/concepts.md)."""

SAGAS: list[Saga[OrderData]] = [create_order, create_order_v1]
"""Every version of create-order: what the coordinator loads
(``sagaflow coordinator services.order.saga:SAGAS``) and the order service's
``SagaClient`` registers; new orders start the latest, ``create_order``."""


def chain_saga(n: int) -> Saga[OrderData]:
    """A saga of ``n`` compensatable steps cycling reserve, charge, schedule (benchmark).

    Step ``i`` acts for the order ``<order_id>.<i>``, so every step has an
    effect and a compensation of its own. Its data is an ``OrderData`` as for
    create-order (a stocked sku, a customer with money, a served destination).
    """
    if n < 1:
        raise ValueError("a chain saga needs at least one step")
    return Saga(f"chain-{n}", data=OrderData, steps=[_chain_step(i) for i in range(n)])


def _chain_step(i: int) -> Step[OrderData]:
    action, command, compensation = _CHAIN[i % len(_CHAIN)]

    def forward(d: OrderData) -> BaseModel:
        return command(d.model_copy(update={"order_id": f"{d.order_id}.{i}"}))

    def undo(d: OrderData) -> OrderRef:
        return OrderRef(order_id=f"{d.order_id}.{i}")

    return Step(
        f"{action.name}-{i}",
        action,
        forward,
        compensation=compensation,
        compensation_command=undo,
        retry=STEP_RETRY,
        compensation_retry=COMPENSATION_RETRY,
        timeout=STEP_TIMEOUT,
    )


_CHAIN: list[tuple[Action[Any, Any], Callable[[OrderData], BaseModel], Action[Any, Any]]] = [
    (reserve_stock, _reserve, release_stock),
    (charge_payment, _charge, refund_payment),
    (schedule_shipment, _schedule, cancel_shipment),
]

chain_3 = chain_saga(3)
chain_6 = chain_saga(6)
chain_12 = chain_saga(12)
CHAIN_SAGAS = [chain_3, chain_6, chain_12]
"""Benchmark sagas: ``sagaflow coordinator services.order.saga:chain_3 ...``."""
