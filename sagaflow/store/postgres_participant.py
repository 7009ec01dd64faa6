"""The PostgreSQL participant store: the inbox commits with the business effect.

Each participant service keeps an ``inbox`` table in its own schema (created by
:func:`sagaflow.store.migrate.migrate_participant`, which
:meth:`PostgresParticipantStore.start` runs unless told not to). A handler runs
its business SQL on :attr:`PostgresParticipantTransaction.connection`, inside the
transaction that also records the command id and its reply.

Inbox rows are ``pending`` (claimed, no reply yet), ``done`` (reply stored) or
``tombstone`` (never to be applied). Claiming inserts a ``pending`` row; a
concurrent claim of the same id blocks on the primary key until the first
transaction ends, then sees what it stored. A *committed* ``pending`` row means
a transaction claimed the command and committed without storing a reply, so no
effect is on record: :meth:`~PostgresParticipantTransaction.claim` treats it as
unclaimed (``None``) and :meth:`~PostgresParticipantTransaction.tombstone` turns
it into a tombstone.

Errors are translated as in :mod:`sagaflow.store.postgres`: database failures of
the store's own statements raise :class:`~sagaflow.core.errors.StoreError`
(``__cause__`` holds asyncpg's error). A handler's own SQL errors leave the
transaction as they are, except two that heal by running the command again: a
deadlock or serialization failure (SQLSTATE class 40) leaves it as
:class:`~sagaflow.core.errors.ConcurrencyConflict`, a lost connection as
``StoreError``.

Handlers run on pooled connections: asyncpg's reset on release (``RESET ALL``,
``UNLISTEN *``, advisory locks released, cursors closed) keeps what one handler
leaves on its session (a ``SET``, a ``LISTEN``, an advisory lock) from reaching
the next command.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from sagaflow.core.errors import StoreError
from sagaflow.core.messages import Envelope
from sagaflow.core.ports import TOMBSTONE, Tombstone
from sagaflow.store.migrate import migrate_participant, quote_schema
from sagaflow.store.postgres_common import (
    CONNECT_ERRORS,
    CONNECT_TIMEOUT,
    DB_ERRORS,
    begin,
    check_migrated,
    connect_error,
    envelope_from_json,
    envelope_to_json,
    log,
    release,
    store_error,
)

if TYPE_CHECKING:
    from asyncpg.transaction import Transaction

    from sagaflow.store.postgres_common import Pool

__all__ = ["PostgresParticipantStore", "PostgresParticipantTransaction"]


class _InboxSql:
    def __init__(self, schema: str) -> None:
        s = quote_schema(schema)
        self.claim = (
            f"INSERT INTO {s}.inbox (command_id, status)"
            " SELECT u.id, 'pending' FROM unnest($1::text[]) AS u(id) ORDER BY u.id"
            " ON CONFLICT (command_id) DO NOTHING RETURNING command_id"
        )
        # A separate statement: the INSERT's snapshot predates the rows it waited for.
        self.stored = (
            f"SELECT command_id, status, reply::text FROM {s}.inbox"
            " WHERE command_id = ANY($1::text[]) ORDER BY command_id FOR UPDATE"
        )
        self.stored_one = (
            f"SELECT status, reply::text FROM {s}.inbox WHERE command_id = $1 FOR UPDATE"
        )
        self.complete = (
            f"INSERT INTO {s}.inbox AS i (command_id, status, reply)"
            " SELECT u.id, 'done', u.reply::jsonb"
            " FROM unnest($1::text[], $2::text[]) AS u(id, reply)"
            " ON CONFLICT (command_id) DO UPDATE SET status = 'done', reply = EXCLUDED.reply"
            " WHERE i.status = 'pending' RETURNING command_id"
        )
        self.tombstone = (
            f"INSERT INTO {s}.inbox AS i (command_id, status) VALUES ($1, 'tombstone')"
            " ON CONFLICT (command_id) DO UPDATE SET status = 'tombstone'"
            " WHERE i.status = 'pending' RETURNING 1"
        )
        # By physical row (a TID scan) among rows the BRIN index on created_at
        # finds; rows locked by a command's transaction are left for a later batch.
        self.prune = (
            f"WITH gone AS (DELETE FROM {s}.inbox WHERE ctid = ANY(ARRAY("
            f"SELECT ctid FROM {s}.inbox WHERE created_at < to_timestamp($1::float8)"
            " LIMIT $2 FOR UPDATE SKIP LOCKED)) RETURNING 1) SELECT count(*) FROM gone"
        )


class PostgresParticipantTransaction:
    """The :class:`~sagaflow.core.ports.ParticipantTransaction` on PostgreSQL."""

    __slots__ = ("_conn", "_savepoints", "_sql")

    def __init__(self, conn: PoolConnectionProxy[Any], sql: _InboxSql) -> None:
        self._conn = conn
        self._sql = sql
        self._savepoints = 0

    @property
    def connection(self) -> PoolConnectionProxy[Any]:
        """The asyncpg connection inside the transaction, for the handler's own SQL."""
        return self._conn

    def savepoint(self) -> _Savepoint:
        """A block whose work (business SQL and inbox writes) is undone if it raises."""
        self._savepoints += 1
        return _Savepoint(self._conn, f"sagaflow_{self._savepoints}")

    async def claim(self, command_ids: Sequence[str]) -> dict[str, Envelope | Tombstone]:
        """Claim command ids (in id order, so concurrent claimers never deadlock).

        Returns the stored reply or :data:`~sagaflow.core.ports.TOMBSTONE` of the
        ids seen before; the others (new, or claimed without a reply by a
        transaction that committed: no effect on record) are now claimed here. A
        concurrent claim of the same id waits until the first transaction ends.
        """
        stored: dict[str, Envelope | Tombstone] = {}
        wanted = sorted(set(command_ids))
        try:
            while wanted:
                inserted = {row[0] for row in await self._conn.fetch(self._sql.claim, wanted)}
                seen = [i for i in wanted if i not in inserted]
                if not seen:
                    break
                rows = await self._conn.fetch(self._sql.stored, seen)
                for command_id, status, reply in rows:
                    found = _stored(status, reply)
                    if found is not None:
                        stored[command_id] = found
                # A conflicting row that vanished meanwhile (a cleanup): claim again.
                wanted = sorted(set(seen) - {row[0] for row in rows})
        except DB_ERRORS as exc:
            raise store_error(exc, "claim") from exc
        return stored

    async def complete(self, replies: Sequence[Envelope]) -> None:
        """Store the replies of claimed (or not yet seen) commands, in one statement.

        Raises:
            StoreError: a command is already done or tombstoned.
        """
        if not replies:
            return
        try:
            rows = await self._conn.fetch(
                self._sql.complete,
                [r.command_id for r in replies],
                [envelope_to_json(r) for r in replies],
            )
        except DB_ERRORS as exc:
            raise store_error(exc, "complete") from exc
        if len(rows) != len(replies):
            done = {row[0] for row in rows}
            late = [r.command_id for r in replies if r.command_id not in done]
            raise StoreError(f"commands already done or tombstoned: {late}")

    async def tombstone(self, command_id: str) -> Envelope | Tombstone | None:
        """Mark a command as never to be applied, unless it already was.

        Returns:
            ``None`` when the tombstone is now set, else the stored reply or
            :data:`~sagaflow.core.ports.TOMBSTONE` if it already was one.
        """
        try:
            while True:
                if await self._conn.fetchval(self._sql.tombstone, command_id) is not None:
                    return None
                row = await self._conn.fetchrow(self._sql.stored_one, command_id)
                if row is not None:
                    return _stored(row[0], row[1])
        except DB_ERRORS as exc:
            raise store_error(exc, "tombstone") from exc


def _stored(status: str, reply: str | None) -> Envelope | Tombstone | None:
    if status == "tombstone":
        return TOMBSTONE
    if status == "done" and reply is not None:
        return envelope_from_json(reply)
    return None  # committed while pending: no effect on record


class _Savepoint:
    """``SAVEPOINT`` on entry; ``ROLLBACK TO SAVEPOINT`` if the block raises; on a
    clean exit nothing: the savepoint is released with the transaction, which
    saves a round trip per command. Savepoints nest, and a block is left before
    the next one starts, so rolling back to one never undoes a later block's
    work that should stay."""

    __slots__ = ("_conn", "_name")

    def __init__(self, conn: PoolConnectionProxy[Any], name: str) -> None:
        self._conn = conn
        self._name = name

    async def __aenter__(self) -> None:
        try:
            await self._conn.execute(f"SAVEPOINT {self._name}")
        except DB_ERRORS as exc:
            raise store_error(exc, "savepoint") from exc

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None:
            return
        try:
            await self._conn.execute(f"ROLLBACK TO SAVEPOINT {self._name}")
        except DB_ERRORS as error:
            log.debug("rollback to savepoint failed: %r", error)
        if isinstance(exc, asyncpg.TransactionRollbackError):
            # A deadlock or serialization failure in the handler's SQL: this
            # transaction lost to a concurrent one, which may still wait for locks
            # taken by earlier commands of this batch. Only rolling back the whole
            # transaction (and running the batch again) resolves it; it is not the
            # command's own failure.
            raise store_error(exc, "handler") from exc


class _TransactionContext:
    __slots__ = ("_conn", "_store", "_tx")

    def __init__(self, store: PostgresParticipantStore) -> None:
        self._store = store
        self._conn: PoolConnectionProxy[Any] | None = None
        self._tx: Transaction | None = None

    async def __aenter__(self) -> PostgresParticipantTransaction:
        store = self._store
        self._conn, self._tx = await begin(store._pool_or_raise(), store._max_size + 1)
        return PostgresParticipantTransaction(self._conn, store._sql)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        tx = self._tx
        assert tx is not None
        conn = self._conn
        # A handler's SQL lost a deadlock or its connection: not the command's own
        # failure; running it again heals it.
        healing = isinstance(exc, asyncpg.TransactionRollbackError) or (
            isinstance(exc, DB_ERRORS) and conn is not None and conn.is_closed()
        )
        try:
            if exc is None:
                try:
                    await tx.commit()
                except DB_ERRORS as error:
                    raise store_error(error, "commit") from error
            else:
                try:
                    await tx.rollback()
                except DB_ERRORS as error:
                    log.debug("rollback failed (connection lost?): %r", error)
        finally:
            conn, self._conn = self._conn, None
            if conn is not None:
                await release(self._store._pool, conn)
        if healing:
            assert exc is not None
            raise store_error(exc, "handler") from exc


class PostgresParticipantStore:
    """The :class:`~sagaflow.core.ports.ParticipantStore` on PostgreSQL.

    Args:
        dsn: The PostgreSQL URL of the participant's database.
        schema: The participant's own schema (holds its ``inbox``).
        min_size: Connections the pool keeps open.
        max_size: Most connections the pool opens: one per command handled at
            once (the worker's ``concurrency``).
        auto_migrate: Create or update the inbox table in :meth:`start` (safe when
            several workers start at once).
    """

    def __init__(
        self,
        dsn: str,
        *,
        schema: str,
        min_size: int = 2,
        max_size: int = 16,
        auto_migrate: bool = True,
    ) -> None:
        self._dsn = dsn
        self._schema = schema
        self._sql = _InboxSql(schema)
        self._min_size = min_size
        self._max_size = max_size
        self._auto_migrate = auto_migrate
        self._pool: Pool | None = None

    @property
    def schema(self) -> str:
        """The participant's schema."""
        return self._schema

    async def start(self) -> None:
        """Open the pool and migrate the inbox (with ``auto_migrate=False``,
        check that it is migrated).

        Raises:
            ConfigurationError: the database refused the connection (an unknown
                role, a wrong password, no such database, a malformed URL), the
                role may not create the schema, or it is not migrated: waiting
                will not help.
            StoreError: the database cannot be reached or the migration failed.
        """
        if self._pool is not None:
            return
        try:
            pool = await asyncpg.create_pool(
                self._dsn,
                min_size=self._min_size,
                max_size=self._max_size,
                timeout=CONNECT_TIMEOUT,
                # asyncpg's own reset on release stays: handlers are users' code,
                # and what they leave on a session must not reach the next command
            )
        except CONNECT_ERRORS as exc:
            raise connect_error(exc, self._dsn) from exc
        try:
            async with pool.acquire() as conn:
                if self._auto_migrate:
                    await migrate_participant(conn, self._schema)
                else:
                    await check_migrated(conn, self._schema, participant=True)
        except BaseException as exc:
            pool.terminate()
            if isinstance(exc, (*DB_ERRORS, StoreError)):
                raise connect_error(exc, self._dsn, f"set up schema {self._schema}") from exc
            raise
        self._pool = pool

    async def close(self) -> None:
        """Close the pool."""
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()

    def transaction(self) -> _TransactionContext:
        """One command's transaction: the handler's effect and its inbox record."""
        return _TransactionContext(self)

    async def prune_inbox(self, before: float, limit: int) -> int:
        """Delete up to ``limit`` inbox rows created before ``before`` (epoch
        seconds): one statement, its own short transaction; returns how many.

        Raises:
            StoreError: the database failed.
        """
        pool = self._pool_or_raise()
        try:
            count = await pool.fetchval(self._sql.prune, before, limit)
        except DB_ERRORS as exc:
            raise store_error(exc, "prune inbox") from exc
        return int(count)

    def _pool_or_raise(self) -> Pool:
        if self._pool is None:
            raise StoreError("the store is not started (call start() first)")
        return self._pool
