"""The payment participant: ``payment.charge`` and its compensation ``payment.refund``.

Run it with ``sagaflow worker services.payment.app:participant``. Its tables
live in the ``payment`` schema (amounts in cents)::

    payment.accounts(customer_id pk, balance)
    payment.charges(order_id pk, customer_id, amount, status charged|refunded)
"""

from __future__ import annotations

from collections.abc import Callable

from sagaflow import BusinessFailure, HandlerContext, Participant
from sagaflow.examples.shop.contracts import Reason
from sagaflow.examples.shop.participants import (
    SEED_BALANCES,
    MemoryPayments,
    Payments,
    payment_id,
    payment_participant,
)
from services import Connection, create_schema, repository

__all__ = ["SEED_BALANCES", "MemoryPayments", "PostgresPayments", "build", "participant"]


class PostgresPayments:
    """Payments on the handler's connection (inside the inbox transaction)."""

    def __init__(self, connection: Connection) -> None:
        self.db = connection

    async def charge(self, order_id: str, customer_id: str, amount: int) -> str:
        # an unknown customer is a refusal, as in memory: checked before the charge
        # row, whose foreign key would otherwise fail (an error, retried in vain)
        known = await self.db.fetchval(
            "SELECT 1 FROM payment.accounts WHERE customer_id = $1", customer_id
        )
        if known is None:
            raise BusinessFailure(Reason.UNKNOWN_CUSTOMER)
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
            raise BusinessFailure(Reason.INSUFFICIENT_FUNDS)
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
    """The payment participant; ``memory`` is its state when run in memory.

    The handlers are the example shop's
    (:func:`sagaflow.examples.shop.participants.payment_participant`); this
    service adds the PostgreSQL storage and its schema.
    """
    payments: Callable[[HandlerContext], Payments] = repository(
        memory or MemoryPayments(), PostgresPayments
    )
    return payment_participant(payments, setup=setup)


participant = build()
