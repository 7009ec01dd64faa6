"""Scenario 7: a participant that does not answer, and a compensation that keeps failing.

Both with the ``quick`` variant of create-order (3-second step timeouts,
three attempts per step, four per compensation; ``tests/faults/sagas.py``).

A: the shipping worker is frozen (SIGSTOP) mid-run. Sagas that reach
``schedule`` meanwhile time out, send the command again, time out again and,
after their third attempt, abandon the step and compensate: shipping's
``cancel`` first (its effect is unknown), then refund and release together
(reserve and charge ran in one parallel group), then reject.
The worker is thawed (SIGCONT) before the compensations run out of attempts.

B: inventory's reservations table rejects updates (a trigger), so ``release``
fails. Sagas that must release stock (their reservation is in force) retry it
with growing back-off, then end FAILED. The trigger is dropped and an operator resumes each FAILED saga with
``sagaflow sagas retry <id>`` (the CLI for a few, the same ``SagaClient``
call for the rest): they end COMPENSATED, with who and why in their log.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections import Counter

import asyncpg
import pytest

from sagaflow import SagaClient, SagaStatus
from sagaflow.store import PostgresSagaStore
from tests.faults import sagas
from tests.faults.conftest import StackFactory
from tests.faults.harness import saga_ids, sagaflow_cli, scenario, settle
from tests.faults.invariants import check
from tests.faults.workload import (
    DirectPlacer,
    pace,
    place_all,
    plan,
    rng_for,
    scenario_timeout,
    workload_size,
)

pytestmark = [pytest.mark.faults, pytest.mark.timeout(scenario_timeout())]

SAGA_SPECS = ("services.order.saga:SAGAS", "tests.faults.sagas:quick")
FREEZE = sagas.QUICK_TIMEOUT * sagas.QUICK_RETRY.max_attempts + 4.0
"""Long enough for the first sagas to abandon ``schedule``, short of their
compensation's budget (four more timeouts)."""
BY, WHY = "fault-suite", "scenario 7: the reservations trigger was dropped"
CLI_RETRIES = 3
REJECT_UPDATES = """
CREATE FUNCTION inventory.reject_updates() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN RAISE EXCEPTION 'fault injection: inventory.reservations rejects updates'; END $$;
CREATE TRIGGER reject_updates BEFORE UPDATE ON inventory.reservations
FOR EACH ROW EXECUTE FUNCTION inventory.reject_updates();
"""
ACCEPT_UPDATES = """
DROP TRIGGER reject_updates ON inventory.reservations;
DROP FUNCTION inventory.reject_updates();
"""


async def test_silent_participant_and_failing_compensation(
    make_stack: StackFactory, pg_url: str
) -> None:
    async with scenario("7 timeouts + failing compensation") as account:
        rng, seed = rng_for("timeouts")
        account.notes.append(f"seed={seed}")
        stack = await make_stack(sagas=SAGA_SPECS)
        store = PostgresSagaStore(pg_url)
        await store.start()
        client = SagaClient([sagas.quick], store=store)
        place = DirectPlacer(pg_url, client, sagas.quick)
        size = workload_size()
        first, second = (
            plan(size // 2, seed=seed, tag="a-"),
            plan(size - size // 2, seed=seed + 1, tag="b-"),
        )
        account.sagas = size
        try:
            # ---------------------------------------------------------- A: silence
            seconds = pace(len(first))
            placing = asyncio.create_task(place_all(first, place, seconds=seconds))
            await asyncio.sleep(rng.uniform(0.2, 0.4) * seconds)
            pid = stack.pid("shipping")
            assert pid is not None
            await account.strike(stack, "shipping frozen (SIGSTOP)")
            os.kill(pid, signal.SIGSTOP)
            try:
                await asyncio.sleep(FREEZE)
            finally:
                os.kill(pid, signal.SIGCONT)
            placed_a = await placing
            states = await settle(stack, placed_a)
            silenced = [
                s
                for s in states.values()
                if s.failure and (s.failure.cause, s.failure.step) == ("timeout", "schedule")
            ]
            assert silenced, "no saga timed out while shipping was frozen"
            for state in silenced:
                await _timed_out_then_compensated(store, state.saga_id)
            account.notes.append(f"{len(silenced)} sagas abandoned schedule after 3 timeouts")

            # ---------------------------------------------------------- B: failing undo
            conn = await asyncpg.connect(pg_url)
            try:
                await conn.execute(REJECT_UPDATES)
                account.fault("inventory.release failing (trigger)")
                placed_b = await place_all(second, place, seconds=pace(len(second)))
                states = await stack.wait_settled(saga_ids(placed_b), timeout=180)
                failed = {sid for sid, s in states.items() if s.status is SagaStatus.FAILED}
                kinds = {f"order-{o.order_id}": o.kind for o in second}
                reserved = {
                    f"order-{row['order_id']}"
                    for row in await conn.fetch(
                        "SELECT order_id FROM inventory.reservations WHERE status = 'reserved'"
                    )
                }
                must_release = {
                    sid
                    for sid, kind in kinds.items()
                    if kind in ("insufficient_funds", "unsupported_destination") and sid in reserved
                }
                # those whose orders fail after their stock was reserved (a refused
                # charge whose sibling reserve was still queued tombstones it instead:
                # nothing to release); a saga that abandoned a step (a reply slower
                # than 3 s on a loaded machine) may join them
                assert must_release, "no failing order had its stock reserved"
                assert must_release <= failed, must_release - failed
                for sid in sorted(failed):
                    await _backed_off_then_failed(store, states[sid].saga_id)
                await conn.execute(ACCEPT_UPDATES)
            finally:
                with contextlib.suppress(asyncpg.PostgresError):
                    await conn.execute(ACCEPT_UPDATES)
                await conn.close()

            # ---------------------------------------------------------- the operator
            ordered = sorted(failed)
            for sid in ordered[:CLI_RETRIES]:
                code, out, err = await sagaflow_cli(
                    stack, "sagas", "retry", sid, "--reason", WHY, "--by", BY,
                    "--module", "tests.faults.sagas:quick",
                )  # fmt: skip
                assert code == 0, f"sagaflow sagas retry exited {code}: {out}{err}"
                account.fault("sagaflow sagas retry (CLI)")
            for sid in ordered[CLI_RETRIES:]:
                await client.retry_saga(sid, by=BY, reason=WHY)
                account.fault("SagaClient.retry_saga")
            states = await settle(stack, [*placed_a, *placed_b])
            for sid in ordered:
                assert states[sid].status is SagaStatus.COMPENSATED, states[sid]
                retried = [e for e in await store.log(sid) if e.event.value == "retry_requested"]
                assert [(e.detail["by"], e.detail["reason"]) for e in retried] == [(BY, WHY)]
            account.notes.append(f"{len(failed)} FAILED sagas resumed to COMPENSATED")
        finally:
            await place.close()
            await store.close()

        account.verdict = await check(pg_url, placed=[*placed_a, *placed_b], allow_abandoned=True)
        account.verdict.raise_if_violated()


async def _timed_out_then_compensated(store: PostgresSagaStore, saga_id: str) -> None:
    """The log of a saga whose ``schedule`` went unanswered."""
    log = await store.log(saga_id)
    command = [e for e in log if e.step == "schedule" and e.kind == "command"]
    sent = [e.attempt for e in command if e.event.value == "command_sent"]
    timeouts = [e.attempt for e in command if e.event.value == "timed_out"]
    attempts = list(range(1, sagas.QUICK_RETRY.max_attempts + 1))
    assert sent == attempts and timeouts == attempts, (saga_id, sent, timeouts)
    started = [e for e in log if e.event.value == "compensation_started"]
    assert [e.detail["cause"] for e in started] == ["timeout"]
    undo = started[0].detail["undo"]  # reserve and charge, one group: undone together
    assert undo[0] == "schedule" and set(undo[1:3]) == {"charge", "reserve"}, undo
    assert undo[3:] == ["validate"], undo
    assert log[-1].event.value == "saga_compensated"


async def _backed_off_then_failed(store: PostgresSagaStore, saga_id: str) -> None:
    """The log of a saga whose ``release`` kept failing: retries with growing delays."""
    log = await store.log(saga_id)
    delays = [
        e.detail["delay"]
        for e in log
        if e.event.value == "retry_scheduled" and e.step == "reserve" and e.kind == "compensation"
    ]
    assert len(delays) == sagas.QUICK_COMPENSATION_RETRY.max_attempts - 1, (saga_id, delays)
    assert delays == sorted(delays) and delays[0] < delays[-1], (saga_id, delays)
    assert log[-1].event.value == "saga_failed"
    assert log[-1].detail["cause"] == "compensation"
    assert Counter(e.event.value for e in log)["compensation_sent"] >= 1
