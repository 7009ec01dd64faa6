"""``sagaflow coordinator`` and ``sagaflow worker``: the long-running processes.

Both stop gracefully on SIGTERM or SIGINT (finish the batches in hand, publish
what they produced, close) and exit 0; a second signal stops at once. A signal
that arrives while the process is still connecting stops it too.

:func:`run_coordinator` and :func:`run_worker` build and run the same
processes for a program of its own: with other adapters wrapped around the
usual ones, or more hooks.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Awaitable, Callable, Sequence
from typing import Annotated, Any, Protocol

import typer

from sagaflow.cli import common
from sagaflow.cli.common import EARLY_SIGNALS, current_settings, guarded, run_async
from sagaflow.cli.resolve import load_participant, load_sagas, split_specs
from sagaflow.config import Settings
from sagaflow.core.definition import Saga
from sagaflow.core.ports import ParticipantStore, SagaStore, Transport
from sagaflow.runtime.coordinator import Coordinator
from sagaflow.runtime.hooks import CompositeHooks, Hooks
from sagaflow.runtime.participant import Participant, Worker

__all__ = [
    "TransportFactory",
    "coordinator",
    "run_coordinator",
    "run_worker",
    "serve",
    "worker",
]

log = logging.getLogger("sagaflow.cli")


async def serve(
    name: str,
    start: Callable[[], Awaitable[None]],
    stop: Callable[[], Awaitable[None]],
    *,
    abort: Callable[[], Awaitable[None]],
    ready: Callable[[], Awaitable[None]],
) -> None:
    """Run a component until SIGTERM/SIGINT.

    Args:
        name: For log lines.
        start: Connects and starts the component (retrying what heals for
            ``SAGAFLOW_CONNECT_TIMEOUT`` at most).
        stop: The graceful stop.
        abort: Releases what a cancelled ``start`` may have opened. A start
            cancelled part way leaves no task running (only connections).
        ready: Awaited once ``start`` returned, with the component running (logs
            the "started" line, gives advice): a signal meanwhile, or a failure,
            stops it gracefully. Work after the start belongs here, not in
            ``start``, where a cancel would leave a started component to ``abort``.
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
        try:
            await ready()
        except BaseException:
            waiting.cancel()
            await stop()
            raise
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


class TransportFactory(Protocol):
    """Builds a process's broker transport (:func:`sagaflow.cli.common.transport`'s shape)."""

    def __call__(self, settings: Settings, *, name: str) -> Transport: ...


def _with(extra: Sequence[Hooks], hooks: Hooks) -> Hooks:
    return CompositeHooks([hooks, *extra]) if extra else hooks


def run_coordinator(
    settings: Settings,
    sagas: Sequence[Saga[Any]],
    *,
    transport: TransportFactory | None = None,
    store: Callable[[Settings], SagaStore] | None = None,
    hooks: Sequence[Hooks] = (),
) -> None:
    """Run a coordinator until SIGTERM/SIGINT: what ``sagaflow coordinator`` does.

    For a program that builds the coordinator process itself (its own
    adapters around the usual ones, hooks of its own).

    Args:
        settings: The process settings.
        sagas: The definitions it runs.
        transport: Builds the transport; :func:`sagaflow.cli.common.transport` by default.
        store: Builds the saga store; :func:`sagaflow.cli.common.saga_store` by default.
        hooks: More hooks, called after tracing, metrics and saga logs.
    """
    make_transport = transport or common.transport
    make_store = store or common.saga_store

    async def go() -> None:
        telemetry = common.telemetry(settings, "coordinator")
        saga_store = make_store(settings)
        runner = Coordinator(
            sagas,
            store=saga_store,
            transport=make_transport(settings, name="sagaflow-coordinator"),
            hooks=_with(hooks, telemetry.hooks),
            max_batch=settings.coordinator_max_batch,
            prefetch=settings.coordinator_prefetch,
            concurrency=settings.coordinator_concurrency,
            timer_interval=settings.coordinator_timer_interval,
            group_linger=settings.coordinator_group_linger,
            max_message_bytes=settings.max_message_bytes,
            strict_payloads=settings.strict_payloads,
            retention=settings.retention_policy(),
            start_timeout=settings.connect_timeout,
        )
        redacted = settings.redacted()

        async def ready() -> None:
            telemetry.watch_outbox(saga_store, clock=runner.clock)
            from sagaflow.store.postgres import PostgresSagaStore

            if isinstance(saga_store, PostgresSagaStore):
                # said once, where it matters: the process that writes the tables all day
                await saga_store.warn_if_unvacuumed()
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

        async def abort() -> None:
            # start() failed or was stopped before anything was consumed: nothing to
            # drain (stop() would try, and wait on a store that never opened)
            await runner.transport.close()
            await saga_store.close()

        try:
            await serve("coordinator", runner.start, runner.stop, abort=abort, ready=ready)
        finally:
            await telemetry.aclose()  # flush the last spans and metrics
        log.info("coordinator exited")

    run_async(go())


def run_worker(
    settings: Settings,
    participant: Participant,
    *,
    transport: TransportFactory | None = None,
    store: Callable[[Settings, str], ParticipantStore] | None = None,
    hooks: Sequence[Hooks] = (),
) -> None:
    """Run a participant worker until SIGTERM/SIGINT: what ``sagaflow worker`` does.

    For a program that builds the worker process itself (its own adapters
    around the usual ones, hooks of its own).

    Args:
        settings: The process settings.
        participant: The handlers.
        transport: Builds the transport; :func:`sagaflow.cli.common.transport` by default.
        store: Builds the participant's store from the settings and the service
            name; :func:`sagaflow.cli.common.participant_store` by default.
        hooks: More hooks, called after tracing, metrics and saga logs.
    """
    make_transport = transport or common.transport
    make_store = store or common.participant_store
    service = participant.service

    async def go() -> None:
        broker = make_transport(settings, name=f"sagaflow-worker-{service}")
        inbox = make_store(settings, service)
        telemetry = common.telemetry(settings, service)
        runner = Worker(
            participant,
            transport=broker,
            store=inbox,
            hooks=_with(hooks, telemetry.hooks),
            prefetch=settings.worker_prefetch,
            concurrency=settings.worker_concurrency,
            max_batch=settings.worker_max_batch,
            max_message_bytes=settings.max_message_bytes,
            strict_payloads=settings.strict_payloads,
            retention=settings.retention_policy(),
            start_timeout=settings.connect_timeout,
        )

        async def abort() -> None:
            # Worker.stop() does nothing before start() finished: close what may be open
            await broker.close()
            await inbox.close()

        async def ready() -> None:
            log.info(
                "worker started",
                extra={
                    "pid": os.getpid(),
                    "service": service,
                    "actions": participant.actions,
                    "schema": settings.participant_schema_for(service),
                },
            )

        try:
            await serve(f"worker {service}", runner.start, runner.stop, abort=abort, ready=ready)
        finally:
            await telemetry.aclose()  # flush the last spans and metrics
        log.info("worker exited", extra={"service": service})

    run_async(go())


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
    run_coordinator(settings, load_sagas(split_specs(specs or [])))


@guarded
def worker(
    spec: Annotated[str, typer.Argument(metavar="MODULE:ATTR", help="The Participant to run.")],
) -> None:
    """Run a participant worker until SIGTERM/SIGINT.

    Its inbox lives in SAGAFLOW_PARTICIPANT_SCHEMA, by default a schema named
    after the service.
    """
    settings = current_settings()
    run_worker(settings, load_participant(spec))
