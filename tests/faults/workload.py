"""The workload of every fault scenario: create-order sagas, about 30% bound to fail.

Orders come from :func:`services.demo.demo_orders` (70% succeed; 10% each ask
for a sold-out sku, come from a broke customer or ship where nobody ships, so
they fail at ``reserve``, ``charge`` or ``schedule``). Each order gets an id
chosen here, so placing it again after a failure (the API or the database was
down) is safe: the same id and body place it once.

:func:`place_all` paces the orders over a few seconds, so faults injected
meanwhile find sagas at every step.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg
import httpx

from sagaflow import SagaClient, SagaflowError
from sagaflow.core.definition import Saga
from services.demo import demo_orders
from services.order.app import NewOrder, Order, OrderStatus, PostgresOrders
from services.order.saga import OrderData
from services.stack import Stack

DEFAULT_SAGAS = 500
"""Sagas per scenario unless ``SAGAFLOW_FAULT_SAGAS`` says otherwise (see docs/guarantees.md)."""


def workload_size(default: int = DEFAULT_SAGAS) -> int:
    """Sagas per scenario: ``SAGAFLOW_FAULT_SAGAS`` or ``default``."""
    value = os.environ.get("SAGAFLOW_FAULT_SAGAS", "").strip()
    return int(value) if value else default


def scenario_timeout() -> float:
    """Seconds a scenario may take: 15 minutes, more for a long soak."""
    return max(900.0, 300.0 + 1.5 * workload_size())


@dataclass(frozen=True)
class PlannedOrder:
    kind: str
    body: dict[str, Any]

    @property
    def order_id(self) -> str:
        return str(self.body["order_id"])


def plan(count: int, *, seed: int, tag: str = "") -> list[PlannedOrder]:
    """``count`` orders with fresh ids (``tag`` prefixes them)."""
    run = uuid.uuid4().hex[:6]
    return [
        PlannedOrder(kind, {**new.model_dump(exclude_none=True), "order_id": f"{tag}{run}-{n:05d}"})
        for n, (kind, new) in enumerate(demo_orders(count, seed=seed))
    ]


Placer = Callable[[PlannedOrder], Awaitable[None]]

PLACING_ERRORS = (
    httpx.HTTPError,
    OSError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    SagaflowError,
)
"""What placing an order raises while the API, the broker or the database restarts."""


def http_placer(stack: Stack) -> Placer:
    """Place through the order API (``POST /orders``), the way clients do."""

    async def place(order: PlannedOrder) -> None:
        response = await stack.http.post("/orders", json=order.body, timeout=10.0)
        response.raise_for_status()

    return place


class DirectPlacer:
    """Place by inserting the order and starting ``saga`` in one transaction.

    The same thing the order API does, for saga variants the API does not start
    (a definition with short timeouts, say). ``client`` must be started;
    :meth:`close` releases the connections.
    """

    def __init__(self, database_url: str, client: SagaClient, saga: Saga[OrderData]) -> None:
        self.database_url = database_url
        self.client = client
        self.saga = saga
        self._pool: asyncpg.Pool | None = None

    async def __call__(self, order: PlannedOrder) -> None:
        if self._pool is None:
            self._pool = await asyncpg.create_pool(self.database_url, min_size=1, max_size=5)
        new = NewOrder.model_validate(order.body)
        row = Order(
            **new.model_dump(exclude={"order_id"}),
            order_id=order.order_id,
            status=OrderStatus.PENDING,
            saga_id=f"order-{order.order_id}",
            created_at=time.time(),
        )
        async with self._pool.acquire() as conn, conn.transaction():
            if await PostgresOrders(conn).insert(row) is not None:
                return  # placed by an earlier attempt
            data = OrderData.model_validate(
                row.model_dump(exclude={"status", "saga_id", "created_at"})
            )
            await self.client.start_saga(self.saga, data, saga_id=row.saga_id, connection=conn)

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()


async def place_all(
    orders: Sequence[PlannedOrder],
    place: Placer,
    *,
    seconds: float,
    concurrency: int = 8,
    give_up_after: float = 120.0,
) -> list[str]:
    """Place every order, spread over about ``seconds``; returns the ids placed.

    A failed attempt (API restarting, database down) is retried with the same
    id until ``give_up_after`` seconds have passed for that order.

    Raises:
        TimeoutError: an order could not be placed in time.
    """
    gate = asyncio.Semaphore(concurrency)
    start = time.monotonic()
    interval = seconds / max(1, len(orders))

    async def one(n: int, order: PlannedOrder) -> str:
        await asyncio.sleep(max(0.0, start + n * interval - time.monotonic()))
        deadline = time.monotonic() + give_up_after
        delay = 0.1
        async with gate:
            while True:
                try:
                    await place(order)
                    return order.order_id
                except PLACING_ERRORS:
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"could not place order {order.order_id}") from None
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 2.0)

    return list(await asyncio.gather(*(one(n, order) for n, order in enumerate(orders))))


RATE = 50.0
"""Orders placed per second: close to what this 2-core machine settles (about
70 sagas a second through the order API), so faults find sagas in flight at
every step; a stopped process makes a backlog, which drains after it."""


def pace(count: int, rate: float = RATE, minimum: float = 10.0) -> float:
    """Seconds over which to spread ``count`` orders at ``rate`` (at least ``minimum``)."""
    return max(minimum, count / rate)


def rng_for(name: str) -> tuple[random.Random, int]:
    """A random generator for a scenario and its seed (``SAGAFLOW_FAULT_SEED`` fixes it)."""
    value = os.environ.get("SAGAFLOW_FAULT_SEED", "").strip()
    seed = int(value) if value else random.randrange(1_000_000)
    return random.Random(f"{name}:{seed}"), seed
