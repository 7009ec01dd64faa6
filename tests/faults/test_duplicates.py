"""Scenario 5: every message delivered twice, and out of order.

The coordinator and the workers run through ``python -m tests.faults.proc``
with ``FAULTS_DUPLICATE=1``: they publish through
:class:`tests.faults.injection.DuplicatingTransport`, so each batch goes out
shuffled, and every message is published a second time up to half a second
later, after messages the saga sent since (a command for a step already
compensated, a reply for a step already finished). The order service's own
worker publishes normally; the commands it receives are duplicated by the
coordinator. Effects must still happen once.
"""

from __future__ import annotations

import re

import pytest

from tests.faults.conftest import StackFactory
from tests.faults.harness import injecting, scenario, settle
from tests.faults.injection import DUPLICATE_ENV
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

DUPLICATED = ("coordinator", "inventory", "payment", "shipping")
SENT = re.compile(r"fault injection: (\d+) duplicate messages sent, (\d+) lost")


async def test_every_message_twice_and_out_of_order(make_stack: StackFactory, pg_url: str) -> None:
    async with scenario("5 duplicates + reordering") as account:
        _, seed = rng_for("duplicates")
        account.notes.append(f"seed={seed}")
        stack = await make_stack(
            launchers=injecting(*DUPLICATED),
            process_env={name: {DUPLICATE_ENV: "1"} for name in DUPLICATED},
        )
        orders = plan(workload_size(), seed=seed)
        account.sagas = len(orders)
        placed = await place_all(orders, http_placer(stack), seconds=pace(len(orders)))
        await settle(stack, placed)
        # a graceful stop flushes the copies still waiting and logs how many went out
        await stack.terminate_all()
        sent = lost = 0
        for name in DUPLICATED:
            for match in SENT.finditer(stack.log_path(name).read_text(errors="replace")):
                sent, lost = sent + int(match[1]), lost + int(match[2])
        account.faults.extend(["duplicated message"] * sent)
        account.notes.append(f"{lost} copies not sent")
        assert sent > 0
        account.verdict = await check(pg_url, placed=placed)
        account.verdict.raise_if_violated()
