"""Waits, signals and deadlines on real processes (issue 12).

- Scenario W1: every order waits for a manager's approval; three processes
  approve every saga twice, concurrently, some before the saga reaches its
  wait (kept), most while it waits. Each approval is applied once, by one of
  them, and every order completes or fails as its contents call for.
- Scenario W2: the coordinator is SIGKILLed at random moments while sagas run
  and wait; half of them are approved (while it is down, too), the other half
  time out waiting and are rolled back.
- Scenario W4: the coordinator SIGKILLed while sagas run the shop's
  create-order (v2: reservation and payment in one parallel group).
- Scenario W3: sagas with a 4-second deadline while RabbitMQ restarts: those
  that had not passed their pivot compensate, those that had complete
  overdue, nothing is half-undone. It restarts the machine's shared broker:
  run it alone (``-k deadline``), the lead runs it in CI.

The invariants come from the services' own tables (tests/faults/invariants.py),
plus the signal's: one ``signal_received`` taken per saga that waited.
"""

from __future__ import annotations

import asyncio
import sys
from collections import Counter
from pathlib import Path

import asyncpg
import orjson
import pytest

from sagaflow import SagaClient, SagaStatus
from sagaflow.examples.shop.contracts import ManagerApproval
from services.order.saga import create_order
from tests.faults.conftest import StackFactory
from tests.faults.harness import (
    at_random_moments,
    saga_ids,
    scenario,
    settle,
    start_rabbitmq_app,
    stop_rabbitmq_app,
)
from tests.faults.invariants import check, order_kind
from tests.faults.sagas import APPROVAL_TIMEOUT, hurried
from tests.faults.workload import (
    DirectPlacer,
    http_placer,
    pace,
    place_all,
    plan,
    rng_for,
    scenario_timeout,
    workload_size,
)

pytestmark = [pytest.mark.faults, pytest.mark.timeout(scenario_timeout())]

ROOT = Path(__file__).resolve().parents[2]
EVERY_ORDER_WAITS = {"ORDER_APPROVAL_THRESHOLD": "1"}
WAIT = 3  # create-order's approval step


async def _signal_log(pg_url: str) -> dict[str, list[dict[str, object]]]:
    conn = await asyncpg.connect(pg_url)
    try:
        rows = await conn.fetch(
            "SELECT saga_id, detail::text FROM sagaflow.saga_log"
            " WHERE event = 'signal_received' ORDER BY id"
        )
    finally:
        await conn.close()
    found: dict[str, list[dict[str, object]]] = {}
    for row in rows:
        found.setdefault(row["saga_id"], []).append(orjson.loads(row["detail"]))
    return found


async def test_signals_sent_twice_concurrently_from_three_processes(
    make_stack: StackFactory, pg_url: str, tmp_path: Path
) -> None:
    async with scenario("W1 signals twice from three processes") as account:
        _, seed = rng_for("signals")
        account.notes.append(f"seed={seed}")
        stack = await make_stack(env_extra=EVERY_ORDER_WAITS)
        orders = plan(workload_size(), seed=seed)
        account.sagas = len(orders)
        placing = asyncio.create_task(
            place_all(orders, http_placer(stack), seconds=pace(len(orders)))
        )
        # the managers start while orders are still being placed: some approvals
        # come before their saga reaches the wait and are kept
        await asyncio.sleep(pace(len(orders)) / 2)
        first_half = saga_ids(o.order_id for o in orders[: len(orders) // 2])
        ids_file = tmp_path / "sagas.txt"
        ids_file.write_text("\n".join(first_half))
        env = {**stack.env, "SAGAFLOW_DATABASE_URL": pg_url}
        early = [await _manager(f"early-{n}", ids_file, env) for n in range(3)]
        placed = await placing
        ids = saga_ids(placed)
        ids_file.write_text("\n".join(ids))
        managers = [await _manager(f"manager-{n}", ids_file, env) for n in range(3)]
        reports = [await _finish(p) for p in [*early, *managers]]
        account.notes.append(f"managers: {reports}")
        await settle(stack, placed)
        account.verdict = verdict = await check(pg_url, placed=placed)

        states = {sid: await stack.store.get(sid) for sid in ids}
        log = await _signal_log(pg_url)
        approvers = {f"early-{n}" for n in range(3)} | {f"manager-{n}" for n in range(3)}
        reached = 0
        for sid, state in states.items():
            assert state is not None
            entries = log.get(sid, [])
            counted = [e for e in entries if e.get("kept") or not e.get("early")]
            verdict.expect(len(counted) <= 1, f"saga {sid}: approval applied {len(counted)} times")
            if state.signalled.get("approval") == "signal":
                reached += 1
                verdict.expect(
                    state.data["approved_by"] in approvers,
                    f"saga {sid}: approved by {state.data['approved_by']!r}",
                )
                verdict.expect(len(counted) == 1, f"saga {sid}: approved without a log entry")
            elif state.status is SagaStatus.COMPLETED:
                verdict.expect(False, f"saga {sid} completed without its approval")
        account.notes.append(f"{reached} sagas approved at their wait")
        verdict.expect(reached > len(ids) // 2, f"only {reached} sagas reached their wait")
        verdict.raise_if_violated()


async def _manager(name: str, ids_file: Path, env: dict[str, str]) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.faults.signaller",
        name,
        str(ids_file),
        cwd=ROOT,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def _finish(process: asyncio.subprocess.Process) -> dict[str, int]:
    out, err = await asyncio.wait_for(process.communicate(), 600)
    assert process.returncode == 0, err.decode()[-2000:]
    report: dict[str, int] = orjson.loads(out.decode().strip().splitlines()[-1])
    return report


async def test_coordinator_killed_while_sagas_wait(make_stack: StackFactory, pg_url: str) -> None:
    async with scenario("W2 coordinator SIGKILL while sagas wait") as account:
        rng, seed = rng_for("waits-crash")
        account.notes.append(f"seed={seed}")
        stack = await make_stack(
            env_extra=EVERY_ORDER_WAITS, sagas=("tests.faults.sagas:approving",)
        )
        orders = plan(workload_size(), seed=seed)
        account.sagas = len(orders)
        seconds = pace(len(orders))
        placing = asyncio.create_task(place_all(orders, http_placer(stack), seconds=seconds))
        store = stack.store
        client = SagaClient([create_order], store=store)
        approved: set[str] = set()

        async def approve_some() -> None:
            # every other order is approved as soon as it waits, kills or not, until
            # each one was approved or finished without waiting (on a loaded machine
            # sagas reach their wait later than the placing window suggests)
            pending = {f"order-{order.order_id}" for order in orders[::2]}
            while pending:
                for sid in sorted(pending):
                    state = await store.get(sid)
                    if state is None:
                        if placing.done():
                            pending.discard(sid)  # never placed: nothing to approve
                    elif state.waiting_for == "approval":
                        await client.signal_saga(
                            sid, "approval", ManagerApproval(approved_by="w2"), by="w2", reason="ok"
                        )
                        approved.add(sid)
                        pending.discard(sid)
                    elif state.status.terminal:
                        pending.discard(sid)
                await asyncio.sleep(0.2)

        approving = asyncio.create_task(approve_some())

        async def kill(_: int) -> None:
            await account.strike(stack, "coordinator SIGKILL")
            await stack.kill("coordinator")
            await asyncio.sleep(rng.uniform(0.0, 2.0))
            await stack.restart("coordinator")

        await at_random_moments(6, seconds + APPROVAL_TIMEOUT / 2, kill, rng=rng)
        placed = await placing
        await approving
        await settle(stack, placed)
        account.verdict = verdict = await check(pg_url, placed=placed, allow_abandoned=True)
        causes: Counter[str] = Counter()
        conn = await asyncpg.connect(pg_url)
        try:
            rows = await conn.fetch('SELECT * FROM "order".orders')
        finally:
            await conn.close()
        for order in rows:
            state = await store.get(order["saga_id"])
            assert state is not None
            waited = WAIT not in state.skipped and (
                state.signalled.get("approval")
                or (state.failure and state.failure.step == "approval")
            )
            if order["saga_id"] in approved:
                verdict.expect(
                    state.status is SagaStatus.COMPLETED or order_kind(order) != "success",
                    f"approved saga {state.saga_id} ended {state.status.value}",
                )
            elif waited and order_kind(order) != "out_of_stock":
                verdict.expect(
                    state.status is SagaStatus.COMPENSATED
                    and state.failure is not None
                    and state.failure.step == "approval",
                    f"unapproved saga {state.saga_id} ended {state.status.value}: {state.failure}",
                )
            if state.failure is not None:
                causes[f"{state.failure.step}:{state.failure.cause}"] += 1
        account.notes.append(f"{len(approved)} approved; failures {dict(causes)}")
        verdict.expect(causes["approval:timeout"] > 0, "no saga timed out waiting")
        verdict.raise_if_violated()
        assert account.faults.count("coordinator SIGKILL") >= 5


async def test_deadline_expiry_while_rabbitmq_restarts(
    make_stack: StackFactory, pg_url: str
) -> None:
    async with scenario("W3 deadlines while RabbitMQ restarts") as account:
        rng, seed = rng_for("deadline-broker")
        account.notes.append(f"seed={seed}")
        stack = await make_stack(sagas=("tests.faults.sagas:hurried",))
        client = SagaClient([hurried], store=stack.store)
        placer = DirectPlacer(pg_url, client, hurried)
        orders = plan(workload_size(), seed=seed)
        account.sagas = len(orders)
        seconds = pace(len(orders))
        try:
            placing = asyncio.create_task(place_all(orders, placer, seconds=seconds))

            async def restart(_: int) -> None:
                await account.strike(stack, "RabbitMQ restart")
                await stop_rabbitmq_app()
                await asyncio.sleep(rng.uniform(2.0, 6.0))  # deadlines pass meanwhile
                await start_rabbitmq_app()

            await at_random_moments(2, seconds, restart, rng=rng)
            placed = await placing
        finally:
            await placer.close()
        await settle(stack, placed)
        account.verdict = verdict = await check(pg_url, placed=placed, allow_abandoned=True)
        outcomes: Counter[str] = Counter()
        for sid in saga_ids(placed):
            state = await stack.store.get(sid)
            assert state is not None
            if state.overdue and state.status is SagaStatus.COMPLETED:
                outcomes["completed overdue"] += 1
            elif state.failure is not None and state.failure.cause == "deadline":
                outcomes["compensated by its deadline"] += 1
                verdict.expect(
                    state.status is SagaStatus.COMPENSATED,
                    f"saga {sid} passed its deadline before the pivot but is {state.status.value}",
                )
            else:
                outcomes[state.status.value] += 1
        account.notes.append(str(dict(outcomes)))
        verdict.expect(outcomes["compensated by its deadline"] > 0, "no deadline cancelled a saga")
        verdict.raise_if_violated()


async def test_coordinator_killed_in_the_middle_of_parallel_groups(
    make_stack: StackFactory, pg_url: str
) -> None:
    """W4: the shop's create-order (reserve and charge in one group), placed
    through the order API, while the coordinator is SIGKILLed: replies of one
    branch land while the other is in flight, commands of a group are half
    published, refusals abandon siblings."""
    async with scenario("W4 create-order's group, coordinator SIGKILL mid-group") as account:
        rng, seed = rng_for("groups-crash")
        account.notes.append(f"seed={seed}")
        stack = await make_stack()
        orders = plan(workload_size(), seed=seed)
        account.sagas = len(orders)
        seconds = pace(len(orders))
        placing = asyncio.create_task(place_all(orders, http_placer(stack), seconds=seconds))

        async def kill(_: int) -> None:
            await account.strike(stack, "coordinator SIGKILL")
            await stack.kill("coordinator")
            await asyncio.sleep(rng.uniform(0.0, 1.0))
            await stack.restart("coordinator")

        await at_random_moments(6, seconds, kill, rng=rng)
        placed = await placing
        await settle(stack, placed)
        account.verdict = verdict = await check(pg_url, placed=placed)
        conn = await asyncpg.connect(pg_url)
        try:
            rows = await conn.fetch(
                "SELECT step, detail::text FROM sagaflow.saga_log"
                " WHERE event = 'compensation_started'"
            )
        finally:
            await conn.close()
        # the group undone together: after one of its branches failed (the log
        # names the branch), or after a later step failed
        branches = {create_order.steps[i].name for i in create_order.groups}
        undone: Counter[str] = Counter()
        for row in rows:
            if orjson.loads(row["detail"]).get("parallel"):
                undone["branch" if row["step"] in branches else "later"] += 1
        account.notes.append(f"groups undone in parallel after a failed step: {dict(undone)}")
        verdict.expect(undone["branch"] > 0, "no group was undone after a branch failed")
        verdict.expect(undone["later"] > 0, "no group was undone after a later step failed")
        verdict.raise_if_violated()
        assert account.faults.count("coordinator SIGKILL") >= 5
