"""The benchmark workload: a create-order-like saga of N steps, some failing at payment.

Steps cycle through the services ``inventory``, ``payment``, ``shipping``
(3 steps: reserve, charge, schedule; 6 and 12 steps repeat the cycle). Every
step has a compensation. A failing saga fails at its *last* payment step (step
1 of 3, 4 of 6, 10 of 12), so it compensates every step before it, the most
work a failure can cause. Which sagas fail is deterministic: exactly
``floor(n * fail_rate)`` of the first ``n``, spread evenly.

Each participant's effect is one row in its ``bench_effects`` table, written
in the same transaction as the inbox record; the raw ceiling (``bench.raw``)
writes the same row plus its own dedup row, so both do the same business work.

This module uses sagaflow's public API only, like any user's code.
"""

from __future__ import annotations

import asyncio
import functools
import math
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from sagaflow import Action, BusinessFailure, HandlerContext, Participant, RetryPolicy, Saga, Step

SERVICES = ("inventory", "payment", "shipping")
_ACTIONS = {
    "inventory": ("reserve", "release"),
    "payment": ("charge", "refund"),
    "shipping": ("schedule", "cancel"),
}
_RATE_SCALE = 1_000_000


def service_of(step: int) -> str:
    return SERVICES[step % len(SERVICES)]


def fail_step(steps: int) -> int:
    """The step at which failing sagas fail: the last payment step."""
    if steps < 2:
        raise ValueError("the workload needs at least 2 steps (a payment step)")
    return max(i for i in range(steps) if service_of(i) == "payment")


def fails(index: int, fail_rate: float) -> bool:
    """Whether saga number ``index`` (0-based) fails; evenly spread, deterministic."""
    rate = round(fail_rate * _RATE_SCALE)
    return ((index + 1) * rate) // _RATE_SCALE > (index * rate) // _RATE_SCALE


def failing_count(sagas: int, fail_rate: float) -> int:
    return (sagas * round(fail_rate * _RATE_SCALE)) // _RATE_SCALE


@dataclass(frozen=True)
class Expected:
    """What a run of ``sagas`` sagas must end with."""

    completed: int
    compensated: int
    messages: int
    effects: dict[str, tuple[int, int]]  # service -> (forward effects, compensations)


def expected(sagas: int, steps: int, fail_rate: float) -> Expected:
    failing = failing_count(sagas, fail_rate)
    ok = sagas - failing
    f = fail_step(steps)
    effects: dict[str, list[int]] = {s: [0, 0] for s in SERVICES}
    for i in range(steps):
        effects[service_of(i)][0] += ok
    for i in range(f):
        effects[service_of(i)][0] += failing
        effects[service_of(i)][1] += failing
    # command + reply per step; a failing saga: f + 1 commands, f compensations
    messages = ok * 2 * steps + failing * 2 * (2 * f + 1)
    return Expected(
        completed=ok,
        compensated=failing,
        messages=messages,
        effects={s: (v[0], v[1]) for s, v in effects.items()},
    )


# --------------------------------------------------------------------------- sagaflow


class OrderData(BaseModel):
    order_id: str
    amount: int = 100
    fail_at: int = -1


class StepCommand(BaseModel):
    order_id: str
    amount: int
    fail: bool = False


class StepDone(BaseModel):
    ref: str = "ok"


ACTIONS: dict[str, tuple[Action[StepCommand, StepDone], Action[StepCommand, StepDone]]] = {
    service: (
        Action(service, forward, StepCommand, StepDone),
        Action(service, undo, StepCommand, StepDone),
    )
    for service, (forward, undo) in _ACTIONS.items()
}

# Generous: a throughput run queues hundreds of sagas; nothing must time out.
_RETRY = RetryPolicy(max_attempts=5, initial_backoff=0.5, max_backoff=5.0)


def _command(index: int) -> Callable[[OrderData], StepCommand]:
    def build(data: OrderData) -> StepCommand:
        return StepCommand(order_id=data.order_id, amount=data.amount, fail=data.fail_at == index)

    return build


def _undo(data: OrderData) -> StepCommand:
    return StepCommand(order_id=data.order_id, amount=data.amount)


@functools.cache
def chain_saga(steps: int) -> Saga[OrderData]:
    """The benchmark saga with ``steps`` compensatable steps (one object per ``steps``:
    a coordinator knows its sagas by identity)."""
    fail_step(steps)  # validates
    return Saga(
        f"bench-order-{steps}",
        data=OrderData,
        steps=[
            Step(
                f"{ACTIONS[service_of(i)][0].name}-{i}",
                ACTIONS[service_of(i)][0],
                _command(i),
                compensation=ACTIONS[service_of(i)][1],
                compensation_command=_undo,
                retry=_RETRY,
                compensation_retry=_RETRY,
                timeout=120.0,
            )
            for i in range(steps)
        ],
    )


def saga_data(index: int, run: str, steps: int, fail_rate: float) -> OrderData:
    return OrderData(
        order_id=f"{run}-{index:07d}",
        fail_at=fail_step(steps) if fails(index, fail_rate) else -1,
    )


EFFECTS_DDL = (
    "CREATE TABLE IF NOT EXISTS {schema}.bench_effects ("
    " command_id text PRIMARY KEY, saga_id text NOT NULL, step text NOT NULL,"
    " compensation boolean NOT NULL)"
)


class EffectCounter:
    """Counts effects where there is no database (embedded mode)."""

    def __init__(self) -> None:
        self.counts: dict[str, list[int]] = {s: [0, 0] for s in SERVICES}


def participant(service: str, counter: EffectCounter | None = None) -> Participant:
    """A bench participant: each handler writes one effect row; payment may refuse."""
    p = Participant(service)
    forward, undo = ACTIONS[service]
    insert = (
        f'INSERT INTO "{service}".bench_effects (command_id, saga_id, step, compensation)'
        " VALUES ($1, $2, $3, $4)"
    )

    async def record(ctx: HandlerContext) -> None:
        if ctx.has_connection:
            await ctx.connection.execute(
                insert, ctx.command_id, ctx.saga_id, ctx.step, ctx.compensation
            )
        elif counter is not None:
            counter.counts[service][1 if ctx.compensation else 0] += 1

    @p.handler(forward)
    async def do(cmd: StepCommand, ctx: HandlerContext) -> StepDone:
        if cmd.fail:
            raise BusinessFailure("declined")
        await record(ctx)
        return StepDone()

    @p.handler(undo)
    async def undo_it(cmd: StepCommand, ctx: HandlerContext) -> StepDone:
        await record(ctx)
        return StepDone()

    return p


class Starts:
    """Saga starts in flight, each in its own task, as a load generator issues
    them: a start never waits for another's commit (the raw driver, the
    server-mode coordinator and the embedded run all start this way).

    ``failed`` is set when a start raises; ``check`` raises the first failure.
    """

    def __init__(self, failed: asyncio.Event | None = None) -> None:
        self.tasks: set[asyncio.Task[Any]] = set()
        self.errors: list[BaseException] = []
        self._failed = failed

    def add(self, start: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.create_task(start)
        self.tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[Any]) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self.errors.append(task.exception())  # type: ignore[arg-type]
            if self._failed is not None:
                self._failed.set()

    def check(self) -> None:
        if self.errors:
            raise self.errors[0]

    async def settle(self) -> None:
        """Wait for the starts still in flight (their failures are in ``errors``)."""
        await asyncio.gather(*self.tasks, return_exceptions=True)


def percentiles(values: list[float]) -> dict[str, float]:
    """p50/p90/p99/max/mean of ``values`` (nearest-rank), in the values' unit."""
    if not values:
        return {"p50": 0.0, "p90": 0.0, "p99": 0.0, "max": 0.0, "mean": 0.0}
    ordered = sorted(values)

    def rank(p: float) -> float:
        k = max(0, min(len(ordered) - 1, math.ceil(p / 100 * len(ordered) - 1e-9) - 1))
        return ordered[k]

    return {
        "p50": rank(50),
        "p90": rank(90),
        "p99": rank(99),
        "max": ordered[-1],
        "mean": sum(ordered) / len(ordered),
    }
