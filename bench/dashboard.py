"""``python -m bench.dashboard``: the dashboard's list queries on a million sagas.

Seeds a fresh database (migrated like any other) with ``--sagas`` sagas (a
million by default) and a log entry each, spread over 30 days and across
statuses the way a busy system has them (mostly COMPLETED, 1% FAILED),
VACUUM ANALYZEs it as autovacuum would, then runs ``EXPLAIN (ANALYZE,
BUFFERS)`` on the statements the list page sends (built by
``sagaflow.dashboard.queries.SagaQueries``, the same code the page runs) and
prints one JSON object: each query's database execution and planning time,
the index it used and the rows it read. The database is dropped afterwards
unless ``--keep``. The numbers and plans are in docs/dashboard.md.

    python -m bench.dashboard                  # 1,000,000 sagas
    python -m bench.dashboard --sagas 100000   # quicker
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import orjson

from sagaflow.core.state import SagaStatus
from sagaflow.dashboard.app import search_keys
from sagaflow.dashboard.queries import SagaFilter, SagaQueries, encode_cursor
from sagaflow.examples.shop.saga import create_order
from sagaflow.store.migrate import migrate

BASE = os.environ.get("SAGAFLOW_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")

# status by the saga's number modulo 100: 90 COMPLETED, 5 COMPENSATED, 1 FAILED, 4 RUNNING;
# of the RUNNING ones, one in 250 waits for a signal and one in 250 is past its deadline
SEED = """
INSERT INTO sagaflow.sagas
    (saga_id, saga_name, saga_version, status, state, wake_at, version, created_at, updated_at)
SELECT id, name, version, status,
       jsonb_build_object(
           'saga_id', id, 'saga_name', name, 'saga_version', version, 'status', status,
           'data', jsonb_build_object('order_id', 'ord-' || n, 'customer_id', 'cust-' || (n % 5000),
                                      'amount', 1000 + n % 700),
           'step_index', CASE WHEN status = 'RUNNING' THEN 1 ELSE 2 END,
           'kind', CASE WHEN status IN ('COMPENSATED', 'FAILED') THEN 'compensation' ELSE 'command' END,
           'failure', CASE WHEN status IN ('COMPENSATED', 'FAILED') THEN jsonb_build_object(
               'step', CASE WHEN n % 3 = 0 THEN 'schedule' ELSE 'charge' END,
               'reason', CASE WHEN n % 3 = 0 THEN 'unsupported_destination' ELSE 'insufficient_funds' END,
               'cause', 'failure') END,
           'waiting_for', CASE WHEN status = 'RUNNING' AND n % 1000 = 997 THEN 'approve' END,
           'deadline_at', CASE WHEN status = 'RUNNING' AND n % 1000 = 998
                               THEN extract(epoch FROM created) + 60 END,
           'created_at', extract(epoch FROM created), 'updated_at', extract(epoch FROM created) + 1,
           'version', 5),
       NULL, 5, created, created + interval '1 second'
FROM (
    SELECT n,
           'order-' || n AS id,
           CASE WHEN n % 10 = 0 THEN 'chain-3' ELSE 'create-order' END AS name,
           CASE WHEN n % 4 = 0 THEN 2 ELSE 1 END AS version,
           CASE WHEN n % 100 < 90 THEN 'COMPLETED' WHEN n % 100 < 95 THEN 'COMPENSATED'
                WHEN n % 100 = 95 THEN 'FAILED' ELSE 'RUNNING' END AS status,
           now() - interval '30 days' + (n * (interval '30 days' / $1::integer)) AS created
    FROM generate_series($2::integer, $3::integer) AS n
) AS s
"""
SEED_LOG = """
INSERT INTO sagaflow.saga_log (saga_id, at, event, step, step_index, kind, attempt, detail)
SELECT 'order-' || n, now(), 'command_sent',
       CASE WHEN n % 100 < 90 THEN 'charge' ELSE 'reserve' END, 2 - (n % 100 / 96), 'command', 1,
       '{}'::jsonb
FROM generate_series($1::integer, $2::integer) AS n
"""


def _plan_summary(plan: dict[str, Any]) -> dict[str, Any]:
    """Times, and the scans of the plan tree (node type, index, rows)."""
    scans: list[dict[str, Any]] = []

    def walk(node: dict[str, Any]) -> None:
        if "Scan" in node["Node Type"]:
            scans.append(
                {
                    "node": node["Node Type"],
                    "relation": node.get("Relation Name"),
                    "index": node.get("Index Name"),
                    "rows": node.get("Actual Rows"),
                    "loops": node.get("Actual Loops"),
                }
            )
        for child in node.get("Plans", []):
            walk(child)

    walk(plan["Plan"])
    return {
        "execution_ms": round(plan["Execution Time"], 3),
        "planning_ms": round(plan["Planning Time"], 3),
        "top_node": plan["Plan"]["Node Type"],
        "scans": scans,
        "shared_buffers_hit": plan["Plan"].get("Shared Hit Blocks"),
        "shared_buffers_read": plan["Plan"].get("Shared Read Blocks"),
    }


async def _seed(url: str, count: int, batch: int = 100_000) -> float:
    started = time.perf_counter()
    conn = await asyncpg.connect(url)
    try:
        for low in range(1, count + 1, batch):
            high = min(count, low + batch - 1)
            await conn.execute(SEED, count, low, high)
            await conn.execute(SEED_LOG, low, high)
        await conn.execute("VACUUM ANALYZE sagaflow.sagas")
        await conn.execute("VACUUM ANALYZE sagaflow.saga_log")
    finally:
        await conn.close()
    return time.perf_counter() - started


async def _measure(url: str, repeat: int, count: int) -> dict[str, Any]:
    # the search looks in the text fields of create-order's data, as the dashboard
    # started with that definition does
    queries = SagaQueries(url, max_size=1, keys=search_keys([create_order]))
    await queries.start()
    try:
        first_sql, first_args = queries.list_sql(SagaFilter(), None, 50)
        pool = queries._pool_or_raise()
        rows = await pool.fetch(first_sql, *first_args)
        cursor = encode_cursor(rows[49]["created_at"], orjson.loads(rows[49][0])["saga_id"])
        cases: dict[str, tuple[str, list[object]]] = {
            "first_page": (first_sql, first_args),
            "second_page": queries.list_sql(SagaFilter(), cursor, 50),
            "status_failed": queries.list_sql(SagaFilter(status=SagaStatus.FAILED), None, 50),
            "status_compensated_step_charge": queries.list_sql(
                SagaFilter(status=SagaStatus.COMPENSATED, failed_step="charge"), None, 50
            ),
            "name_version_running": queries.list_sql(
                SagaFilter(name="create-order", version=2, status=SagaStatus.RUNNING), None, 50
            ),
            "last_day": queries.list_sql(
                SagaFilter(since=datetime.now(UTC) - timedelta(days=1)), None, 50
            ),
            "waiting_for_a_signal": queries.list_sql(SagaFilter(waiting=True), None, 50),
            "overdue": queries.list_sql(SagaFilter(overdue=True), None, 50),
            "reason_contains": queries.list_sql(SagaFilter(reason="destination"), None, 50),
            "search_saga_id": queries.list_sql(
                await queries.resolve(SagaFilter(search=f"order-{count // 2}")), None, 50
            ),
            "search_business_key": queries.list_sql(
                SagaFilter(search=f"ord-{count // 2}"), None, 50
            ),
            "search_key_value": queries.list_sql(
                SagaFilter(search=f"order_id=ord-{count // 2}"), None, 50
            ),
            "counts_per_status": queries.counts_sql(SagaFilter()),
            "step_names_of_a_page": (
                queries.step_names_sql(),
                [
                    [orjson.loads(r[0])["saga_id"] for r in rows[:50]],
                    [orjson.loads(r[0])["step_index"] for r in rows[:50]],
                ],
            ),
        }
        results: dict[str, Any] = {}
        for name, (sql, args) in cases.items():
            runs = [_plan_summary(await queries.explain(sql, args)) for _ in range(repeat)]
            best = min(runs, key=lambda r: r["execution_ms"])
            best["execution_ms_runs"] = [r["execution_ms"] for r in runs]
            best["sql"] = sql
            text = await pool.fetch(f"EXPLAIN (ANALYZE, BUFFERS) {sql}", *args)
            best["plan_text"] = [row[0] for row in text]
            results[name] = best
        return results
    finally:
        await queries.close()


DATA_INDEX = (
    "CREATE INDEX sagas_data_gin_idx ON sagaflow.sagas USING gin ((state->'data') jsonb_path_ops)"
)


async def run(count: int, repeat: int, keep: bool) -> dict[str, Any]:
    name = f"sagaflow_bench_dashboard_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(BASE)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        settings = dict(
            await admin.fetch(
                "SELECT name, setting FROM pg_settings WHERE name = ANY($1::text[])",
                ["autovacuum", "shared_buffers", "work_mem", "server_version"],
            )
        )
    finally:
        await admin.close()
    url = BASE.rsplit("/", 1)[0] + f"/{name}"
    try:
        await migrate(url)
        seeded = await _seed(url, count)
        queries = await _measure(url, repeat, count)
        # the opt-in index on the data (docs/dashboard.md): what searches cost with it
        conn = await asyncpg.connect(url)
        try:
            started = time.perf_counter()
            await conn.execute(DATA_INDEX)
            await conn.execute("ANALYZE sagaflow.sagas")
            index_seconds = time.perf_counter() - started
            index_size = await conn.fetchval(
                "SELECT pg_size_pretty(pg_relation_size('sagaflow.sagas_data_gin_idx'))"
            )
        finally:
            await conn.close()
        with_index = await _measure(url, repeat, count)
    finally:
        if not keep:
            admin = await asyncpg.connect(BASE)
            try:
                await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            finally:
                await admin.close()
    return {
        "kind": "dashboard_queries",
        "sagas": count,
        "seed_seconds": round(seeded, 1),
        "repeat": repeat,
        "postgres_settings": settings,
        "database": name if keep else None,
        "queries": queries,
        "with_data_index": {
            "index": DATA_INDEX,
            "build_seconds": round(index_seconds, 1),
            "size": index_size,
            "queries": {k: v for k, v in with_index.items() if k.startswith(("search", "reason"))},
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.dashboard", description=__doc__)
    parser.add_argument("--sagas", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=5, help="EXPLAIN ANALYZE runs per query")
    parser.add_argument("--keep", action="store_true", help="keep the seeded database")
    args = parser.parse_args(argv)
    if args.sagas < 100:
        parser.error("--sagas must be at least 100")
    result = asyncio.run(run(args.sagas, args.repeat, args.keep))
    sys.stdout.write(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode() + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
