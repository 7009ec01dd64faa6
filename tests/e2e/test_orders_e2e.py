"""The example shop end to end: real processes, RabbitMQ, PostgreSQL, orders over HTTP.

Each service's own tables are the judge: whatever the saga log says, the stock,
the money and the shipments must add up.
"""

from __future__ import annotations

import asyncio
from collections import Counter

import asyncpg
import pytest
from rich.console import Console

from sagaflow import SagaStatus
from services.demo import SCENARIOS, demo_orders, print_result, run_embedded, run_real
from services.inventory.app import SEED_STOCK
from services.payment.app import SEED_BALANCES
from services.stack import Stack

pytestmark = pytest.mark.e2e


async def test_orders_settle_and_every_service_adds_up(stack: Stack, pg_url: str) -> None:
    plan = demo_orders(40, seed=5)
    placed = await asyncio.gather(
        *(stack.place_order(**new.model_dump(exclude_none=True)) for _, new in plan)
    )
    scenario = {p["order_id"]: kind for p, (kind, _) in zip(placed, plan, strict=True)}
    assert all(p["status"] == "PENDING" for p in placed)

    states = await stack.wait_settled([p["saga_id"] for p in placed], timeout=90)

    approved, rejected = set(), set()
    for p in placed:
        state, kind = states[p["saga_id"]], scenario[p["order_id"]]
        if kind == "success":
            assert state.status is SagaStatus.COMPLETED, state
            approved.add(p["order_id"])
        else:
            assert state.status is SagaStatus.COMPENSATED, state
            assert state.failure is not None and state.failure.reason == kind
            rejected.add(p["order_id"])
    assert approved and rejected

    conn = await asyncpg.connect(pg_url)
    try:
        orders = {
            r["order_id"]: r["status"]
            for r in await conn.fetch('SELECT order_id, status FROM "order".orders')
        }
        reservations = await conn.fetch("SELECT * FROM inventory.reservations")
        charges = await conn.fetch("SELECT * FROM payment.charges")
        shipments = await conn.fetch("SELECT * FROM shipping.shipments")
        stock = {
            r["sku"]: r["available"] for r in await conn.fetch("SELECT * FROM inventory.stock")
        }
        balances = {
            r["customer_id"]: r["balance"]
            for r in await conn.fetch("SELECT * FROM payment.accounts")
        }
    finally:
        await conn.close()

    assert orders == {**dict.fromkeys(approved, "APPROVED"), **dict.fromkeys(rejected, "REJECTED")}
    # approved: exactly one reservation, charge and shipment each, all in effect
    for rows, live in ((reservations, "reserved"), (charges, "charged"), (shipments, "scheduled")):
        in_effect = Counter(r["order_id"] for r in rows if r["status"] == live)
        assert in_effect == Counter(approved)
        # rejected: anything they did was undone (the order id is the primary key: at most one)
        assert {r["order_id"] for r in rows} - approved <= rejected
    # stock + reserved = seed; balances + net charges = seed
    for sku, seed in SEED_STOCK.items():
        held = sum(
            r["quantity"] for r in reservations if r["sku"] == sku and r["status"] == "reserved"
        )
        assert stock[sku] + held == seed
    for customer, seed in SEED_BALANCES.items():
        paid = sum(
            r["amount"]
            for r in charges
            if r["customer_id"] == customer and r["status"] == "charged"
        )
        assert balances[customer] + paid == seed

    # the API shows the outcome, and why an order was rejected
    for p in placed[:10]:
        shown = await stack.get_order(p["order_id"])
        kind = scenario[p["order_id"]]
        assert shown["status"] == ("APPROVED" if kind == "success" else "REJECTED")
        assert shown["reason"] == (None if kind == "success" else kind)


async def test_a_client_retry_with_the_same_order_id_places_one_order(stack: Stack) -> None:
    order = {
        "order_id": "retry-1", "customer_id": "cust-4", "sku": "sku-gadget", "quantity": 2,
        "amount": 700, "destination": "JP",
    }  # fmt: skip
    first, again = await asyncio.gather(stack.place_order(**order), stack.place_order(**order))
    assert first["saga_id"] == again["saga_id"]
    await stack.wait_settled([first["saga_id"]], timeout=30)
    assert (await stack.get_order("retry-1"))["status"] == "APPROVED"
    response = await stack.http.post("/orders", json={**order, "amount": 1})
    assert response.status_code == 409


async def test_the_embedded_demo_returns_the_expected_mix() -> None:
    result = await run_embedded(orders=60)

    assert result.ok
    assert {o.scenario for o in result.outcomes} == set(SCENARIOS)
    assert Counter(o.status for o in result.outcomes)[SagaStatus.COMPLETED] >= 30


async def test_the_real_demo_runs_on_real_processes(amqp_url: str, pg_url: str) -> None:
    console = Console(record=True, width=120)
    result = await run_real(12, amqp_url, pg_url, console=console)

    assert result.mode == "real" and len(result.outcomes) == 12
    assert result.ok, [o for o in result.outcomes if not o.as_expected]
    assert [e.event for e in result.timeline][-1] == "saga_compensated"
    print_result(result, console)
    assert "sagas/s" in console.export_text()


async def test_a_killed_worker_is_restarted_and_its_sagas_finish(stack: Stack) -> None:
    await stack.kill("payment")  # SIGKILL: no goodbye to the broker or the database
    assert not stack.alive("payment")
    plan = demo_orders(8, seed=9)
    placed = [await stack.place_order(**new.model_dump(exclude_none=True)) for _, new in plan]

    await stack.restart("payment")
    states = await stack.wait_settled([p["saga_id"] for p in placed], timeout=60)

    assert all(s.status in (SagaStatus.COMPLETED, SagaStatus.COMPENSATED) for s in states.values())
    assert await stack.stop("payment") == 0  # SIGTERM: a graceful exit
