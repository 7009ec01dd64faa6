"""One sagaflow process of a benchmark run: a coordinator or a participant worker.

Built from the public API, as a user's own process would be::

    python -m bench.node coordinator --dsn ... --amqp ... --steps 3 [--drive ...]
    python -m bench.node worker --service payment --dsn ... --amqp ...

The harness creates the schemas beforehand (``sagaflow.store.migrate`` and the
effect tables), so nothing but the benchmark itself runs in the measured
window. Each process prints ``{"event": "ready"}`` once started and stops
cleanly (finishing the batches in hand) when its standard input closes.

With ``--drive`` the coordinator also generates the load, like the raw
ceiling's driver: on ``go`` it starts sagas with ``Coordinator.start_saga``
(one transaction, then the first command is published at once), keeps at most
``--inflight`` unfinished (it learns of terminal states through a ``Hooks``
subclass, without polling) and prints ``{"event": "done", ...}`` at the end.

With ``--telemetry`` the process sets up tracing, metrics and saga logs exactly
as ``sagaflow coordinator`` / ``sagaflow worker`` do
(``sagaflow.cli.common.telemetry``, i.e. ``setup_telemetry``): tracing is on
when the ``OTEL_*`` environment names an exporter, off otherwise; spans and
metrics are flushed when the process stops.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from bench.raw import emit, stdin_reader
from bench.workload import SERVICES, Starts, chain_saga, participant, saga_data
from sagaflow import Coordinator, Hooks, Worker
from sagaflow.config import Settings
from sagaflow.core.signing import Key, Keys
from sagaflow.runtime.hooks import CompositeHooks
from sagaflow.store import PostgresParticipantStore, PostgresSagaStore
from sagaflow.transport import RabbitMQTransport

if TYPE_CHECKING:
    from sagaflow.telemetry import Telemetry


class _Finished(Hooks):
    """Counts sagas reaching a terminal state in this coordinator."""

    def __init__(self) -> None:
        self.count = 0
        self.wake = asyncio.Event()

    def decided(self, saga: Any, before: Any, decision: Any) -> None:
        if before is not None and decision.state.status.terminal and not before.status.terminal:
            self.count += 1
            self.wake.set()


async def _drive(node: Coordinator, finished: _Finished, args: argparse.Namespace) -> int:
    saga = chain_saga(args.steps[0])
    started = 0
    deadline = time.monotonic() + args.duration
    starts = Starts()

    def more() -> bool:
        return time.monotonic() < deadline if args.duration > 0 else bool(started < args.sagas)

    while True:
        # concurrently, like the raw driver: one start must not wait for another
        while more() and started - finished.count < args.inflight:
            data = saga_data(started, args.run, args.steps[0], args.fail_rate)
            starts.add(node.start_saga(saga, data, saga_id=data.order_id))
            started += 1
        starts.check()
        if not more() and finished.count >= started:
            return started
        finished.wake.clear()
        with contextlib.suppress(TimeoutError):  # a soak deadline may pass meanwhile
            await asyncio.wait_for(finished.wake.wait(), 1.0)


async def _until_stdin_closes(reader: asyncio.StreamReader) -> None:
    while await reader.readline():
        pass


def _telemetry(args: argparse.Namespace, component: str) -> Telemetry | None:
    """The CLI's telemetry for ``component`` when ``--telemetry`` is given."""
    if not args.telemetry:
        return None
    # imported here: the plain runs must not even load the OpenTelemetry SDK
    from sagaflow.cli import common

    return common.telemetry(Settings(amqp_url=args.amqp, database_url=args.dsn), component)


def _keys(args: argparse.Namespace, services: Sequence[str]) -> Keys | None:
    """With ``--sign``: a key per service (the coordinator holds all, a worker its own)."""
    if not args.sign:
        return None
    return Keys(Key(s, f"bench-{s}", f"bench-secret-of-{s}-0123456789".encode()) for s in services)


async def coordinator(args: argparse.Namespace) -> None:
    finished = _Finished()
    telemetry = _telemetry(args, "coordinator")
    store = PostgresSagaStore(args.dsn, max_size=args.pool)
    node = Coordinator(
        [chain_saga(steps) for steps in args.steps],
        store=store,
        transport=RabbitMQTransport(
            args.amqp,
            connection_name=f"bench-coordinator-{os.getpid()}",
            keys=_keys(args, SERVICES),
        ),
        # tracing first, as the CLI's chain has it; the counter last
        hooks=finished if telemetry is None else CompositeHooks([telemetry.hooks, finished]),
    )
    await node.start()
    if telemetry is not None:
        telemetry.watch_outbox(store, clock=node.clock)
    reader = await stdin_reader()
    emit("ready", pid=os.getpid())
    try:
        if args.drive:
            await reader.readline()  # "go"
            started = await _drive(node, finished, args)
            emit("done", started=started)
        await _until_stdin_closes(reader)
    finally:
        await node.stop()
        if telemetry is not None:
            await telemetry.aclose()  # flush the last spans and metrics
    emit("stopped")


async def worker(args: argparse.Namespace) -> None:
    telemetry = _telemetry(args, args.service)
    node = Worker(
        participant(args.service),
        transport=RabbitMQTransport(
            args.amqp, connection_name=f"bench-{args.service}", keys=_keys(args, [args.service])
        ),
        store=PostgresParticipantStore(
            args.dsn, schema=args.service, max_size=args.pool, auto_migrate=False
        ),
        hooks=None if telemetry is None else telemetry.hooks,
    )
    await node.start()
    reader = await stdin_reader()
    emit("ready", pid=os.getpid())
    try:
        await _until_stdin_closes(reader)
    finally:
        await node.stop()
        if telemetry is not None:
            await telemetry.aclose()  # flush the last spans and metrics
    emit("stopped")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.node")
    parser.add_argument("role", choices=["coordinator", "worker"])
    parser.add_argument("--dsn", required=True)
    parser.add_argument("--amqp", required=True)
    parser.add_argument("--service", choices=SERVICES)
    parser.add_argument("--steps", type=int, nargs="+", default=[3])
    parser.add_argument("--pool", type=int, default=10)
    parser.add_argument("--drive", action="store_true", help="also generate the load")
    parser.add_argument("--run", default="sf")
    parser.add_argument("--sagas", type=int, default=2000)
    parser.add_argument("--duration", type=float, default=0.0)
    parser.add_argument("--inflight", type=int, default=200)
    parser.add_argument("--fail-rate", type=float, default=0.1)
    parser.add_argument("--sign", action="store_true", help="sign every message (HMAC per service)")
    parser.add_argument(
        "--telemetry", action="store_true", help="set up telemetry as the sagaflow CLI does"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    if args.role == "worker" and not args.service:
        parser.error("worker needs --service")
    asyncio.run(coordinator(args) if args.role == "coordinator" else worker(args))


if __name__ == "__main__":
    main()
