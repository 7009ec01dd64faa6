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

from sagaflow.core.errors import ConcurrencyConflict, StoreError
from sagaflow.core.messages import Envelope

if TYPE_CHECKING:
    from typing import TypeAlias

    from asyncpg.transaction import Transaction

    Pool: TypeAlias = asyncpg.Pool[asyncpg.Record]

__all__ = [
    "BROKEN",
    "CONNECT_TIMEOUT",
    "DB_ERRORS",
    "begin",
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
