"""Scenario 1: the coordinator SIGKILLed at random moments, at least 5 times, and restarted.

A killed coordinator leaves replies unacked (redelivered to the next one),
committed outbox rows unpublished (the relay of the next one sends them) and
timers due (fired by the next one). Nothing may be lost or applied twice.
"""

from __future__ import annotations

import asyncio

import pytest

from tests.faults.conftest import StackFactory
from tests.faults.harness import at_random_moments, scenario, settle
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

KILLS = 6


async def test_coordinator_killed_at_random_moments(make_stack: StackFactory, pg_url: str) -> None:
    async with scenario("1 coordinator SIGKILL") as account:
        rng, seed = rng_for("coordinator-crash")
        account.notes.append(f"seed={seed}")
        stack = await make_stack()
        orders = plan(workload_size(), seed=seed)
        account.sagas = len(orders)
        seconds = pace(len(orders))
        placing = asyncio.create_task(place_all(orders, http_placer(stack), seconds=seconds))

        async def kill(_: int) -> None:
            await account.strike(stack, "coordinator SIGKILL")
            await stack.kill("coordinator")
            await asyncio.sleep(rng.uniform(0.0, 1.0))  # down a moment: replies pile up
            await stack.restart("coordinator")

        await at_random_moments(KILLS, seconds, kill, rng=rng)
        placed = await placing
        await settle(stack, placed)
        account.verdict = await check(pg_url, placed=placed)
        account.verdict.raise_if_violated()
        assert account.faults.count("coordinator SIGKILL") >= 5
