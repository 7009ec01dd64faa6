"""One contract for every ``SagaStore`` and ``ParticipantStore``: memory and PostgreSQL.

The same tests run against the in-memory stores and against the PostgreSQL
stores on a fresh database, so the doubles cannot drift: atomic transactions,
row locks, version checks, outbox claims that never overlap, timers, the inbox.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from sagaflow.core.errors import ConcurrencyConflict, StoreError
from sagaflow.core.messages import Envelope, MessageKind, Outcome
from sagaflow.core.ports import TOMBSTONE, ParticipantStore, SagaStore
from sagaflow.core.state import LogEntry, LogEvent, SagaState, SagaStatus, Timer
from sagaflow.store import (
    InMemoryParticipantStore,
    InMemorySagaStore,
    InMemorySagaTransaction,
    PostgresParticipantStore,
    PostgresSagaStore,
    PostgresSagaTransaction,
    migrate,
)

WAIT = 10.0  # the longest any single wait may take before the test fails
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
BACKENDS = ["memory", pytest.param("postgres", marks=pytest.mark.integration)]


class Boom(Exception):
    """Raised by a test to abort a transaction."""


@pytest.fixture(params=BACKENDS)
def database(request: pytest.FixtureRequest) -> str | None:
    """``None`` for the in-memory stores, else the URL of a fresh PostgreSQL database."""
    if request.param == "memory":
        return None
    url: str = request.getfixturevalue("pg_url")
    return url


@pytest.fixture
async def store(database: str | None) -> AsyncIterator[SagaStore]:
    saga_store: SagaStore
    if database is None:
        saga_store = InMemorySagaStore()
    else:
        await migrate(database)
        saga_store = PostgresSagaStore(database)
    await saga_store.start()
    yield saga_store
    await saga_store.close()


@pytest.fixture
async def participant(database: str | None) -> AsyncIterator[ParticipantStore]:
    inbox: ParticipantStore
    if database is None:
        inbox = InMemoryParticipantStore()
    else:
        inbox = PostgresParticipantStore(database, schema="inventory")
    await inbox.start()
    yield inbox
    await inbox.close()


def saga(
    saga_id: str,
    *,
    name: str = "create-order",
    status: SagaStatus = SagaStatus.RUNNING,
    wake_at: float | None = None,
    created_at: float = 1_700_000_000.0,
) -> SagaState:
    timer = None
    if wake_at is not None:
        timer = Timer(
            purpose="timeout", step_index=0, kind=MessageKind.COMMAND, attempt=1, due_at=wake_at
        )
    return SagaState(
        saga_id=saga_id,
        saga_name=name,
        saga_version=1,
        status=status,
        data={"order_id": saga_id, "lines": [{"sku": "A-1", "qty": 2}], "total": 12.5},
        completed=(0,),
        timer=timer,
        trace={"traceparent": TRACEPARENT},
        created_at=created_at,
        updated_at=created_at,
    )


def envelope(saga_id: str, n: int = 0, *, kind: MessageKind = MessageKind.COMMAND) -> Envelope:
    return Envelope(
        message_id=f"{saga_id}:step{n}:{kind.value}:1",
        command_id=f"{saga_id}:step{n}:{kind.value}",
        saga_id=saga_id,
        saga_name="create-order",
        step=f"step{n}",
        step_index=n,
        kind=kind,
        attempt=1,
        type="inventory.reserve",
        payload={"sku": "A-1", "qty": n},
        trace={"traceparent": TRACEPARENT, "tracestate": "vendor=1"},
    )


def entry(saga_id: str, at: float, event: LogEvent, **fields: object) -> LogEntry:
    return LogEntry.model_validate({"saga_id": saga_id, "at": at, "event": event, **fields})


async def insert(store: SagaStore, *states: SagaState) -> None:
    async with store.transaction() as tx:
        for state in states:
            await tx.insert(state)


async def outbox_ids(store: SagaStore, now: float) -> list[int]:
    """Claim without deleting: the ids of every due row."""
    with pytest.raises(Boom):
        async with store.claim_outbox(now, 10_000) as items:
            ids = [item.id for item in items]
            raise Boom
    return ids


async def blocked(task: asyncio.Task[Any]) -> bool:
    """Whether ``task`` is still waiting after giving it a fair chance to run."""
    await asyncio.sleep(0.2)
    return not task.done()


# --------------------------------------------------------------------------- states


async def test_insert_get_and_lock(store: SagaStore) -> None:
    state = saga("s-1")
    await insert(store, state)

    assert await store.get("s-1") == state
    assert await store.get("missing") is None
    async with store.transaction() as tx:
        locked = await tx.lock(["s-1", "missing"])
    assert locked == {"s-1": state}


async def test_insert_duplicate_raises_store_error(store: SagaStore) -> None:
    await insert(store, saga("s-1"))
    async with store.transaction() as tx:
        with pytest.raises(StoreError):
            await tx.insert(saga("s-1", name="other"))
        await tx.insert(saga("s-2"))  # the transaction is still usable
    assert (await store.get("s-1")) == saga("s-1")
    assert (await store.get("s-2")) is not None


async def test_concurrent_insert_of_one_id(store: SagaStore) -> None:
    inserted = asyncio.Event()
    release = asyncio.Event()

    async def first() -> None:
        async with store.transaction() as tx:
            await tx.insert(saga("s-1"))
            inserted.set()
            await release.wait()

    async def second() -> None:
        async with store.transaction() as tx:
            await tx.insert(saga("s-1"))

    one = asyncio.create_task(first())
    await inserted.wait()
    two = asyncio.create_task(second())
    assert await blocked(two)  # waits on the primary key
    release.set()
    await one
    with pytest.raises(StoreError):
        await asyncio.wait_for(two, WAIT)


async def test_insert_is_visible_to_its_own_transaction(store: SagaStore) -> None:
    async with store.transaction() as tx:
        await tx.insert(saga("s-1"))
        assert await tx.lock(["s-1"]) == {"s-1": saga("s-1")}


async def test_save_bumps_the_version(store: SagaStore) -> None:
    await insert(store, saga("s-1"))
    async with store.transaction() as tx:
        state = (await tx.lock(["s-1"]))["s-1"]
        await tx.save(state.model_copy(update={"status": SagaStatus.COMPENSATING}))

    saved = await store.get("s-1")
    assert saved is not None
    assert (saved.version, saved.status) == (1, SagaStatus.COMPENSATING)
    async with store.transaction() as tx:
        state = (await tx.lock(["s-1"]))["s-1"]
        assert state == saved
        await tx.save(state.model_copy(update={"status": SagaStatus.COMPENSATED}))
    saved = await store.get("s-1")
    assert saved is not None
    assert (saved.version, saved.status) == (2, SagaStatus.COMPENSATED)


async def test_save_of_a_stale_version_conflicts(store: SagaStore) -> None:
    await insert(store, saga("s-1"))
    stale = await store.get("s-1")
    assert stale is not None
    async with store.transaction() as tx:
        await tx.save(stale)

    with pytest.raises(ConcurrencyConflict):
        async with store.transaction() as tx:
            await tx.save(stale.model_copy(update={"status": SagaStatus.FAILED}))
    with pytest.raises(ConcurrencyConflict):
        async with store.transaction() as tx:
            await tx.save(saga("never-inserted"))
    current = await store.get("s-1")
    assert current is not None
    assert (current.version, current.status) == (1, SagaStatus.RUNNING)


async def test_save_many(store: SagaStore) -> None:
    await insert(store, saga("s-1"), saga("s-2"), saga("s-3"))
    async with store.transaction() as tx:
        assert isinstance(tx, InMemorySagaTransaction | PostgresSagaTransaction)  # beyond the port
        states = await tx.lock(["s-1", "s-2", "s-3"])
        await tx.save_many(
            [s.model_copy(update={"status": SagaStatus.COMPLETED}) for s in states.values()]
        )
    for saga_id in ("s-1", "s-2", "s-3"):
        saved = await store.get(saga_id)
        assert saved is not None
        assert (saved.version, saved.status) == (1, SagaStatus.COMPLETED)

    with pytest.raises(ConcurrencyConflict, match="s-2"):
        async with store.transaction() as tx:
            assert isinstance(tx, InMemorySagaTransaction | PostgresSagaTransaction)
            fresh = await tx.lock(["s-1"])
            await tx.save_many([fresh["s-1"], saga("s-2")])
    saved = await store.get("s-1")
    assert saved is not None
    assert saved.version == 1  # the whole transaction rolled back


async def test_concurrent_saves_of_one_version_conflict(store: SagaStore) -> None:
    await insert(store, saga("s-1"))
    loaded = await store.get("s-1")
    assert loaded is not None
    first_saved = asyncio.Event()
    release_first = asyncio.Event()

    async def first() -> None:
        async with store.transaction() as tx:
            await tx.save(loaded)
            first_saved.set()
            await release_first.wait()

    async def second() -> None:
        await first_saved.wait()
        async with store.transaction() as tx:
            await tx.save(loaded)  # waits on the row, then finds version 1

    one, two = asyncio.create_task(first()), asyncio.create_task(second())
    await first_saved.wait()
    assert await blocked(two)
    release_first.set()
    await one
    with pytest.raises(ConcurrencyConflict):
        await asyncio.wait_for(two, WAIT)


async def test_lock_serializes_transactions(store: SagaStore) -> None:
    await insert(store, saga("s-1"), saga("s-2"))
    locked = asyncio.Event()
    release = asyncio.Event()

    async def holder() -> None:
        async with store.transaction() as tx:
            state = (await tx.lock(["s-2", "s-1"]))["s-1"]
            locked.set()
            await release.wait()
            await tx.save(state.model_copy(update={"data": {"by": "holder"}}))

    async def waiter() -> SagaState:
        async with store.transaction() as tx:
            return (await tx.lock(["s-1"]))["s-1"]

    hold = asyncio.create_task(holder())
    await locked.wait()
    wait = asyncio.create_task(waiter())
    assert await blocked(wait)
    release.set()
    await hold
    seen = await asyncio.wait_for(wait, WAIT)
    assert (seen.version, seen.data) == (1, {"by": "holder"})


async def test_rollback_leaves_nothing(store: SagaStore) -> None:
    now = time.time()
    await insert(store, saga("s-1"))
    with pytest.raises(Boom):
        async with store.transaction() as tx:
            await tx.insert(saga("s-2"))
            state = (await tx.lock(["s-1"]))["s-1"]
            await tx.save(state.model_copy(update={"status": SagaStatus.FAILED}))
            await tx.append_log([entry("s-1", now, LogEvent.FAILED)])
            await tx.add_outbox([envelope("s-1")], publish_after=now)
            raise Boom

    assert await store.get("s-2") is None
    assert await store.get("s-1") == saga("s-1")
    assert await store.log("s-1") == []
    assert await store.outbox_stats(now + 1) == (0, 0.0)
    async with store.claim_outbox(now + 1, 10) as items:
        assert items == []


# --------------------------------------------------------------------------- timers


async def test_lock_due_returns_due_sagas_earliest_first(store: SagaStore) -> None:
    await insert(
        store,
        saga("late", wake_at=1_000_030.0),
        saga("first", wake_at=1_000_010.0),
        saga("second", wake_at=1_000_020.0),
        saga("idle"),
    )
    async with store.transaction() as tx:
        assert [s.saga_id for s in await tx.lock_due(1_000_025.0, 10)] == ["first", "second"]
    async with store.transaction() as tx:
        assert [s.saga_id for s in await tx.lock_due(1_000_100.0, 2)] == ["first", "second"]
    async with store.transaction() as tx:
        assert await tx.lock_due(1_000_000.0, 10) == []


async def test_lock_due_skips_sagas_locked_elsewhere(store: SagaStore) -> None:
    await insert(store, saga("a", wake_at=10.0), saga("b", wake_at=20.0), saga("c", wake_at=30.0))
    locked = asyncio.Event()
    release = asyncio.Event()

    async def holder() -> None:
        async with store.transaction() as tx:
            await tx.lock(["a"])
            locked.set()
            await release.wait()

    hold = asyncio.create_task(holder())
    await locked.wait()
    try:
        async with store.transaction() as tx:
            due = await asyncio.wait_for(tx.lock_due(100.0, 2), WAIT)
            assert [s.saga_id for s in due] == ["b", "c"]

            async def other() -> list[str]:
                async with store.transaction() as tx2:
                    return [s.saga_id for s in await tx2.lock_due(100.0, 10)]

            assert await asyncio.wait_for(other(), WAIT) == []  # a held by holder, b/c by us
    finally:
        release.set()
        await hold


async def test_saving_a_new_timer_moves_the_saga(store: SagaStore) -> None:
    await insert(store, saga("s-1", wake_at=10.0))
    async with store.transaction() as tx:
        [state] = await tx.lock_due(15.0, 10)
        await tx.save(state.model_copy(update={"timer": None}))
    async with store.transaction() as tx:
        assert await tx.lock_due(1e12, 10) == []
        state = (await tx.lock(["s-1"]))["s-1"]
        timer = Timer(purpose="retry", step_index=0, kind=MessageKind.COMMAND, attempt=2, due_at=50)
        await tx.save(state.model_copy(update={"timer": timer}))
    async with store.transaction() as tx:
        assert await tx.lock_due(40.0, 10) == []
        assert [s.saga_id for s in await tx.lock_due(50.0, 10)] == ["s-1"]


# --------------------------------------------------------------------------- log and queries


async def test_log_keeps_order_and_fields(store: SagaStore) -> None:
    first = [
        entry("s-1", 1_700_000_000.25, LogEvent.STARTED, detail={"request": {"id": 7}}),
        entry(
            "s-1",
            1_700_000_000.5,
            LogEvent.COMMAND_SENT,
            step="reserve",
            step_index=0,
            kind=MessageKind.COMMAND,
            attempt=1,
        ),
        entry("s-2", 1_700_000_000.75, LogEvent.STARTED),
    ]
    later = [entry("s-1", 1_700_000_000.125, LogEvent.REPLY_RECEIVED, detail={"outcome": "ok"})]
    async with store.transaction() as tx:
        await tx.append_log(first)
    async with store.transaction() as tx:
        await tx.append_log(later)
        await tx.append_log([])

    assert await store.log("s-1") == [first[0], first[1], later[0]]
    assert await store.log("s-2") == [first[2]]
    assert await store.log("nobody") == []


async def test_list_filters_newest_first(store: SagaStore) -> None:
    await insert(
        store,
        saga("a", created_at=1.0),
        saga("b", created_at=2.0, status=SagaStatus.COMPLETED),
        saga("c", created_at=3.0, name="refund"),
        saga("d", created_at=4.0, name="refund", status=SagaStatus.COMPLETED),
    )

    def ids(states: list[SagaState]) -> list[str]:
        return [s.saga_id for s in states]

    assert ids(await store.list()) == ["d", "c", "b", "a"]
    assert ids(await store.list(limit=2)) == ["d", "c"]
    assert ids(await store.list(status=SagaStatus.COMPLETED)) == ["d", "b"]
    assert ids(await store.list(name="refund")) == ["d", "c"]
    assert ids(await store.list(name="refund", status=SagaStatus.RUNNING)) == ["c"]
    assert ids(await store.list(status=SagaStatus.FAILED)) == []


# --------------------------------------------------------------------------- outbox


async def test_outbox_add_claim_delete(store: SagaStore) -> None:
    now = time.time()
    sent = [envelope("s-1", n) for n in range(3)]
    async with store.transaction() as tx:
        ids = await tx.add_outbox(sent, publish_after=now)
        assert await tx.add_outbox([], publish_after=now) == []
    assert ids == sorted(ids) and len(set(ids)) == 3

    async with store.claim_outbox(now, 2) as items:
        assert [item.id for item in items] == ids[:2]
        assert [item.envelope for item in items] == sent[:2]
        assert items[0].envelope.trace == sent[0].trace
    async with store.claim_outbox(now, 10) as items:
        assert [(item.id, item.envelope) for item in items] == [(ids[2], sent[2])]
    async with store.claim_outbox(now, 10) as items:
        assert items == []


async def test_claim_that_raises_keeps_the_rows(store: SagaStore) -> None:
    now = time.time()
    async with store.transaction() as tx:
        ids = await tx.add_outbox([envelope("s-1", n) for n in range(2)], publish_after=now)
    with pytest.raises(Boom):
        async with store.claim_outbox(now, 10) as items:
            assert len(items) == 2
            raise Boom
    async with store.claim_outbox(now, 10) as items:
        assert [item.id for item in items] == ids


async def test_delete_outbox(store: SagaStore) -> None:
    now = time.time()
    async with store.transaction() as tx:
        ids = await tx.add_outbox([envelope("s-1", n) for n in range(3)], publish_after=now + 60)
    await store.delete_outbox(ids[:2])
    await store.delete_outbox([])
    assert await outbox_ids(store, now + 61) == ids[2:]


async def test_publish_after_is_respected(store: SagaStore) -> None:
    now = time.time()
    async with store.transaction() as tx:
        later = await tx.add_outbox([envelope("s-1", 1)], publish_after=now + 100)
        due = await tx.add_outbox([envelope("s-1", 0)], publish_after=now - 1)
    assert await outbox_ids(store, now) == due
    assert await outbox_ids(store, now + 100) == sorted(due + later)


async def test_concurrent_claims_never_share_a_row(store: SagaStore) -> None:
    now = time.time()
    async with store.transaction() as tx:
        ids = await tx.add_outbox([envelope(f"s-{n}") for n in range(40)], publish_after=now)

    # Two claims open at the same time get disjoint rows.
    async with store.claim_outbox(now, 10) as one, store.claim_outbox(now, 10) as two:
        assert len(one) == len(two) == 10
        assert not {i.id for i in one} & {i.id for i in two}

    # Many claimers racing until the outbox is empty see every row exactly once.
    seen: list[int] = []

    async def claimer() -> None:
        while True:
            async with store.claim_outbox(now, 3) as items:
                if not items:
                    return
                await asyncio.sleep(0.001)
                seen.extend(item.id for item in items)

    await asyncio.wait_for(asyncio.gather(*(claimer() for _ in range(5))), WAIT)
    assert sorted(seen) == ids[20:]


async def test_outbox_stats(store: SagaStore) -> None:
    now = time.time()
    assert await store.outbox_stats(now) == (0, 0.0)
    async with store.transaction() as tx:
        await tx.add_outbox([envelope("s-1", 0)], publish_after=now - 5)
        await tx.add_outbox([envelope("s-1", 1)], publish_after=now - 2)
        await tx.add_outbox([envelope("s-1", 2)], publish_after=now + 60)
    count, age = await store.outbox_stats(now)
    assert count == 2
    assert age == pytest.approx(5.0, abs=0.01)


async def test_wait_for_outbox_wakes_on_a_due_row(store: SagaStore) -> None:
    await store.wait_for_outbox(0.05)  # may return at once while it starts listening
    started = time.monotonic()
    await store.wait_for_outbox(0.3)  # nothing happens: it waits the timeout
    assert time.monotonic() - started >= 0.25

    waiter = asyncio.create_task(store.wait_for_outbox(WAIT * 3))
    assert await blocked(waiter)
    started = time.monotonic()
    async with store.transaction() as tx:
        await tx.add_outbox([envelope("s-1")], publish_after=time.time())
    await asyncio.wait_for(waiter, WAIT)
    assert time.monotonic() - started < 5


async def test_wait_for_outbox_ignores_deferred_rows(store: SagaStore) -> None:
    await store.wait_for_outbox(0.05)  # may return at once while it starts listening
    async with store.transaction() as tx:
        await tx.add_outbox([envelope("s-1")], publish_after=time.time() + 60)
    started = time.monotonic()
    await store.wait_for_outbox(0.5)
    assert time.monotonic() - started >= 0.45


# --------------------------------------------------------------------------- participant inbox


def reply(command: Envelope) -> Envelope:
    return command.reply(Outcome.SUCCESS, {"reservation": "r-1"})


async def test_claim_new_then_stored_reply(participant: ParticipantStore) -> None:
    command = envelope("s-1")
    async with participant.transaction() as tx:
        assert await tx.claim(command.command_id) is None
        await tx.complete(command.command_id, reply(command))
    async with participant.transaction() as tx:
        stored = await tx.claim(command.command_id)
    assert stored == reply(command)
    assert isinstance(stored, Envelope) and stored.trace == command.trace


async def test_rolled_back_claim_leaves_nothing(participant: ParticipantStore) -> None:
    command = envelope("s-1")
    with pytest.raises(Boom):
        async with participant.transaction() as tx:
            assert await tx.claim(command.command_id) is None
            await tx.complete(command.command_id, reply(command))
            raise Boom
    async with participant.transaction() as tx:
        assert await tx.claim(command.command_id) is None


async def test_complete_twice_raises(participant: ParticipantStore) -> None:
    command = envelope("s-1")
    async with participant.transaction() as tx:
        await tx.claim(command.command_id)
        await tx.complete(command.command_id, reply(command))
    async with participant.transaction() as tx:
        with pytest.raises(StoreError):
            await tx.complete(command.command_id, reply(command))


async def test_tombstone_then_claim(participant: ParticipantStore) -> None:
    async with participant.transaction() as tx:
        assert await tx.tombstone("s-1:step0:command") is None
    async with participant.transaction() as tx:
        assert await tx.claim("s-1:step0:command") == TOMBSTONE
        assert await tx.tombstone("s-1:step0:command") == TOMBSTONE
    async with participant.transaction() as tx:
        with pytest.raises(StoreError):
            await tx.complete("s-1:step0:command", reply(envelope("s-1")))


async def test_tombstone_after_complete_returns_the_reply(participant: ParticipantStore) -> None:
    command = envelope("s-1")
    async with participant.transaction() as tx:
        await tx.claim(command.command_id)
        await tx.complete(command.command_id, reply(command))
    async with participant.transaction() as tx:
        assert await tx.tombstone(command.command_id) == reply(command)
    async with participant.transaction() as tx:
        assert await tx.claim(command.command_id) == reply(command)


async def test_savepoint_rollback_undoes_the_claim(participant: ParticipantStore) -> None:
    command = envelope("s-1")
    kept = envelope("s-2")
    async with participant.transaction() as tx:
        with pytest.raises(Boom):
            async with tx.savepoint():
                assert await tx.claim(command.command_id) is None
                await tx.complete(command.command_id, reply(command))
                raise Boom
        async with tx.savepoint():
            await tx.claim(kept.command_id)
            await tx.complete(kept.command_id, reply(kept))
        assert await tx.claim(command.command_id) is None  # new again after the rollback
    async with participant.transaction() as tx:
        assert await tx.tombstone(command.command_id) is None
        assert await tx.claim(kept.command_id) == reply(kept)


async def test_concurrent_claim_waits_for_the_first(participant: ParticipantStore) -> None:
    command = envelope("s-1")
    claimed = asyncio.Event()
    release = asyncio.Event()

    async def first() -> None:
        async with participant.transaction() as tx:
            assert await tx.claim(command.command_id) is None
            claimed.set()
            await release.wait()
            await tx.complete(command.command_id, reply(command))

    async def second() -> Envelope | str | None:
        async with participant.transaction() as tx:
            return await tx.claim(command.command_id)

    one = asyncio.create_task(first())
    await claimed.wait()
    two = asyncio.create_task(second())
    assert await blocked(two)
    release.set()
    await one
    assert await asyncio.wait_for(two, WAIT) == reply(command)


async def test_concurrent_claim_after_a_rollback_is_new(participant: ParticipantStore) -> None:
    claimed = asyncio.Event()
    release = asyncio.Event()

    async def first() -> None:
        with pytest.raises(Boom):
            async with participant.transaction() as tx:
                await tx.claim("c-1")
                claimed.set()
                await release.wait()
                raise Boom

    async def second() -> Envelope | str | None:
        async with participant.transaction() as tx:
            return await tx.claim("c-1")

    one = asyncio.create_task(first())
    await claimed.wait()
    two = asyncio.create_task(second())
    assert await blocked(two)
    release.set()
    await one
    assert await asyncio.wait_for(two, WAIT) is None


async def test_write_saves_logs_and_queues_a_batch_at_once(store: SagaStore) -> None:
    await insert(store, saga("w-1"), saga("w-2"))
    async with store.transaction() as tx:
        states = await tx.lock(["w-1", "w-2"])
        changed = [s.model_copy(update={"status": SagaStatus.COMPLETED}) for s in states.values()]
        log = [entry("w-1", 1.0, LogEvent.COMPLETED), entry("w-2", 2.0, LogEvent.COMPLETED)]
        ids = await tx.write(changed, log, [envelope("w-1"), envelope("w-2", 1)], publish_after=0.0)
    assert len(ids) == 2 and ids == sorted(ids)
    for saga_id in ("w-1", "w-2"):
        got = await store.get(saga_id)
        assert got is not None and (got.status, got.version) == (SagaStatus.COMPLETED, 1)
        assert [e.event for e in await store.log(saga_id)] == [LogEvent.COMPLETED]
    async with store.claim_outbox(10.0, 10) as items:
        assert [i.envelope.saga_id for i in items] == ["w-1", "w-2"]
        assert items[0].envelope.trace == {"traceparent": TRACEPARENT, "tracestate": "vendor=1"}
    # nothing but a log line is fine too; a stale state conflicts and writes nothing
    async with store.transaction() as tx:
        assert (
            await tx.write([], [entry("w-1", 3.0, LogEvent.RETRY_REQUESTED)], [], publish_after=0.0)
            == []
        )
    with pytest.raises(ConcurrencyConflict):
        async with store.transaction() as tx:
            await tx.write(
                changed[:1],
                [entry("w-1", 4.0, LogEvent.FAILED)],
                [envelope("w-1", 7)],
                publish_after=0.0,
            )
    assert [e.event for e in await store.log("w-1")] == [
        LogEvent.COMPLETED,
        LogEvent.RETRY_REQUESTED,
    ]


async def test_commit_is_one_unit_of_work_of_its_own(store: SagaStore) -> None:
    """``commit``: inserts, guarded saves, log, outbox and deletes, all or nothing."""
    published = await insert_with_outbox(store, "c-0")
    ids = await store.commit(
        inserts=[saga("c-1"), saga("c-2")],
        log=[entry("c-1", 1.0, LogEvent.STARTED), entry("c-2", 2.0, LogEvent.STARTED)],
        envelopes=[envelope("c-1"), envelope("c-2")],
        publish_after=0.0,
        delete_outbox=published,
    )
    assert len(ids) == 2 and ids == sorted(ids)
    assert await outbox_ids(store, 10.0) == ids  # the published row is gone
    first = await store.get("c-1")
    assert first is not None and first.version == 0
    assert [e.event for e in await store.log("c-1")] == [LogEvent.STARTED]

    # a save is guarded by the version it was read at, and bumps it
    moved = first.model_copy(update={"status": SagaStatus.COMPENSATING})
    assert (
        await store.commit(states=[moved], log=[entry("c-1", 3.0, LogEvent.COMPENSATION_STARTED)])
        == []
    )
    again = await store.get("c-1")
    assert again is not None and (again.version, again.status) == (1, SagaStatus.COMPENSATING)

    # a stale save fails the whole unit: no insert, log, outbox row or delete
    second = await store.get("c-2")
    assert second is not None
    with pytest.raises(ConcurrencyConflict):
        await store.commit(
            inserts=[saga("c-3")],
            states=[second.model_copy(update={"status": SagaStatus.COMPLETED}), moved],
            log=[entry("c-2", 4.0, LogEvent.COMPLETED)],
            envelopes=[envelope("c-2", 5)],
            publish_after=0.0,
            delete_outbox=ids,
        )
    assert await store.get("c-3") is None
    unchanged = await store.get("c-2")
    assert unchanged is not None and unchanged.version == second.version
    assert unchanged.status is SagaStatus.RUNNING
    assert [e.event for e in await store.log("c-2")] == [LogEvent.STARTED]
    assert await outbox_ids(store, 10.0) == ids

    # an existing saga cannot be inserted again; nothing else of the unit lands
    with pytest.raises(StoreError) as raised:
        await store.commit(
            inserts=[saga("c-4"), saga("c-1")], log=[entry("c-4", 5.0, LogEvent.STARTED)]
        )
    assert not isinstance(raised.value, ConcurrencyConflict)
    assert await store.get("c-4") is None and await store.log("c-4") == []


async def insert_with_outbox(store: SagaStore, saga_id: str) -> list[int]:
    """A saga with one queued message; returns the message's outbox id."""
    async with store.transaction() as tx:
        await tx.insert(saga(saga_id))
        return await tx.add_outbox([envelope(saga_id)], publish_after=0.0)


async def test_a_failing_command_transaction_keeps_nothing_and_its_error(
    participant: ParticipantStore,
) -> None:
    """The worker tells a handler's own exception from the store's by identity:
    an exception leaving the transaction is the same object, and nothing of the
    transaction (a claim, a tombstone) is kept."""
    command, undone = envelope("r-1"), envelope("r-2")
    boom = Boom()
    with pytest.raises(Boom) as raised:
        async with participant.transaction() as tx:
            assert await tx.tombstone(undone.command_id) is None
            assert await tx.claim(command.command_id) is None
            raise boom
    assert raised.value is boom
    async with participant.transaction() as tx:
        assert await tx.claim(command.command_id) is None
        assert await tx.claim(undone.command_id) is None
