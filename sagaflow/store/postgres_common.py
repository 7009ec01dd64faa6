"""What the PostgreSQL stores share: error translation, connections, envelope JSON.

Both :mod:`sagaflow.store.postgres` (the coordinator's store) and
:mod:`sagaflow.store.postgres_participant` build on these.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import asyncpg
import orjson
from asyncpg.pool import PoolConnectionProxy

from sagaflow.config import redact_url
from sagaflow.core.errors import ConcurrencyConflict, ConfigurationError, StoreError
from sagaflow.core.messages import Envelope
from sagaflow.store.migrate import load_migrations, quote_schema

if TYPE_CHECKING:
    from typing import TypeAlias

    from asyncpg.transaction import Transaction

    Pool: TypeAlias = asyncpg.Pool[asyncpg.Record]

__all__ = [
    "BROKEN",
    "CONNECT_ERRORS",
    "CONNECT_TIMEOUT",
    "DB_ERRORS",
    "REFUSED",
    "begin",
    "check_migrated",
    "connect_error",
    "envelope_from_json",
    "envelope_to_json",
    "release",
    "store_error",
]

log = logging.getLogger("sagaflow.store")

DB_ERRORS: tuple[type[Exception], ...] = (
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,  # e.g. a protocol state error on a dying connection
    OSError,
)
"""What asyncpg raises when the database fails; translated by :func:`store_error`."""

BROKEN: tuple[type[Exception], ...] = (
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
    OSError,
)
"""Errors meaning the connection itself is gone (a restart, a terminated backend)."""

CONNECT_TIMEOUT = 10.0

REFUSED: tuple[type[Exception], ...] = (
    asyncpg.InvalidAuthorizationSpecificationError,  # no such role, a wrong password (28P01)
    asyncpg.InvalidCatalogNameError,  # no such database
    asyncpg.InsufficientPrivilegeError,  # no CONNECT on the database, no CREATE for a schema
    ValueError,  # a malformed URL (ClientConfigurationError is one), a certificate refused
    OverflowError,  # a port out of range
)
"""Failures at start that waiting does not heal: :func:`connect_error` makes them
a ``ConfigurationError``. Refused connections, a server starting up or shutting
down (``CannotConnectNowError``), too many connections: those heal."""

CONNECT_ERRORS: tuple[type[Exception], ...] = (*DB_ERRORS, ValueError, OverflowError)
"""What opening a pool raises: the database failures and a malformed URL."""


def store_error(exc: BaseException, action: str) -> StoreError:
    """Wrap a database failure into the sagaflow error the runtime retries.

    Args:
        exc: The asyncpg or OS error.
        action: What was being done, for the message ("lock", "commit"...).

    Returns:
        A :class:`ConcurrencyConflict` for SQLSTATE class 40, else a
        :class:`StoreError`; its ``__cause__`` is ``exc``.
    """
    if isinstance(exc, StoreError):
        return exc
    message = f"{action} failed: {type(exc).__name__}: {exc}"
    error = (
        ConcurrencyConflict(message)
        if isinstance(exc, asyncpg.TransactionRollbackError)
        else StoreError(message)
    )
    error.__cause__ = exc
    return error


def connect_error(exc: BaseException, dsn: str, action: str | None = None) -> Exception:
    """A failure to start a store, for the runtime's start-up retry to judge.

    Args:
        exc: What asyncpg (or the migration) raised.
        dsn: The URL, shown with its password masked.
        action: What was being done after connecting, for the message.

    Returns:
        A ``ConfigurationError`` for the failures in :data:`REFUSED` (raised at
        once, not retried), else a ``StoreError`` (the database is away: retried);
        its ``__cause__`` is ``exc``.
    """
    reason = exc.__cause__ if isinstance(exc, StoreError) and exc.__cause__ else exc
    where = f"PostgreSQL at {redact_url(dsn)}"
    doing = f"connect to {where}" if action is None else f"{action} in {where}"
    error: Exception
    if isinstance(reason, REFUSED):
        error = ConfigurationError(f"cannot {doing}: {reason}")
    else:
        error = StoreError(f"cannot {doing}: {type(reason).__name__}: {reason}")
    error.__cause__ = exc
    return error


async def check_migrated(
    conn: asyncpg.Connection | PoolConnectionProxy[Any], schema: str, *, participant: bool
) -> None:
    """Refuse a schema whose packaged migrations are not all recorded.

    A process that started on one would log "started" and then fail every
    statement (or worse, a newer statement on older tables) without end.

    Raises:
        ConfigurationError: ``schema_migrations`` is missing or lacks versions.
        asyncpg.PostgresError: the query failed (the caller translates it).
    """
    table = f"{quote_schema(schema)}.schema_migrations"
    wanted = [m.version for m in load_migrations(participant=participant)]
    how = f"run `sagaflow db migrate --schema {schema}`"
    if participant:
        how = f"run `sagaflow db migrate --participant SERVICE --schema {schema}`"
    if await conn.fetchval("SELECT to_regclass($1)", table) is None:
        raise ConfigurationError(f"schema {schema} is not migrated: {how}")
    done = {row[0] for row in await conn.fetch(f"SELECT version FROM {table}")}
    missing = [version for version in wanted if version not in done]
    if missing:
        raise ConfigurationError(
            f"schema {schema} is not migrated up to date (missing {', '.join(missing)}): {how}"
        )


def envelope_to_json(envelope: Envelope) -> str:
    """An envelope as stored: its JSON body plus its ``trace`` (excluded from dumps)."""
    body = envelope.model_dump_json(by_alias=True)
    if not envelope.trace:
        return body
    # The body is always a non-empty object, so its closing brace can be reopened.
    return f'{body[:-1]},"trace":{orjson.dumps(envelope.trace).decode()}}}'


def envelope_from_json(text: str) -> Envelope:
    """The envelope stored by :func:`envelope_to_json`, trace included."""
    return Envelope.model_validate_json(text)


async def release(pool: Pool | None, conn: PoolConnectionProxy[Any]) -> None:
    """Give a connection back; the pool drops it if it is broken."""
    if pool is None:  # closed meanwhile: the pool already terminated it
        return
    try:
        await pool.release(conn)
    except DB_ERRORS as exc:
        log.debug("releasing a connection failed: %r", exc)


async def begin(pool: Pool, attempts: int) -> tuple[PoolConnectionProxy[Any], Transaction]:
    """Acquire a connection and start a transaction on it.

    Pooled connections that died while idle (a restart) are only noticed when
    used; nothing has happened yet, so ``BEGIN`` is retried on another (or a
    reconnected) one, up to ``attempts`` times. Failing to connect is not retried.

    Raises:
        StoreError: no connection could be opened, or every attempt failed.
    """
    for attempt in range(1, attempts + 1):
        try:
            conn = await pool.acquire()
        except DB_ERRORS as exc:
            raise store_error(exc, "connect") from exc
        tx = conn.transaction()
        try:
            await tx.start()
        except BROKEN as exc:
            await release(pool, conn)
            if attempt >= attempts:
                raise store_error(exc, "begin") from exc
            continue
        except DB_ERRORS as exc:
            await release(pool, conn)
            raise store_error(exc, "begin") from exc
        except BaseException:
            await release(pool, conn)
            raise
        return conn, tx
    raise StoreError("begin failed: no attempts")


async def keep_session(connection: asyncpg.Connection) -> None:
    """Pool ``reset`` that does nothing: see where the pools are created."""
