"""Scenario 3: RabbitMQ restarted in the middle of the run (twice).

``rabbitmqctl stop_app`` closes every connection and stops the queues; after
``start_app`` the quorum queues come back from disk. Clients reconnect,
re-declare their topology and consume again; messages published (confirmed)
before the stop are delivered after it; messages whose publish was cut off
are published again from the outbox or the worker's redelivered command.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.faults.conftest import StackFactory
from tests.faults.harness import (
    ensure_rabbitmq_up,
    scenario,
    settle,
    start_rabbitmq_app,
    stop_rabbitmq_app,
)
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
"""When, as fractions of the placing time, the broker goes down."""


async def test_rabbitmq_restarted_mid_run(make_stack: StackFactory, pg_url: str) -> None:
    async with scenario("3 RabbitMQ restart") as account:
        rng, seed = rng_for("rabbitmq-restart")
        account.notes.append(f"seed={seed}")
        stack = await make_stack()
        orders = plan(workload_size(), seed=seed)
        account.sagas = len(orders)
        seconds = pace(len(orders))
        begun = time.monotonic()
        placing = asyncio.create_task(place_all(orders, http_placer(stack), seconds=seconds))
        try:
            for low, high in RESTARTS:
                moment = begun + rng.uniform(low, high) * seconds
                await asyncio.sleep(max(0.0, moment - time.monotonic()))
                await account.strike(stack, "RabbitMQ stop_app/start_app")
                await stop_rabbitmq_app()
                down = rng.uniform(2.0, 6.0)
                account.notes.append(f"broker down {down:.1f}s")
                await asyncio.sleep(down)
                await start_rabbitmq_app()
        finally:
            await asyncio.to_thread(ensure_rabbitmq_up)
        placed = await placing
        await settle(stack, placed)
        account.verdict = await check(pg_url, placed=placed)
        account.verdict.raise_if_violated()
