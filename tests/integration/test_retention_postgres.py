"""Retention on the real PostgreSQL (and RabbitMQ for the processes), issue 11.

Before, nothing ever deleted a saga, a log row or an inbox row. Now finished
sagas past ``SAGAFLOW_RETENTION`` go with their log and inbox rows past
``SAGAFLOW_INBOX_RETENTION`` go: in batches of short transactions, by the
coordinator and the workers on a schedule and by ``sagaflow db prune``.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
import uuid
from pathlib import Path

import asyncpg
import pytest

from sagaflow import Coordinator, Participant, Worker
from sagaflow.core.ports import Pruned, Topology, UnitOfWork
from sagaflow.core.state import LogEntry, LogEvent, SagaState, SagaStatus
from sagaflow.runtime.retention import DAY, FINISHED, Retention, prune_sagas
from sagaflow.store import PostgresParticipantStore, PostgresSagaStore, migrate
from sagaflow.store.migrate import migrate_participant
from sagaflow.transport import RabbitMQTransport
from tests.sample import saga as sample

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

ROOT = Path(__file__).resolve().parents[2]
HOUR = 3600.0
TOPOLOGY = Topology(prefix="retention", delivery_limit=3)


def state(saga_id: str, status: SagaStatus, updated_at: float) -> SagaState:
    return SagaState(
        saga_id=saga_id,
        saga_name="sample",
        saga_version=1,
        status=status,
        data={"order_id": saga_id},
        created_at=updated_at - 60,
        updated_at=updated_at,
    )


async def fill(pg_url: str, count: int, status: SagaStatus, updated_at: float, tag: str) -> None:
    """``count`` sagas with four log rows each, written by SQL (fast for many)."""
    conn = await asyncpg.connect(pg_url)
    try:
        await conn.execute(
            "INSERT INTO sagaflow.sagas SELECT $1::text || i, 'sample', 1, $2::text,"
            " jsonb_build_object('saga_id', $1 || i, 'saga_name', 'sample', 'saga_version', 1,"
            " 'status', $2::text, 'data', '{}'::jsonb, 'created_at', $3::float8,"
            " 'updated_at', $3::float8, 'version', 1), NULL, 1,"
            " to_timestamp($3::float8), to_timestamp($3::float8)"
            " FROM generate_series(1, $4::int) i",
            tag,
            status.value,
            updated_at,
            count,
        )
        await conn.execute(
            "INSERT INTO sagaflow.saga_log (saga_id, at, event)"
            " SELECT $1 || i, to_timestamp($2::float8), 'started'"
            " FROM generate_series(1, $3::int) i, generate_series(1, 4)",
            tag,
            updated_at,
            count,
        )
        await conn.execute("ANALYZE sagaflow.sagas")
    finally:
        await conn.close()


async def count(pg_url: str, sql: str) -> int:
    conn = await asyncpg.connect(pg_url)
    try:
        return int(await conn.fetchval(sql))
    finally:
        await conn.close()


async def test_the_prune_scans_the_index_of_finished_sagas(pg_url: str) -> None:
    """Run every few minutes on a table of millions, a prune with nothing to do must
    not read the table: the partial index keeps it to the rows it deletes."""
    await migrate(pg_url)
    now = time.time()
    await fill(pg_url, 20_000, SagaStatus.COMPLETED, now, "new-")
    await fill(pg_url, 20_000, SagaStatus.RUNNING, now - 100 * DAY, "run-")
    store = PostgresSagaStore(pg_url)
    await store.start()
    try:
        sql = store._sql.prune(FINISHED)
        conn = await asyncpg.connect(pg_url)
        try:
            await conn.execute("SET plan_cache_mode = force_generic_plan")  # as the pool
            await conn.execute(f"PREPARE p(float8, int) AS {sql}")
            plan = "\n".join(r[0] for r in await conn.fetch("EXPLAIN EXECUTE p(1, 1000)"))
        finally:
            await conn.close()
        assert "sagas_finished_at_idx" in plan, plan
        assert "Seq Scan on sagas" not in plan, plan
        assert await store.prune(FINISHED, now - DAY, 1000) == Pruned()
    finally:
        await store.close()


async def test_many_sagas_are_pruned_in_short_transactions_beside_live_writes(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    await migrate(pg_url)
    now = time.time()
    await fill(pg_url, 12_000, SagaStatus.COMPLETED, now - 40 * DAY, "old-")
    await fill(pg_url, 500, SagaStatus.RUNNING, now - 40 * DAY, "run-")
    await fill(pg_url, 500, SagaStatus.COMPLETED, now - 1 * DAY, "young-")
    store = PostgresSagaStore(pg_url)
    await store.start()
    batches: list[float] = []
    original = store.prune

    async def timed(statuses: list[SagaStatus], before: float, limit: int) -> Pruned:
        started = time.monotonic()
        result = await original(statuses, before, limit)
        batches.append(time.monotonic() - started)
        return result

    monkeypatch.setattr(store, "prune", timed)
    writes: list[float] = []
    pruning = True

    async def live() -> None:  # what a coordinator does meanwhile: insert and save sagas
        n = 0
        while pruning:
            n += 1
            started = time.monotonic()
            fresh = state(f"live-{n}", SagaStatus.RUNNING, time.time())
            async with store.transaction() as tx:
                await tx.write(UnitOfWork(inserts=[fresh]))
            async with store.transaction() as tx:
                [locked] = (await tx.lock([f"run-{n % 500 + 1}"])).values()
                await tx.write(UnitOfWork(states=[locked]))
            writes.append(time.monotonic() - started)
            await asyncio.sleep(0.005)

    writer = asyncio.create_task(live())
    try:
        pruned = await prune_sagas(store, Retention(finished=30 * DAY, batch=1000), now)
    finally:
        pruning = False
        await writer
        await store.close()

    assert pruned == Pruned(sagas=12_000, log_entries=48_000)
    assert len(batches) == 13  # twelve full batches and the empty one that ends it
    assert writes and max(writes) < 2.0, (max(writes), max(batches))
    assert (
        await count(pg_url, "SELECT count(*) FROM sagaflow.sagas WHERE saga_id LIKE 'old-%'") == 0
    )
    assert (
        await count(pg_url, "SELECT count(*) FROM sagaflow.saga_log WHERE saga_id LIKE 'old-%'")
        == 0
    )
    left = await count(
        pg_url, "SELECT count(*) FROM sagaflow.sagas WHERE saga_id NOT LIKE 'live-%'"
    )
    assert left == 1000  # the running ones and the young ones


async def test_the_coordinator_prunes_on_its_own_schedule(amqp_url: str, pg_url: str) -> None:
    await migrate(pg_url)
    now = time.time()
    store = PostgresSagaStore(pg_url)
    coordinator = Coordinator(
        [sample],
        store=store,
        transport=RabbitMQTransport(amqp_url, TOPOLOGY, connection_name=f"c-{uuid.uuid4()}"),
        retention=Retention(finished=HOUR, interval=0.2),
    )
    await coordinator.start()
    try:
        async with store.transaction() as tx:
            await tx.write(
                UnitOfWork(
                    inserts=[
                        state("old-done", SagaStatus.COMPLETED, now - 2 * HOUR),
                        state("old-compensated", SagaStatus.COMPENSATED, now - 2 * HOUR),
                        state("old-failed", SagaStatus.FAILED, now - 2 * HOUR),
                        state("old-running", SagaStatus.RUNNING, now - 2 * HOUR),
                        state("young-done", SagaStatus.COMPLETED, now),
                    ],
                    log=[LogEntry(saga_id="old-done", at=now, event=LogEvent.STARTED)],
                )
            )
        for _ in range(100):
            if await store.get("old-done") is None and await store.get("old-compensated") is None:
                break
            await asyncio.sleep(0.1)
        assert await store.get("old-done") is None
        assert await store.log("old-done") == []
        assert await store.get("old-compensated") is None
        for kept in ("old-failed", "old-running", "young-done"):
            assert await store.get(kept) is not None, kept
    finally:
        await coordinator.stop()


hotel = Participant("hotel")


async def test_the_worker_prunes_its_inbox_by_age(amqp_url: str, pg_url: str) -> None:
    worker = Worker(
        hotel,
        transport=RabbitMQTransport(amqp_url, TOPOLOGY, connection_name=f"w-{uuid.uuid4()}"),
        store=PostgresParticipantStore(pg_url, schema="hotel"),
        retention=Retention(inbox=7 * DAY, interval=0.2),
    )
    await worker.start()  # migrates the inbox
    conn = await asyncpg.connect(pg_url)
    try:
        await conn.execute(
            "INSERT INTO hotel.inbox (command_id, status, created_at)"
            " SELECT 'old-' || i, 'done', now() - interval '8 days' FROM generate_series(1, 2500) i"
            " UNION ALL SELECT 'new-' || i, 'done', now() - interval '6 days'"
            " FROM generate_series(1, 100) i"
        )
        for _ in range(100):
            if await conn.fetchval("SELECT count(*) FROM hotel.inbox") == 100:
                break
            await asyncio.sleep(0.1)
        left = await conn.fetch("SELECT command_id FROM hotel.inbox")
    finally:
        await conn.close()
        await worker.stop()
    assert len(left) == 100
    assert all(row[0].startswith("new-") for row in left)


async def sagaflow(*args: str, pg_url: str) -> tuple[int, str, str]:
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("SAGAFLOW_")}
    env.update(SAGAFLOW_DATABASE_URL=pg_url, SAGAFLOW_LOG_FORMAT="json")
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sagaflow", *args, cwd=ROOT, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_db_prune_command_for_sagas_and_an_inbox(pg_url: str) -> None:
    await migrate(pg_url)
    await migrate_participant(pg_url, "hotel")
    now = time.time()
    await fill(pg_url, 2500, SagaStatus.COMPLETED, now - 31 * DAY, "old-")
    await fill(pg_url, 10, SagaStatus.FAILED, now - 31 * DAY, "failed-")
    await fill(pg_url, 10, SagaStatus.COMPLETED, now - 29 * DAY, "young-")

    code, out, err = await sagaflow("db", "prune", "--json", "--batch", "1000", pg_url=pg_url)

    assert code == 0, err
    report = json.loads(out)
    assert (report["sagas"], report["log_entries"]) == (2500, 10_000)
    assert report["failed_before"] is None
    code, out, err = await sagaflow(
        "db", "prune", "--failed-older-than", "30d", "--older-than", "90d", pg_url=pg_url
    )
    assert code == 0, err
    assert out.startswith("deleted 10 sagas and 40 log entries"), out
    assert await count(pg_url, "SELECT count(*) FROM sagaflow.sagas") == 10  # the young ones

    conn = await asyncpg.connect(pg_url)
    try:
        await conn.execute(
            "INSERT INTO hotel.inbox (command_id, status, created_at)"
            " SELECT 'c-' || i, 'done', now() - (i || ' hours')::interval"
            " FROM generate_series(1, 300) i"
        )
    finally:
        await conn.close()
    code, out, err = await sagaflow(
        "db", "prune", "--participant", "hotel", "--older-than", "10d30m", "--json", pg_url=pg_url
    )
    assert code == 0, err
    assert json.loads(out)["inbox_rows"] == 300 - 240  # 241 to 300 hours old
    code, out, err = await sagaflow(
        "db", "prune", "--participant", "hotel", "--older-than", "2h", pg_url=pg_url
    )
    assert code == 2 and "at least 1d" in err


async def test_the_index_can_be_built_beforehand_without_blocking(pg_url: str) -> None:
    """The documented way for a large table: CREATE INDEX CONCURRENTLY, then migrate."""
    conn = await asyncpg.connect(pg_url)
    try:
        applied = await migrate(conn)
        assert "0003_finished_sagas_index" in applied
        await conn.execute("DROP INDEX sagaflow.sagas_finished_at_idx")
        await conn.execute("DELETE FROM sagaflow.schema_migrations WHERE version LIKE '0003%'")
        await conn.execute(
            "CREATE INDEX CONCURRENTLY sagas_finished_at_idx ON sagaflow.sagas (updated_at)"
            " WHERE status IN ('COMPLETED', 'COMPENSATED', 'CANCELLED')"
        )
        assert await migrate(conn) == ["0003_finished_sagas_index"]
    finally:
        await conn.close()
