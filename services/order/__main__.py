"""``python -m services.order``: the order HTTP API and the order participant, one process.

Configuration comes from the environment: ``SAGAFLOW_*`` (see
``sagaflow.config.Settings``) plus ``ORDER_*`` (see
``services.order.api.ApiSettings``): ``ORDER_HTTP_HOST`` (default
``127.0.0.1``), ``ORDER_HTTP_PORT`` (default ``8000``), ``ORDER_API_TOKEN``
and ``ORDER_MAX_BODY_BYTES``. SIGTERM or SIGINT stops the API
(in-flight requests finish) and the worker (batches in hand commit, reply and
are acknowledged), then the process exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Iterator

import uvicorn

from sagaflow import Worker
from sagaflow.config import Settings
from sagaflow.telemetry import setup_telemetry
from services.order.api import ApiSettings, create_app
from services.order.app import participant

log = logging.getLogger("services.order")

_STOP_GRACE = 20.0
"""Seconds the worker gets to finish its batches after SIGTERM."""


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # main() owns the signals: it stops the worker too, and uvicorn's own
        # handler would re-raise SIGTERM at exit and kill the process mid-shutdown
        yield


async def serve(settings: Settings, api: ApiSettings) -> bool:
    """Run the API and the worker until SIGTERM/SIGINT; False if the API could not start."""
    telemetry = setup_telemetry(settings, "order")  # OTEL_* environment: off when unset
    worker = Worker(
        participant,
        hooks=telemetry.hooks,
        transport=settings.transport(connection_name="order"),
        store=settings.participant_store("order"),
        prefetch=settings.worker_prefetch,
        concurrency=settings.worker_concurrency,
        start_timeout=settings.connect_timeout,
    )
    app = create_app(settings, api=api, hooks=telemetry.hooks)
    server = _Server(
        uvicorn.Config(
            app, host=api.http_host, port=api.http_port, log_config=None, access_log=False
        )
    )

    async def http() -> None:
        try:
            await server.serve()
        except SystemExit:  # uvicorn's way to say the app failed to start; logged already
            log.error("the HTTP API did not start")
        finally:  # the API stopped, or never started (port taken...): stop the worker too
            worker.request_stop()
            if not server.started:  # a worker still connecting would not see the request
                working.cancel()

    async def work() -> None:
        try:
            await worker.run()
        finally:
            server.should_exit = True

    async with asyncio.TaskGroup() as tasks:
        tasks.create_task(http(), name="http")
        working = tasks.create_task(work(), name="worker")

        def stop() -> None:
            log.info("stopping")
            server.should_exit = True
            worker.request_stop()
            # a worker still connecting (broker down) does not see the request: cancel it
            asyncio.get_running_loop().call_later(_STOP_GRACE, working.cancel)

        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop)
    await telemetry.aclose()  # flush the last spans
    log.info("stopped")
    return server.started


def _arguments(argv: list[str] | None = None) -> None:
    """``--help`` prints what configures the service and exits; it takes no arguments."""
    parser = argparse.ArgumentParser(
        prog="python -m services.order",
        description=__doc__.split("\n\n", 1)[0] if __doc__ else None,
        epilog="Configured by the environment: " + (__doc__ or "").split("\n\n", 1)[-1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    _arguments(argv)
    settings = Settings()
    logging.basicConfig(
        level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    api = ApiSettings()
    # redacted: the URLs' passwords and the token never reach a log
    log.info(
        "order service on http://%s:%d (bearer token %s), settings %s",
        api.http_host,
        api.http_port,
        "required" if api.api_token is not None else "off",
        settings.redacted(),
    )
    if not asyncio.run(serve(settings, api)):
        sys.exit(1)


if __name__ == "__main__":
    main()
