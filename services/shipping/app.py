"""The shipping participant: ``shipping.schedule`` and its compensation ``shipping.cancel``.

Run it with ``sagaflow worker services.shipping.app:participant``. Its tables
live in the ``shipping`` schema::

    shipping.destinations(code pk)
    shipping.shipments(order_id pk, destination, status scheduled|cancelled)
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
    ScheduleShipment,
    ShipmentScheduled,
    Undone,
    cancel_shipment,
    schedule_shipment,
)

__all__ = ["SEED_DESTINATIONS", "MemoryShipping", "PostgresShipping", "build", "participant"]

SEED_DESTINATIONS: frozenset[str] = frozenset({"US", "CA", "GB", "DE", "FR", "JP"})
"""Countries the service ships to; anything else (``AQ``...) is refused."""


class Shipping(Protocol):
    """What the handlers need from storage."""

    async def schedule(self, order_id: str, destination: str) -> str:
        """Schedule the order's shipment; returns the shipment id.

        Raises:
            BusinessFailure: ``unsupported_destination``.
        """
        ...

    async def cancel(self, order_id: str) -> bool:
        """Cancel the order's shipment; False when none was scheduled."""
        ...


def shipment_id(order_id: str) -> str:
    return f"shp-{order_id}"


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


@dataclass
class Shipment:
    destination: str
    status: str = "scheduled"


@dataclass
class MemoryShipping:
    """Shipments in memory; one per participant instance (see :func:`build`)."""

    destinations: set[str] = field(default_factory=lambda: set(SEED_DESTINATIONS))
    shipments: dict[str, Shipment] = field(default_factory=dict)

    async def schedule(self, order_id: str, destination: str) -> str:
        if destination not in self.destinations:
            raise BusinessFailure(Reason.UNSUPPORTED_DESTINATION)
        self.shipments.setdefault(order_id, Shipment(destination))
        return shipment_id(order_id)

    async def cancel(self, order_id: str) -> bool:
        shipment = self.shipments.get(order_id)
        if shipment is None or shipment.status != "scheduled":
            return False
        shipment.status = "cancelled"
        return True


SCHEMA = """
CREATE TABLE IF NOT EXISTS shipping.destinations (code text PRIMARY KEY);
CREATE TABLE IF NOT EXISTS shipping.shipments (
    order_id text PRIMARY KEY,
    destination text NOT NULL REFERENCES shipping.destinations (code),
    status text NOT NULL CHECK (status IN ('scheduled', 'cancelled'))
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
    """The shipping participant; ``memory`` is its state when run in memory."""
    participant = Participant("shipping", setup=setup)
    shipping: Callable[[HandlerContext], Shipping] = repository(
        memory or MemoryShipping(), PostgresShipping
    )

    @participant.handler(schedule_shipment)
    async def schedule(command: ScheduleShipment, ctx: HandlerContext) -> ShipmentScheduled:
        sid = await shipping(ctx).schedule(command.order_id, command.destination)
        return ShipmentScheduled(shipment_id=sid)

    @participant.handler(cancel_shipment)
    async def cancel(command: OrderRef, ctx: HandlerContext) -> Undone:
        return Undone(undone=await shipping(ctx).cancel(command.order_id))

    return participant


participant = build()
