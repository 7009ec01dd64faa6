"""The inventory participant: ``inventory.reserve`` and its compensation ``inventory.release``.

Run it with ``sagaflow worker services.inventory.app:participant``. Its tables
live in the ``inventory`` schema::

    inventory.stock(sku pk, available)
    inventory.reservations(order_id pk, sku, quantity, status reserved|released)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from sagaflow import BusinessFailure, HandlerContext, Participant
from services import Connection, create_schema, repository
from services.contracts import (
    OrderRef,
    Reason,
    ReserveStock,
    StockReserved,
    Undone,
    release_stock,
    reserve_stock,
)

__all__ = ["SEED_STOCK", "MemoryInventory", "PostgresInventory", "build", "participant"]

SEED_STOCK: dict[str, int] = {
    "sku-widget": 1_000_000,
    "sku-gadget": 1_000_000,
    "sku-gizmo": 1_000_000,
    "sku-sold-out": 0,
}
"""Stock on hand when the service first starts."""


class Inventory(Protocol):
    """What the handlers need from storage."""

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


class PostgresInventory:
    """The inventory on the handler's connection (inside the inbox transaction)."""

    def __init__(self, connection: Connection) -> None:
        self.db = connection

    async def reserve(self, order_id: str, sku: str, quantity: int) -> str:
        # the natural key first: a second reserve for the order changes nothing
        inserted = await self.db.fetchval(
            "INSERT INTO inventory.reservations (order_id, sku, quantity, status)"
            " VALUES ($1, $2, $3, 'reserved') ON CONFLICT (order_id) DO NOTHING RETURNING 1",
            order_id,
            sku,
            quantity,
        )
        if inserted is None:
            return reservation_id(order_id)
        taken = await self.db.fetchval(
            "UPDATE inventory.stock SET available = available - $2"
            " WHERE sku = $1 AND available >= $2 RETURNING 1",
            sku,
            quantity,
        )
        if taken is None:  # the framework's savepoint rolls the reservation row back
            known = await self.db.fetchval("SELECT 1 FROM inventory.stock WHERE sku = $1", sku)
            raise BusinessFailure(Reason.OUT_OF_STOCK if known else Reason.UNKNOWN_SKU)
        return reservation_id(order_id)

    async def release(self, order_id: str) -> bool:
        row = await self.db.fetchrow(
            "UPDATE inventory.reservations SET status = 'released'"
            " WHERE order_id = $1 AND status = 'reserved' RETURNING sku, quantity",
            order_id,
        )
        if row is None:
            return False
        await self.db.execute(
            "UPDATE inventory.stock SET available = available + $2 WHERE sku = $1",
            row["sku"],
            row["quantity"],
        )
        return True


@dataclass
class Reservation:
    sku: str
    quantity: int
    status: str = "reserved"


@dataclass
class MemoryInventory:
    """The inventory in memory; one per participant instance (see :func:`build`)."""

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


SCHEMA = """
CREATE TABLE IF NOT EXISTS inventory.stock (
    sku text PRIMARY KEY,
    available bigint NOT NULL CHECK (available >= 0)
);
CREATE TABLE IF NOT EXISTS inventory.reservations (
    order_id text PRIMARY KEY,
    sku text NOT NULL REFERENCES inventory.stock (sku),
    quantity integer NOT NULL CHECK (quantity > 0),
    status text NOT NULL CHECK (status IN ('reserved', 'released'))
);
"""


async def setup(connection: Connection | None) -> None:
    """Create the ``inventory`` schema and seed the stock (a no-op in memory)."""
    if connection is None:
        return
    await create_schema(connection, "inventory", SCHEMA)
    await connection.executemany(
        "INSERT INTO inventory.stock (sku, available) VALUES ($1, $2) ON CONFLICT DO NOTHING",
        list(SEED_STOCK.items()),
    )


def build(memory: MemoryInventory | None = None) -> Participant:
    """The inventory participant; ``memory`` is its state when run in memory."""
    participant = Participant("inventory", setup=setup)
    inventory: Callable[[HandlerContext], Inventory] = repository(
        memory or MemoryInventory(), PostgresInventory
    )

    @participant.handler(reserve_stock)
    async def reserve(command: ReserveStock, ctx: HandlerContext) -> StockReserved:
        rid = await inventory(ctx).reserve(command.order_id, command.sku, command.quantity)
        return StockReserved(reservation_id=rid)

    @participant.handler(release_stock)
    async def release(command: OrderRef, ctx: HandlerContext) -> Undone:
        return Undone(undone=await inventory(ctx).release(command.order_id))

    return participant


participant = build()
