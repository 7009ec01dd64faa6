"""A throwaway PostgreSQL database per test, and what its tables hold."""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from types import TracebackType
from typing import Any, Protocol
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from sagaflow.runtime.participant import Participant

__all__ = ["Rows", "ThrowawayDatabase"]

Rows = dict[str, list[dict[str, Any]]]
"""Each table (``schema.table``) and its rows, in a stable order."""

# what the framework keeps in a participant's schema: not the handler's effect
FRAMEWORK_TABLES = frozenset({"inbox", "schema_migrations"})


class _Closable(Protocol):
    async def aclose(self) -> None: ...


class ThrowawayDatabase:
    """A database created for one test and dropped after it.

    Args:
        admin_url: A PostgreSQL URL whose role may create databases; the new
            database lives on the same server.
        prefix: The start of the database's name (a random suffix follows).

    Use it as ``async with ThrowawayDatabase(url) as db:`` (the
    ``saga_database`` fixture does), then give ``db`` to
    ``SagaTestEnvironment(database=db)``.
    """

    __test__ = False  # not a test class, whatever pytest thinks of its name

    def __init__(self, admin_url: str, *, prefix: str = "sagaflow_test") -> None:
        self.admin_url = admin_url
        self.name = f"{prefix}_{uuid.uuid4().hex[:12]}"
        parts = urlsplit(admin_url)
        self.url = urlunsplit(parts._replace(path=f"/{self.name}"))
        self._users: list[_Closable] = []

    async def create(self) -> None:
        admin = await asyncpg.connect(self.admin_url)
        try:
            await admin.execute(f'CREATE DATABASE "{self.name}"')
        finally:
            await admin.close()

    async def drop(self) -> None:
        """Close the environments using it, then drop it."""
        users, self._users = self._users, []
        for user in reversed(users):
            await user.aclose()
        admin = await asyncpg.connect(self.admin_url)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')
        finally:
            await admin.close()

    def attach(self, user: _Closable) -> None:
        """Something to close before the database is dropped."""
        self._users.append(user)

    async def __aenter__(self) -> ThrowawayDatabase:
        await self.create()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.drop()

    async def connect(self) -> asyncpg.Connection[Any]:
        """A new connection to the database (close it when done)."""
        return await asyncpg.connect(self.url)

    async def execute(self, sql: str, *args: Any) -> str:
        """Run SQL on a connection of its own (schema setup, seed rows)."""
        conn = await self.connect()
        try:
            return str(await conn.execute(sql, *args))
        finally:
            await conn.close()

    async def fetch(self, sql: str, *args: Any) -> list[dict[str, Any]]:
        """The rows of a query, as dicts."""
        conn = await self.connect()
        try:
            return [dict(row) for row in await conn.fetch(sql, *args)]
        finally:
            await conn.close()

    async def setup(self, participants: Iterable[Participant]) -> None:
        """Run each participant's ``setup`` (its schema, its seed rows), as a
        worker does when it starts."""
        conn = await self.connect()
        try:
            for participant in participants:
                if participant.setup is not None:
                    async with conn.transaction():
                        await participant.setup(conn)
        finally:
            await conn.close()

    async def rows(self) -> Rows:
        """Every row of every table the participants own (not the framework's)."""
        conn = await self.connect()
        try:
            return await snapshot(conn)
        finally:
            await conn.close()


async def snapshot(conn: Any) -> Rows:
    """Every row of every user table reachable on ``conn``, sorted."""
    tables = await conn.fetch(
        "SELECT table_schema, table_name FROM information_schema.tables"
        " WHERE table_type = 'BASE TABLE'"
        " AND table_schema NOT IN ('pg_catalog', 'information_schema')"
        " ORDER BY table_schema, table_name"
    )
    rows: Rows = {}
    for table in tables:
        if table["table_name"] in FRAMEWORK_TABLES:
            continue
        name = f'"{table["table_schema"]}"."{table["table_name"]}"'
        found = [dict(row) for row in await conn.fetch(f"SELECT * FROM {name}")]
        rows[f"{table['table_schema']}.{table['table_name']}"] = sorted(found, key=repr)
    return rows
