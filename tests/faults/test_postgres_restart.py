"""Scenario 4: PostgreSQL restarted in the middle of the run.

``pg_ctlcluster restart`` terminates every connection of every process (and
refuses new ones while it restarts). Transactions in flight roll back and are
retried; a commit whose outcome was lost is retried too and absorbed by the
saga's version, the deterministic message ids and the inboxes.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.faults.conftest import StackFactory
from tests.faults.harness import ensure_postgres_up, restart_postgres, scenario, settle
from tests.faults.invariants import check
from tests.faults.workload import (
    http_placer,
    pace,
    place_all,
    plan,
    rng_for,
    scenario_timeout,
    workload_size,
)

pytestmark = [pytest.mark.faults, pytest.mark.timeout(scenario_timeout())]

RESTARTS = ((0.15, 0.35), (0.6, 0.8))
"""When, as fractions of the placing time, the database restarts."""


async def test_postgres_restarted_mid_run(make_stack: StackFactory, pg_url: str) -> None:
    async with scenario("4 PostgreSQL restart") as account:
        rng, seed = rng_for("postgres-restart")
        account.notes.append(f"seed={seed}")
        stack = await make_stack()
        orders = plan(workload_size(), seed=seed)
        account.sagas = len(orders)
        seconds = pace(len(orders))
        placing = asyncio.create_task(place_all(orders, http_placer(stack), seconds=seconds))
        begun = time.monotonic()
        try:
            for low, high in RESTARTS:
                moment = begun + rng.uniform(low, high) * seconds
                await asyncio.sleep(max(0.0, moment - time.monotonic()))
                await account.strike(stack, "PostgreSQL restart")
                took = await restart_postgres()
                account.notes.append(f"restart took {took:.1f}s")
        finally:
            await asyncio.to_thread(ensure_postgres_up)
        placed = await placing
        await settle(stack, placed)
        account.verdict = await check(pg_url, placed=placed)
        account.verdict.raise_if_violated()
