"""The saga store's SQL: every statement rendered once per schema.

A unit of work is one statement of data-modifying CTEs over ``unnest()``ed
arrays, whatever the batch size; :meth:`SagaSql.unit` renders it for the parts
the unit has.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import orjson

from sagaflow.core.ports import UnitOfWork
from sagaflow.core.state import LogEntry, SagaState, SagaStatus
from sagaflow.store.migrate import quote_schema
from sagaflow.store.postgres_common import envelope_to_json

__all__ = ["SagaSql"]


def _detail_default(value: object) -> object:
    dump = getattr(value, "model_dump", None)
    if callable(dump):
        return dump(mode="json")
    return str(value)


def _detail_json(detail: dict[str, Any]) -> str:
    if not detail:
        return "{}"
    return orjson.dumps(detail, default=_detail_default).decode()


def _state_json(state: SagaState, version: int) -> str:
    if state.version != version:
        state = state.model_copy(update={"version": version})
    return state.model_dump_json()


class SagaSql:
    """The statements, rendered once for a schema (a unit of work's once per shape)."""

    def __init__(self, schema: str, sender: str) -> None:
        s = quote_schema(schema)
        self.channel = f"{schema}_outbox"
        # the payload of notifications from transactions this store commits: its
        # own listener, woken already at commit, skips them
        self.sender = sender
        self.lock = (
            f"SELECT state::text FROM {s}.sagas WHERE saga_id = ANY($1::text[])"
            " ORDER BY saga_id FOR UPDATE"
        )
        self.lock_due = (
            f"SELECT state::text FROM {s}.sagas WHERE wake_at <= to_timestamp($1::float8)"
            " AND (saga_name, saga_version) IN"
            " (SELECT * FROM unnest($3::text[], $4::integer[]))"
            " ORDER BY wake_at LIMIT $2 FOR UPDATE SKIP LOCKED"
        )
        self.schema = s
        self._units: dict[tuple[bool, ...], str] = {}
        self._prunes: dict[tuple[SagaStatus, ...], str] = {}
        # Claimed rows are deleted at once and come back if the transaction rolls
        # back (the publish failed). The delete need not wait for the disk
        # (synchronous_commit off, set for this transaction only): one lost in a
        # crash means those messages are published again, which consumers dedup.
        self.claim_outbox = (
            f"DELETE FROM {s}.outbox AS o"
            " USING (SELECT set_config('synchronous_commit', 'off', true)) AS _"
            f" WHERE o.id IN (SELECT id FROM {s}.outbox ORDER BY id LIMIT $1"
            " FOR UPDATE SKIP LOCKED) RETURNING o.id, o.envelope::text"
        )
        self.outbox_table = f"{s}.outbox"
        self.record_definitions = (
            f"INSERT INTO {s}.saga_definitions (saga_name, saga_version, fingerprint, shape)"
            " SELECT * FROM unnest($1::text[], $2::integer[], $3::text[], $4::jsonb[])"
            " ON CONFLICT (saga_name, saga_version) DO NOTHING"
        )
        self.definitions = (
            f"SELECT saga_name, saga_version, fingerprint, shape::text FROM {s}.saga_definitions"
            " WHERE (saga_name, saga_version) IN"
            " (SELECT * FROM unnest($1::text[], $2::integer[]))"
        )
        self.get = f"SELECT state::text FROM {s}.sagas WHERE saga_id = $1"
        self.list_base = f"SELECT state::text FROM {s}.sagas"
        self.log = (
            f"SELECT saga_id, extract(epoch FROM at)::float8 AS at, event, step, step_index,"
            f" kind, attempt, detail::text AS detail FROM {s}.saga_log"
            " WHERE saga_id = $1 ORDER BY id"
        )
        self.outbox_stats = (
            f"SELECT count(*), extract(epoch FROM min(publish_after))::float8 FROM {s}.outbox"
        )
        # what would keep the churning tables from being vacuumed (see unvacuumed())
        self.vacuum_settings = (
            "SELECT current_setting('autovacuum')::boolean,"
            " array(SELECT c.relname FROM pg_class c"
            " JOIN pg_namespace n ON n.oid = c.relnamespace,"
            " pg_options_to_table(c.reloptions) AS o"
            " WHERE n.nspname = $1 AND c.relname = ANY($2::text[])"
            " AND o.option_name = 'autovacuum_enabled' AND NOT o.option_value::boolean"
            " ORDER BY c.relname)"
        )

    def prune(self, statuses: Sequence[SagaStatus]) -> str:
        """One batch of retention: lock up to ``$2`` sagas in ``statuses`` last
        changed before ``$1`` (epoch seconds), oldest first, skipping those locked
        elsewhere; delete them and their log. Returns (sagas, log entries) deleted.

        The statuses are literals in the text, not a parameter: only then can the
        planner use the partial index of finished sagas (``sagas_finished_at_idx``)
        under the pool's generic plans. ``ANY(ARRAY(...))`` keeps each delete an
        index scan by key whatever the batch size.
        """
        key = tuple(sorted(set(statuses)))
        sql = self._prunes.get(key)
        if sql is None:
            s = self.schema
            listed = ", ".join(f"'{SagaStatus(status).value}'" for status in key)
            sql = self._prunes[key] = (
                f"WITH doomed AS (SELECT saga_id FROM {s}.sagas WHERE status IN ({listed})"
                " AND updated_at < to_timestamp($1::float8) ORDER BY updated_at LIMIT $2"
                " FOR UPDATE SKIP LOCKED),"
                f" gone AS (DELETE FROM {s}.sagas"
                " WHERE saga_id = ANY(ARRAY(SELECT saga_id FROM doomed)) RETURNING saga_id),"
                f" logged AS (DELETE FROM {s}.saga_log"
                " WHERE saga_id = ANY(ARRAY(SELECT saga_id FROM gone)) RETURNING 1)"
                " SELECT (SELECT count(*) FROM gone), (SELECT count(*) FROM logged)"
            )
        return sql

    def unit(self, unit: UnitOfWork, *, notify: bool, sender: str = "") -> tuple[str, list[Any]]:
        """One statement writing ``unit``, and its arguments ("" if empty).

        Data-modifying CTEs all run whether the result reads them or not. Rows
        come back as (kind, saga id): ``s`` a saved saga. Only the parts the
        unit has are in the statement: unnest over empty arrays still costs
        PostgreSQL about a third of a reply's commit. The text depends only on
        the shape, so each shape is rendered (and prepared by asyncpg) once.
        """
        shape = (bool(unit.inserts), bool(unit.states), bool(unit.log), bool(unit.messages), notify)
        args: list[Any] = []
        if unit.inserts:
            args += _inserted_args(unit.inserts)
        if unit.states:
            args += _saved_args(unit.states)
        if unit.log:
            args += _log_args(unit.log)
        if unit.messages:
            args += [
                [e.saga_id for e in unit.messages],
                [envelope_to_json(e) for e in unit.messages],
            ]
        if notify:
            args += [self.channel, sender]
        sql = self._units.get(shape)
        if sql is None:
            sql = self._units[shape] = self._render(*shape)
        return sql, args

    def _render(self, inserts: bool, states: bool, log: bool, messages: bool, notify: bool) -> str:
        s = self.schema
        count = 0

        def p(n: int) -> list[str]:
            nonlocal count
            count += n
            return [f"${i}" for i in range(count - n + 1, count + 1)]

        ctes: list[str] = []
        results: list[str] = []
        if inserts:
            a = p(9)
            ctes.append(
                f"inserted AS (INSERT INTO {s}.sagas (saga_id, saga_name, saga_version, status,"
                " state, wake_at, version, created_at, updated_at)"
                " SELECT u.saga_id, u.saga_name, u.saga_version, u.status, u.state::jsonb,"
                " to_timestamp(u.wake_at), u.version, to_timestamp(u.created_at),"
                " to_timestamp(u.updated_at)"
                f" FROM unnest({a[0]}::text[], {a[1]}::text[], {a[2]}::int4[], {a[3]}::text[],"
                f" {a[4]}::text[], {a[5]}::float8[], {a[6]}::int8[], {a[7]}::float8[],"
                f" {a[8]}::float8[]) AS u(saga_id, saga_name, saga_version, status, state,"
                " wake_at, version, created_at, updated_at))"
            )
        if states:
            a = p(6)
            ctes.append(
                f"saved AS (UPDATE {s}.sagas AS t SET status = u.status,"
                " state = u.state::jsonb, wake_at = to_timestamp(u.wake_at),"
                " version = u.version + 1, updated_at = to_timestamp(u.updated_at)"
                f" FROM unnest({a[0]}::text[], {a[1]}::text[], {a[2]}::text[],"
                f" {a[3]}::float8[], {a[4]}::int8[], {a[5]}::float8[])"
                " AS u(saga_id, status, state, wake_at, version, updated_at)"
                " WHERE t.saga_id = u.saga_id AND t.version = u.version RETURNING t.saga_id)"
            )
            results.append("SELECT 's', saga_id FROM saved")
        if log:
            a = p(8)
            ctes.append(
                f"logged AS (INSERT INTO {s}.saga_log (saga_id, at, event, step, step_index,"
                " kind, attempt, detail) SELECT u.saga_id, to_timestamp(u.at), u.event, u.step,"
                " u.step_index, u.kind, u.attempt, u.detail::jsonb"
                f" FROM unnest({a[0]}::text[], {a[1]}::float8[], {a[2]}::text[],"
                f" {a[3]}::text[], {a[4]}::int4[], {a[5]}::text[], {a[6]}::int4[],"
                f" {a[7]}::text[]) WITH ORDINALITY"
                " AS u(saga_id, at, event, step, step_index, kind, attempt, detail, ord)"
                " ORDER BY u.ord)"
            )
        if messages:
            a = p(2)
            ctes.append(
                f"queued AS (INSERT INTO {s}.outbox (saga_id, envelope, publish_after)"
                " SELECT u.saga_id, u.envelope::jsonb, now()"
                f" FROM unnest({a[0]}::text[], {a[1]}::text[]) WITH ORDINALITY"
                " AS u(saga_id, envelope, ord) ORDER BY u.ord)"
            )
        if notify:
            channel, sender = p(2)
            results.append(f"SELECT 'n', NULL FROM pg_notify({channel}::text, {sender}::text)")
        if not ctes:
            return ""
        if not results:  # a unit with nothing to report still needs a SELECT
            results.append("SELECT 'x', NULL WHERE false")
        return f"WITH {', '.join(ctes)} {' UNION ALL '.join(results)}"


def _saved_args(states: Sequence[SagaState]) -> list[Any]:
    ids = [s.saga_id for s in states]
    if len(set(ids)) != len(ids):
        raise ValueError("write got the same saga twice")
    return [
        ids,
        [s.status.value for s in states],
        [_state_json(s, s.version + 1) for s in states],
        [s.wake_at for s in states],
        [s.version for s in states],
        [s.updated_at for s in states],
    ]


def _log_args(log: Sequence[LogEntry]) -> list[Any]:
    return [
        [e.saga_id for e in log],
        [e.at for e in log],
        [e.event.value for e in log],
        [e.step for e in log],
        [e.step_index for e in log],
        [None if e.kind is None else e.kind.value for e in log],
        [e.attempt for e in log],
        [_detail_json(e.detail) for e in log],
    ]


def _inserted_args(states: Sequence[SagaState]) -> list[Any]:
    return [
        [s.saga_id for s in states],
        [s.saga_name for s in states],
        [s.saga_version for s in states],
        [s.status.value for s in states],
        [s.model_dump_json() for s in states],
        [s.wake_at for s in states],
        [s.version for s in states],
        [s.created_at for s in states],
        [s.updated_at for s in states],
    ]
