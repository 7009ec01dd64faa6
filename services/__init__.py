"""Example participant services built on sagaflow: order, inventory, payment, shipping.

Each service is a ``sagaflow.Participant`` (``services/<name>/app.py``) whose
handlers keep their business state in the service's own PostgreSQL schema,
written on the handler's connection so the effect commits with the inbox
record of the command. With the in-memory store (the embedded demo, unit
tests) there is no connection and the same handlers use an in-memory
repository instead. This module holds the few helpers the services share.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeAlias, TypeVar

import asyncpg

from sagaflow import HandlerContext

__all__ = ["Connection", "create_schema", "repository"]

Connection: TypeAlias = Any
"""An asyncpg connection (or a pool's proxy of one) inside an open transaction."""

R = TypeVar("R")


def repository(memory: R, postgres: Callable[[Connection], R]) -> Callable[[HandlerContext], R]:
    """Choose a handler's repository per call.

    Args:
        memory: The in-memory repository, used when the worker runs on the
            in-memory store (``not ctx.has_connection``).
        postgres: Builds the PostgreSQL repository on the handler's connection.

    Returns:
        ``ctx -> repository``.
    """

    def pick(ctx: HandlerContext) -> R:
        return postgres(ctx.connection) if ctx.has_connection else memory

    return pick


async def create_schema(connection: Connection, schema: str, ddl: str) -> None:
    """Create a service's schema and tables, once, however many workers start together.

    ``CREATE ... IF NOT EXISTS`` alone races between concurrent starts (both
    see nothing and both create); a transaction-scoped advisory lock on the
    schema's name serializes them until the caller's transaction ends.

    Args:
        connection: A connection inside a transaction.
        schema: The service's schema (also the key of the lock).
        ddl: ``CREATE TABLE IF NOT EXISTS`` statements and idempotent seed inserts.
    """
    await connection.execute("SELECT pg_advisory_xact_lock(hashtext($1))", f"services.{schema}")
    try:
        async with connection.transaction():  # a savepoint: a lost race must not abort the caller
            await connection.execute(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
    except asyncpg.UniqueViolationError:
        pass  # sagaflow's inbox migration created it at the same moment, under its own lock
    await connection.execute(ddl)
