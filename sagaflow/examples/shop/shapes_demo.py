"""The demo's second part: the create-order saga's shapes, one order each, on a
fake clock (so that a day without an approval passes in a moment): its
reservation and payment in one parallel group (every order), its wait for a
manager's approval and its conditional gift wrapping, and what each undoes.

``sagaflow demo`` runs it after the stream of orders (:func:`run_shapes`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from rich.console import Console
from rich.table import Table

from sagaflow import SagaStatus
from sagaflow.examples.shop.contracts import ManagerApproval
from sagaflow.examples.shop.demo import undo_order
from sagaflow.examples.shop.participants import (
    MemoryInventory,
    MemoryOrders,
    MemoryPayments,
    MemoryShipping,
    NewOrder,
    in_memory,
    inventory_participant,
    order_participant,
    payment_participant,
    place_order,
    shipping_participant,
)
from sagaflow.examples.shop.saga import APPROVAL_TIMEOUT, SAGAS, create_order
from sagaflow.testing import SagaTestEnvironment

__all__ = ["APPROVAL_THRESHOLD", "ShapeOutcome", "print_shapes", "run_shapes"]

APPROVAL_THRESHOLD = 100_000
"""Orders of this many cents or more wait for a manager (the order API's
``ORDER_APPROVAL_THRESHOLD`` does the same for the real service)."""


@dataclass(frozen=True)
class ShapeOutcome:
    """How one order of the showcase ended, and which steps it skipped and undid."""

    order: str
    story: str
    status: SagaStatus
    skipped: tuple[str, ...]
    undone: tuple[str, ...]
    expected: SagaStatus

    @property
    def as_expected(self) -> bool:
        return self.status is self.expected


_BASE = NewOrder(customer_id="cust-1", sku="sku-widget", quantity=1, amount=2_500, destination="DE")


async def run_shapes() -> list[ShapeOutcome]:
    """Place one order per shape and let each end (a day passes for the unapproved one)."""
    orders = MemoryOrders()
    participants = [
        order_participant(in_memory(orders)),
        inventory_participant(in_memory(MemoryInventory())),
        payment_participant(in_memory(MemoryPayments())),
        shipping_participant(in_memory(MemoryShipping())),
    ]
    names = [step.name for step in create_order.steps]
    outcomes: list[ShapeOutcome] = []
    async with SagaTestEnvironment(SAGAS, participants) as env:

        async def place(order_id: str, **changes: Any) -> str:
            new = _BASE.model_copy(update={"order_id": order_id, **changes})
            placed, _ = await place_order(
                env.coordinator, orders, new, approval_threshold=APPROVAL_THRESHOLD
            )
            await env.drain()
            return placed.saga_id

        plan: list[tuple[str, str, dict[str, Any], SagaStatus]] = [
            ("plain", "a small order: no approval, no gift wrap", {}, SagaStatus.COMPLETED),
            ("gift", "gift wrap asked for", {"gift_wrap": True}, SagaStatus.COMPLETED),
            ("approved", "a large order, approved", {"amount": 250_000}, SagaStatus.COMPLETED),
            (
                "unapproved",
                f"a large order nobody approves ({APPROVAL_TIMEOUT / 3600:g} h)",
                {"amount": 250_000},
                SagaStatus.COMPENSATED,
            ),
            (
                "gift-refused",
                "gift wrapped, then shipping refused",
                {"gift_wrap": True, "destination": "AQ"},
                SagaStatus.COMPENSATED,
            ),
            (
                "out-of-stock",
                "out of stock: the charge made alongside is refunded",
                {"sku": "sku-sold-out"},
                SagaStatus.COMPENSATED,
            ),
            (
                "payment-refused",
                "payment refused: the reservation made alongside is released",
                {"customer_id": "cust-broke"},
                SagaStatus.COMPENSATED,
            ),
        ]
        sagas = {name: await place(f"demo-{name}", **dict(changes)) for name, _, changes, _ in plan}
        await env.coordinator.client.signal_saga(
            sagas["approved"],
            "approval",
            ManagerApproval(approved_by="ann", note="known customer"),
            by="ann",
            reason="known customer",
        )
        await env.drain()
        await env.advance(APPROVAL_TIMEOUT + 1)  # the unapproved order's wait times out
        for name, story, _, expected in plan:
            state = await env.get(sagas[name])
            undone = tuple(
                str(e.step) for e in await env.log(sagas[name]) if e.event == "compensation_sent"
            )
            outcomes.append(
                ShapeOutcome(
                    order=f"demo-{name}",
                    story=story,
                    status=state.status,
                    skipped=tuple(names[i] for i in state.skipped),
                    undone=undone,
                    expected=expected,
                )
            )
    return outcomes


def print_shapes(outcomes: Sequence[ShapeOutcome], console: Console) -> None:
    """A table: each order, what it shows, how it ended, what it skipped and undid."""
    table = Table(title="one parallel group, a manager's approval, conditional steps (fake clock)")
    for column in ("order", "shows", "status", "skipped", "undone, in order (+: together)"):
        table.add_column(column, no_wrap=column in ("order", "status"))
    for o in outcomes:
        color = "green" if o.status is SagaStatus.COMPLETED else "yellow"
        if not o.as_expected:
            color = "red"
        table.add_row(
            o.order,
            o.story,
            f"[{color}]{o.status.value}[/]",
            ", ".join(o.skipped),
            undo_order(o.undone, {create_order.steps[i].name for i in create_order.groups}),
        )
    console.print(table)
