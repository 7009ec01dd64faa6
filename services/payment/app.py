"""The payment participant: ``payment.charge`` and its compensation ``payment.refund``.

Run it with ``sagaflow worker services.payment.app:participant``. Its tables
live in the ``payment`` schema (amounts in cents)::

    payment.accounts(customer_id pk, balance)
    payment.charges(order_id pk, customer_id, amount, status charged|refunded)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from sagaflow import BusinessFailure, HandlerContext, Participant
from services import Connection, create_schema, repository
from services.contracts import (
    ChargePayment,
    OrderRef,
    PaymentCharged,
    Reason,
    Undone,
    charge_payment,
    refund_payment,
)

__all__ = ["SEED_BALANCES", "MemoryPayments", "PostgresPayments", "build", "participant"]

SEED_BALANCES: dict[str, int] = {
    **{f"cust-{n}": 10_000_000_000 for n in range(1, 6)},
    "cust-broke": 0,
}
"""Account balances in cents when the service first starts."""


class Payments(Protocol):
    """What the handlers need from storage."""

    async def charge(self, order_id: str, customer_id: str, amount: int) -> str:
        """Debit the customer for the order; returns the payment id.

        Raises:
            BusinessFailure: ``unknown_customer`` or ``insufficient_funds``.
        """
        ...

    async def refund(self, order_id: str) -> bool:
        """Credit the order's charge back; False when nothing was charged."""
        ...


def payment_id(order_id: str) -> str:
    return f"pay-{order_id}"


class PostgresPayments:
    """Payments on the handler's connection (inside the inbox transaction)."""

    def __init__(self, connection: Connection) -> None:
        self.db = connection

    async def charge(self, order_id: str, customer_id: str, amount: int) -> str:
        inserted = await self.db.fetchval(
            "INSERT INTO payment.charges (order_id, customer_id, amount, status)"
            " VALUES ($1, $2, $3, 'charged') ON CONFLICT (order_id) DO NOTHING RETURNING 1",
            order_id,
            customer_id,
            amount,
        )
        if inserted is None:
            return payment_id(order_id)
        debited = await self.db.fetchval(
            "UPDATE payment.accounts SET balance = balance - $2"
            " WHERE customer_id = $1 AND balance >= $2 RETURNING 1",
            customer_id,
            amount,
        )
        if debited is None:  # the framework's savepoint rolls the charge row back
            known = await self.db.fetchval(
                "SELECT 1 FROM payment.accounts WHERE customer_id = $1", customer_id
            )
            raise BusinessFailure(Reason.INSUFFICIENT_FUNDS if known else Reason.UNKNOWN_CUSTOMER)
        return payment_id(order_id)

    async def refund(self, order_id: str) -> bool:
        row = await self.db.fetchrow(
            "UPDATE payment.charges SET status = 'refunded'"
            " WHERE order_id = $1 AND status = 'charged' RETURNING customer_id, amount",
            order_id,
        )
        if row is None:
            return False
        await self.db.execute(
            "UPDATE payment.accounts SET balance = balance + $2 WHERE customer_id = $1",
            row["customer_id"],
            row["amount"],
        )
        return True


@dataclass
class Charge:
    customer_id: str
    amount: int
    status: str = "charged"


@dataclass
class MemoryPayments:
    """Payments in memory; one per participant instance (see :func:`build`)."""

    balances: dict[str, int] = field(default_factory=lambda: dict(SEED_BALANCES))
    charges: dict[str, Charge] = field(default_factory=dict)

    async def charge(self, order_id: str, customer_id: str, amount: int) -> str:
        if order_id not in self.charges:
            if customer_id not in self.balances:
                raise BusinessFailure(Reason.UNKNOWN_CUSTOMER)
            if self.balances[customer_id] < amount:
                raise BusinessFailure(Reason.INSUFFICIENT_FUNDS)
            self.balances[customer_id] -= amount
            self.charges[order_id] = Charge(customer_id, amount)
        return payment_id(order_id)

    async def refund(self, order_id: str) -> bool:
        charge = self.charges.get(order_id)
        if charge is None or charge.status != "charged":
            return False
        charge.status = "refunded"
        self.balances[charge.customer_id] += charge.amount
        return True


SCHEMA = """
CREATE TABLE IF NOT EXISTS payment.accounts (
    customer_id text PRIMARY KEY,
    balance bigint NOT NULL CHECK (balance >= 0)
);
CREATE TABLE IF NOT EXISTS payment.charges (
    order_id text PRIMARY KEY,
    customer_id text NOT NULL REFERENCES payment.accounts (customer_id),
    amount bigint NOT NULL CHECK (amount > 0),
    status text NOT NULL CHECK (status IN ('charged', 'refunded'))
);
"""


async def setup(connection: Connection | None) -> None:
    """Create the ``payment`` schema and seed the accounts (a no-op in memory)."""
    if connection is None:
        return
    await create_schema(connection, "payment", SCHEMA)
    await connection.executemany(
        "INSERT INTO payment.accounts (customer_id, balance) VALUES ($1, $2)"
        " ON CONFLICT DO NOTHING",
        list(SEED_BALANCES.items()),
    )


def build(memory: MemoryPayments | None = None) -> Participant:
    """The payment participant; ``memory`` is its state when run in memory."""
    participant = Participant("payment", setup=setup)
    payments: Callable[[HandlerContext], Payments] = repository(
        memory or MemoryPayments(), PostgresPayments
    )

    @participant.handler(charge_payment)
    async def charge(command: ChargePayment, ctx: HandlerContext) -> PaymentCharged:
        pid = await payments(ctx).charge(command.order_id, command.customer_id, command.amount)
        return PaymentCharged(payment_id=pid)

    @participant.handler(refund_payment)
    async def refund(command: OrderRef, ctx: HandlerContext) -> Undone:
        return Undone(undone=await payments(ctx).refund(command.order_id))

    return participant


participant = build()
