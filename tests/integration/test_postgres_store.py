"""The PostgreSQL stores beyond the shared contract: migrations, joining a caller's
transaction, NOTIFY across processes, deadlocks, and surviving killed connections."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator

import asyncpg
import pytest

from sagaflow.core.errors import ConcurrencyConflict, ConfigurationError, StoreError
from sagaflow.core.messages import Envelope, MessageKind, Outcome
from sagaflow.core.ports import UnitOfWork
from sagaflow.core.state import SagaState, SagaStatus
from sagaflow.store import PostgresParticipantStore, PostgresSagaStore, migrate
from sagaflow.store.migrate import load_migrations, migrate_participant

pytestmark = pytest.mark.integration

WAIT = 10.0


def saga(saga_id: str) -> SagaState:
    return SagaState(
        saga_id=saga_id,
        saga_name="create-order",
        saga_version=1,
        status=SagaStatus.RUNNING,
        data={"order_id": saga_id},
        created_at=1_700_000_000.0,
        updated_at=1_700_000_000.0,
    )


def envelope(saga_id: str) -> Envelope:
    return Envelope(
        message_id=f"{saga_id}:reserve:command:1",
        command_id=f"{saga_id}:reserve:command",
        saga_id=saga_id,
        saga_name="create-order",
        step="reserve",
        step_index=0,
        kind=MessageKind.COMMAND,
        attempt=1,
        type="inventory.reserve",
        trace={"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"},
    )


@pytest.fixture
async def store(pg_url: str) -> AsyncIterator[PostgresSagaStore]:
    await migrate(pg_url)
    saga_store = PostgresSagaStore(pg_url, min_size=2, max_size=4)
    await saga_store.start()
    yield saga_store
    await saga_store.close()


async def terminate_backends(url: str) -> int:
    """Kill every other connection to the test database, as a server restart would."""
    conn = await asyncpg.connect(url)
    try:
        killed = await conn.fetch(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
        # pg_terminate_backend only signals: wait until the backends are gone.
        for _ in range(100):
            left = await conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
            if left == 0:
                break
            await asyncio.sleep(0.05)
        return len(killed)
    finally:
        await conn.close()


# --------------------------------------------------------------------------- migrations


async def test_migrate_twice_is_idempotent(pg_url: str) -> None:
    versions = [m.version for m in load_migrations()]
    assert versions and versions == sorted(versions)
    assert await migrate(pg_url) == versions
    assert await migrate(pg_url) == []

    conn = await asyncpg.connect(pg_url)
    try:
        recorded = await conn.fetch("SELECT version FROM sagaflow.schema_migrations")
        tables = await conn.fetch(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'sagaflow'"
        )
    finally:
        await conn.close()
    assert [r["version"] for r in recorded] == versions
    assert {r["table_name"] for r in tables} >= {"sagas", "saga_log", "outbox", "schema_migrations"}


async def test_migrate_from_five_connections_at_once(pg_url: str) -> None:
    results = await asyncio.wait_for(
        asyncio.gather(*(migrate(pg_url, schema="busy") for _ in range(5))), WAIT * 3
    )
    assert sorted(map(len, results)) == [0, 0, 0, 0, len(load_migrations())]

    inbox = await asyncio.gather(*(migrate_participant(pg_url, "busy") for _ in range(5)))
    wanted = [m.version for m in load_migrations(participant=True)]
    assert wanted[:2] == ["participant/0001_inbox", "participant/0002_inbox_created_at_brin"]
    assert sorted(map(len, inbox)) == [0, 0, 0, 0, len(wanted)]
    assert inbox[[len(r) for r in inbox].index(len(wanted))] == wanted

    conn = await asyncpg.connect(pg_url)
    try:
        indexes = await conn.fetch(
            "SELECT indexname, indexdef FROM pg_indexes"
            " WHERE schemaname = 'busy' AND tablename = 'inbox'"
        )
    finally:
        await conn.close()
    # no B-tree on created_at: every command's insert would maintain it
    assert {r["indexname"] for r in indexes} == {"inbox_pkey", "inbox_created_at_brin"}
    assert "USING brin" in next(r["indexdef"] for r in indexes if "brin" in r["indexname"])


async def test_migrate_on_a_callers_connection_and_bad_schema(pg_url: str) -> None:
    conn = await asyncpg.connect(pg_url)
    try:
        assert await migrate(conn, schema="Mixed_Case") == [m.version for m in load_migrations()]
        assert not conn.is_closed()
        assert await conn.fetchval('SELECT count(*) FROM "Mixed_Case".sagas') == 0
    finally:
        await conn.close()
    with pytest.raises(ConfigurationError):
        await migrate(pg_url, schema='x"; DROP TABLE y; --')
    with pytest.raises(ConfigurationError):
        PostgresSagaStore(pg_url, schema="no spaces")


async def test_two_schemas_are_independent(pg_url: str) -> None:
    await migrate(pg_url, schema="one")
    await migrate(pg_url, schema="two")
    one = PostgresSagaStore(pg_url, schema="one")
    two = PostgresSagaStore(pg_url, schema="two")
    await one.start()
    await two.start()
    try:
        async with one.transaction() as tx:
            await tx.write(UnitOfWork(inserts=[saga("s-1")]))
        assert await one.get("s-1") is not None
        assert await two.get("s-1") is None
    finally:
        await one.close()
        await two.close()


# --------------------------------------------------------------------------- caller's transaction


async def test_transaction_joins_the_callers_transaction(
    pg_url: str, store: PostgresSagaStore
) -> None:
    conn = await asyncpg.connect(pg_url)
    # The caller's own codecs must not matter to the store.
    await conn.set_type_codec("jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog")
    try:
        await conn.execute("CREATE TABLE orders (id text PRIMARY KEY)")
        await store.wait_for_outbox(0.05)  # starts listening
        waiter = asyncio.create_task(store.wait_for_outbox(WAIT * 3))
        async with conn.transaction():
            await conn.execute("INSERT INTO orders VALUES ('o-1')")
            async with store.transaction(conn) as tx:
                await tx.write(UnitOfWork(inserts=[saga("s-1")], messages=[envelope("s-1")]))
            assert await store.get("s-1") is None  # not committed yet
            assert await store.outbox_stats(time.time()) == (0, 0.0)
            assert not waiter.done()  # no hint before the rows can be seen
        assert await store.get("s-1") == saga("s-1")
        assert (await store.outbox_stats(time.time()))[0] == 1
        await asyncio.wait_for(waiter, WAIT)  # the caller's commit is the hint

        with pytest.raises(RuntimeError):
            async with conn.transaction():
                await conn.execute("INSERT INTO orders VALUES ('o-2')")
                async with store.transaction(conn) as tx:
                    await tx.write(UnitOfWork(inserts=[saga("s-2")], messages=[envelope("s-2")]))
                raise RuntimeError("the caller changes its mind")
        assert await store.get("s-2") is None
        assert (await store.outbox_stats(time.time()))[0] == 1
        assert await conn.fetchval("SELECT count(*) FROM orders") == 1
    finally:
        await conn.close()


async def test_transaction_on_a_pool_proxy_and_outside_a_transaction(
    pg_url: str, store: PostgresSagaStore
) -> None:
    pool = await asyncpg.create_pool(pg_url, min_size=1, max_size=1)
    try:
        async with pool.acquire() as conn, conn.transaction(), store.transaction(conn) as tx:
            await tx.write(UnitOfWork(inserts=[saga("s-1")]))
        assert await store.get("s-1") is not None

        async with pool.acquire() as conn:  # no transaction: the store opens its own
            with pytest.raises(RuntimeError):
                async with store.transaction(conn) as tx:
                    await tx.write(UnitOfWork(inserts=[saga("s-2")]))
                    raise RuntimeError
            assert not conn.is_in_transaction()
            async with store.transaction(conn) as tx:
                await tx.write(UnitOfWork(inserts=[saga("s-3")]))
        assert await store.get("s-2") is None
        assert await store.get("s-3") is not None
    finally:
        await pool.close()


# --------------------------------------------------------------------------- concurrency


async def test_notify_wakes_another_process(pg_url: str, store: PostgresSagaStore) -> None:
    other = PostgresSagaStore(pg_url)
    await other.start()
    try:
        await store.wait_for_outbox(0.05)  # starts listening
        waiter = asyncio.create_task(store.wait_for_outbox(WAIT * 3))
        await asyncio.sleep(0.2)
        assert not waiter.done()
        started = time.monotonic()
        async with other.transaction() as tx:
            await tx.write(UnitOfWork(messages=[envelope("s-1")]))
        await asyncio.wait_for(waiter, WAIT)
        assert time.monotonic() - started < 5

        # A commit that queued no messages sends no hint.
        async with other.transaction() as tx:
            await tx.write(UnitOfWork(inserts=[saga("s-2")]))
        started = time.monotonic()
        await store.wait_for_outbox(0.5)
        assert time.monotonic() - started >= 0.45
    finally:
        await other.close()


async def test_own_commit_wakes_once_and_a_callers_commit_wakes_by_notify(
    pg_url: str, store: PostgresSagaStore
) -> None:
    """A commit of the store's own wakes its relay at commit, and its own NOTIFY
    does not wake it a second time (an empty claim per commit, before); a
    commit of the caller's transaction can only wake it by NOTIFY."""
    await store.wait_for_outbox(0.05)  # starts listening
    async with store.transaction() as tx:
        await tx.write(UnitOfWork(messages=[envelope("s-1")]))
    await asyncio.wait_for(store.wait_for_outbox(WAIT), 0.5)  # woken at commit
    started = time.monotonic()
    await store.wait_for_outbox(0.6)  # the NOTIFY that follows is its own: skipped
    assert time.monotonic() - started >= 0.55

    pool = await asyncpg.create_pool(pg_url, min_size=1, max_size=1)
    try:
        waiter = asyncio.create_task(store.wait_for_outbox(WAIT * 3))
        await asyncio.sleep(0.1)
        async with pool.acquire() as conn, conn.transaction(), store.transaction(conn) as tx:
            await tx.write(UnitOfWork(messages=[envelope("s-2")]))
        await asyncio.wait_for(waiter, WAIT)
    finally:
        await pool.close()


async def test_a_deadlock_is_a_concurrency_conflict(store: PostgresSagaStore) -> None:
    async with store.transaction() as tx:
        await tx.write(UnitOfWork(inserts=[saga("a"), saga("b")]))
    a, b = await store.get("a"), await store.get("b")
    assert a is not None and b is not None
    both = asyncio.Barrier(2)

    async def crossed(first: SagaState, second: SagaState) -> None:
        async with store.transaction() as tx:
            await tx.write(UnitOfWork(states=[first]))
            await both.wait()
            await tx.write(UnitOfWork(states=[second]))

    results = await asyncio.wait_for(
        asyncio.gather(crossed(a, b), crossed(b, a), return_exceptions=True), WAIT
    )
    errors = [r for r in results if isinstance(r, BaseException)]
    assert len(errors) == 1 and isinstance(errors[0], ConcurrencyConflict)
    assert isinstance(errors[0].__cause__, asyncpg.DeadlockDetectedError)


async def test_participant_savepoint_undoes_business_sql(pg_url: str) -> None:
    inbox = PostgresParticipantStore(pg_url, schema="inventory")
    await inbox.start()
    try:
        async with inbox.transaction() as tx:
            await tx.connection.execute("CREATE TABLE inventory.stock (sku text, qty int)")
        command = envelope("s-1")
        async with inbox.transaction() as tx:
            assert await tx.claim([command.command_id]) == {}
            with pytest.raises(ZeroDivisionError):
                async with tx.savepoint():
                    await tx.connection.execute("INSERT INTO inventory.stock VALUES ('A', 1)")
                    raise ZeroDivisionError
            await tx.connection.execute("INSERT INTO inventory.stock VALUES ('B', 2)")
            await tx.complete([command.reply(Outcome.SUCCESS)])
        async with inbox.transaction() as tx:
            rows = await tx.connection.fetch("SELECT sku FROM inventory.stock")
            assert [r["sku"] for r in rows] == ["B"]
            assert await tx.claim([command.command_id]) == {
                command.command_id: command.reply(Outcome.SUCCESS)
            }
    finally:
        await inbox.close()


# --------------------------------------------------------------------------- failures


async def test_errors_before_start_and_when_unreachable() -> None:
    idle = PostgresSagaStore("postgresql://postgres@127.0.0.1:1/nowhere")
    with pytest.raises(StoreError, match="not started"):
        await idle.get("s-1")
    with pytest.raises(StoreError) as caught:
        await idle.start()
    assert isinstance(caught.value.__cause__, OSError)
    started = time.monotonic()
    await idle.wait_for_outbox(0.2)  # cannot listen: it just waits, never raises
    assert time.monotonic() - started >= 0.15


async def test_store_survives_terminated_connections(pg_url: str, store: PostgresSagaStore) -> None:
    async with store.transaction() as tx:
        await tx.write(UnitOfWork(inserts=[saga("s-1")], messages=[envelope("s-1")]))
    await store.wait_for_outbox(0.05)  # starts listening

    # Idle connections die: the next calls still work.
    assert await terminate_backends(pg_url) >= 2
    assert await store.get("s-1") is not None
    async with store.transaction() as tx:
        state = (await tx.lock(["s-1"]))["s-1"]
        await tx.write(UnitOfWork(states=[state]))
    async with store.claim_outbox(10) as items:
        assert len(items) == 1

    # A transaction in flight fails with a StoreError; the next one works.
    with pytest.raises(StoreError) as caught:
        async with store.transaction() as tx:
            state = (await tx.lock(["s-1"]))["s-1"]
            await terminate_backends(pg_url)
            await tx.write(UnitOfWork(states=[state]))
    assert caught.value.__cause__ is not None
    async with store.transaction() as tx:
        state = (await tx.lock(["s-1"]))["s-1"]
        assert state.version == 1
        await tx.write(UnitOfWork(states=[state]))
    saved = await store.get("s-1")
    assert saved is not None and saved.version == 2

    # The listener reconnects: a wake-up from another store arrives again.
    await terminate_backends(pg_url)
    await store.wait_for_outbox(0.05)  # notices the dead listener and reconnects
    other = PostgresSagaStore(pg_url)
    await other.start()
    try:
        waiter = asyncio.create_task(store.wait_for_outbox(WAIT * 3))
        await asyncio.sleep(0.2)
        assert not waiter.done()
        async with other.transaction() as tx:
            await tx.write(UnitOfWork(messages=[envelope("s-1")]))
        await asyncio.wait_for(waiter, WAIT)
    finally:
        await other.close()


async def test_participant_store_survives_terminated_connections(pg_url: str) -> None:
    inbox = PostgresParticipantStore(pg_url, schema="inventory", min_size=2)
    await inbox.start()
    try:
        async with inbox.transaction() as tx:
            assert await tx.claim(["c-1"]) == {}
        await terminate_backends(pg_url)
        async with inbox.transaction() as tx:
            assert await tx.tombstone("c-2") is None
        with pytest.raises(StoreError):
            async with inbox.transaction() as tx:
                await tx.claim(["c-3"])
                await terminate_backends(pg_url)
                done = envelope("s-3").reply(Outcome.SUCCESS)
                await tx.complete([done.model_copy(update={"command_id": "c-3"})])
        async with inbox.transaction() as tx:
            assert await tx.claim(["c-3"]) == {}
            assert await tx.claim(["c-2"]) == {"c-2": "tombstone"}
    finally:
        await inbox.close()


async def _autovacuum_on_after(pg_url: str, *statements: str) -> bool:
    """Migrate ``pg_url``, run ``statements``; whether the server runs autovacuum."""
    await migrate(pg_url)
    conn = await asyncpg.connect(pg_url)
    try:
        for statement in statements:
            await conn.execute(statement)
        return bool(await conn.fetchval("SHOW autovacuum") == "on")
    finally:
        await conn.close()


async def _start_warning(
    pg_url: str, caplog: pytest.LogCaptureFixture
) -> tuple[PostgresSagaStore, list[str]]:
    """A started store, and the warnings its start and then its advice logged."""
    store = PostgresSagaStore(pg_url, min_size=1, max_size=2)
    with caplog.at_level("WARNING", logger="sagaflow.store"):
        await store.start()
        # a read (sagas list, the dashboard) only starts a store: it says nothing
        assert not [r for r in caplog.records if r.levelname == "WARNING"]
        await store.warn_if_unvacuumed()  # what the coordinator and db migrate call
    return store, [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]


async def test_a_store_on_a_database_that_will_not_vacuum_says_so(
    pg_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    # The sagas and outbox tables churn at every step: unvacuumed they bloat and
    # every commit slows (docs/operations.md). The store warns at start when the
    # server or one of those tables has autovacuum off.
    server_on = await _autovacuum_on_after(
        pg_url, "ALTER TABLE sagaflow.outbox SET (autovacuum_enabled = off)"
    )
    store, warnings = await _start_warning(pg_url, caplog)
    try:
        assert await store.unvacuumed() == (["outbox"] if server_on else ["server", "outbox"])
        assert len(warnings) == 1
        assert "table outbox" in warnings[0]
        assert ("autovacuum = off" in warnings[0]) is not server_on
    finally:
        await store.close()


async def test_a_store_whose_tables_are_vacuumed_starts_quietly(
    pg_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    server_on = await _autovacuum_on_after(pg_url)
    store, warnings = await _start_warning(pg_url, caplog)
    try:
        # the tables are as the migrations made them: only the server can be at fault
        assert await store.unvacuumed() == ([] if server_on else ["server"])
        assert len(warnings) == (0 if server_on else 1)
    finally:
        await store.close()
