"""One contract for every ``SagaStore`` and ``ParticipantStore``: memory and PostgreSQL.

The same tests run against the in-memory stores and against the PostgreSQL
stores on a fresh database, so the doubles cannot drift: atomic transactions,
row locks, version checks, outbox claims that never overlap, timers, the inbox.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from sagaflow.core.errors import ConcurrencyConflict, StoreError
from sagaflow.core.messages import Envelope, MessageKind, Outcome
from sagaflow.core.ports import TOMBSTONE, OutboxItem, ParticipantStore, SagaStore, UnitOfWork
from sagaflow.core.state import LogEntry, LogEvent, SagaState, SagaStatus, Timer

WAIT = 10.0  # the longest any single wait may take before the test fails
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


class Boom(Exception):
    """Raised by a test to abort a transaction."""


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
        await tx.write(UnitOfWork(inserts=states))


async def queue(store: SagaStore, *messages: Envelope) -> None:
    async with store.transaction() as tx:
        await tx.write(UnitOfWork(messages=messages))


async def peek_outbox(store: SagaStore) -> list[OutboxItem]:
    """Claim without deleting: every row, oldest first."""
    with pytest.raises(Boom):
        async with store.claim_outbox(10_000) as items:
            raise Boom
    return items


async def nothing_of(store: SagaStore, *saga_ids: str) -> bool:
    """Whether no saga, log entry or outbox row of ``saga_ids`` exists."""
    for saga_id in saga_ids:
        if await store.get(saga_id) is not None or await store.log(saga_id):
            return False
    return not [i for i in await peek_outbox(store) if i.envelope.saga_id in saga_ids]


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


async def test_insert_of_an_existing_saga_raises_store_error(store: SagaStore) -> None:
    await insert(store, saga("s-1"))
    with pytest.raises(StoreError) as raised:
        async with store.transaction() as tx:
            await tx.write(
                UnitOfWork(
                    inserts=[saga("s-2"), saga("s-1", name="other")],
                    log=[entry("s-2", 1.0, LogEvent.STARTED)],
                    messages=[envelope("s-2")],
                )
            )
    assert not isinstance(raised.value, ConcurrencyConflict)
    assert await store.get("s-1") == saga("s-1")
    assert await nothing_of(store, "s-2")  # nothing of the unit, once rolled back

    with pytest.raises(StoreError):  # twice in one unit is no better
        async with store.transaction() as tx:
            await tx.write(UnitOfWork(inserts=[saga("s-3"), saga("s-3")]))
    assert await nothing_of(store, "s-3")
    await insert(store, saga("s-2"), saga("s-3"))  # the ids stayed free


@pytest.mark.parametrize("first_commits", [True, False], ids=["commits", "rolls-back"])
async def test_concurrent_insert_of_one_id(store: SagaStore, first_commits: bool) -> None:
    inserted = asyncio.Event()
    release = asyncio.Event()

    async def first() -> None:
        async with store.transaction() as tx:
            await tx.write(UnitOfWork(inserts=[saga("s-1")]))
            inserted.set()
            await release.wait()
            if not first_commits:
                raise Boom

    async def second() -> None:
        async with store.transaction() as tx:
            await tx.write(UnitOfWork(inserts=[saga("s-1", name="second")]))

    one = asyncio.create_task(first())
    await inserted.wait()
    two = asyncio.create_task(second())
    assert await blocked(two)  # waits on the primary key
    release.set()
    if first_commits:
        await one
        with pytest.raises(StoreError):
            await asyncio.wait_for(two, WAIT)
        assert await store.get("s-1") == saga("s-1")
    else:
        with pytest.raises(Boom):
            await one
        await asyncio.wait_for(two, WAIT)  # the id came free
        assert await store.get("s-1") == saga("s-1", name="second")


async def test_insert_is_visible_to_its_own_transaction(store: SagaStore) -> None:
    async with store.transaction() as tx:
        await tx.write(UnitOfWork(inserts=[saga("s-1")]))
        assert await tx.lock(["s-1"]) == {"s-1": saga("s-1")}


async def test_save_bumps_the_version(store: SagaStore) -> None:
    await insert(store, saga("s-1"))
    async with store.transaction() as tx:
        state = (await tx.lock(["s-1"]))["s-1"]
        await tx.write(
            UnitOfWork(states=[state.model_copy(update={"status": SagaStatus.COMPENSATING})])
        )

    saved = await store.get("s-1")
    assert saved is not None
    assert (saved.version, saved.status) == (1, SagaStatus.COMPENSATING)
    async with store.transaction() as tx:
        state = (await tx.lock(["s-1"]))["s-1"]
        assert state == saved
        await tx.write(
            UnitOfWork(states=[state.model_copy(update={"status": SagaStatus.COMPENSATED})])
        )
    saved = await store.get("s-1")
    assert saved is not None
    assert (saved.version, saved.status) == (2, SagaStatus.COMPENSATED)


async def test_save_of_a_stale_version_conflicts(store: SagaStore) -> None:
    await insert(store, saga("s-1"))
    stale = await store.get("s-1")
    assert stale is not None
    async with store.transaction() as tx:
        await tx.write(UnitOfWork(states=[stale]))

    with pytest.raises(ConcurrencyConflict):
        async with store.transaction() as tx:
            await tx.write(
                UnitOfWork(states=[stale.model_copy(update={"status": SagaStatus.FAILED})])
            )
    with pytest.raises(ConcurrencyConflict):
        async with store.transaction() as tx:
            await tx.write(UnitOfWork(states=[saga("never-inserted")]))
    current = await store.get("s-1")
    assert current is not None
    assert (current.version, current.status) == (1, SagaStatus.RUNNING)
    assert await store.get("never-inserted") is None


async def test_a_conflict_in_a_batch_writes_nothing_of_the_unit(store: SagaStore) -> None:
    await insert(store, saga("s-1"), saga("s-2"), saga("s-3"))
    async with store.transaction() as tx:
        states = await tx.lock(["s-1", "s-2", "s-3"])
        await tx.write(
            UnitOfWork(
                states=[
                    s.model_copy(update={"status": SagaStatus.COMPLETED}) for s in states.values()
                ]
            )
        )
    for saga_id in ("s-1", "s-2", "s-3"):
        saved = await store.get(saga_id)
        assert saved is not None
        assert (saved.version, saved.status) == (1, SagaStatus.COMPLETED)

    with pytest.raises(ConcurrencyConflict, match="s-2"):
        async with store.transaction() as tx:
            fresh = await tx.lock(["s-1"])
            await tx.write(
                UnitOfWork(
                    inserts=[saga("s-4")],
                    states=[fresh["s-1"], saga("s-2")],  # s-2 is at version 1, not 0
                    log=[entry("s-1", 1.0, LogEvent.FAILED), entry("s-4", 1.0, LogEvent.STARTED)],
                    messages=[envelope("s-1"), envelope("s-4")],
                )
            )
    saved = await store.get("s-1")
    assert saved is not None
    assert saved.version == 1  # the whole transaction rolled back
    assert await nothing_of(store, "s-4")
    assert await store.log("s-1") == []
    assert await peek_outbox(store) == []


async def test_a_saga_twice_in_states_raises_value_error(store: SagaStore) -> None:
    await insert(store, saga("s-1"))
    with pytest.raises(ValueError, match="twice"):
        async with store.transaction() as tx:
            state = (await tx.lock(["s-1"]))["s-1"]
            await tx.write(
                UnitOfWork(
                    inserts=[saga("s-2")],
                    states=[state, state.model_copy(update={"status": SagaStatus.FAILED})],
                    log=[entry("s-1", 1.0, LogEvent.FAILED)],
                    messages=[envelope("s-1")],
                )
            )
    assert await store.get("s-1") == saga("s-1")
    assert await store.log("s-1") == []
    assert await nothing_of(store, "s-2")
    assert await peek_outbox(store) == []


async def test_write_inserts_saves_logs_and_queues_a_batch_at_once(store: SagaStore) -> None:
    await insert(store, saga("w-1"), saga("w-2"))
    async with store.transaction() as tx:
        states = await tx.lock(["w-1", "w-2"])
        changed = [s.model_copy(update={"status": SagaStatus.COMPLETED}) for s in states.values()]
        log = [
            entry("w-1", 1.0, LogEvent.COMPLETED),
            entry("w-2", 2.0, LogEvent.COMPLETED),
            entry("w-3", 3.0, LogEvent.STARTED),
        ]
        sent = [envelope("w-1"), envelope("w-2", 1), envelope("w-3")]
        await tx.write(UnitOfWork(inserts=[saga("w-3")], states=changed, log=log, messages=sent))
    for saga_id in ("w-1", "w-2"):
        got = await store.get(saga_id)
        assert got is not None and (got.status, got.version) == (SagaStatus.COMPLETED, 1)
        assert [e.event for e in await store.log(saga_id)] == [LogEvent.COMPLETED]
    assert await store.get("w-3") == saga("w-3")
    assert await store.log("w-3") == [log[2]]
    async with store.claim_outbox(10) as items:
        assert [i.envelope for i in items] == sent
        assert items[0].envelope.trace == {"traceparent": TRACEPARENT, "tracestate": "vendor=1"}
    # nothing but a log line is fine too; a stale state conflicts and writes nothing
    async with store.transaction() as tx:
        await tx.write(UnitOfWork(log=[entry("w-1", 3.0, LogEvent.RETRY_REQUESTED)]))
    with pytest.raises(ConcurrencyConflict):
        async with store.transaction() as tx:
            await tx.write(
                UnitOfWork(
                    states=changed[:1],
                    log=[entry("w-1", 4.0, LogEvent.FAILED)],
                    messages=[envelope("w-1", 7)],
                )
            )
    assert [e.event for e in await store.log("w-1")] == [
        LogEvent.COMPLETED,
        LogEvent.RETRY_REQUESTED,
    ]
    assert await peek_outbox(store) == []


async def test_concurrent_saves_of_one_version_conflict(store: SagaStore) -> None:
    await insert(store, saga("s-1"))
    loaded = await store.get("s-1")
    assert loaded is not None
    first_saved = asyncio.Event()
    release_first = asyncio.Event()

    async def first() -> None:
        async with store.transaction() as tx:
            await tx.write(UnitOfWork(states=[loaded]))
            first_saved.set()
            await release_first.wait()

    async def second() -> None:
        await first_saved.wait()
        async with store.transaction() as tx:
            await tx.write(UnitOfWork(states=[loaded]))  # waits on the row, then finds version 1

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
            await tx.write(UnitOfWork(states=[state.model_copy(update={"data": {"by": "holder"}})]))

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
            state = (await tx.lock(["s-1"]))["s-1"]
            await tx.write(
                UnitOfWork(
                    inserts=[saga("s-2")],
                    states=[state.model_copy(update={"status": SagaStatus.FAILED})],
                    log=[entry("s-1", now, LogEvent.FAILED)],
                    messages=[envelope("s-1")],
                )
            )
            await tx.write(UnitOfWork(log=[entry("s-2", now, LogEvent.STARTED)]))
            raise Boom

    assert await nothing_of(store, "s-2")
    assert await store.get("s-1") == saga("s-1")
    assert await store.log("s-1") == []
    assert await store.outbox_stats(now + 1) == (0, 0.0)
    async with store.claim_outbox(10) as items:
        assert items == []


# --------------------------------------------------------------------------- timers

KNOWN = [("create-order", 1)]
"""The definitions the timer queries below ask for (what ``saga()`` makes)."""


async def test_lock_due_takes_only_the_kinds_asked_for(store: SagaStore) -> None:
    """Sagas of a definition the coordinator does not know never fill its batch:
    205 of them, due earlier, stopped every other timeout (issue 11, item 4)."""
    ghosts = [saga(f"ghost-{n:03}", name="ghost", wake_at=10.0 + n) for n in range(205)]
    await insert(store, *ghosts, saga("known", wake_at=500.0))
    async with store.transaction() as tx:
        assert [s.saga_id for s in await tx.lock_due(1000.0, 200, KNOWN)] == ["known"]
    async with store.transaction() as tx:
        assert len(await tx.lock_due(1000.0, 300, [("ghost", 1)])) == 205


async def test_lock_due_returns_due_sagas_earliest_first(store: SagaStore) -> None:
    await insert(
        store,
        saga("late", wake_at=1_000_030.0),
        saga("first", wake_at=1_000_010.0),
        saga("second", wake_at=1_000_020.0),
        saga("idle"),
    )
    async with store.transaction() as tx:
        assert [s.saga_id for s in await tx.lock_due(1_000_025.0, 10, KNOWN)] == ["first", "second"]
    async with store.transaction() as tx:
        assert [s.saga_id for s in await tx.lock_due(1_000_100.0, 2, KNOWN)] == ["first", "second"]
    async with store.transaction() as tx:
        assert await tx.lock_due(1_000_000.0, 10, KNOWN) == []


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
            due = await asyncio.wait_for(tx.lock_due(100.0, 2, KNOWN), WAIT)
            assert [s.saga_id for s in due] == ["b", "c"]

            async def other() -> list[str]:
                async with store.transaction() as tx2:
                    return [s.saga_id for s in await tx2.lock_due(100.0, 10, KNOWN)]

            assert await asyncio.wait_for(other(), WAIT) == []  # a held by holder, b/c by us
    finally:
        release.set()
        await hold


async def test_saving_a_new_timer_moves_the_saga(store: SagaStore) -> None:
    await insert(store, saga("s-1", wake_at=10.0))
    async with store.transaction() as tx:
        [state] = await tx.lock_due(15.0, 10, KNOWN)
        await tx.write(UnitOfWork(states=[state.model_copy(update={"timer": None})]))
    async with store.transaction() as tx:
        assert await tx.lock_due(1e12, 10, KNOWN) == []
        state = (await tx.lock(["s-1"]))["s-1"]
        timer = Timer(purpose="retry", step_index=0, kind=MessageKind.COMMAND, attempt=2, due_at=50)
        await tx.write(UnitOfWork(states=[state.model_copy(update={"timer": timer})]))
    async with store.transaction() as tx:
        assert await tx.lock_due(40.0, 10, KNOWN) == []
        assert [s.saga_id for s in await tx.lock_due(50.0, 10, KNOWN)] == ["s-1"]


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
    # written order, not time order: the clock may step back between entries
    backwards = [
        entry("s-3", 1_700_000_100.0 - n, LogEvent.RETRY_REQUESTED, attempt=n + 1)
        for n in range(40)
    ]
    async with store.transaction() as tx:
        await tx.write(UnitOfWork(log=first))
    async with store.transaction() as tx:
        await tx.write(UnitOfWork(log=later))
        await tx.write(UnitOfWork())
        await tx.write(UnitOfWork(log=backwards))

    assert await store.log("s-1") == [first[0], first[1], later[0]]
    assert await store.log("s-2") == [first[2]]
    assert await store.log("s-3") == backwards
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


async def test_outbox_keeps_order_and_claims_delete_oldest_first(store: SagaStore) -> None:
    sent = [envelope("s-1", n) for n in range(3)]
    await queue(store, *sent)
    await queue(store, envelope("s-2"))

    async with store.claim_outbox(2) as items:
        assert [item.envelope for item in items] == sent[:2]
        assert items[0].envelope.trace == sent[0].trace
        first = [item.id for item in items]
    async with store.claim_outbox(10) as items:
        assert [item.envelope for item in items] == [sent[2], envelope("s-2")]
        ids = first + [item.id for item in items]
    assert ids == sorted(ids) and len(set(ids)) == 4
    async with store.claim_outbox(10) as items:
        assert items == []  # deleted when the blocks exited


async def test_committed_rows_are_due_at_once_uncommitted_ones_are_not(store: SagaStore) -> None:
    async with store.transaction() as tx:
        await tx.write(UnitOfWork(inserts=[saga("s-1")], messages=[envelope("s-1")]))
        async with store.claim_outbox(10) as items:
            assert items == []
    async with store.claim_outbox(10) as items:  # no grace: claimable right after commit
        assert [item.envelope for item in items] == [envelope("s-1")]


async def test_claim_that_raises_keeps_the_rows(store: SagaStore) -> None:
    await queue(store, *(envelope("s-1", n) for n in range(2)))
    with pytest.raises(Boom):
        async with store.claim_outbox(10) as items:
            assert len(items) == 2
            claimed = items
            raise Boom
    async with store.claim_outbox(10) as items:
        assert items == claimed


async def test_concurrent_claims_never_share_a_row(store: SagaStore) -> None:
    await queue(store, *(envelope(f"s-{n}") for n in range(40)))
    ids = [item.id for item in await peek_outbox(store)]
    assert len(ids) == 40

    # Two claims open at the same time get disjoint rows: the second skips the
    # rows the first holds and takes the next oldest.
    async with store.claim_outbox(10) as one, store.claim_outbox(10) as two:
        assert [i.id for i in one] == ids[:10]
        assert [i.id for i in two] == ids[10:20]

    # Many claimers racing until the outbox is empty see every row exactly once.
    seen: list[int] = []

    async def claimer() -> None:
        while True:
            async with store.claim_outbox(3) as items:
                if not items:
                    return
                await asyncio.sleep(0.001)
                seen.extend(item.id for item in items)

    await asyncio.wait_for(asyncio.gather(*(claimer() for _ in range(5))), WAIT)
    assert sorted(seen) == ids[20:]


async def test_outbox_stats_counts_every_row(store: SagaStore) -> None:
    before = time.time()
    assert await store.outbox_stats(before) == (0, 0.0)
    await queue(store, envelope("s-1", 0), envelope("s-1", 1))
    await queue(store, envelope("s-1", 2))
    count, age = await store.outbox_stats(before + 60)
    assert count == 3
    assert age == pytest.approx(60.0, abs=1.0)  # the oldest row's
    async with store.claim_outbox(10) as items:
        assert len(items) == 3
    assert await store.outbox_stats(before + 60) == (0, 0.0)


async def test_wait_for_outbox_wakes_at_once_on_a_commit_with_messages(store: SagaStore) -> None:
    await store.wait_for_outbox(0.05)  # may return at once while it starts listening
    started = time.monotonic()
    await store.wait_for_outbox(0.3)  # nothing happens: it waits the timeout
    assert time.monotonic() - started >= 0.25

    # A commit without messages, or a rolled-back one with messages, is no reason to wake.
    started = time.monotonic()
    waiter = asyncio.create_task(store.wait_for_outbox(0.6))
    await insert(store, saga("s-1"))
    with pytest.raises(Boom):
        async with store.transaction() as tx:
            await tx.write(UnitOfWork(messages=[envelope("s-1")]))
            raise Boom
    await asyncio.wait_for(waiter, WAIT)
    assert time.monotonic() - started >= 0.55

    waiter = asyncio.create_task(store.wait_for_outbox(WAIT * 3))
    assert await blocked(waiter)
    started = time.monotonic()
    await queue(store, envelope("s-1"))
    await asyncio.wait_for(waiter, WAIT)
    assert time.monotonic() - started < 1.0


# --------------------------------------------------------------------------- participant inbox


def reply(command: Envelope) -> Envelope:
    return command.reply(Outcome.SUCCESS, {"reservation": "r-1"})


async def test_claim_new_then_stored_reply(participant: ParticipantStore) -> None:
    command = envelope("s-1")
    async with participant.transaction() as tx:
        assert await tx.claim([command.command_id]) == {}
        await tx.complete([reply(command)])
    async with participant.transaction() as tx:
        stored = (await tx.claim([command.command_id]))[command.command_id]
    assert stored == reply(command)
    assert isinstance(stored, Envelope) and stored.trace == command.trace


async def test_rolled_back_claim_leaves_nothing(participant: ParticipantStore) -> None:
    command = envelope("s-1")
    with pytest.raises(Boom):
        async with participant.transaction() as tx:
            assert await tx.claim([command.command_id]) == {}
            await tx.complete([reply(command)])
            raise Boom
    async with participant.transaction() as tx:
        assert await tx.claim([command.command_id]) == {}


async def test_complete_twice_raises(participant: ParticipantStore) -> None:
    command = envelope("s-1")
    async with participant.transaction() as tx:
        await tx.claim([command.command_id])
        await tx.complete([reply(command)])
    async with participant.transaction() as tx:
        with pytest.raises(StoreError):
            await tx.complete([reply(command)])


async def test_tombstone_then_claim(participant: ParticipantStore) -> None:
    async with participant.transaction() as tx:
        assert await tx.tombstone("s-1:step0:command") is None
    async with participant.transaction() as tx:
        assert await tx.claim(["s-1:step0:command"]) == {"s-1:step0:command": TOMBSTONE}
        assert await tx.tombstone("s-1:step0:command") == TOMBSTONE
    async with participant.transaction() as tx:
        with pytest.raises(StoreError):
            tombstoned = reply(envelope("s-1")).model_copy(
                update={"command_id": "s-1:step0:command"}
            )
            await tx.complete([tombstoned])


async def test_tombstone_after_complete_returns_the_reply(participant: ParticipantStore) -> None:
    command = envelope("s-1")
    async with participant.transaction() as tx:
        await tx.claim([command.command_id])
        await tx.complete([reply(command)])
    async with participant.transaction() as tx:
        assert await tx.tombstone(command.command_id) == reply(command)
    async with participant.transaction() as tx:
        assert await tx.claim([command.command_id]) == {command.command_id: reply(command)}


async def test_savepoint_rollback_undoes_the_claim(participant: ParticipantStore) -> None:
    command = envelope("s-1")
    kept = envelope("s-2")
    async with participant.transaction() as tx:
        with pytest.raises(Boom):
            async with tx.savepoint():
                assert await tx.claim([command.command_id]) == {}
                await tx.complete([reply(command)])
                raise Boom
        async with tx.savepoint():
            await tx.claim([kept.command_id])
            await tx.complete([reply(kept)])
        assert await tx.claim([command.command_id]) == {}  # new again after the rollback
    async with participant.transaction() as tx:
        assert await tx.tombstone(command.command_id) is None
        assert await tx.claim([kept.command_id]) == {kept.command_id: reply(kept)}


async def test_concurrent_claim_waits_for_the_first(participant: ParticipantStore) -> None:
    command = envelope("s-1")
    claimed = asyncio.Event()
    release = asyncio.Event()

    async def first() -> None:
        async with participant.transaction() as tx:
            assert await tx.claim([command.command_id]) == {}
            claimed.set()
            await release.wait()
            await tx.complete([reply(command)])

    async def second() -> Envelope | str | None:
        async with participant.transaction() as tx:
            return await tx.claim([command.command_id])

    one = asyncio.create_task(first())
    await claimed.wait()
    two = asyncio.create_task(second())
    assert await blocked(two)
    release.set()
    await one
    assert await asyncio.wait_for(two, WAIT) == {command.command_id: reply(command)}


async def test_concurrent_claim_after_a_rollback_is_new(participant: ParticipantStore) -> None:
    claimed = asyncio.Event()
    release = asyncio.Event()

    async def first() -> None:
        with pytest.raises(Boom):
            async with participant.transaction() as tx:
                await tx.claim(["c-1"])
                claimed.set()
                await release.wait()
                raise Boom

    async def second() -> dict[str, Envelope | str]:
        async with participant.transaction() as tx:
            return await tx.claim(["c-1"])

    one = asyncio.create_task(first())
    await claimed.wait()
    two = asyncio.create_task(second())
    assert await blocked(two)
    release.set()
    await one
    assert await asyncio.wait_for(two, WAIT) == {}


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
            assert await tx.claim([command.command_id]) == {}
            raise boom
    assert raised.value is boom
    async with participant.transaction() as tx:
        assert await tx.claim([command.command_id]) == {}
        assert await tx.claim([undone.command_id]) == {}


async def test_a_batch_claim_answers_the_seen_and_claims_the_rest(
    participant: ParticipantStore,
) -> None:
    done, tombstoned, new = envelope("b-1"), envelope("b-2"), envelope("b-3")
    async with participant.transaction() as tx:
        assert await tx.claim([done.command_id]) == {}
        await tx.complete([reply(done)])
        assert await tx.tombstone(tombstoned.command_id) is None
    async with participant.transaction() as tx:
        ids = [new.command_id, tombstoned.command_id, done.command_id, new.command_id]
        assert await tx.claim(ids) == {
            done.command_id: reply(done),
            tombstoned.command_id: TOMBSTONE,
        }
        await tx.complete([reply(new)])
        with pytest.raises(StoreError):
            await tx.complete([reply(done)])


# --------------------------------------------------------------------------- definitions


async def test_record_definitions_keeps_the_first_record(store: SagaStore) -> None:
    from sagaflow.core.fingerprint import DefinitionRecord

    first = DefinitionRecord("trip", 1, "aaaa", {"saga": "trip", "steps": [{"name": "a"}]})
    other = DefinitionRecord("trip", 1, "bbbb", {"saga": "trip", "steps": []})
    second = DefinitionRecord("trip", 2, "cccc", {"saga": "trip", "steps": []})
    assert await store.record_definitions([]) == []
    assert await store.record_definitions([first]) == [first]
    assert await store.record_definitions([second, other]) == [second, first]


async def test_list_overdue_and_the_deadline_wakes_the_saga(store: SagaStore) -> None:
    late = saga("late").model_copy(update={"deadline_at": 1_700_000_100.0})
    marked = saga("marked", status=SagaStatus.COMPLETED).model_copy(update={"overdue": True})
    later = saga("later", wake_at=1_700_000_050.0).model_copy(
        update={"deadline_at": 1_700_000_900.0}
    )
    finished = saga("finished", status=SagaStatus.COMPLETED).model_copy(
        update={"deadline_at": 1_700_000_100.0}
    )
    await insert(store, late, marked, later, finished)
    overdue = await store.list(overdue_at=1_700_000_200.0)
    assert sorted(s.saga_id for s in overdue) == ["late", "marked"]
    assert [s.saga_id for s in await store.list(overdue_at=1_700_000_000.0)] == ["marked"]
    # the deadline is a timer for the store's scan: the earlier of the two wakes the saga
    async with store.transaction() as tx:
        due = await tx.lock_due(1_700_000_100.0, 10, [("create-order", 1)])
    assert sorted(s.saga_id for s in due) == ["late", "later"]
