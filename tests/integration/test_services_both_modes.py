"""The example services, tested as a user would with the sagaflow pytest plugin:
in memory and on a real PostgreSQL database, with the same refusal reasons in
both, and the effects-once check over every handler."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import pytest
from pydantic import BaseModel

from sagaflow import Action, Participant, SagaStatus
from sagaflow.testing import SagaTestEnvironment, ThrowawayDatabase, check_effects_once
from sagaflow.testing.coverage import flat
from sagaflow.testing.plugin import postgres_url
from services.contracts import (
    validate_order,
)
from services.inventory.app import MemoryInventory
from services.inventory.app import build as inventory
from services.order.app import (
    MemoryOrders,
    NewOrder,
    Order,
    OrderStatus,
    PostgresOrders,
    place_order,
)
from services.order.app import build as order
from services.order.saga import OrderData, create_order
from services.payment.app import MemoryPayments
from services.payment.app import build as payment
from services.shipping.app import MemoryShipping
from services.shipping.app import build as shipping

pytestmark = pytest.mark.timeout(60)

EnvFactory = Callable[..., Any]
GOOD = NewOrder(customer_id="cust-1", sku="sku-widget", quantity=3, amount=1250, destination="DE")


@dataclass
class Shop:
    env: SagaTestEnvironment
    database: ThrowawayDatabase | None
    orders: MemoryOrders

    async def place(self, **changes: object) -> Order:
        new = GOOD.model_copy(update=changes)
        if self.database is None:
            placed, _ = await place_order(self.env.coordinator, self.orders, new)
        else:
            # In production the saga starts in the order's transaction; here its
            # store is in memory, so it starts once the order row committed.
            starts = _AfterCommit()
            conn = await self.database.connect()
            try:
                async with conn.transaction():
                    placed, _ = await place_order(starts, PostgresOrders(conn), new)  # type: ignore[arg-type]
            finally:
                await conn.close()
            for saga, data, saga_id in starts.calls:
                await self.env.start_saga(saga, data, saga_id=saga_id)
        await self.env.drain(fail_fast=True)
        return placed


class _AfterCommit:
    """Records the sagas ``place_order`` starts, to start them after the commit."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, Any, str]] = []

    async def start_saga(self, saga: Any, data: Any, *, saga_id: str, connection: Any) -> None:
        self.calls.append((saga, data, saga_id))


@pytest.fixture(params=["memory", "postgres"])
async def shop(request: pytest.FixtureRequest, saga_env: EnvFactory) -> AsyncIterator[Shop]:
    orders = MemoryOrders()
    participants = [
        order(orders),
        inventory(MemoryInventory()),
        payment(MemoryPayments()),
        shipping(MemoryShipping()),
    ]
    if request.param == "memory":
        yield Shop(await saga_env([create_order], participants), None, orders)
        return
    async with ThrowawayDatabase(postgres_url(request.config)) as database:
        env = await saga_env([create_order], participants, database=database)
        yield Shop(env, database, orders)


async def test_an_order_completes_every_step(shop: Shop) -> None:
    placed = await shop.place()

    history = await shop.env.assert_saga(
        placed.saga_id, status=SagaStatus.COMPLETED, compensations=[]
    )
    assert {"validate", "reserve", "charge", "schedule", "approve"} <= set(history.steps)
    if shop.database is not None:
        rows = await shop.database.fetch('SELECT status FROM "order".orders')
        assert rows == [{"status": "APPROVED"}]


@pytest.mark.parametrize(
    ("changes", "step", "reason", "undone"),
    [
        # reserve and charge run in one group: a refused one's sibling is undone
        ({"sku": "sku-unknown"}, "reserve", "unknown_sku", ["charge", "validate"]),
        ({"sku": "sku-sold-out"}, "reserve", "out_of_stock", ["charge", "validate"]),
        ({"customer_id": "cust-unknown"}, "charge", "unknown_customer", ["reserve", "validate"]),
        ({"customer_id": "cust-broke"}, "charge", "insufficient_funds", ["reserve", "validate"]),
        ({"destination": "AQ"}, "schedule", "unsupported_destination", ["charge", "reserve", "validate"]),
    ],
)  # fmt: skip
async def test_each_documented_refusal_has_the_same_reason_in_both_modes(
    shop: Shop, changes: dict[str, str], step: str, reason: str, undone: list[str]
) -> None:
    placed = await shop.place(**changes)

    history = await shop.env.assert_saga(
        placed.saga_id, status=SagaStatus.COMPENSATED, reason=reason
    )
    # (as sets: steps that run side by side are undone side by side)
    assert set(history.compensations) == set(undone)
    state = await shop.env.get(placed.saga_id)
    assert state.failure is not None and state.failure.step == step
    assert "retry_scheduled" not in history.events  # refused at once, never retried
    if shop.database is not None:
        leftovers = await shop.database.fetch(
            "SELECT 'reservation' AS what FROM inventory.reservations WHERE status = 'reserved'"
            " UNION ALL SELECT 'charge' FROM payment.charges WHERE status = 'charged'"
            " UNION ALL SELECT 'shipment' FROM shipping.shipments WHERE status = 'scheduled'"
        )
        assert leftovers == []


# ------------------------------------------------------------------ effects once

ORDER_ID = "o-effects"
ORDER_ROW = Order(
    order_id=ORDER_ID, customer_id="cust-2", sku="sku-gizmo", quantity=2, amount=700,
    destination="JP", status=OrderStatus.PENDING, saga_id="s-effects", created_at=0.0,
)  # fmt: skip
# every step's fields set, so that every step applies (a conditional one too)
DATA = OrderData.model_validate(
    {**ORDER_ROW.model_dump(), **{f: True for f in ("gift_wrap", "needs_approval")}}
)


def handlers() -> list[tuple[str, Action[Any, Any], BaseModel, Action[Any, Any] | None, Any]]:
    """Each step of the create-order saga that calls a participant: its service,
    action, command, compensation and the compensation's command, built from the
    definition itself (a step added to the saga is checked without a word here)."""
    found = []
    for step in flat(create_order.steps):
        action = getattr(step, "action", None)
        if action is None:
            continue  # a wait: nothing runs in a participant
        command = step.command(DATA)
        undo = step.compensation
        undo_command = None
        if undo is not None:
            build = step.compensation_command
            undo_command = (
                build(DATA) if build else undo.command.model_validate(command.model_dump())
            )
        found.append((action.service, action, command, undo, undo_command))
    return found


HANDLERS = handlers()
IDS = [action.type for _, action, *_ in HANDLERS]


def test_the_effects_check_covers_every_handler_of_the_services() -> None:
    checked = {a.type for _, a, *_ in HANDLERS} | {c.type for *_, c, _ in HANDLERS if c}
    every = {
        f"{p.service}.{name.split('.', 1)[1]}"
        for p in (order(), inventory(), payment(), shipping())
        for name in p.actions
    }
    assert checked == every


@pytest.mark.parametrize(
    ("service", "action", "command", "compensation", "undo"), HANDLERS, ids=IDS
)
async def test_every_handler_applies_its_effect_once_on_postgres(
    saga_database: ThrowawayDatabase,
    service: str,
    action: Action[Any, Any],
    command: BaseModel,
    compensation: Action[Any, Any] | None,
    undo: BaseModel | None,
) -> None:
    participant = {
        "order": order,
        "inventory": inventory,
        "payment": payment,
        "shipping": shipping,
    }[service]()
    if service == "order":
        await saga_database.setup([participant])
        conn = await saga_database.connect()
        try:
            await PostgresOrders(conn).insert(ORDER_ROW)
        finally:
            await conn.close()

    report = await check_effects_once(
        participant,
        action,
        command,
        compensation=compensation,
        compensation_command=undo,
        database=saga_database,
    )

    assert not any("refused" in answer for _, answer in report.answers[:2]), report
    assert report.changed_first or action in (validate_order,)  # validate only reads


@pytest.mark.parametrize(
    ("service", "action", "command", "compensation", "undo"), HANDLERS, ids=IDS
)
async def test_every_handler_applies_its_effect_once_in_memory(
    service: str,
    action: Action[Any, Any],
    command: BaseModel,
    compensation: Action[Any, Any] | None,
    undo: BaseModel | None,
) -> None:
    memory: Any
    build: Callable[[Any], Participant]
    memory, build = {
        "order": (MemoryOrders(orders={ORDER_ID: ORDER_ROW}), order),
        "inventory": (MemoryInventory(), inventory),
        "payment": (MemoryPayments(), payment),
        "shipping": (MemoryShipping(), shipping),
    }[service]

    report = await check_effects_once(
        build(memory),
        action,
        command,
        compensation=compensation,
        compensation_command=undo,
        state=lambda: vars(memory),
    )

    assert not any("refused" in answer for _, answer in report.answers[:2]), report
