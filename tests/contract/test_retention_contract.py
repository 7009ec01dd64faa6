"""Retention, one contract for the in-memory and the PostgreSQL stores.

``SagaStore.prune`` deletes sagas in terminal statuses last changed before a
cutoff, with their log, oldest first, at most ``limit`` per call, skipping
sagas a transaction holds; a running saga is never deleted, whatever its age.
``ParticipantStore.prune_inbox`` deletes inbox rows written before a cutoff.
(Issue 11: before, there was no retention at all.)
"""

from __future__ import annotations

import asyncio
import time

import pytest

from sagaflow.core.messages import Envelope, MessageKind, Outcome
from sagaflow.core.ports import ParticipantStore, Pruned, SagaStore, UnitOfWork
from sagaflow.core.state import LogEntry, LogEvent, SagaState, SagaStatus
from sagaflow.runtime.retention import FINISHED, Retention, prune_inbox, prune_sagas

T0 = 1_700_000_000.0
HOUR = 3600.0


def saga(saga_id: str, status: SagaStatus, updated_at: float) -> SagaState:
    return SagaState(
        saga_id=saga_id,
        saga_name="create-order",
        saga_version=1,
        status=status,
        data={"order_id": saga_id},
        created_at=updated_at - 60,
        updated_at=updated_at,
    )


def logged(saga_id: str, at: float, n: int = 3) -> list[LogEntry]:
    return [LogEntry(saga_id=saga_id, at=at, event=LogEvent.STARTED) for _ in range(n)]


async def insert(store: SagaStore, *states: SagaState, log_entries: int = 3) -> None:
    log = [e for s in states for e in logged(s.saga_id, s.updated_at, log_entries)]
    async with store.transaction() as tx:
        await tx.write(UnitOfWork(inserts=states, log=log))


async def test_finished_sagas_past_the_cutoff_go_with_their_log(store: SagaStore) -> None:
    old, new = T0, T0 + 10 * HOUR
    await insert(
        store,
        saga("done-old", SagaStatus.COMPLETED, old),
        saga("comp-old", SagaStatus.COMPENSATED, old),
        saga("cancel-old", SagaStatus.CANCELLED, old),
        saga("done-new", SagaStatus.COMPLETED, new),
    )

    pruned = await store.prune(FINISHED, T0 + HOUR, 100)

    assert pruned == Pruned(sagas=3, log_entries=9)
    for gone in ("done-old", "comp-old", "cancel-old"):
        assert await store.get(gone) is None
        assert await store.log(gone) == []
    assert await store.get("done-new") is not None
    assert len(await store.log("done-new")) == 3
    assert await store.prune(FINISHED, T0 + HOUR, 100) == Pruned()


async def test_running_and_failed_sagas_are_never_pruned_with_the_finished(
    store: SagaStore,
) -> None:
    await insert(
        store,
        saga("running", SagaStatus.RUNNING, T0),
        saga("compensating", SagaStatus.COMPENSATING, T0),
        saga("failed", SagaStatus.FAILED, T0),
    )

    assert await store.prune(FINISHED, T0 + 1000 * HOUR, 100) == Pruned()

    for kept in ("running", "compensating", "failed"):
        assert await store.get(kept) is not None
    # FAILED ones only when asked for, by their own cutoff
    assert await store.prune([SagaStatus.FAILED], T0 + HOUR, 100) == Pruned(1, 3)
    assert await store.get("failed") is None


@pytest.mark.parametrize("status", [SagaStatus.RUNNING, SagaStatus.COMPENSATING])
async def test_asking_to_prune_running_sagas_is_refused(
    store: SagaStore, status: SagaStatus
) -> None:
    await insert(store, saga("running", status, T0))
    with pytest.raises(ValueError, match="terminal"):
        await store.prune([SagaStatus.COMPLETED, status], T0 + HOUR, 100)
    with pytest.raises(ValueError):
        await store.prune([], T0 + HOUR, 100)
    assert await store.get("running") is not None


async def test_prune_takes_at_most_limit_oldest_first(store: SagaStore) -> None:
    await insert(store, *(saga(f"s{n}", SagaStatus.COMPLETED, T0 + n) for n in range(10)))

    first = await store.prune(FINISHED, T0 + HOUR, 4)

    assert first == Pruned(sagas=4, log_entries=12)
    left = {s.saga_id for s in await store.list(limit=100)}
    assert left == {f"s{n}" for n in range(4, 10)}


async def test_a_saga_held_by_a_transaction_is_skipped_not_waited_for(store: SagaStore) -> None:
    await insert(
        store, saga("held", SagaStatus.COMPLETED, T0), saga("free", SagaStatus.COMPLETED, T0)
    )
    async with store.transaction() as tx:
        assert set(await tx.lock(["held"])) == {"held"}
        pruned = await asyncio.wait_for(store.prune(FINISHED, T0 + HOUR, 100), 5)
    assert pruned.sagas == 1
    assert await store.get("held") is not None
    assert await store.get("free") is None


async def test_prune_sagas_runs_batches_until_none_is_left(
    store: SagaStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    await insert(
        store,
        *(saga(f"s{n}", SagaStatus.COMPLETED, T0) for n in range(25)),
        *(saga(f"f{n}", SagaStatus.FAILED, T0) for n in range(3)),
        saga("young", SagaStatus.COMPLETED, T0 + 100 * HOUR),
        log_entries=2,
    )
    calls: list[int] = []
    original = store.prune

    async def counted(statuses: list[SagaStatus], before: float, limit: int) -> Pruned:
        result = await original(statuses, before, limit)
        calls.append(result.sagas)
        return result

    monkeypatch.setattr(store, "prune", counted)
    retention = Retention(finished=HOUR, failed=2 * HOUR, batch=10)

    pruned = await prune_sagas(store, retention, now=T0 + 3 * HOUR)

    assert pruned == Pruned(sagas=28, log_entries=56)
    assert calls == [10, 10, 5, 3]  # one transaction each, none over the batch
    assert [s.saga_id for s in await store.list(limit=100)] == ["young"]


# --------------------------------------------------------------------------- inbox


def reply(command_id: str) -> Envelope:
    saga_id = command_id.split(":")[0]
    return Envelope(
        message_id=f"{command_id}:reply:1",
        command_id=command_id,
        saga_id=saga_id,
        saga_name="create-order",
        step="reserve",
        step_index=0,
        kind=MessageKind.REPLY,
        attempt=1,
        type="inventory.reserve",
        payload={},
        outcome=Outcome.SUCCESS,
        for_kind=MessageKind.COMMAND,
    )


async def handled(participant: ParticipantStore, *command_ids: str) -> None:
    async with participant.transaction() as tx:
        await tx.claim(command_ids)
        await tx.complete([reply(c) for c in command_ids])


async def test_inbox_rows_written_before_the_cutoff_are_pruned(
    participant: ParticipantStore,
) -> None:
    await handled(participant, "a:reserve:command", "b:reserve:command")
    async with participant.transaction() as tx:
        assert await tx.tombstone("c:reserve:compensation") is None

    assert await participant.prune_inbox(time.time() - HOUR, 100) == 0  # all younger
    assert await participant.prune_inbox(time.time() + 60, 2) == 2  # at most the limit
    assert await participant.prune_inbox(time.time() + 60, 100) == 1

    # gone means new again: exactly why the retention must outlive redeliveries
    async with participant.transaction() as tx:
        assert await tx.claim(["a:reserve:command"]) == {}


async def test_an_inbox_row_held_by_a_command_transaction_is_skipped(
    participant: ParticipantStore,
) -> None:
    await handled(participant, "a:reserve:command", "b:reserve:command")
    async with participant.transaction() as tx:
        stored = await tx.claim(["a:reserve:command"])
        assert set(stored) == {"a:reserve:command"}
        deleted = await asyncio.wait_for(participant.prune_inbox(time.time() + 60, 100), 5)
    assert deleted == 1
    async with participant.transaction() as tx:
        assert set(await tx.claim(["a:reserve:command"])) == {"a:reserve:command"}


async def test_prune_inbox_runs_batches_until_none_is_left(
    participant: ParticipantStore,
) -> None:
    await handled(participant, *(f"s{n}:reserve:command" for n in range(23)))
    assert await prune_inbox(participant, 60.0, time.time() + 120, batch=5) == 23
    assert await participant.prune_inbox(time.time() + 120, 100) == 0
