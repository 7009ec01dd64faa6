"""Scenario 10: a poisoned reply and a poisoned command, while a workload runs.

A bug that raises on one message must not loop, nor hold up the queue: the
message goes back to its queue, each return counts toward the queue's
delivery limit, and on its last delivery it is dead-lettered with the error
as its reason (``unhandled: PoisonedMessage: ...``); every other message flows
meanwhile. The coordinator and the payment worker run through
``python -m tests.faults.proc`` with ``FAULTS_POISON_SAGA``: a hook of theirs
(:class:`tests.faults.injection.Poison`) raises in ``processing`` for every
message of one saga each (the first reply of one, the charge command of the
other) until that message was dead-lettered. Then the two sagas go on the
usual way: their step times out, the next attempt is answered (from the
inbox, for the reply the coordinator could not take) and they complete.
"""

from __future__ import annotations

import asyncio
import time

import orjson
import pytest

from sagaflow import SagaStatus
from sagaflow.core.ports import DeadLetter
from sagaflow.transport import RabbitMQTransport
from services.stack import Stack
from tests.faults.conftest import StackFactory
from tests.faults.harness import injecting, log_count, saga_ids, sagaflow_cli, scenario, settle
from tests.faults.injection import POISON_ENV
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

POISONED = "fault injection: poisoned "
SPENT = "fault injection: the poison of saga "


async def test_a_poisoned_reply_and_a_poisoned_command_are_dead_lettered(
    make_stack: StackFactory, pg_url: str
) -> None:
    async with scenario("10 poisoned reply + command") as account:
        rng, seed = rng_for("poison")
        account.notes.append(f"seed={seed}")
        orders = plan(workload_size(), seed=seed)
        account.sagas = len(orders)
        # two orders that must complete, early in the run: the poison acts while the rest flow
        early = [o for o in orders[: max(20, len(orders) // 5)] if o.kind == "success"]
        reply_order, command_order = rng.sample(early, 2)
        victims = dict(
            zip(
                ("coordinator", "payment"),
                saga_ids([reply_order.order_id, command_order.order_id]),
                strict=True,
            )
        )
        stack = await make_stack(
            launchers=injecting(*victims),
            process_env={name: {POISON_ENV: sid} for name, sid in victims.items()},
        )
        topology = stack.settings.topology()
        queues = {
            "coordinator": topology.replies_queue,
            "payment": topology.service_queue("payment"),
        }
        limit = topology.delivery_limit

        placed = await place_all(orders, http_placer(stack), seconds=pace(len(orders)))
        others = [oid for oid in placed if saga_ids([oid])[0] not in victims.values()]
        await settle(stack, others)

        # each poisoned message is in the dead-letter queue once, with the exception as
        # its reason, and nothing else is
        letters = await _wait_for_letters(stack, len(victims))
        account.faults.extend(["poisoned reply", "poisoned command"])
        expected = sorted(
            (queues[name], sid, f"unhandled: PoisonedMessage: poisoned message of saga {sid}"
             f" on {queues[name]}")
            for name, sid in victims.items()
        )  # fmt: skip
        found = sorted((letter.source_queue, _saga_id(letter), letter.reason) for letter in letters)
        assert found == expected, found

        # nothing looped: each poisoned message was handled on its deliveries only
        # (a delivery in a batch that failed is tried once more on its own), and the
        # processes gave up on it rather than retrying it
        for name, sid in victims.items():
            raised = log_count(stack, name, POISONED)
            assert limit + 1 <= raised <= 2 * (limit + 1), (name, raised)
            assert log_count(stack, name, f"{SPENT}{sid} is spent") == 1, stack.tails([name])
            account.notes.append(f"{name}: {raised} poisoned handlings")

        # the poisoned sagas go on: a step timeout, the next attempt, completed
        states = await settle(stack, placed)
        assert {sid: states[sid].status for sid in victims.values()} == dict.fromkeys(
            victims.values(), SagaStatus.COMPLETED
        )
        code, out, err = await sagaflow_cli(stack, "dlq", "list", "--json")
        assert code == 0, out + err
        assert sorted(doc["saga_id"] for doc in orjson.loads(out)) == sorted(victims.values())
        for name in victims:  # still spent: no later message of those sagas was poisoned
            assert log_count(stack, name, POISONED) <= 2 * (limit + 1)

        account.verdict = await check(pg_url, placed=placed)
        account.verdict.raise_if_violated()


def _saga_id(letter: DeadLetter) -> str | None:
    try:
        body = orjson.loads(letter.body)
    except orjson.JSONDecodeError:
        return None
    return body.get("saga_id") if isinstance(body, dict) else None


async def _wait_for_letters(stack: Stack, count: int, timeout: float = 60.0) -> list[DeadLetter]:
    """The dead letters, once there are ``count`` (or after ``timeout``: the assertion says)."""
    broker = RabbitMQTransport(stack.settings.amqp_url, stack.settings.topology())
    await broker.start([])
    try:
        deadline = time.monotonic() + timeout
        while True:
            letters = await broker.dead_letters(count + 100)
            if len(letters) >= count or time.monotonic() > deadline:
                return letters
            await asyncio.sleep(0.3)
    finally:
        await broker.close()
