"""Scenario 2: participant workers SIGKILLed at the worst moment, and at random.

The worst moment is right after a worker's transaction committed the business
effect and the inbox record, before it published the replies and acked the
commands: the workers run through ``python -m tests.faults.proc``, and
``FAULTS_KILL_AFTER_COMMIT=once:<N>`` makes one SIGKILL itself right after
its N-th command transaction committed
(:class:`tests.faults.injection.KillAfterCommit`). The commands come back to
the restarted worker, which must answer them from its inbox without a
second effect. Random SIGKILLs of every participant process (the order
service's included) come on top.
"""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from tests.faults.conftest import StackFactory
from tests.faults.harness import (
    at_random_moments,
    in_flight,
    injecting,
    kill_and_restart,
    log_count,
    scenario,
    settle,
)
from tests.faults.injection import KILL_AFTER_COMMIT_ENV, KILLED_AFTER_COMMIT
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

WORKERS = ("inventory", "payment", "shipping")
WORST_MOMENT_KILLS = 2  # per worker
RANDOM_KILLS = 5


async def test_workers_killed_after_commit_and_at_random(
    make_stack: StackFactory, pg_url: str
) -> None:
    async with scenario("2 worker SIGKILL") as account:
        rng, seed = rng_for("worker-crash")
        account.notes.append(f"seed={seed}")

        def fault_env() -> dict[str, str]:
            return {KILL_AFTER_COMMIT_ENV: f"once:{rng.randint(3, 12)}"}

        stack = await make_stack(
            launchers=injecting(*WORKERS), process_env={w: fault_env() for w in WORKERS}
        )
        orders = plan(workload_size(), seed=seed)
        account.sagas = len(orders)
        seconds = pace(len(orders))
        locks = {name: asyncio.Lock() for name in (*WORKERS, "order")}
        self_kills = dict.fromkeys(WORKERS, 0)

        async def watch(name: str) -> None:
            """Restart a worker that killed itself after a commit (armed again twice)."""
            while True:
                process = stack.processes[name].process
                assert process is not None
                code = await process.wait()
                async with locks[name]:
                    if stack.processes[name].process is not process:
                        continue  # a random kill; restarted by the killer
                    assert code == -9, f"{name} exited {code}\n{stack.tails([name])}"
                    self_kills[name] += 1
                    account.hit.append(await in_flight(stack))
                    again = self_kills[name] < WORST_MOMENT_KILLS
                    await stack.restart(name, wait=False, env=fault_env() if again else {})

        async def random_kill(_: int) -> None:
            name = rng.choice(sorted(locks))
            async with locks[name]:
                if not stack.alive(name):
                    return  # it just killed itself: its watcher restarts it
                await account.strike(stack, "participant SIGKILL at random")
                await kill_and_restart(stack, name, down=rng.uniform(0.0, 1.0))

        watchers = [asyncio.create_task(watch(name)) for name in WORKERS]
        try:
            placing = asyncio.create_task(place_all(orders, http_placer(stack), seconds=seconds))
            await at_random_moments(RANDOM_KILLS, seconds, random_kill, rng=rng)
            placed = await placing
            await settle(stack, placed)
        finally:
            for task in watchers:
                task.cancel()
            for task in watchers:
                with contextlib.suppress(asyncio.CancelledError):
                    await task

        for name in WORKERS:
            # the hook logs a line right before it kills: the kill came after a commit
            hooked = log_count(stack, name, KILLED_AFTER_COMMIT)
            assert hooked >= 1, f"{name} never reached its fault injection point"
            account.faults.extend([f"{name} SIGKILL after commit"] * hooked)
        account.verdict = await check(pg_url, placed=placed)
        account.verdict.raise_if_violated()
