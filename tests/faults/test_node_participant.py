"""The order saga with the inventory service written in Node.js (issue 14).

``services/inventory_node`` replaces the Python inventory worker
(``Stack(node=["inventory"])``, the ``SAGAFLOW_STACK_NODE`` setting). As in
every fault scenario, messages are signed and each process has its own
least-privilege broker user, so the Node participant must verify and sign
HMACs and cannot declare anything. The coordinator publishes every message
twice and out of order (``FAULTS_DUPLICATE``): the Node participant sees
duplicate commands, and compensations before the commands they undo. The
judge is the same as for the Python services: every saga terminal, each
effect once, stock adding up, no inbox row left claimed, read from the
services' own tables (:func:`tests.faults.invariants.check`).
"""

from __future__ import annotations

import re

import asyncpg
import pytest

from services.stack import NODE_TWINS
from tests.faults.conftest import StackFactory
from tests.faults.harness import injecting, scenario, settle
from tests.faults.injection import DUPLICATE_ENV
from tests.faults.invariants import check
from tests.faults.workload import http_placer, pace, place_all, plan, rng_for, workload_size

pytestmark = [pytest.mark.faults, pytest.mark.timeout(600)]

SAGAS = max(200, min(workload_size(), 400))
SENT = re.compile(r"fault injection: (\d+) duplicate messages sent, (\d+) lost")


async def test_orders_with_the_node_inventory_settle_with_effects_once(
    make_stack: StackFactory, pg_url: str
) -> None:
    assert "inventory" in NODE_TWINS
    async with scenario("14 Node.js inventory + duplicates") as account:
        _, seed = rng_for("node-inventory")
        account.notes.append(f"seed={seed}")
        stack = await make_stack(
            node=["inventory"],
            launchers=injecting("coordinator"),
            process_env={"coordinator": {DUPLICATE_ENV: "1"}},
        )
        assert stack.processes["inventory"].argv[0] == "node"
        orders = plan(SAGAS, seed=seed)
        account.sagas = len(orders)
        placed = await place_all(orders, http_placer(stack), seconds=pace(len(orders)))
        await settle(stack, placed)
        await stack.terminate_all()
        copies = sum(
            int(m[1]) for m in SENT.finditer(stack.log_path("coordinator").read_text("utf-8"))
        )
        account.faults.extend(["duplicated message"] * copies)
        assert copies >= len(orders), "the coordinator did not duplicate its commands"
        node_log = stack.log_path("inventory").read_text("utf-8")
        assert "worker inventory started" in node_log and "signed=true" in node_log
        account.verdict = await check(pg_url, placed=placed)
        account.verdict.raise_if_violated()
        conn = await asyncpg.connect(pg_url)
        try:  # the Node worker answered from its inbox, and tombstoned early arrivals
            statuses = dict(
                await conn.fetch("SELECT status, count(*) FROM inventory.inbox GROUP BY status")
            )
        finally:
            await conn.close()
        assert statuses.get("done", 0) >= len(orders)
        account.notes.append(f"inventory inbox {statuses}")
