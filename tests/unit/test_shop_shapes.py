"""The example shop's create-order saga uses a wait, a condition and a deadline-free
timeout the way a shop would: large orders wait for a manager, gift wrapping
only when asked. In memory, on the fake clock."""

from __future__ import annotations

import pytest

from sagaflow import SagaflowError, SagaStatus
from sagaflow.examples.shop.contracts import ManagerApproval
from sagaflow.examples.shop.saga import APPROVAL_TIMEOUT
from services.order.app import OrderStatus, place_order
from services.payment.app import SEED_BALANCES
from tests.unit.test_services_memory import Shop, shop  # noqa: F401 - the fixture

THRESHOLD = 10_000


async def _place(shop: Shop, **changes: object) -> str:  # noqa: F811
    from services.order.app import NewOrder

    new = NewOrder(
        customer_id="cust-1", sku="sku-widget", quantity=1, amount=1250, destination="DE"
    ).model_copy(update=changes)
    placed, _ = await place_order(
        shop.env.coordinator, shop.orders, new, approval_threshold=THRESHOLD
    )
    await shop.env.drain(fail_fast=True)
    return placed.saga_id


async def test_a_large_order_waits_for_the_manager_then_completes(shop: Shop) -> None:  # noqa: F811
    saga_id = await _place(shop, amount=20_000)
    state = await shop.env.get(saga_id)
    assert state.status is SagaStatus.RUNNING and state.waiting_for == "approval"
    assert shop.payments.balances["cust-1"] == SEED_BALANCES["cust-1"] - 20_000  # charged first
    client = shop.env.coordinator.client
    await client.signal_saga(
        saga_id, "approval", ManagerApproval(approved_by="ann"), by="ann", reason="known customer"
    )
    await shop.env.drain(fail_fast=True)
    state = await shop.env.get(saga_id)
    assert state.status is SagaStatus.COMPLETED and state.data["approved_by"] == "ann"
    order_id = state.data["order_id"]
    assert shop.orders.orders[order_id].status is OrderStatus.APPROVED


async def test_a_large_order_nobody_approves_is_rolled_back(shop: Shop) -> None:  # noqa: F811
    saga_id = await _place(shop, amount=20_000)
    await shop.env.advance(APPROVAL_TIMEOUT + 1)
    state = await shop.env.get(saga_id)
    assert state.status is SagaStatus.COMPENSATED
    assert state.failure is not None and state.failure.step == "approval"
    assert state.failure.cause == "timeout"
    assert await shop.compensations(saga_id) == ["charge", "reserve", "validate"]
    assert shop.payments.balances["cust-1"] == SEED_BALANCES["cust-1"]
    assert shop.orders.orders[state.data["order_id"]].status is OrderStatus.REJECTED
    with pytest.raises(SagaflowError, match="saga is COMPENSATED"):
        await shop.env.coordinator.client.signal_saga(
            saga_id, "approval", {"approved_by": "late"}, by="late", reason="too late"
        )


async def test_a_small_order_skips_the_approval_and_gift_wrap_runs_only_when_asked(
    shop: Shop,  # noqa: F811
) -> None:
    plain = await shop.env.get(await _place(shop))
    assert plain.status is SagaStatus.COMPLETED
    skipped = [shop.env.coordinator.registry.of(plain).steps[i].name for i in plain.skipped]  # type: ignore[union-attr]
    assert skipped == ["approval", "gift-wrap"]
    assert shop.shipping.wrapped == set()

    gift = await shop.env.get(await _place(shop, gift_wrap=True))
    assert gift.status is SagaStatus.COMPLETED and gift.data["wrap_id"] is not None
    assert shop.shipping.wrapped == {gift.data["order_id"]}


async def test_a_gift_wrap_is_undone_when_the_shipment_is_refused(shop: Shop) -> None:  # noqa: F811
    saga_id = await _place(shop, gift_wrap=True, destination="AQ")
    state = await shop.env.get(saga_id)
    assert state.status is SagaStatus.COMPENSATED
    assert await shop.compensations(saga_id) == ["gift-wrap", "charge", "reserve", "validate"]
    assert shop.shipping.wrapped == set()


async def test_the_demo_shows_each_outcome() -> None:
    from sagaflow.examples.shop.shapes_demo import run_shapes

    outcomes = {o.order: o for o in await run_shapes()}
    assert all(o.as_expected for o in outcomes.values())
    assert outcomes["demo-plain"].skipped == ("approval", "gift-wrap")
    assert outcomes["demo-unapproved"].status is SagaStatus.COMPENSATED
    assert outcomes["demo-unapproved"].undone == ("charge", "reserve", "validate")
    assert outcomes["demo-gift-refused"].undone == ("gift-wrap", "charge", "reserve", "validate")
    assert outcomes["demo-parallel"].status is SagaStatus.COMPLETED
    # out of stock while the charge ran alongside: the charge is refunded, the
    # refused reservation is not undone, then the order is rejected
    assert outcomes["demo-parallel-refused"].undone == ("charge", "validate")


async def test_the_parallel_saga_sends_reserve_and_charge_together() -> None:
    from sagaflow.examples.shop.saga import create_order_parallel
    from sagaflow.testing import SagaTestEnvironment
    from services.inventory.app import MemoryInventory
    from services.inventory.app import build as inventory
    from services.order.app import MemoryOrders, NewOrder
    from services.order.app import build as order
    from services.payment.app import MemoryPayments
    from services.payment.app import build as payment
    from services.shipping.app import MemoryShipping
    from services.shipping.app import build as shipping

    orders = MemoryOrders()
    participants = [
        order(orders),
        inventory(MemoryInventory()),
        payment(MemoryPayments()),
        shipping(MemoryShipping()),
    ]
    async with SagaTestEnvironment([create_order_parallel], participants) as env:
        new = NewOrder(
            customer_id="cust-1", sku="sku-widget", quantity=1, amount=700, destination="DE"
        )
        placed, _ = await place_order(env.coordinator, orders, new, saga=create_order_parallel)
        await env.drain(fail_fast=True)
        log = await env.log(placed.saga_id)
        state = await env.get(placed.saga_id)
    sent = [(e.step, e.at) for e in log if e.event == "command_sent"]
    (reserve_at,) = [at for step, at in sent if step == "reserve"]
    (charge_at,) = [at for step, at in sent if step == "charge"]
    assert reserve_at == charge_at  # one decision sent both
    assert state.status is SagaStatus.COMPLETED
    assert state.data["reservation_id"] and state.data["payment_id"]  # both merges kept
