"""The example services in memory: every create-order outcome, and what it leaves behind."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest

from sagaflow import SagaStatus
from sagaflow.testing import SagaTestEnvironment
from services.demo import SCENARIOS, demo_orders, run_embedded
from services.inventory.app import SEED_STOCK, MemoryInventory
from services.inventory.app import build as inventory
from services.order.app import (
    MemoryOrders,
    NewOrder,
    Order,
    OrderConflict,
    OrderStatus,
    place_order,
)
from services.order.app import build as order
from services.order.saga import CHAIN_SAGAS, SAGAS, chain_saga
from services.payment.app import SEED_BALANCES, MemoryPayments
from services.payment.app import build as payment
from services.shipping.app import MemoryShipping
from services.shipping.app import build as shipping


@dataclass
class Shop:
    env: SagaTestEnvironment
    orders: MemoryOrders
    inventory: MemoryInventory
    payments: MemoryPayments
    shipping: MemoryShipping

    async def place(self, **changes: object) -> Order:
        new = NewOrder(
            customer_id="cust-1", sku="sku-widget", quantity=3, amount=1250, destination="DE"
        ).model_copy(update=changes)
        placed, created = await place_order(self.env.coordinator, self.orders, new)
        assert created
        await self.env.drain(fail_fast=True)
        return placed

    async def compensations(self, saga_id: str) -> list[str]:
        return [
            str(entry.step)
            for entry in await self.env.log(saga_id)
            if entry.event == "compensation_sent"
        ]


@pytest.fixture
async def shop() -> AsyncIterator[Shop]:
    orders, stock, payments, shipments = (
        MemoryOrders(),
        MemoryInventory(),
        MemoryPayments(),
        MemoryShipping(),
    )
    participants = [order(orders), inventory(stock), payment(payments), shipping(shipments)]
    async with SagaTestEnvironment([*SAGAS, *CHAIN_SAGAS], participants) as env:
        yield Shop(env, orders, stock, payments, shipments)


async def test_an_order_that_succeeds_reserves_charges_ships_and_is_approved(shop: Shop) -> None:
    placed = await shop.place()

    state = await shop.env.get(placed.saga_id)
    assert state.status is SagaStatus.COMPLETED
    assert state.data["reservation_id"] == f"res-{placed.order_id}"
    assert state.data["payment_id"] == f"pay-{placed.order_id}"
    assert state.data["shipment_id"] == f"shp-{placed.order_id}"
    assert shop.orders.orders[placed.order_id].status is OrderStatus.APPROVED
    assert shop.inventory.stock["sku-widget"] == SEED_STOCK["sku-widget"] - 3
    assert shop.inventory.reservations[placed.order_id].status == "reserved"
    assert shop.payments.balances["cust-1"] == SEED_BALANCES["cust-1"] - 1250
    assert shop.shipping.shipments[placed.order_id].status == "scheduled"
    assert await shop.compensations(placed.saga_id) == []


async def test_out_of_stock_rejects_the_order_and_refunds_the_charge(shop: Shop) -> None:
    placed = await shop.place(sku="sku-sold-out")

    state = await shop.env.get(placed.saga_id)
    assert state.status is SagaStatus.COMPENSATED
    assert state.failure is not None
    assert (state.failure.step, state.failure.reason) == ("reserve", "out_of_stock")
    assert shop.orders.orders[placed.order_id].status is OrderStatus.REJECTED
    assert shop.inventory.reservations == {}
    # the charge ran alongside the refused reservation (one parallel group): refunded
    assert shop.payments.charges[placed.order_id].status == "refunded"
    assert shop.payments.balances == SEED_BALANCES
    assert await shop.compensations(placed.saga_id) == ["charge", "validate"]


async def test_insufficient_funds_releases_the_stock(shop: Shop) -> None:
    # reserved alongside the refused charge (one parallel group): released
    placed = await shop.place(customer_id="cust-broke")

    state = await shop.env.get(placed.saga_id)
    assert state.status is SagaStatus.COMPENSATED
    assert state.failure is not None and state.failure.reason == "insufficient_funds"
    assert shop.inventory.reservations[placed.order_id].status == "released"
    assert shop.inventory.stock == SEED_STOCK
    assert shop.payments.balances == SEED_BALANCES
    assert shop.orders.orders[placed.order_id].status is OrderStatus.REJECTED
    assert await shop.compensations(placed.saga_id) == ["reserve", "validate"]


async def test_unsupported_destination_refunds_and_releases_in_reverse_order(shop: Shop) -> None:
    placed = await shop.place(destination="AQ")

    state = await shop.env.get(placed.saga_id)
    assert state.status is SagaStatus.COMPENSATED
    assert state.failure is not None
    assert (state.failure.step, state.failure.reason) == ("schedule", "unsupported_destination")
    assert shop.payments.charges[placed.order_id].status == "refunded"
    assert shop.payments.balances == SEED_BALANCES
    assert shop.inventory.reservations[placed.order_id].status == "released"
    assert shop.inventory.stock == SEED_STOCK
    assert shop.shipping.shipments == {}
    assert shop.orders.orders[placed.order_id].status is OrderStatus.REJECTED
    # the group's two branches are undone together (their compensations sent in
    # one decision), then validate
    assert await shop.compensations(placed.saga_id) == ["charge", "reserve", "validate"]


async def test_a_mix_of_orders_adds_up(shop: Shop) -> None:
    placed: list[tuple[str, Order]] = []
    for kind, new in demo_orders(40, seed=3):
        order_, _ = await place_order(shop.env.coordinator, shop.orders, new)
        placed.append((kind, order_))
    await shop.env.drain(fail_fast=True)

    approved = [o for kind, o in placed if kind == "success"]
    for kind, o in placed:
        state = await shop.env.get(o.saga_id)
        expected = SagaStatus.COMPLETED if kind == "success" else SagaStatus.COMPENSATED
        assert state.status is expected
        if kind != "success":
            assert state.failure is not None and state.failure.reason == kind
    # stock: seed = available + what approved orders hold
    for sku, seed in SEED_STOCK.items():
        held = sum(o.quantity for o in approved if o.sku == sku)
        assert shop.inventory.stock[sku] + held == seed
    # money: seed = balance + what approved orders paid
    for customer, seed in SEED_BALANCES.items():
        paid = sum(o.amount for o in approved if o.customer_id == customer)
        assert shop.payments.balances[customer] + paid == seed
    live = {oid for oid, s in shop.shipping.shipments.items() if s.status == "scheduled"}
    assert live == {o.order_id for o in approved}


async def test_a_client_retry_places_the_order_once(shop: Shop) -> None:
    new = NewOrder(
        order_id="o-retry", customer_id="cust-2", sku="sku-gadget", quantity=1, amount=99,
        destination="US",
    )  # fmt: skip
    first, created = await place_order(shop.env.coordinator, shop.orders, new)
    again, created_again = await place_order(shop.env.coordinator, shop.orders, new)
    await shop.env.drain(fail_fast=True)

    assert (created, created_again) == (True, False)
    assert again.saga_id == first.saga_id
    assert shop.payments.balances["cust-2"] == SEED_BALANCES["cust-2"] - 99
    with pytest.raises(OrderConflict):
        await place_order(shop.env.coordinator, shop.orders, new.model_copy(update={"amount": 1}))


async def test_compensations_are_idempotent_and_tolerate_nothing_to_undo() -> None:
    stock, payments, shipments = MemoryInventory(), MemoryPayments(), MemoryShipping()
    assert await stock.release("never-reserved") is False
    assert await payments.refund("never-charged") is False
    assert await shipments.cancel("never-scheduled") is False
    await stock.reserve("o1", "sku-gizmo", 2)
    assert await stock.release("o1") is True
    assert await stock.release("o1") is False
    assert stock.stock == SEED_STOCK


async def test_a_chain_saga_undoes_every_step_when_the_last_fails(shop: Shop) -> None:
    saga = next(s for s in CHAIN_SAGAS if len(s.steps) == 6)
    data = {
        "order_id": "bench-1", "customer_id": "cust-3", "sku": "sku-gizmo", "quantity": 1,
        "amount": 10, "destination": "US",
    }  # fmt: skip
    ok = await shop.env.start_saga(saga, data)
    await shop.env.drain(fail_fast=True)
    assert (await shop.env.get(ok.saga_id)).status is SagaStatus.COMPLETED
    assert {f"bench-1.{i}" for i in (0, 3)} == set(shop.inventory.reservations)

    failing = await shop.env.start_saga(saga, {**data, "order_id": "bench-2", "destination": "AQ"})
    await shop.env.drain(fail_fast=True)
    state = await shop.env.get(failing.saga_id)
    assert state.status is SagaStatus.COMPENSATED
    # the first schedule step fails: what ran before it is undone, last first
    assert await shop.compensations(failing.saga_id) == ["charge-1", "reserve-0"]
    assert shop.inventory.stock["sku-gizmo"] == SEED_STOCK["sku-gizmo"] - 2  # bench-1 only
    assert [len(chain_saga(n).steps) for n in (3, 12)] == [3, 12]


async def test_the_embedded_demo_shows_every_outcome() -> None:
    result = await run_embedded(orders=60, seed=11)

    assert len(result.outcomes) == 60
    assert result.ok, [o for o in result.outcomes if not o.as_expected]
    assert {o.scenario for o in result.outcomes} == set(SCENARIOS)
    assert result.timeline and result.timeline[-1].event == "saga_compensated"
    assert result.throughput > 0
