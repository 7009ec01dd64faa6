"""One saga at a time, two independent steps in parallel against in sequence.

``python -m bench.parallel [--sagas 200] [--repeat 2]`` runs, on the real
servers (a fresh database and vhost), a coordinator in this process and the
three bench participants as processes of their own (``bench.node worker``),
and starts sagas one at a time: ``bench-seq-2`` (two independent steps, one
after the other: inventory then payment) and ``bench-par-2`` (the same two in
one parallel group), one of each in turn so that both see the same load,
``--repeat`` times. Prints one JSON line per run and one comparison:
``p50_ratio`` is the parallel saga's p50 over the sequential one's (issue 12's
target: at most 0.7; the ideal is 1/2, one round trip instead of two, plus
the start and the last commit they share). ``--group-linger 0`` turns off
the coordinator's hold of a group's early reply (see
:mod:`sagaflow.runtime.siblings`), to see what it saves.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from typing import Any

from bench.infra import create, drop
from bench.workload import (
    ACTIONS,
    SERVICES,
    OrderData,
    _command,
    _undo,
    service_of,
)
from sagaflow import Coordinator, Group, Hooks, RetryPolicy, Saga, SagaStatus, Step
from sagaflow.runtime.siblings import DEFAULT_LINGER
from sagaflow.store import PostgresSagaStore
from sagaflow.transport import RabbitMQTransport

_RETRY = RetryPolicy(max_attempts=5, initial_backoff=0.5, max_backoff=5.0)


def _step(i: int) -> Step[OrderData]:
    forward, undo = ACTIONS[service_of(i)]
    return Step(
        f"{forward.name}-{i}",
        forward,
        _command(i),
        compensation=undo,
        compensation_command=_undo,
        retry=_RETRY,
        compensation_retry=_RETRY,
        timeout=120.0,
    )


SEQUENTIAL = Saga("bench-seq-2", data=OrderData, steps=[_step(0), _step(1)])
PARALLEL = Saga("bench-par-2", data=OrderData, steps=[Group("both", [_step(0), _step(1)])])


class _Ended(Hooks):
    """Wakes the run when a saga's decision makes it terminal (no polling)."""

    def __init__(self) -> None:
        self.waiting: dict[str, asyncio.Future[SagaStatus]] = {}

    def decided(self, saga: Any, before: Any, decision: Any) -> None:
        state = decision.state
        future = self.waiting.get(state.saga_id)
        if state.status.terminal and future is not None and not future.done():
            future.set_result(state.status)


async def _one_at_a_time(
    coordinator: Coordinator, ended: _Ended, saga: Saga[OrderData], n: int, run: str
) -> list[float]:
    seconds = []
    loop = asyncio.get_running_loop()
    for i in range(n):
        saga_id = f"{run}-{i:05d}"
        future = ended.waiting[saga_id] = loop.create_future()
        began = time.perf_counter()
        await coordinator.start_saga(saga, OrderData(order_id=saga_id), saga_id=saga_id)
        status = await asyncio.wait_for(future, 60)
        del ended.waiting[saga_id]
        assert status is SagaStatus.COMPLETED, status
        seconds.append(time.perf_counter() - began)
    return seconds


async def main(sagas: int, repeat: int, group_linger: float = DEFAULT_LINGER) -> None:
    from bench.harness import _setup_sagaflow

    infra = await create("parallel")
    ended = _Ended()
    try:
        await _setup_sagaflow(infra.dsn)
        coordinator = Coordinator(
            [SEQUENTIAL, PARALLEL],
            store=PostgresSagaStore(infra.dsn, max_size=4),
            transport=RabbitMQTransport(infra.amqp_url),
            hooks=ended,
            group_linger=group_linger,
        )
        # the participants in their own processes, as deployed: their handlers truly
        # run side by side
        workers = [
            await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "bench.node",
                "worker",
                "--dsn",
                infra.dsn,
                "--amqp",
                infra.amqp_url,
                "--service",
                service,
                "--pool",
                "2",
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
            )
            for service in SERVICES
        ]
        for process in workers:
            assert process.stdout is not None
            line = await asyncio.wait_for(process.stdout.readline(), 60)
            assert b"ready" in line, line
        await coordinator.start()
        try:
            await _one_at_a_time(coordinator, ended, SEQUENTIAL, 20, "warm-seq")
            await _one_at_a_time(coordinator, ended, PARALLEL, 20, "warm-par")
            p50s: dict[str, list[float]] = {"sequential": [], "parallel": []}
            for r in range(repeat):
                # saga by saga, one of each in turn: both see the same load on the machine
                seconds: dict[str, list[float]] = {"sequential": [], "parallel": []}
                for i in range(sagas):
                    for label, saga in (("sequential", SEQUENTIAL), ("parallel", PARALLEL)):
                        one = await _one_at_a_time(coordinator, ended, saga, 1, f"{label}-{r}-{i}")
                        seconds[label].extend(one)
                for label, values in seconds.items():
                    p50 = statistics.median(values) * 1000
                    p50s[label].append(p50)
                    row: dict[str, Any] = {
                        "kind": "run",
                        "workload": "parallel-group",
                        "saga": label,
                        "sagas": sagas,
                        "p50_ms": round(p50, 2),
                        "p95_ms": round(sorted(values)[int(len(values) * 0.95)] * 1000, 2),
                    }
                    print(json.dumps(row), flush=True)
            ratio = statistics.median(p50s["parallel"]) / statistics.median(p50s["sequential"])
            print(
                json.dumps(
                    {
                        "kind": "comparison",
                        "workload": "parallel-group",
                        "p50_ms": {k: [round(v, 2) for v in vs] for k, vs in p50s.items()},
                        "p50_ratio": round(ratio, 3),
                        "group_linger_ms": group_linger * 1000,
                        "target": "<= 0.7",
                        "met": ratio <= 0.7,
                    }
                ),
                flush=True,
            )
        finally:
            for process in workers:
                assert process.stdin is not None
                process.stdin.close()  # a bench node stops when its stdin closes
                await asyncio.wait_for(process.wait(), 30)
            await coordinator.stop()
    finally:
        await drop(infra)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m bench.parallel")
    parser.add_argument("--sagas", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument(
        "--group-linger",
        type=float,
        default=DEFAULT_LINGER,
        help="seconds a group's reply waits for its siblings' (0: none; the coordinator's default)",
    )
    args = parser.parse_args()
    asyncio.run(main(args.sagas, args.repeat, args.group_linger))
