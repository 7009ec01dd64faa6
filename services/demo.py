"""The demo on real processes: ``sagaflow demo --real``.

The orders, the saga, the participants' handlers and the report are the
example shop that ships with sagaflow (:mod:`sagaflow.examples.shop.demo`,
which ``sagaflow demo`` runs embedded, in memory). Here the same orders go
through real processes (:class:`services.stack.Stack`) on the configured
RabbitMQ and PostgreSQL, placed through the order service's HTTP API. It uses
the configured database as given and creates the coordinator's schema
(``SAGAFLOW_SCHEMA``) and the ``order``, ``inventory``, ``payment`` and
``shipping`` schemas there if they are missing.

``sagaflow demo --real`` (or ``sagaflow demo`` with ``SAGAFLOW_AMQP_URL`` or
``SAGAFLOW_DATABASE_URL`` set) calls :func:`main` from the repository's root.
"""

from __future__ import annotations

import asyncio
import os

from rich.console import Console

from sagaflow.config import Settings
from sagaflow.examples.shop.demo import (
    SCENARIOS,
    DemoResult,
    SagaOutcome,
    TimelineEntry,
    demo_orders,
    print_result,
    quiet_logs,
    run_embedded,
    run_orders,
)
from sagaflow.examples.shop.participants import NewOrder
from services.stack import Stack

__all__ = [
    "SCENARIOS",
    "DemoResult",
    "SagaOutcome",
    "TimelineEntry",
    "demo_orders",
    "main",
    "print_result",
    "run_embedded",
    "run_real",
]


async def run_real(
    orders: int,
    amqp_url: str,
    database_url: str,
    *,
    schema: str = "sagaflow",
    prefix: str = "sagaflow",
    seed: int = 7,
    console: Console | None = None,
    timeout: float = 300.0,
) -> DemoResult:
    """Run the demo on real processes (:class:`services.stack.Stack`), orders over HTTP."""
    console = console or Console(stderr=True)
    stack = Stack(amqp_url, database_url, schema=schema, prefix=prefix)
    try:
        with console.status("starting the coordinator, the workers and the order service..."):
            await stack.start()
    except BaseException:
        await stack.terminate_all()
        raise
    console.print(f"processes started; logs in {stack.log_dir}")

    async def place(new: NewOrder) -> str:
        placed = await stack.place_order(**new.model_dump(exclude_none=True))
        return str(placed["saga_id"])

    try:
        return await run_orders(
            "real",
            demo_orders(orders, seed),
            place,
            stack.store.get,
            stack.store.log,
            console,
            timeout=timeout,
        )
    finally:
        await stack.terminate_all()


def main(real: bool = False, orders: int = 200) -> int:
    """Run the demo and print the result; returns the exit code (0: all as expected).

    Real mode is chosen by ``real`` or by ``SAGAFLOW_AMQP_URL`` /
    ``SAGAFLOW_DATABASE_URL`` being set; otherwise the embedded demo runs.
    """
    console = Console()
    quiet_logs()
    if real or os.environ.get("SAGAFLOW_AMQP_URL") or os.environ.get("SAGAFLOW_DATABASE_URL"):
        settings = Settings()
        console.print(
            f"real mode: RabbitMQ {settings.redacted()['amqp_url']}, "
            f"PostgreSQL {settings.redacted()['database_url']}"
        )
        result = asyncio.run(
            run_real(
                orders,
                settings.amqp_url,
                settings.database_url,
                schema=settings.db_schema,
                prefix=settings.prefix,
                console=console,
            )
        )
    else:
        result = asyncio.run(run_embedded(orders, console=console))
    print_result(result, console)
    return 0 if result.ok else 1
