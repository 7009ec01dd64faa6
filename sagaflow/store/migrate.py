"""Versioned SQL migrations for the PostgreSQL stores.

The files live in ``sagaflow/store/migrations/`` (coordinator tables) and
``sagaflow/store/migrations/participant/`` (a participant's inbox). Each file is
applied once, in name order, in its own transaction, and recorded in a
``schema_migrations(version, applied_at)`` table of the target schema. The
placeholder ``__SCHEMA__`` in a file stands for the quoted schema name.

A run holds a session advisory lock on a key fixed per schema
(``pg_advisory_lock(0x5A6A, crc32(schema) - 2**31)``) from before it creates the
schema until it ends, so several processes may migrate at once: the first
applies the missing files, the others wait and then find nothing to do.

Coordinator versions are the file stems (``0001_saga_tables``); participant
versions carry a ``participant/`` prefix (``participant/0001_inbox``), so a
coordinator and a participant can share one schema without colliding.
"""

from __future__ import annotations

import contextlib
import re
import zlib
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING, Any, TypeAlias

from sagaflow.core.errors import ConfigurationError, StoreError

__all__ = [
    "Connection",
    "Migration",
    "load_migrations",
    "migrate",
    "migrate_participant",
    "quote_schema",
]

if TYPE_CHECKING:
    import asyncpg
    from asyncpg.pool import PoolConnectionProxy

    Connection: TypeAlias = asyncpg.Connection[Any] | PoolConnectionProxy[Any]
    """A connection the caller owns: a plain asyncpg connection or a pool's proxy."""

_LOCK_CLASS = 0x5A6A  # the first key of the advisory lock; the second hashes the schema
_SCHEMA_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,49}")
_PLACEHOLDER = "__SCHEMA__"


@dataclass(frozen=True)
class Migration:
    """One SQL file.

    Attributes:
        version: The name recorded in ``schema_migrations``.
        sql: The file's text, with ``__SCHEMA__`` not yet substituted.
    """

    version: str
    sql: str

    def render(self, schema: str) -> str:
        """The SQL with the placeholder replaced by the quoted ``schema``."""
        return self.sql.replace(_PLACEHOLDER, quote_schema(schema))


def quote_schema(schema: str) -> str:
    """Validate a schema name and return it double-quoted for SQL.

    Names are restricted to letters, digits and underscores (at most 50
    characters, leaving room for the ``<schema>_outbox`` notification channel),
    so they can never smuggle SQL in.

    Raises:
        ConfigurationError: the name is not a plain identifier.
    """
    if not _SCHEMA_RE.fullmatch(schema):
        raise ConfigurationError(
            f"invalid schema name {schema!r}: use letters, digits and '_' (at most 50)"
        )
    return f'"{schema}"'


def load_migrations(participant: bool = False) -> list[Migration]:
    """The packaged migrations, in the order they apply.

    Args:
        participant: The participant inbox set instead of the coordinator's.
    """
    folder = resources.files("sagaflow.store").joinpath("migrations")
    prefix = ""
    if participant:
        folder = folder.joinpath("participant")
        prefix = "participant/"
    files = sorted(
        (f for f in folder.iterdir() if f.is_file() and f.name.endswith(".sql")),
        key=lambda f: f.name,
    )
    return [
        Migration(version=prefix + f.name.removesuffix(".sql"), sql=f.read_text("utf-8"))
        for f in files
    ]


async def migrate(dsn_or_connection: str | Connection, schema: str = "sagaflow") -> list[str]:
    """Bring the coordinator's tables in ``schema`` up to date.

    Safe to run from several processes at once, and idempotent.

    Args:
        dsn_or_connection: A PostgreSQL URL, or an open connection (not closed here).
        schema: The schema to create or update.

    Returns:
        The versions applied by this call (empty when already up to date).

    Raises:
        ConfigurationError: ``schema`` is not a valid name.
        StoreError: the database failed; ``__cause__`` holds asyncpg's error.
    """
    return await _run(dsn_or_connection, schema, load_migrations(participant=False))


async def migrate_participant(dsn_or_connection: str | Connection, schema: str) -> list[str]:
    """Create or update a participant's ``inbox`` table in its own ``schema``.

    Same guarantees as :func:`migrate`.

    Args:
        dsn_or_connection: A PostgreSQL URL, or an open connection (not closed here).
        schema: The participant's schema.

    Returns:
        The versions applied by this call.

    Raises:
        ConfigurationError: ``schema`` is not a valid name.
        StoreError: the database failed.
    """
    return await _run(dsn_or_connection, schema, load_migrations(participant=True))


async def _run(
    dsn_or_connection: str | Connection, schema: str, migrations: list[Migration]
) -> list[str]:
    import asyncpg  # here, so that importing sagaflow.store never needs asyncpg

    quoted = quote_schema(schema)
    try:
        if isinstance(dsn_or_connection, str):
            conn: Connection = await asyncpg.connect(dsn_or_connection)
            try:
                return await _apply(conn, schema, quoted, migrations)
            finally:
                await conn.close()
        return await _apply(dsn_or_connection, schema, quoted, migrations)
    except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
        raise StoreError(f"migrating schema {schema!r} failed: {exc}") from exc


async def _apply(
    conn: Connection, schema: str, quoted: str, migrations: list[Migration]
) -> list[str]:
    key = _lock_key(schema)
    await conn.execute("SELECT pg_advisory_lock($1, $2)", _LOCK_CLASS, key)
    try:
        applied = await _apply_locked(conn, schema, quoted, migrations)
    except BaseException:
        # Keep the original error; a broken connection releases the lock anyway.
        with contextlib.suppress(Exception):
            if not conn.is_closed():
                await conn.execute("SELECT pg_advisory_unlock($1, $2)", _LOCK_CLASS, key)
        raise
    await conn.execute("SELECT pg_advisory_unlock($1, $2)", _LOCK_CLASS, key)
    return applied


async def _apply_locked(
    conn: Connection, schema: str, quoted: str, migrations: list[Migration]
) -> list[str]:
    await conn.execute(
        f"CREATE SCHEMA IF NOT EXISTS {quoted};"
        f"CREATE TABLE IF NOT EXISTS {quoted}.schema_migrations ("
        " version text PRIMARY KEY,"
        " applied_at timestamptz NOT NULL DEFAULT now())"
    )
    rows = await conn.fetch(f"SELECT version FROM {quoted}.schema_migrations")
    done = {row["version"] for row in rows}
    applied: list[str] = []
    for migration in migrations:
        if migration.version in done:
            continue
        async with conn.transaction():
            await conn.execute(migration.render(schema))
            await conn.execute(
                f"INSERT INTO {quoted}.schema_migrations (version) VALUES ($1)",
                migration.version,
            )
        applied.append(migration.version)
    return applied


def _lock_key(schema: str) -> int:
    """The second advisory-lock key: a stable signed 32-bit hash of the schema name."""
    return zlib.crc32(schema.encode()) - 2**31
