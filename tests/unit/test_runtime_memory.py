"""Coordinator and workers end to end over the in-memory adapters (fake clock)."""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest

from sagaflow import BusinessFailure, HandlerContext, Participant, SagaStatus
from sagaflow.core.engine import Decision
from sagaflow.core.messages import Envelope, MessageKind, Outcome, command_id, encode
from sagaflow.core.state import LogEvent, SagaState
from sagaflow.runtime.coordinator import SagaClient
from sagaflow.runtime.hooks import Hooks
from sagaflow.testing import HandlerFailed, SagaTestEnvironment
from tests.sample import (
    Cmd,
    Ok,
    approve,
    cancel,
    charge,
    confirm,
    refund,
    release,
    reserve,
    saga,
    schedule,
)


@dataclass
class World:
    """What the fake participants do, and what they did."""

    refuse: set[str] = field(default_factory=set)  # action types answering a business failure
    crash: Counter[str] = field(default_factory=Counter)  # action type -> transient errors left
    calls: Counter[str] = field(default_factory=Counter)
    effects: list[str] = field(default_factory=list)


def participants(world: World) -> list[Participant]:
    made: dict[str, Participant] = {}
    for action in (reserve, release, charge, refund, schedule, cancel, confirm, approve):
        p = made.setdefault(action.service, Participant(action.service))

        def handler(kind: str = action.type) -> object:
            async def handle(cmd: Cmd, ctx: HandlerContext) -> Ok:
                world.calls[kind] += 1
                if world.crash[kind] > 0:
                    world.crash[kind] -= 1
                    raise ConnectionError("database went away")
                if kind in world.refuse:
                    raise BusinessFailure(f"{kind} refused")
                world.effects.append(f"{kind}:{cmd.order_id}")
                return Ok(ref=f"{kind}-{cmd.order_id}")

            return handle

        p.handler(action)(handler())  # type: ignore[arg-type]
    return list(made.values())


async def test_happy_path_completes_with_one_effect_per_step() -> None:
    world = World()
    async with SagaTestEnvironment([saga], participants(world)) as env:
        handle = await env.start_saga(saga, {"order_id": "o1"})
        await env.drain(fail_fast=True)
        state = await env.get(handle.saga_id)
    assert state.status is SagaStatus.COMPLETED
    assert state.data["reservation"] == "inventory.reserve-o1"
    assert world.effects == [
        "inventory.reserve:o1",
        "payment.charge:o1",
        "shipping.schedule:o1",
        "order.confirm:o1",
        "order.approve:o1",
    ]


async def test_business_failure_compensates_in_reverse_order() -> None:
    world = World(refuse={"shipping.schedule"})
    async with SagaTestEnvironment([saga], participants(world)) as env:
        handle = await env.start_saga(saga, {"order_id": "o2"})
        await env.drain()
        state = await env.get(handle.saga_id)
        log = await env.log(handle.saga_id)
    assert state.status is SagaStatus.COMPENSATED
    assert state.failure is not None and state.failure.reason == "shipping.schedule refused"
    assert world.effects == [
        "inventory.reserve:o2",
        "payment.charge:o2",
        "payment.refund:o2",
        "inventory.release:o2",
    ]
    sent = [e.detail["type"] for e in log if e.event is LogEvent.COMPENSATION_SENT]
    assert sent == ["payment.refund", "inventory.release"]


async def test_transient_errors_are_retried_and_fail_fast_surfaces_them() -> None:
    world = World(crash=Counter({"payment.charge": 2}))
    async with SagaTestEnvironment([saga], participants(world)) as env:
        handle = await env.start_saga(saga, {"order_id": "o3"})
        with pytest.raises(HandlerFailed, match="database went away"):
            await env.drain(fail_fast=True)
        await env.drain()
        await env.advance(1)  # back-off timers fire
        await env.advance(1)
        state = await env.get(handle.saga_id)
    assert state.status is SagaStatus.COMPLETED
    assert world.calls["payment.charge"] == 3
    assert world.effects.count("payment.charge:o3") == 1


async def test_duplicate_command_is_answered_from_the_inbox_without_a_second_effect() -> None:
    world = World()
    async with SagaTestEnvironment([saga], participants(world)) as env:
        handle = await env.start_saga(saga, {"order_id": "o4"})
        await env.drain()
        # redeliver every command of the finished saga, as a broker would after a crash
        for entry in await env.log(handle.saga_id):
            if entry.event is LogEvent.COMMAND_SENT:
                step = saga.steps[entry.step_index or 0]
                cid = command_id(handle.saga_id, step.name, MessageKind.COMMAND)
                env.transport.inject(
                    env.transport.topology.service_queue(step.action.service),
                    encode(
                        Envelope(
                            message_id=f"{cid}:1",
                            command_id=cid,
                            saga_id=handle.saga_id,
                            saga_name="sample",
                            step=step.name,
                            step_index=entry.step_index or 0,
                            kind=MessageKind.COMMAND,
                            attempt=1,
                            type=step.action.type,
                            payload={"order_id": "o4", "amount": 10},
                        )
                    ),
                )
        await env.drain()
        state = await env.get(handle.saga_id)
    assert state.status is SagaStatus.COMPLETED
    assert len(world.effects) == 5  # no second effect
    assert sum(world.calls.values()) == 5  # handlers never even ran again


async def test_a_silent_participant_times_out_then_the_saga_compensates() -> None:
    world = World()
    parts = participants(world)
    async with SagaTestEnvironment([saga], [p for p in parts if p.service != "payment"]) as env:
        # no payment worker: its queue exists (the coordinator declares it) but nobody answers
        handle = await env.start_saga(saga, {"order_id": "o5"})
        await env.drain()
        for _ in range(3):
            await env.advance(5)
        state = await env.get(handle.saga_id)
        log = await env.log(handle.saga_id)
    # charge timed out 3 times: abandoned and compensated (unknown effect), reserve released
    assert state.status is SagaStatus.COMPENSATING  # refund waits for the absent payment worker
    assert [e.event for e in log].count(LogEvent.TIMED_OUT) == 3
    assert state.failure is not None and state.failure.cause == "timeout"


async def test_malformed_and_unknown_messages_are_dead_lettered_and_the_rest_flows() -> None:
    world = World()
    async with SagaTestEnvironment([saga], participants(world)) as env:
        t = env.transport
        replies = t.topology.replies_queue
        inv = t.topology.service_queue("inventory")
        t.inject(replies, b"\x00\xff not json")
        t.inject(replies, orjson.dumps({"schema": 1, "message_id": "x"}))
        t.inject(inv, b"[1, 2]")
        t.inject(inv, b"{" * 300_000)  # larger than the limit
        handle = await env.start_saga(saga, {"order_id": "o6"})
        await env.drain()
        state = await env.get(handle.saga_id)
        dead = await t.dead_letters()
    assert state.status is SagaStatus.COMPLETED
    reasons = sorted(d.reason.split(":")[0] for d in dead)
    assert reasons == ["invalid", "invalid", "not_json", "too_large"]


async def test_cancel_and_operator_retry() -> None:
    world = World(crash=Counter({"inventory.release": 100}), refuse={"payment.charge"})
    async with SagaTestEnvironment([saga], participants(world)) as env:
        handle = await env.start_saga(saga, {"order_id": "o7"})
        await env.drain()
        for _ in range(10):
            await env.advance(2)
        state = await env.get(handle.saga_id)
        assert state.status is SagaStatus.FAILED
        assert (
            state.failure is not None
            and "inventory.release failed after 4 attempts" in state.failure.reason
        )
        world.crash.clear()  # the operator fixes the cause
        await env.coordinator.retry_saga(handle.saga_id, by="ops", reason="fixed the db")
        await env.drain()
        state = await env.get(handle.saga_id)
    assert state.status is SagaStatus.COMPENSATED
    assert world.effects.count("inventory.release:o7") == 1


async def test_cancel_running_saga_ends_cancelled() -> None:
    world = World()
    async with SagaTestEnvironment([saga], participants(world)) as env:
        handle = await env.start_saga(saga, {"order_id": "o8"})
        state = await env.coordinator.cancel_saga(handle.saga_id, by="alice", reason="changed mind")
        assert state.status is SagaStatus.COMPENSATING
        await env.drain()
        state = await env.get(handle.saga_id)
    assert state.status is SagaStatus.CANCELLED
    # reserve was in flight when cancelled: the tombstone stops it, or it ran and was undone
    assert world.effects in ([], ["inventory.reserve:o8", "inventory.release:o8"])


async def test_many_sagas_in_parallel_all_finish() -> None:
    world = World(refuse={"payment.charge"})
    async with SagaTestEnvironment([saga], participants(world)) as env:
        handles = [await env.start_saga(saga, {"order_id": f"m{i}"}) for i in range(100)]
        await env.drain()
        states = [await env.get(h.saga_id) for h in handles]
    assert Counter(s.status for s in states) == {SagaStatus.COMPENSATED: 100}
    assert sum(e.startswith("inventory.reserve") for e in world.effects) == 100
    assert sum(e.startswith("inventory.release") for e in world.effects) == 100


async def test_each_kind_of_bad_input_is_dead_lettered_with_its_reason() -> None:
    world = World()
    async with SagaTestEnvironment([saga], participants(world)) as env:
        t = env.transport
        good = await env.start_saga(saga, {"order_id": "o9"})
        await env.drain()
        base = Envelope(
            message_id="m:1",
            command_id="m",
            saga_id=good.saga_id,
            saga_name="sample",
            step="reserve",
            step_index=0,
            kind=MessageKind.COMMAND,
            attempt=1,
            type="inventory.reserve",
            payload={"order_id": "o9"},
        )
        inv = t.topology.service_queue("inventory")
        replies = t.topology.replies_queue
        t.inject(inv, encode(base.model_copy(update={"type": "inventory.teleport"})))
        t.inject(inv, encode(base.model_copy(update={"payload": {"order_id": 42}})))
        t.inject(inv, encode(base.model_copy(update={"type": "payment.charge"})))
        t.inject(
            replies,
            encode(base.reply(Outcome.SUCCESS, {}).model_copy(update={"saga_name": "nope"})),
        )
        t.inject(
            replies,
            encode(base.reply(Outcome.SUCCESS, {}).model_copy(update={"saga_id": "missing"})),
        )
        t.inject(
            replies, encode(base.reply(Outcome.SUCCESS, {}).model_copy(update={"step": "nope"}))
        )
        t.inject(replies, encode(base))  # a command on the replies queue
        await env.drain()
        reasons = sorted(d.reason.split(":")[0] for d in await t.dead_letters())
        state = await env.get(good.saga_id)
    assert reasons == [
        "invalid_command",
        "not_a_reply",
        "rejected",
        "unknown_action",
        "unknown_saga",
        "unknown_saga_id",
        "wrong_service",
    ]
    assert state.status is SagaStatus.COMPLETED
    assert len(world.effects) == 5


class _CancelElsewhere(Hooks):
    """Has another process cancel a saga as soon as its first step completed."""

    def __init__(self) -> None:
        self.operator: SagaClient | None = None
        self.tasks: list[asyncio.Task[SagaState]] = []

    def decided(self, saga: Any, before: SagaState | None, decision: Decision) -> None:
        state = decision.state
        if self.operator is not None and not self.tasks and len(state.completed) == 1:
            cancel = self.operator.cancel_saga(state.saga_id, by="ops", reason="elsewhere")
            self.tasks.append(asyncio.ensure_future(cancel))


async def test_a_saga_moved_by_another_process_is_not_overwritten() -> None:
    """The coordinator decides replies on the states it remembers; an operator's
    cancel from another process makes that memory stale: the version guard
    refuses the write and the reply is decided again on the stored state."""
    hooks = _CancelElsewhere()
    world = World()
    # one reply per batch, so the late charge reply is decided on its own
    async with SagaTestEnvironment([saga], participants(world), hooks=hooks, max_batch=1) as env:
        hooks.operator = SagaClient([saga], store=env.store, clock=env.clock)
        handle = await env.start_saga(saga, {"order_id": "o9"})
        await env.drain()
        await asyncio.gather(*hooks.tasks)
        await env.drain()
        state = await env.get(handle.saga_id)
    assert hooks.tasks
    assert state.status is SagaStatus.CANCELLED
    assert world.effects.count("inventory.reserve:o9") == 1
    assert world.effects.count("inventory.release:o9") == 1
    assert world.effects.count("payment.charge:o9") == world.effects.count("payment.refund:o9")
