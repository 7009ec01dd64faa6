"""The saga page's drawing: each step of the definition in its live state (in memory)."""

from __future__ import annotations

import asyncio
from dataclasses import replace

from sagaflow import BusinessFailure, HandlerContext, Participant, Saga, SagaStatus
from sagaflow.core.fingerprint import shape
from sagaflow.dashboard.views import definition_of, saga_view
from sagaflow.testing import SagaTestEnvironment
from tests.sample import (
    Cmd,
    Data,
    Ok,
    approve,
    cancel,
    charge,
    confirm,
    refund,
    release,
    reserve,
    schedule,
)
from tests.sample import saga as sample


def _participants(*, refuse_schedule: bool) -> list[Participant]:
    inventory, payment = Participant("inventory"), Participant("payment")
    shipping, order = Participant("shipping"), Participant("order")

    async def ok(cmd: Cmd, ctx: HandlerContext) -> Ok:
        return Ok()

    async def refused(cmd: Cmd, ctx: HandlerContext) -> Ok:
        raise BusinessFailure("no_courier")

    for participant, action in (
        (inventory, reserve),
        (inventory, release),
        (payment, charge),
        (payment, refund),
        (shipping, cancel),
        (order, confirm),
        (order, approve),
    ):
        participant.handler(action)(ok)
    shipping.handler(schedule)(refused if refuse_schedule else ok)
    return [inventory, payment, shipping, order]


def _drawing(saga: Saga[Data], *, refuse_schedule: bool) -> tuple[SagaStatus, dict[str, str]]:
    async def run() -> tuple[SagaStatus, dict[str, str]]:
        env = SagaTestEnvironment([saga], _participants(refuse_schedule=refuse_schedule))
        async with env:
            handle = await env.start_saga(saga, {"order_id": "o-1"})
            await env.drain()
            state = await env.get(handle.saga_id)
            log = await env.log(handle.saga_id)
            view = saga_view(definition_of(saga, None), state, log, jaeger_url=None)
            # the shape a coordinator records draws the same as the code
            recorded = saga_view(definition_of(None, shape(saga)), state, log, jaeger_url=None)
            assert recorded["drawing"] == view["drawing"]
        return state.status, {step["name"]: step["state"] for step in view["drawing"]}

    return asyncio.run(run())


def test_a_compensated_saga_draws_done_failed_compensated_and_not_run() -> None:
    status, drawing = _drawing(sample, refuse_schedule=True)
    assert status is SagaStatus.COMPENSATED
    assert drawing == {
        "reserve": "compensated",
        "charge": "compensated",
        "schedule": "failed",
        "confirm": "not run",
        "approve": "not run",
    }


def test_a_skipped_step_is_drawn_skipped() -> None:
    steps = list(sample.steps)
    steps[1] = replace(steps[1], when=lambda data: data.amount > 1_000)  # charge: skipped
    skipping = Saga("sample-skip", data=Data, steps=steps)
    status, drawing = _drawing(skipping, refuse_schedule=False)
    assert status is SagaStatus.COMPLETED
    assert drawing == {
        "reserve": "done",
        "charge": "skipped",
        "schedule": "done",
        "confirm": "done",
        "approve": "done",
    }
