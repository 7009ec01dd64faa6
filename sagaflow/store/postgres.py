"""The PostgreSQL saga store (asyncpg): state, log and outbox in one transaction.

Tables live in one schema (``sagaflow`` by default) created by
:func:`sagaflow.store.migrate.migrate`; every statement names that schema, so a
connection's ``search_path`` never matters.

JSON documents travel as text (``$1::text::jsonb`` in, ``state::text`` out) and
are parsed by pydantic's own JSON parser: faster than a JSON codec followed by
``model_validate``, and it works unchanged on a caller's connection whose type
codecs we must not touch. Times are epoch floats on the Python side and
``timestamptz`` (microsecond precision) in the tables.

Errors. Every database failure surfaces as a :class:`~sagaflow.core.errors.StoreError`
with asyncpg's exception as ``__cause__``; the runtime catches ``StoreError``
and retries the whole unit of work:

- :class:`~sagaflow.core.errors.ConcurrencyConflict`: ``write`` found a saga
  at another version than it was read at, or PostgreSQL reported a serialization failure or a deadlock
  (SQLSTATE class 40).
- :class:`~sagaflow.core.errors.StoreError`: anything else, notably a lost
  or refused connection (``PostgresConnectionError``, ``InterfaceError``,
  ``OSError``) and a server shutting down (class 57).

After a ``StoreError`` inside :meth:`PostgresSagaStore.transaction` the whole
transaction is rolled back. A connection lost *while committing* leaves the
outcome unknown: the work may or may not have committed; the runtime's
idempotence (versions, deterministic ids, the inbox) absorbs the retry.

A PostgreSQL restart costs at most the calls in flight. A pooled connection
that died while idle is only noticed when used, so ``BEGIN`` and the read-only
or idempotent calls (``get``, ``list``, ``log``, ``outbox_stats``, ``prune``) are retried on another connection when theirs turns out to
be dead (never a failure to connect: that raises at once); asyncpg's pool
reopens broken connections on the next acquire. ``wait_for_outbox`` listens on a
dedicated connection outside the pool and reconnects on its next call when that
connection died.
"""

from __future__ import annotations

import asyncio
import builtins
import logging
import uuid
from collections.abc import Awaitable, Callable, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

import asyncpg
import orjson
from asyncpg.pool import PoolConnectionProxy

from sagaflow.core.errors import ConcurrencyConflict, StoreError
from sagaflow.core.fingerprint import DefinitionRecord
from sagaflow.core.messages import MessageKind
from sagaflow.core.ports import OutboxItem, Pruned, UnitOfWork
from sagaflow.core.state import LogEntry, LogEvent, SagaState, SagaStatus
from sagaflow.store.postgres_common import (
    BROKEN,
    CONNECT_ERRORS,
    CONNECT_TIMEOUT,
    DB_ERRORS,
    begin,
    check_migrated,
    connect_error,
    envelope_from_json,
    keep_session,
    release,
    store_error,
)
from sagaflow.store.postgres_sql import SagaSql

if TYPE_CHECKING:
    from asyncpg.transaction import Transaction

    from sagaflow.store.migrate import Connection
    from sagaflow.store.postgres_common import Pool

__all__ = ["PostgresSagaStore", "PostgresSagaTransaction"]

log = logging.getLogger("sagaflow.store")
_CHURNING = ("sagas", "outbox")  # rewritten or deleted at every step
T = TypeVar("T")


class PostgresSagaTransaction:
    """The :class:`~sagaflow.core.ports.SagaTransaction` of :class:`PostgresSagaStore`.

    Every method is one round trip, whatever the batch size.
    """

    __slots__ = ("_conn", "_sender", "_sql", "notified")

    def __init__(self, conn: Connection, sql: SagaSql, *, commits: bool) -> None:
        self._conn = conn
        self._sql = sql
        # A transaction this store commits wakes its own relay at commit, so its
        # listener may skip the notification; a caller's transaction may not.
        self._sender = sql.sender if commits else ""
        self.notified = False  # a NOTIFY for due outbox rows is pending in this transaction

    @property
    def connection(self) -> Connection:
        """The connection this transaction runs on."""
        return self._conn

    async def lock(self, saga_ids: Sequence[str]) -> dict[str, SagaState]:
        """Load and lock sagas in id order; unknown ids are absent from the result."""
        if not saga_ids:
            return {}
        try:
            rows = await self._conn.fetch(self._sql.lock, list(saga_ids))
        except DB_ERRORS as exc:
            raise store_error(exc, "lock") from exc
        states = [SagaState.model_validate_json(row[0]) for row in rows]
        return {state.saga_id: state for state in states}

    async def lock_due(
        self, now: float, limit: int, kinds: Sequence[tuple[str, int]]
    ) -> list[SagaState]:
        """Lock up to ``limit`` due sagas of ``kinds``, earliest first, skipping rows
        locked elsewhere."""
        names = [name for name, _ in kinds]
        versions = [version for _, version in kinds]
        try:
            rows = await self._conn.fetch(self._sql.lock_due, now, limit, names, versions)
        except DB_ERRORS as exc:
            raise store_error(exc, "lock_due") from exc
        return [SagaState.model_validate_json(row[0]) for row in rows]

    async def write(self, unit: UnitOfWork) -> None:
        """Write ``unit`` in one statement; ``NOTIFY <schema>_outbox`` at commit
        when it queues messages.

        Raises:
            StoreError: a saga of ``unit.inserts`` exists (``__cause__`` is asyncpg's
                ``UniqueViolationError``); the transaction must be rolled back.
            ConcurrencyConflict: a saga of ``unit.states`` is no longer at its version.
            ValueError: a saga appears twice in ``unit.states``.
        """
        notify = bool(unit.messages) and not self.notified
        sql, args = self._sql.unit(unit, notify=notify, sender=self._sender)
        if not sql:
            return
        try:
            rows = await self._conn.fetch(sql, *args)
        except asyncpg.UniqueViolationError as exc:
            raise StoreError(f"saga already exists: {exc.detail or exc}") from exc
        except DB_ERRORS as exc:
            raise store_error(exc, "write") from exc
        self.notified = self.notified or notify
        if unit.states:
            saved = {row[1] for row in rows if row[0] == "s"}
            if len(saved) != len(unit.states):
                stale = [s.saga_id for s in unit.states if s.saga_id not in saved]
                raise ConcurrencyConflict(
                    f"sagas no longer at the version they were loaded at: {stale}"
                )


class _TransactionContext:
    """``async with store.transaction(conn) as tx``: one transaction, or the caller's."""

    __slots__ = ("_conn", "_external", "_store", "_tx", "_txn")

    def __init__(self, store: PostgresSagaStore, external: Connection | None) -> None:
        self._store = store
        self._external = external
        self._conn: PoolConnectionProxy[Any] | None = None
        self._tx: Transaction | None = None
        self._txn: PostgresSagaTransaction | None = None

    async def __aenter__(self) -> PostgresSagaTransaction:
        store = self._store
        conn: Connection
        if self._external is None:
            conn, self._tx = await begin(store._pool_or_raise(), store._attempts)
            self._conn = conn
        else:
            conn = self._external
            if not conn.is_in_transaction():
                # Not the documented use, but atomicity must not depend on the caller.
                self._tx = conn.transaction()
                try:
                    await self._tx.start()
                except DB_ERRORS as exc:
                    raise store_error(exc, "begin") from exc
        self._txn = PostgresSagaTransaction(conn, store._sql, commits=self._tx is not None)
        return self._txn

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            if self._tx is not None:
                if exc is None:
                    try:
                        await self._tx.commit()
                    except DB_ERRORS as error:
                        raise store_error(error, "commit") from error
                    if self._txn is not None and self._txn.notified:
                        self._store._wake.set()
                else:
                    await _quiet_rollback(self._tx)
        finally:
            await self._release()

    async def _release(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            await release(self._store._pool, conn)


async def _quiet_rollback(tx: Transaction) -> None:
    """Roll back while another error is on its way; a dead connection rolls back anyway."""
    try:
        await tx.rollback()
    except DB_ERRORS as exc:
        log.debug("rollback failed (connection lost?): %r", exc)


class _ClaimContext:
    """``async with store.claim_outbox(n) as items``: the rows are deleted in a
    transaction that commits when the block exits cleanly (and rolls back, so
    they come back, when it raises)."""

    __slots__ = ("_conn", "_limit", "_store", "_tx")

    def __init__(self, store: PostgresSagaStore, limit: int) -> None:
        self._store = store
        self._limit = limit
        self._conn: PoolConnectionProxy[Any] | None = None
        self._tx: Transaction | None = None

    async def __aenter__(self) -> list[OutboxItem]:
        store = self._store
        self._conn, self._tx = conn, _ = await begin(store._pool_or_raise(), store._attempts)
        try:
            rows = await conn.fetch(store._sql.claim_outbox, self._limit)
        except DB_ERRORS as exc:
            await self._abort()
            raise store_error(exc, "claim_outbox") from exc
        except BaseException:
            await self._abort()
            raise
        rows.sort(key=lambda row: row[0])  # RETURNING has no order of its own
        return [OutboxItem(id=row[0], envelope=envelope_from_json(row[1])) for row in rows]

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is not None:
            await self._abort()
            return
        conn, tx = self._conn, self._tx
        assert conn is not None and tx is not None
        try:
            await tx.commit()
        except DB_ERRORS as error:
            await self._abort()
            raise store_error(error, "delete claimed outbox rows") from error
        except BaseException:
            await self._abort()
            raise
        self._conn = None
        await release(self._store._pool, conn)

    async def _abort(self) -> None:
        conn, tx = self._conn, self._tx
        self._conn = self._tx = None
        if tx is not None:
            await _quiet_rollback(tx)
        if conn is not None:
            await release(self._store._pool, conn)


class PostgresSagaStore:
    """The :class:`~sagaflow.core.ports.SagaStore` on PostgreSQL.

    Run :func:`~sagaflow.store.migrate.migrate` first (``sagaflow db migrate``).

    Args:
        dsn: The PostgreSQL URL.
        schema: The schema holding the tables.
        min_size: Connections the pool keeps open.
        max_size: Most connections the pool opens.
    """

    def __init__(
        self, dsn: str, *, schema: str = "sagaflow", min_size: int = 2, max_size: int = 10
    ) -> None:
        self._dsn = dsn
        self._schema = schema
        self._sql = SagaSql(schema, sender=uuid.uuid4().hex)
        self._min_size = min_size
        self._max_size = max_size
        self._attempts = max_size + 1  # every idle connection may have died
        self._pool: Pool | None = None
        self._listener: asyncpg.Connection[asyncpg.Record] | None = None
        self._listener_lock = asyncio.Lock()
        self._listen_failed = False
        self._wake = asyncio.Event()

    @property
    def schema(self) -> str:
        """The schema holding the tables."""
        return self._schema

    async def start(self) -> None:
        """Open the connection pool and check that the schema is migrated.

        Raises:
            ConfigurationError: the database refused the connection (an unknown
                role, a wrong password, no such database, a malformed URL) or the
                schema is not migrated: waiting will not help.
            StoreError: the database cannot be reached.
        """
        if self._pool is not None:
            return
        try:
            pool = await asyncpg.create_pool(
                self._dsn,
                min_size=self._min_size,
                max_size=self._max_size,
                timeout=CONNECT_TIMEOUT,
                # asyncpg resets every connection on release (a round trip and a
                # transaction per batch, ~7% of the coordinator's time); skipped, as
                # our statements leave no session state behind (no session SET, LISTEN or advisory locks on pooled connections)
                reset=keep_session,
                # PostgreSQL plans a prepared statement afresh for its first five runs,
                # then keeps doing so when a fresh plan looks cheaper; for the batch
                # write's CTEs over unnest() arrays it always does, and planning took
                # as long as running (0.4-0.6 ms of a 1.3 ms commit). Every statement
                # on these connections is ours, and their plans do not depend on the
                # values: plan once per connection. (PostgreSQL 12 or later.)
                server_settings={"plan_cache_mode": "force_generic_plan"},
            )
        except CONNECT_ERRORS as exc:
            raise connect_error(exc, self._dsn) from exc
        try:
            async with pool.acquire() as conn:
                await check_migrated(conn, self._schema, participant=False)
        except BaseException as exc:
            pool.terminate()
            if isinstance(exc, DB_ERRORS):
                raise connect_error(exc, self._dsn, "read the schema") from exc
            raise
        self._pool = pool

    async def unvacuumed(self) -> list[str]:
        """What keeps autovacuum from the tables that churn: ``["server"]`` when the
        server runs with ``autovacuum = off``, and the tables (``sagas``, ``outbox``)
        whose ``autovacuum_enabled`` storage parameter is off; empty when none.

        Every step writes a new version of its saga's row and every message an
        outbox row that is deleted once published: unvacuumed, both tables bloat
        and every commit and relay scan slows with them (measured in
        docs/operations.md).
        """
        pool = self._pool_or_raise()
        row = await pool.fetchrow(self._sql.vacuum_settings, self._schema, list(_CHURNING))
        assert row is not None  # one row, always
        server_on, tables_off = row
        return ([] if server_on else ["server"]) + list(tables_off)

    async def warn_if_unvacuumed(self) -> list[str]:
        """Log a warning when :meth:`unvacuumed` finds anything; returns what it found.

        Said where it matters, once: a coordinator at start and ``sagaflow db
        migrate`` call it; reads (``sagas list``, the dashboard) do not.
        """
        try:
            found = await self.unvacuumed()
        except DB_ERRORS as exc:  # advice only: never a reason not to start
            log.debug("could not read the autovacuum settings: %r", exc)
            return []
        if found:
            where = [
                "the server runs with autovacuum = off" if f == "server" else f"table {f}"
                for f in found
            ]
            log.warning(
                "PostgreSQL will not vacuum the saga tables (%s): the sagas and outbox"
                " tables will bloat and every commit slow down; turn autovacuum on or"
                " VACUUM them regularly (docs/operations.md)",
                "; ".join(where),
            )
        return found

    async def close(self) -> None:
        """Close the pool and the listening connection."""
        pool, self._pool = self._pool, None
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.terminate()
        if pool is not None:
            await pool.close()

    def transaction(self, connection: Any = None) -> _TransactionContext:
        """One transaction; with ``connection`` it joins the caller's transaction.

        Args:
            connection: An asyncpg connection (or pool proxy) inside the caller's
                transaction: the work commits or rolls back with it, and nothing is
                committed here. A connection outside a transaction gets its own
                transaction, committed at the end of the block.

        Returns:
            An async context manager yielding a :class:`PostgresSagaTransaction`.
        """
        return _TransactionContext(self, connection)

    def claim_outbox(self, limit: int) -> _ClaimContext:
        """Claim up to ``limit`` rows (oldest id first), skipping rows claimed elsewhere.

        The rows are deleted when the block exits cleanly; if it raises, they stay
        for the next claim.
        """
        return _ClaimContext(self, limit)

    async def wait_for_outbox(self, timeout: float) -> None:
        """Return on a ``NOTIFY <schema>_outbox`` (or a local commit of due rows), or after
        ``timeout``.

        Listens on a dedicated connection opened on the first call and reopened
        after it dies; a call that (re)opens it returns at once, since a hint may
        have been missed meanwhile. It never raises for a database failure.
        """
        dead = self._listener is None or self._listener.is_closed()
        if dead and await self._listen(timeout):
            self._wake.clear()  # this early return is the wake-up
            return
        try:
            async with asyncio.timeout(timeout):
                await self._wake.wait()
        except TimeoutError:
            pass
        self._wake.clear()

    async def get(self, saga_id: str) -> SagaState | None:
        """The committed state of a saga, or ``None``."""
        text = await self._run("get", lambda c: c.fetchval(self._sql.get, saga_id))
        return None if text is None else SagaState.model_validate_json(text)

    async def list(
        self,
        *,
        status: SagaStatus | None = None,
        name: str | None = None,
        limit: int = 100,
        overdue_at: float | None = None,
    ) -> list[SagaState]:
        """Sagas, newest first, optionally filtered by status, name and being overdue."""
        clauses: list[str] = []
        args: list[object] = []
        if status is not None:
            args.append(SagaStatus(status).value)
            clauses.append(f"status = ${len(args)}")
        if name is not None:
            args.append(name)
            clauses.append(f"saga_name = ${len(args)}")
        if overdue_at is not None:
            args.append(overdue_at)
            clauses.append(
                "(coalesce((state->>'overdue')::boolean, false) OR"
                f" ((state->>'deadline_at')::float8 <= ${len(args)}::float8"
                " AND status IN ('RUNNING', 'COMPENSATING')))"
            )
        args.append(limit)
        where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
        query = (
            f"{self._sql.list_base}{where} ORDER BY created_at DESC, saga_id DESC"
            f" LIMIT ${len(args)}"
        )
        rows = await self._run("list", lambda c: c.fetch(query, *args))
        return [SagaState.model_validate_json(row[0]) for row in rows]

    async def log(self, saga_id: str) -> builtins.list[LogEntry]:
        """A saga's log, oldest first (``at`` rounded to the microsecond)."""
        rows = await self._run("log", lambda c: c.fetch(self._sql.log, saga_id))
        return [
            LogEntry(
                saga_id=row["saga_id"],
                at=row["at"],
                event=LogEvent(row["event"]),
                step=row["step"],
                step_index=row["step_index"],
                kind=None if row["kind"] is None else MessageKind(row["kind"]),
                attempt=row["attempt"],
                detail=orjson.loads(row["detail"]),
            )
            for row in rows
        ]

    async def outbox_stats(self, now: float) -> tuple[int, float]:
        """Rows waiting and the age in seconds of the oldest (0.0 when none)."""
        row = await self._run("outbox_stats", lambda c: c.fetchrow(self._sql.outbox_stats))
        assert row is not None
        count, oldest = int(row[0]), row[1]
        return count, (0.0 if oldest is None else max(0.0, now - oldest))

    async def record_definitions(
        self, records: Sequence[DefinitionRecord]
    ) -> builtins.list[DefinitionRecord]:
        """Record each definition unless its name and version are recorded (one
        statement: the first record wins a race); return the records held for them.

        Raises:
            StoreError: the database failed.
        """
        if not records:
            return []
        names = [r.name for r in records]
        versions = [r.version for r in records]
        prints = [r.fingerprint for r in records]
        shapes = [orjson.dumps(r.shape).decode() for r in records]

        async def work(c: PoolConnectionProxy[Any]) -> builtins.list[Any]:
            async with c.transaction():
                await c.execute(self._sql.record_definitions, names, versions, prints, shapes)
                return await c.fetch(self._sql.definitions, names, versions)

        rows = await self._run("record_definitions", work)
        held = {
            (row[0], row[1]): DefinitionRecord(row[0], row[1], row[2], orjson.loads(row[3]))
            for row in rows
        }
        return [held[(r.name, r.version)] for r in records]

    async def prune(self, statuses: Sequence[SagaStatus], before: float, limit: int) -> Pruned:
        """Delete up to ``limit`` sagas in ``statuses`` last changed before ``before``,
        oldest first, with their log: one statement, its own short transaction.
        Sagas locked by a transaction are skipped (a later batch takes them).

        Raises:
            ValueError: a status is not terminal.
            StoreError: the database failed.
        """
        if not statuses or not all(SagaStatus(s).terminal for s in statuses):
            raise ValueError(f"only terminal sagas are pruned, not {list(statuses)}")
        sql = self._sql.prune(statuses)
        row = await self._run("prune", lambda c: c.fetchrow(sql, before, limit))
        assert row is not None  # one row, always
        return Pruned(sagas=int(row[0]), log_entries=int(row[1]))

    # ----------------------------------------------------------------- internals

    def _pool_or_raise(self) -> Pool:
        if self._pool is None:
            raise StoreError("the store is not started (call start() first)")
        return self._pool

    async def _run(
        self,
        action: str,
        work: Callable[[PoolConnectionProxy[Any]], Awaitable[T]],
        *,
        retry: type[Exception] | tuple[type[Exception], ...] = BROKEN,
    ) -> T:
        """Run one statement, retried on another connection if this one died.

        Idempotent statements retry on any sign of a dead connection (``BROKEN``);
        others pass ``retry=asyncpg.InterfaceError``: raised when the connection
        was found closed *before* the statement was sent.
        """
        pool = self._pool_or_raise()
        for attempt in range(1, self._attempts + 1):
            try:
                conn = await pool.acquire()
            except DB_ERRORS as exc:
                raise store_error(exc, "connect") from exc
            try:
                return await work(conn)
            except StoreError:
                raise
            except retry as exc:
                if attempt >= self._attempts:
                    raise store_error(exc, action) from exc
            except DB_ERRORS as exc:
                raise store_error(exc, action) from exc
            finally:
                await release(pool, conn)
        raise StoreError(f"{action} failed: no attempts")

    async def _listen(self, timeout: float) -> bool:
        """(Re)open the listening connection; ``True`` if it is listening now."""
        async with self._listener_lock:
            if self._listener is not None and not self._listener.is_closed():
                return True
            self._listener = None
            conn: asyncpg.Connection[asyncpg.Record] | None = None
            try:
                conn = await asyncpg.connect(
                    self._dsn, timeout=min(CONNECT_TIMEOUT, max(timeout, 1.0))
                )
                await conn.add_listener(self._sql.channel, self._on_notify)
                # A dead listener wakes its waiter, whose next call reconnects.
                conn.add_termination_listener(self._on_terminated)
            except DB_ERRORS as exc:
                level = logging.DEBUG if self._listen_failed else logging.WARNING
                log.log(level, "cannot listen for outbox notifications (polling): %r", exc)
                self._listen_failed = True
                if conn is not None:
                    conn.terminate()
                return False
            self._listener, self._listen_failed = conn, False
            return True

    def _on_notify(self, connection: object, pid: int, channel: str, payload: object) -> None:
        if payload != self._sql.sender:  # this process's own commits woke it already
            self._wake.set()

    def _on_terminated(self, *_: object) -> None:
        self._wake.set()
