"""``sagaflow coordinator`` and ``sagaflow worker``: the long-running processes.

Both stop gracefully on SIGTERM or SIGINT (finish the batches in hand, publish
what they produced, close) and exit 0; a second signal stops at once. A signal
that arrives while the process is still connecting stops it too.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import signal
import sys
from collections.abc import Awaitable, Callable
from typing import Annotated

import typer

from sagaflow.cli import common
from sagaflow.cli.common import (
    EARLY_SIGNALS,
    UsageProblem,
    current_settings,
    guarded,
    run_async,
)
from sagaflow.cli.resolve import load_participant, load_sagas, split_specs
from sagaflow.runtime.coordinator import Coordinator
from sagaflow.runtime.participant import Worker

__all__ = ["FAULT_ENV", "coordinator", "fault_hook", "serve", "worker"]

log = logging.getLogger("sagaflow.cli")

FAULT_ENV = "SAGAFLOW_FAULT_KILL_AFTER_COMMIT"
"""Test-only: makes ``sagaflow worker`` SIGKILL itself after a batch commits."""


async def serve(
    name: str,
    start: Callable[[], Awaitable[None]],
    stop: Callable[[], Awaitable[None]],
    *,
    abort: Callable[[], Awaitable[None]],
    ready: Callable[[], None],
) -> None:
    """Run a component until SIGTERM/SIGINT.

    Args:
        name: For log lines.
        start: Connects and starts the component (may retry for a long time).
        stop: The graceful stop.
        abort: Releases what a cancelled ``start`` may have opened.
        ready: Called once ``start`` returned (logs the "started" line).
    """
    loop = asyncio.get_running_loop()
    signalled = asyncio.Event()
    signals = (signal.SIGTERM, signal.SIGINT)
    for sig in signals:
        loop.add_signal_handler(sig, signalled.set)
    if EARLY_SIGNALS:  # stopped before the loop ran: nothing started, nothing to drain
        log.info("%s: stop requested before start", name)
        for sig in signals:
            loop.remove_signal_handler(sig)
        return
    try:
        starting = asyncio.ensure_future(start())
        waiting = asyncio.ensure_future(signalled.wait())
        await asyncio.wait({starting, waiting}, return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():
            log.info("%s: stop requested while starting", name)
            starting.cancel()
            await asyncio.wait({starting})
            await abort()
            return
        if starting.exception() is not None:
            waiting.cancel()
            await abort()
            starting.result()  # raises the start failure
        ready()
        await waiting
        log.info("%s stopping", name)
        signalled.clear()
        stopping = asyncio.ensure_future(stop())
        again = asyncio.ensure_future(signalled.wait())
        await asyncio.wait({stopping, again}, return_when=asyncio.FIRST_COMPLETED)
        again.cancel()
        if not stopping.done():
            log.warning("%s: second signal, stopping without waiting", name)
            stopping.cancel()
            await asyncio.wait({stopping})
            return
        stopping.result()
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)


def _kill_self() -> None:
    log.warning("fault injection: SIGKILL after commit (%s)", FAULT_ENV)
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def fault_hook(
    spec: str | None,
    *,
    kill: Callable[[], None] = _kill_self,
    rng: Callable[[], float] = random.random,
) -> Callable[[], None] | None:
    """The worker's ``after_commit`` for ``SAGAFLOW_FAULT_KILL_AFTER_COMMIT`` (test-only).

    Args:
        spec: ``None``/empty for no fault; a probability ``0..1`` of being killed
            after each committed batch; or ``once:<N>`` to be killed after the
            N-th committed batch of this process.
        kill: What killing means (SIGKILL of this process by default).
        rng: Random numbers in [0, 1).

    Raises:
        UsageProblem: the spec is not one of these forms.
    """
    if spec is None or not spec.strip():
        return None
    text = spec.strip().lower()
    if text.startswith("once:"):
        try:
            nth = int(text.removeprefix("once:"))
        except ValueError:
            nth = 0
        if nth < 1:
            raise UsageProblem(f"{FAULT_ENV}={spec!r}: 'once:<N>' needs N >= 1")
        committed = 0

        def once() -> None:
            nonlocal committed
            committed += 1
            if committed == nth:
                kill()

        return once
    try:
        probability = float(text)
    except ValueError:
        probability = -1.0
    if not 0.0 <= probability <= 1.0:
        raise UsageProblem(f"{FAULT_ENV}={spec!r}: expected a probability 0..1 or 'once:<N>'")

    def maybe() -> None:
        if rng() < probability:
            kill()

    return maybe


@guarded
def coordinator(
    specs: Annotated[
        list[str] | None,
        typer.Argument(
            metavar="MODULE:ATTR...",
            envvar="SAGAFLOW_SAGAS",
            help="Saga definitions (a Saga or a list of Sagas each); default: SAGAFLOW_SAGAS.",
            show_envvar=False,
        ),
    ] = None,
) -> None:
    """Run a coordinator for the given sagas until SIGTERM/SIGINT.

    Several coordinators may run against the same database and broker.
    """
    settings = current_settings()
    sagas = load_sagas(split_specs(specs or []))

    async def go() -> None:
        telemetry = common.telemetry(settings, "coordinator")
        store = common.saga_store(settings)
        runner = Coordinator(
            sagas,
            store=store,
            transport=common.transport(settings, name="sagaflow-coordinator"),
            hooks=telemetry.hooks,
            max_batch=settings.coordinator_max_batch,
            prefetch=settings.coordinator_prefetch,
            concurrency=settings.coordinator_concurrency,
            timer_interval=settings.coordinator_timer_interval,
            max_message_bytes=settings.max_message_bytes,
        )
        redacted = settings.redacted()

        def ready() -> None:
            telemetry.watch_outbox(store, clock=runner.clock)
            log.info(
                "coordinator started",
                extra={
                    "pid": os.getpid(),
                    "sagas": [f"{s.name}@{s.version}" for s in sagas],
                    "amqp_url": redacted["amqp_url"],
                    "database_url": redacted["database_url"],
                    "schema": settings.db_schema,
                    "prefix": settings.prefix,
                },
            )

        # stop() also releases a half-started coordinator: it closes transport and store
        try:
            await serve("coordinator", runner.start, runner.stop, abort=runner.stop, ready=ready)
        finally:
            await telemetry.aclose()  # flush the last spans and metrics
        log.info("coordinator exited")

    run_async(go())


@guarded
def worker(
    spec: Annotated[str, typer.Argument(metavar="MODULE:ATTR", help="The Participant to run.")],
) -> None:
    """Run a participant worker until SIGTERM/SIGINT.

    Its inbox lives in SAGAFLOW_PARTICIPANT_SCHEMA, by default a schema named
    after the service.

    Test-only: SAGAFLOW_FAULT_KILL_AFTER_COMMIT (a probability 0..1, or
    once:N for the N-th committed batch) makes the worker SIGKILL itself right
    after a batch commits, before it replies and acks. Fault-injection tests
    use it; never set it in production.
    """
    settings = current_settings()
    participant = load_participant(spec)
    after_commit = fault_hook(os.environ.get(FAULT_ENV))
    service = participant.service

    async def go() -> None:
        broker = common.transport(settings, name=f"sagaflow-worker-{service}")
        store = common.participant_store(settings, service)
        telemetry = common.telemetry(settings, service)
        runner = Worker(
            participant,
            transport=broker,
            store=store,
            hooks=telemetry.hooks,
            prefetch=settings.worker_prefetch,
            concurrency=settings.worker_concurrency,
            max_batch=settings.worker_max_batch,
            max_message_bytes=settings.max_message_bytes,
        )

        async def abort() -> None:
            # Worker.stop() does nothing before start() finished: close what may be open
            await broker.close()
            await store.close()

        def ready() -> None:
            log.info(
                "worker started",
                extra={
                    "pid": os.getpid(),
                    "service": service,
                    "actions": participant.actions,
                    "schema": settings.participant_schema_for(service),
                    "fault_injection": os.environ.get(FAULT_ENV) or None,
                },
            )

        try:
            await serve(f"worker {service}", runner.start, runner.stop, abort=abort, ready=ready)
        finally:
            await telemetry.aclose()  # flush the last spans and metrics
        log.info("worker exited", extra={"service": service})

    run_async(go())
