"""Scenario 8: hostile input on every queue, while a workload runs.

Random bytes, bodies over the size limit, wrong types, JSON that is not an
envelope, unknown sagas, saga ids and steps, a command on the replies queue,
a reply on a service queue, unknown actions, a command sent to the wrong
service, a reply for a step of a finished saga, a reply for a step not yet
reached, a forged attempt number: published straight to the queues. Each is
dead-lettered with its reason (``sagaflow dlq list --json``), a log line and
a counter (``sagaflow_messages_dead_lettered_total``), or ignored with a log
line and a counter (``sagaflow_replies_ignored_total``); every other saga
finishes as if nothing happened.

Then a valid message dead-lettered for a cause an operator can fix: sagas of
``create-order`` v3 (``tests.faults.sagas:patient``, ten-minute timeouts)
started while the coordinator only knows v1 and v2 (the shop's own), so
their first replies are dead-lettered as ``unknown_saga``. The coordinator is
restarted with v3, and ``sagaflow dlq replay`` sends the replies again: the
sagas complete.
"""

from __future__ import annotations

import asyncio
import time

import orjson
import pytest

from sagaflow import SagaClient, SagaStatus
from sagaflow.core.signing import Keys
from sagaflow.store import PostgresSagaStore
from sagaflow.transport import RabbitMQTransport
from services.stack import Stack, free_port
from tests.faults import hostile, sagas
from tests.faults.conftest import SIGNING_KEYS, StackFactory
from tests.faults.harness import log_count, saga_ids, sagaflow_cli, scenario, settle
from tests.faults.invariants import check
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

SHOP = "services.order.saga:SAGAS"  # create-order v1 and v2
WITH_V3 = f"{SHOP},tests.faults.sagas:patient"
WORKERS = ("inventory", "payment", "shipping")
DEAD = "sagaflow_messages_dead_lettered_total"
IGNORED = "sagaflow_replies_ignored_total"
PATIENT_ORDERS = 3
BY, WHY = "fault-suite", "scenario 8: the coordinator now runs create-order v3"


async def test_hostile_input_is_dead_lettered_or_ignored(
    make_stack: StackFactory, pg_url: str, amqp_url: str
) -> None:
    async with scenario("8 hostile input + dlq replay") as account:
        rng, seed = rng_for("hostile")
        account.notes.append(f"seed={seed}")
        ports = {name: free_port() for name in ("coordinator", *WORKERS)}
        env = {name: {"SAGAFLOW_METRICS_PORT": str(port)} for name, port in ports.items()}
        env["coordinator"]["SAGAFLOW_SAGAS"] = SHOP
        stack = await make_stack(sagas=(), process_env=env)
        topology = stack.settings.topology()
        store = PostgresSagaStore(pg_url)
        await store.start()
        patient = DirectPlacer(pg_url, SagaClient([sagas.patient], store=store), sagas.patient)
        try:
            # sagas the coordinator cannot run yet: their first replies are dead-lettered
            patient_orders = [o for o in plan(40, seed=seed, tag="v3-") if o.kind == "success"]
            patient_ids = await place_all(patient_orders[:PATIENT_ORDERS], patient, seconds=0.0)
            orders = plan(workload_size(), seed=seed, tag="v2-")
            account.sagas = len(orders) + len(patient_ids)
            placing = asyncio.create_task(
                place_all(orders, http_placer(stack), seconds=pace(len(orders)))
            )

            # ------------------------------------------------ first wave, mid-run
            finished = await _first_completed(store)
            before = await store.get(finished)
            wave = hostile.first_wave(topology, finished, stack.settings.max_message_bytes)
            await asyncio.sleep(rng.uniform(0.0, 2.0))
            await hostile.publish(amqp_url, wave, Keys.parse(SIGNING_KEYS))
            account.faults.extend("hostile message" for _ in wave)
            placed = await placing
            await settle(stack, placed)

            expected = [(h.queue, h.reason) for h in wave if h.reason is not None]
            expected += [(topology.replies_queue, "unknown_saga")] * len(patient_ids)
            letters = await _wait_for_letters(stack, len(expected))
            assert sorted(expected) == sorted(
                (doc["source_queue"], _code(doc["reason"])) for doc in letters
            ), letters
            unknown = {
                doc["saga_id"]: doc["id"]
                for doc in letters
                if doc["saga_id"] in saga_ids(patient_ids)
            }
            assert len(unknown) == len(patient_ids)
            after = await store.get(finished)
            assert after == before  # the reply for its finished step changed nothing

            # counters and log lines, per process
            queues = {"coordinator": topology.replies_queue}
            queues.update({w: topology.service_queue(w) for w in WORKERS})
            for name, queue in queues.items():
                counted = hostile.by_reason(await hostile.scrape(ports[name], DEAD))
                mine = [reason for q, reason in expected if q == queue]
                assert counted == {r: float(mine.count(r)) for r in set(mine)}, (name, counted)
                needle = "dead-lettering a " + ("message" if name == "coordinator" else "command")
                assert log_count(stack, name, needle) == len(mine), name
            ignored = hostile.by_reason(await hostile.scrape(ports["coordinator"], IGNORED))
            assert ignored.get("finished", 0) >= 1, ignored
            assert log_count(stack, "coordinator", f"ignoring a reply for saga {finished}") >= 1

            # ------------------------------------------------ fix the cause, second wave
            await stack.restart(
                "coordinator", env={**env["coordinator"], "SAGAFLOW_SAGAS": WITH_V3}
            )
            account.fault("coordinator redeployed with create-order v3")
            waiting = saga_ids(patient_ids)[0]
            state = await store.get(waiting)
            assert (
                state is not None and state.status is SagaStatus.RUNNING and state.step_index == 0
            )
            wave2 = hostile.second_wave(topology, waiting)
            await hostile.publish(amqp_url, wave2, Keys.parse(SIGNING_KEYS))
            account.faults.extend("hostile message" for _ in wave2)
            letters = await _wait_for_letters(stack, len(expected) + 1)
            forged = [
                doc for doc in letters if doc["saga_id"] == waiting and "forged" in doc["reason"]
            ]
            assert len(forged) == 1, letters
            await _wait_for(
                lambda: _ignored_stale(ports["coordinator"]), what="the stale reply to be ignored"
            )
            assert (await store.get(waiting)) == state  # neither moved the saga

            # ------------------------------------------------ replay what the fix cures
            code, out, err = await sagaflow_cli(
                stack, "dlq", "replay", *unknown.values(), "--reason", WHY, "--by", BY
            )
            assert code == 0, out + err
            assert f"replayed {len(unknown)} dead letters" in out
            assert f"recorded in the log of {len(unknown)} sagas" in out
            account.fault("sagaflow dlq replay")
            states = await settle(stack, patient_ids, timeout=60)
            assert {s.status for s in states.values()} == {SagaStatus.COMPLETED}
            for sid, letter_id in unknown.items():
                (entry,) = [
                    e for e in await store.log(sid) if e.event.value == "dead_letter_replayed"
                ]
                assert (entry.detail["by"], entry.detail["reason"]) == (BY, WHY)
                assert entry.detail["dead_letter_id"] == letter_id
            left = await _letters(stack)
            assert not {doc["id"] for doc in left} & set(unknown.values())
            assert len(left) == len(letters) - len(unknown)
        finally:
            await patient.close()
            await store.close()

        account.verdict = await check(pg_url, placed=[*placed, *patient_ids])
        account.verdict.raise_if_violated()


def _code(reason: str) -> str:
    return reason.split(":", 1)[0].strip()


async def _first_completed(store: PostgresSagaStore, timeout: float = 60.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = await store.list(status=SagaStatus.COMPLETED, limit=1)
        if done:
            return done[0].saga_id
        await asyncio.sleep(0.2)
    raise TimeoutError("no saga completed")


async def _letters(stack: Stack) -> list[dict[str, object]]:
    """``sagaflow dlq list --json``: the operator's view of the dead-letter queue."""
    code, out, err = await sagaflow_cli(stack, "dlq", "list", "--json", "--limit", "1000")
    assert code == 0, out + err
    letters: list[dict[str, object]] = orjson.loads(out)
    return letters


async def _wait_for_letters(
    stack: Stack, count: int, timeout: float = 60.0
) -> list[dict[str, object]]:
    # poll in-process (a CLI run per poll is slow); the operator's view decides
    broker = RabbitMQTransport(stack.settings.amqp_url, stack.settings.topology())
    await broker.start([])
    try:
        deadline = time.monotonic() + timeout
        while len(await broker.dead_letters(count + 100)) < count:
            if time.monotonic() > deadline:
                break
            await asyncio.sleep(0.3)
    finally:
        await broker.close()
    return await _letters(stack)


async def _ignored_stale(port: int) -> bool:
    return hostile.by_reason(await hostile.scrape(port, IGNORED)).get("stale", 0) >= 1


async def _wait_for(check: object, *, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        assert callable(check)
        if await check():
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout}s for {what}")
        await asyncio.sleep(0.3)
