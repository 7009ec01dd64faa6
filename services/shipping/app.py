"""The shipping participant: ``shipping.schedule`` and its compensation ``shipping.cancel``.

Run it with ``sagaflow worker services.shipping.app:participant``. Its tables
live in the ``shipping`` schema::

    shipping.destinations(code pk)
    shipping.shipments(order_id pk, destination, status scheduled|cancelled)
    shipping.gift_wraps(order_id pk, status wrapped|unwrapped)
"""

from __future__ import annotations

from collections.abc import Callable

from sagaflow import BusinessFailure, HandlerContext, Participant
from sagaflow.examples.shop.contracts import Reason
from sagaflow.examples.shop.participants import (
    SEED_DESTINATIONS,
    MemoryShipping,
    Shipping,
    shipment_id,
    shipping_participant,
    wrap_id,
)
from services import Connection, create_schema, repository

__all__ = ["SEED_DESTINATIONS", "MemoryShipping", "PostgresShipping", "build", "participant"]


class PostgresShipping:
    """Shipments on the handler's connection (inside the inbox transaction)."""

    def __init__(self, connection: Connection) -> None:
        self.db = connection

    async def schedule(self, order_id: str, destination: str) -> str:
        known = await self.db.fetchval(
            "SELECT 1 FROM shipping.destinations WHERE code = $1", destination
        )
        if known is None:
            raise BusinessFailure(Reason.UNSUPPORTED_DESTINATION)
        await self.db.execute(
            "INSERT INTO shipping.shipments (order_id, destination, status)"
            " VALUES ($1, $2, 'scheduled') ON CONFLICT (order_id) DO NOTHING",
            order_id,
            destination,
        )
        return shipment_id(order_id)

    async def cancel(self, order_id: str) -> bool:
        cancelled = await self.db.fetchval(
            "UPDATE shipping.shipments SET status = 'cancelled'"
            " WHERE order_id = $1 AND status = 'scheduled' RETURNING 1",
            order_id,
        )
        return cancelled is not None

    async def wrap(self, order_id: str) -> str:
        await self.db.execute(
            "INSERT INTO shipping.gift_wraps (order_id, status) VALUES ($1, 'wrapped')"
            " ON CONFLICT (order_id) DO NOTHING",
            order_id,
        )
        return wrap_id(order_id)

    async def unwrap(self, order_id: str) -> bool:
        unwrapped = await self.db.fetchval(
            "UPDATE shipping.gift_wraps SET status = 'unwrapped'"
            " WHERE order_id = $1 AND status = 'wrapped' RETURNING 1",
            order_id,
        )
        return unwrapped is not None


SCHEMA = """
CREATE TABLE IF NOT EXISTS shipping.destinations (code text PRIMARY KEY);
CREATE TABLE IF NOT EXISTS shipping.shipments (
    order_id text PRIMARY KEY,
    destination text NOT NULL REFERENCES shipping.destinations (code),
    status text NOT NULL CHECK (status IN ('scheduled', 'cancelled'))
);
CREATE TABLE IF NOT EXISTS shipping.gift_wraps (
    order_id text PRIMARY KEY,
    status text NOT NULL CHECK (status IN ('wrapped', 'unwrapped'))
);
"""


async def setup(connection: Connection | None) -> None:
    """Create the ``shipping`` schema and seed the destinations (a no-op in memory)."""
    if connection is None:
        return
    await create_schema(connection, "shipping", SCHEMA)
    await connection.executemany(
        "INSERT INTO shipping.destinations (code) VALUES ($1) ON CONFLICT DO NOTHING",
        [(code,) for code in sorted(SEED_DESTINATIONS)],
    )


def build(memory: MemoryShipping | None = None) -> Participant:
    """The shipping participant; ``memory`` is its state when run in memory.

    The handlers are the example shop's
    (:func:`sagaflow.examples.shop.participants.shipping_participant`); this
    service adds the PostgreSQL storage and its schema.
    """
    shipping: Callable[[HandlerContext], Shipping] = repository(
        memory or MemoryShipping(), PostgresShipping
    )
    return shipping_participant(shipping, setup=setup)


participant = build()
