"""What the dashboard reads from the coordinator's tables: filtered, keyset-paged lists.

The list is ordered newest first by ``(created_at, saga_id)`` and paged by
that keyset, never by ``OFFSET``: page 10,000 costs what page 1 costs. The
indexes it walks are ``sagas_created_id_idx`` and ``sagas_status_created_id_idx``
(migration 0006); docs/dashboard.md shows the plans on a million sagas.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

import asyncpg
import orjson

from sagaflow.core.state import SagaState, SagaStatus
from sagaflow.store.migrate import quote_schema

__all__ = ["FilterError", "Page", "SagaFilter", "SagaQueries", "decode_cursor", "encode_cursor"]

MAX_PAGE = 200
COUNT_CAP = 10_000
"""Counts per status stop here ("10,000+"): exact up to it, never a full scan."""


class FilterError(ValueError):
    """A filter, search or cursor from the request that cannot be used (said to the user)."""


@dataclass(frozen=True)
class SagaFilter:
    """What the list shows; every field narrows it (all ``None``: every saga)."""

    name: str | None = None
    version: int | None = None
    status: SagaStatus | None = None
    failed_step: str | None = None
    reason: str | None = None  # a part of the failure reason, any case
    since: datetime | None = None
    until: datetime | None = None
    search: str | None = None  # a saga id, a value anywhere in the data, or key=value
    saga_id: str | None = None  # exactly this saga (a search that names one: see resolve())
    waiting: bool = False  # at a wait, for its signal
    overdue: bool = False  # in flight past its deadline (recorded, or not yet seen by a timer)

    @classmethod
    def from_query(cls, params: Mapping[str, str]) -> SagaFilter:
        """From the list page's query string (empty fields are absent).

        Raises:
            FilterError: a value does not parse (an unknown status, a bad date...).
        """

        def text(key: str) -> str | None:
            value = params.get(key, "").strip()
            return value or None

        status = text("status")
        version = text("version")
        try:
            parsed_status = SagaStatus(status.upper()) if status else None
        except ValueError:
            known = ", ".join(s.value for s in SagaStatus)
            raise FilterError(f"unknown status {status!r} (one of {known})") from None
        if version is not None and not version.isdigit():
            raise FilterError(f"the version must be a whole number, not {version!r}")
        return cls(
            name=text("name"),
            version=int(version) if version is not None else None,
            status=parsed_status,
            failed_step=text("failed_step"),
            reason=text("reason"),
            since=_when(text("since"), "since"),
            until=_when(text("until"), "until"),
            search=text("q"),
            waiting=_flag(params.get("waiting", "")),
            overdue=_flag(params.get("overdue", "")),
        )

    def query(self) -> dict[str, str]:
        """The query-string fields that rebuild this filter (for links and the next page)."""
        values = {
            "name": self.name,
            "version": None if self.version is None else str(self.version),
            "status": None if self.status is None else self.status.value,
            "failed_step": self.failed_step,
            "reason": self.reason,
            "since": None if self.since is None else self.since.isoformat(),
            "until": None if self.until is None else self.until.isoformat(),
            "q": self.search,
            "waiting": "1" if self.waiting else None,
            "overdue": "1" if self.overdue else None,
        }
        return {k: v for k, v in values.items() if v is not None}


def _flag(value: str) -> bool:
    return value.strip().lower() in ("1", "on", "true", "yes")


def _when(value: str | None, what: str) -> datetime | None:
    if value is None:
        return None
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise FilterError(
            f"{what}: {value!r} is not a date and time (2026-12-04T17:00 or 2026-12-04)"
        ) from None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def encode_cursor(created_at: datetime, saga_id: str) -> str:
    """The keyset of the last row of a page, as an opaque URL-safe token."""
    raw = f"{created_at.isoformat()}\n{saga_id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(token: str) -> tuple[datetime, str]:
    """The keyset a token holds.

    Raises:
        FilterError: the token was not made by :func:`encode_cursor`.
    """
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
        stamp, saga_id = raw.split("\n", 1)
        return datetime.fromisoformat(stamp), saga_id
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise FilterError("this page link is damaged; start again from the first page") from None


@dataclass(frozen=True)
class Page:
    """One page of sagas and the cursor of the next one (``None`` on the last)."""

    sagas: list[SagaState]
    next_cursor: str | None
    counts: dict[str, int] = field(default_factory=dict)


class SagaQueries:
    """The dashboard's reads over a small pool of its own.

    Args:
        dsn: The coordinator's PostgreSQL URL.
        schema: The coordinator's schema.
        max_size: Most connections the dashboard holds.
        keys: The top-level fields of the sagas' data a bare search term is
            looked for in (the string fields of their data models); without
            any, it is looked for in every value of the data, at any depth.
    """

    def __init__(
        self,
        dsn: str,
        *,
        schema: str = "sagaflow",
        max_size: int = 3,
        keys: Sequence[str] = (),
    ) -> None:
        self._dsn = dsn
        self._keys = sorted(set(keys))
        self._s = quote_schema(schema)
        self._max_size = max_size
        self._pool: asyncpg.Pool | None = None

    async def start(self) -> None:
        """Open the pool."""
        if self._pool is None:
            self._pool = await asyncpg.create_pool(self._dsn, min_size=1, max_size=self._max_size)

    async def close(self) -> None:
        """Close the pool."""
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()

    def _pool_or_raise(self) -> asyncpg.Pool:
        if self._pool is None:
            raise RuntimeError("SagaQueries.start() was not called")
        return self._pool

    def list_sql(
        self, where: SagaFilter, cursor: str | None, limit: int
    ) -> tuple[str, list[object]]:
        """The list statement and its arguments (the bench EXPLAINs it)."""
        clauses, args = self._where(where)
        if cursor is not None:
            created_at, saga_id = decode_cursor(cursor)
            args += [created_at, saga_id]
            clauses.append(f"(created_at, saga_id) < (${len(args) - 1}, ${len(args)})")
        args.append(min(max(limit, 1), MAX_PAGE) + 1)  # one more: is there a next page?
        sql = (
            f"SELECT state::text, created_at FROM {self._s}.sagas"
            f"{_and(clauses)} ORDER BY created_at DESC, saga_id DESC LIMIT ${len(args)}"
        )
        return sql, args

    def counts_sql(self, where: SagaFilter) -> tuple[str, list[object]]:
        """Sagas per status under the filter (its status aside), each counted up to
        :data:`COUNT_CAP` + 1: a status with more shows as "10,000+", so the count
        never reads a million index entries."""
        clauses, args = self._where(replace(where, status=None))
        args.append([status.value for status in SagaStatus])
        statuses = f"${len(args)}"
        clauses.append("status = st")
        sql = (
            f"SELECT st, (SELECT count(*) FROM (SELECT 1 FROM {self._s}.sagas{_and(clauses)}"
            f" LIMIT {COUNT_CAP + 1}) AS capped) FROM unnest({statuses}::text[]) AS st"
        )
        return sql, args

    async def resolve(self, where: SagaFilter) -> SagaFilter:
        """A search term that is a saga's id finds that saga by its primary key.

        Looking in the data as well would read the whole table when no index
        covers the data (docs/dashboard.md); an id names one saga.
        """
        if where.search is None or "=" in where.search:
            return where
        found = await self._pool_or_raise().fetchval(
            f"SELECT 1 FROM {self._s}.sagas WHERE saga_id = $1", where.search
        )
        return replace(where, search=None, saga_id=where.search) if found else where

    async def page(self, where: SagaFilter, cursor: str | None = None, limit: int = 50) -> Page:
        """A page of sagas under ``where`` after ``cursor``, with the counts per status.

        Raises:
            FilterError: the cursor is damaged.
        """
        pool = self._pool_or_raise()
        where = await self.resolve(where)
        sql, args = self.list_sql(where, cursor, limit)
        rows = await pool.fetch(sql, *args)
        wanted = min(max(limit, 1), MAX_PAGE)
        more = len(rows) > wanted
        rows = rows[:wanted]
        sagas = [SagaState.model_validate_json(row[0]) for row in rows]
        next_cursor = (
            encode_cursor(rows[-1]["created_at"], sagas[-1].saga_id) if more and rows else None
        )
        count_sql, count_args = self.counts_sql(where)
        counts = {row[0]: row[1] for row in await pool.fetch(count_sql, *count_args) if row[1]}
        return Page(sagas, next_cursor, counts)

    def step_names_sql(self) -> str:
        """The name of each saga's current step, from the newest log entry naming it."""
        return (
            f"SELECT DISTINCT ON (l.saga_id) l.saga_id, l.step"
            f" FROM unnest($1::text[], $2::integer[]) AS w(saga_id, step_index)"
            f" JOIN {self._s}.saga_log l ON l.saga_id = w.saga_id"
            f" AND l.step_index = w.step_index AND l.step IS NOT NULL"
            f" ORDER BY l.saga_id, l.id DESC"
        )

    async def step_names(self, sagas: list[SagaState]) -> dict[str, str]:
        """Saga id to the name of its current step (the state keeps only its index)."""
        if not sagas:
            return {}
        rows = await self._pool_or_raise().fetch(
            self.step_names_sql(), [s.saga_id for s in sagas], [s.step_index for s in sagas]
        )
        return {row[0]: row[1] for row in rows}

    async def shape(self, name: str, version: int) -> dict[str, Any] | None:
        """The definition's shape a coordinator recorded for this name and version."""
        raw = await self._pool_or_raise().fetchval(
            f"SELECT shape::text FROM {self._s}.saga_definitions"
            " WHERE saga_name = $1 AND saga_version = $2",
            name,
            version,
        )
        shape: dict[str, Any] | None = orjson.loads(raw) if raw is not None else None
        return shape

    async def get(self, saga_id: str) -> SagaState | None:
        """One saga, or ``None``."""
        row = await self._pool_or_raise().fetchval(
            f"SELECT state::text FROM {self._s}.sagas WHERE saga_id = $1", saga_id
        )
        return None if row is None else SagaState.model_validate_json(row)

    async def explain(self, sql: str, args: list[object]) -> dict[str, Any]:
        """``EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON)`` of a statement: the bench's view."""
        plan = await self._pool_or_raise().fetchval(
            f"EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) {sql}", *args
        )
        parsed: list[dict[str, Any]] = orjson.loads(plan) if isinstance(plan, str) else plan
        return parsed[0]

    def _where(self, where: SagaFilter) -> tuple[list[str], list[object]]:
        clauses: list[str] = []
        args: list[object] = []

        def arg(value: object) -> str:
            args.append(value)
            return f"${len(args)}"

        if where.saga_id is not None:
            clauses.append(f"saga_id = {arg(where.saga_id)}")
        if where.name is not None:
            clauses.append(f"saga_name = {arg(where.name)}")
        if where.version is not None:
            clauses.append(f"saga_version = {arg(where.version)}")
        if where.status is not None:
            clauses.append(f"status = {arg(where.status.value)}")
        if where.failed_step is not None:
            clauses.append(f"state->'failure'->>'step' = {arg(where.failed_step)}")
        if where.reason is not None:
            pattern = "%" + _escape_like(where.reason) + "%"
            clauses.append(f"state->'failure'->>'reason' ILIKE {arg(pattern)}")
        if where.since is not None:
            clauses.append(f"created_at >= {arg(where.since)}")
        if where.until is not None:
            clauses.append(f"created_at < {arg(where.until)}")
        if where.search is not None:
            clauses.append(self._search(where.search, arg))
        if where.waiting:
            clauses.append("status = 'RUNNING' AND state->>'waiting_for' IS NOT NULL")
        if where.overdue:
            now = arg(datetime.now(UTC).timestamp())
            # still in flight: an overdue saga that finished is history, not work
            clauses.append(
                "status IN ('RUNNING', 'COMPENSATING') AND (coalesce((state->>'overdue')::boolean,"
                f" false) OR (state->>'deadline_at')::float8 < {now}::float8)"
            )
        return clauses, args

    def _search(self, term: str, arg: Callable[[object], str]) -> str:
        key, eq, value = term.partition("=")
        if eq and key.strip() and value.strip():
            # key=value: that field of the data, as text or as the JSON value it spells
            return f"({self._contains(key.strip(), value.strip(), arg)})"
        if self._keys:
            # the saga id, or the value of one of the data's known fields: each a
            # containment test, which a GIN index on the data can answer
            tests = [f"saga_id = {arg(term)}"]
            tests += [self._contains(k, term, arg) for k in self._keys]
            return f"({' OR '.join(tests)})"
        # the saga id, or the value of any field of the data, at any depth
        placeholder = arg(term)
        return (
            f"(saga_id = {placeholder} OR jsonb_path_exists(state->'data',"
            f" '$.** ? (@ == $q)', jsonb_build_object('q', {placeholder}::text)))"
        )

    @staticmethod
    def _contains(key: str, value: str, arg: Callable[[object], str]) -> str:
        candidates: list[object] = [value]
        try:
            parsed = orjson.loads(value)
        except orjson.JSONDecodeError:
            parsed = None
        if isinstance(parsed, int | float | bool) and not isinstance(parsed, str):
            candidates.append(parsed)
        return " OR ".join(
            f"state->'data' @> {arg(orjson.dumps({key: c}).decode())}::jsonb" for c in candidates
        )


def _and(clauses: list[str]) -> str:
    return f" WHERE {' AND '.join(clauses)}" if clauses else ""


def _escape_like(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
