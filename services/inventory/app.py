"""The inventory participant: ``inventory.reserve`` and its compensation ``inventory.release``.

Run it with ``sagaflow worker services.inventory.app:participant``. Its tables
live in the ``inventory`` schema::

    inventory.stock(sku pk, available)
    inventory.reservations(order_id pk, sku, quantity, status reserved|released)
"""

from __future__ import annotations

from collections.abc import Callable

from sagaflow import BusinessFailure, HandlerContext, Participant
from sagaflow.examples.shop.contracts import Reason
from sagaflow.examples.shop.participants import (
    SEED_STOCK,
    Inventory,
    MemoryInventory,
    inventory_participant,
    reservation_id,
)
from services import Connection, create_schema, repository

__all__ = ["SEED_STOCK", "MemoryInventory", "PostgresInventory", "build", "participant"]


class PostgresInventory:
    """The inventory on the handler's connection (inside the inbox transaction)."""

    def __init__(self, connection: Connection) -> None:
        self.db = connection

    async def reserve(self, order_id: str, sku: str, quantity: int) -> str:
        # an unknown SKU is a refusal, as in memory: checked before the reservation
        # row, whose foreign key would otherwise fail (an error, retried in vain)
        known = await self.db.fetchval("SELECT 1 FROM inventory.stock WHERE sku = $1", sku)
        if known is None:
            raise BusinessFailure(Reason.UNKNOWN_SKU)
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
            raise BusinessFailure(Reason.OUT_OF_STOCK)
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
    """The inventory participant; ``memory`` is its state when run in memory.

    The handlers are the example shop's
    (:func:`sagaflow.examples.shop.participants.inventory_participant`); this
    service adds the PostgreSQL storage and its schema.
    """
    inventory: Callable[[HandlerContext], Inventory] = repository(
        memory or MemoryInventory(), PostgresInventory
    )
    return inventory_participant(inventory, setup=setup)


participant = build()
