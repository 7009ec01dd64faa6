"""Scenario 6: three coordinators on the same database at once.

The replies queue is shared by three coordinator processes, and their timer
loops and outbox relays scan the same tables. Row locks taken in saga-id
order serialize each saga's events, ``SKIP LOCKED`` shares timers and outbox
rows; the version check on save refuses a state written over a newer one.
No event may be applied twice (each step outcome appears once in the log),
no transaction may deadlock, and every saga finishes.

The same workload also runs against one coordinator first, and both times are
printed; on a 2-core machine three coordinators compete for the same cores,
so the time is reported, not asserted.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.faults.conftest import StackFactory
from tests.faults.harness import log_count, scenario, settle
from tests.faults.invariants import check
from tests.faults.workload import (
    http_placer,
    place_all,
    plan,
    rng_for,
    scenario_timeout,
    workload_size,
)

pytestmark = [pytest.mark.faults, pytest.mark.timeout(scenario_timeout())]

COORDINATORS = ("coordinator", "coordinator-2", "coordinator-3")
PARTICIPANTS = ("inventory", "payment", "shipping", "order")


async def test_three_coordinators_share_one_database(
    make_stack: StackFactory, pg_url: str, tmp_path: Path
) -> None:
    logs = tmp_path / "logs"
    async with scenario("6 three coordinators") as account:
        _, seed = rng_for("competing-coordinators")
        account.notes.append(f"seed={seed}")
        size = workload_size()
        timings: dict[int, float] = {}
        placed: list[str] = []
        for count in (1, 3):
            stack = await make_stack(coordinators=count, log_dir=logs / f"{count}-coordinators")
            orders = plan(size, seed=seed, tag=f"c{count}-")
            started = time.monotonic()
            ids = await place_all(orders, http_placer(stack), seconds=0.0, concurrency=16)
            await settle(stack, ids)
            timings[count] = time.monotonic() - started
            placed.extend(ids)
            if count == 3:
                # the coordinators' own transactions: replies, timers, outbox
                deadlocks = sum(log_count(stack, name, "deadlock") for name in COORDINATORS)
                assert deadlocks == 0, stack.tails(list(COORDINATORS))
                conflicts = sum(
                    log_count(stack, name, "ConcurrencyConflict") for name in COORDINATORS
                )
                account.notes.append(f"{conflicts} coordinator version conflicts retried")
                # each coordinator moved sagas (its log has their transitions)
                for name in COORDINATORS:
                    assert log_count(stack, name, "sagaflow.saga") > 0, f"{name} did no work"
                # the services' hot rows (stock per sku) make worker batches collide;
                # the losing batch is rolled back and run again (not a step failure)
                retried = sum(log_count(stack, name, "deadlock detected") for name in PARTICIPANTS)
                account.notes.append(f"{retried} worker batches retried after a deadlock")
            await stack.terminate_all()
        account.sagas = len(placed)
        account.fault("3 coordinators on one database")
        account.notes.append(
            f"{size} sagas: 1 coordinator {timings[1]:.1f}s, 3 coordinators {timings[3]:.1f}s"
        )
        account.verdict = await check(pg_url, placed=placed)
        account.verdict.raise_if_violated()
