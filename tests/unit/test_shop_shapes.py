"""The example shop's create-order saga uses a parallel group, a wait, a condition
and a timeout the way a shop would: reservation and payment together, large
orders wait for a manager, gift wrapping only when asked. Version 1 (the same
steps in a line) still runs the sagas started on it. In memory, on the fake
clock."""

from __future__ import annotations

import pytest

from sagaflow import SagaflowError, SagaStatus
from sagaflow.examples.shop.contracts import ManagerApproval
from sagaflow.examples.shop.saga import APPROVAL_TIMEOUT
from sagaflow.testing import SagaTestEnvironment
from services.inventory.app import MemoryInventory
from services.inventory.app import build as inventory
from services.order.app import MemoryOrders, NewOrder, OrderStatus, place_order
from services.order.app import build as order
from services.order.saga import SAGAS, create_order, create_order_v1
from services.payment.app import SEED_BALANCES, MemoryPayments
from services.payment.app import build as payment
from services.shipping.app import MemoryShipping
from services.shipping.app import build as shipping
from tests.unit.test_services_memory import Shop, shop  # noqa: F401 - the fixture

THRESHOLD = 10_000


async def _place(shop: Shop, **changes: object) -> str:  # noqa: F811
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
    # out of stock while the charge ran alongside: the charge is refunded, the
    # refused reservation is not undone, then the order is rejected; and the
    # other way round for a refused payment
    assert outcomes["demo-out-of-stock"].undone == ("charge", "validate")
    assert outcomes["demo-payment-refused"].undone == ("reserve", "validate")


def _shop_env() -> tuple[MemoryOrders, SagaTestEnvironment]:
    orders = MemoryOrders()
    participants = [
        order(orders),
        inventory(MemoryInventory()),
        payment(MemoryPayments()),
        shipping(MemoryShipping()),
    ]
    return orders, SagaTestEnvironment(SAGAS, participants)


_SMALL = NewOrder(customer_id="cust-1", sku="sku-widget", quantity=1, amount=700, destination="DE")


async def test_create_order_sends_reserve_and_charge_together() -> None:
    orders, environment = _shop_env()
    async with environment as env:
        placed, _ = await place_order(env.coordinator, orders, _SMALL)  # the latest version
        await env.drain(fail_fast=True)
        log = await env.log(placed.saga_id)
        state = await env.get(placed.saga_id)
    assert state.saga_version == create_order.version == 2
    sent = [(e.step, e.at) for e in log if e.event == "command_sent"]
    (reserve_at,) = [at for step, at in sent if step == "reserve"]
    (charge_at,) = [at for step, at in sent if step == "charge"]
    assert reserve_at == charge_at  # one decision sent both
    assert state.status is SagaStatus.COMPLETED
    assert state.data["reservation_id"] and state.data["payment_id"]  # both merges kept


def test_version_1_is_left_as_it_was() -> None:
    """Sagas started before version 2 existed recorded this fingerprint; a
    coordinator refuses to start if v1 no longer matches it (docs/concepts.md)."""
    assert (create_order_v1.name, create_order_v1.version) == (create_order.name, 1)
    assert create_order_v1.fingerprint == "db9f3c3684135b52"
    assert create_order_v1.groups == {}
    assert [s.name for s in create_order_v1.steps] == [s.name for s in create_order.steps]


async def test_a_saga_started_on_version_1_finishes_on_version_1() -> None:
    """The upgrade: a large order started on v1 waits for its approval while the
    coordinator now loads both versions; approved, it finishes on v1 (reserve,
    then charge), and a new order starts v2."""
    orders, environment = _shop_env()
    async with environment as env:
        old, _ = await place_order(
            env.coordinator, orders, _SMALL.model_copy(update={"amount": 20_000}),
            approval_threshold=THRESHOLD, saga=create_order_v1,
        )  # fmt: skip
        await env.drain(fail_fast=True)
        assert (await env.get(old.saga_id)).waiting_for == "approval"
        new, _ = await place_order(env.coordinator, orders, _SMALL)
        await env.coordinator.client.signal_saga(
            old.saga_id, "approval", ManagerApproval(approved_by="ann"), by="ann", reason="ok"
        )
        await env.drain(fail_fast=True)
        v1, v2 = await env.get(old.saga_id), await env.get(new.saga_id)
        log = await env.log(old.saga_id)
    assert (v1.saga_version, v1.status) == (1, SagaStatus.COMPLETED)
    assert v1.fingerprint == create_order_v1.fingerprint
    assert (v2.saga_version, v2.status) == (2, SagaStatus.COMPLETED)
    # one command in flight at a time on v1: charge only after reserve answered
    events = [(e.event, e.step) for e in log if e.event in ("command_sent", "reply_received")]
    at = events.index(("command_sent", "charge"))
    assert ("reply_received", "reserve") in events[:at]


def test_the_demo_joins_steps_undone_together() -> None:
    from sagaflow.examples.shop.demo import undo_order

    group = {"charge", "reserve"}
    assert undo_order(["schedule", "charge", "reserve", "validate"], group) == (
        "schedule, charge + reserve, validate"
    )
    assert undo_order(["charge", "validate"], group) == "charge, validate"
