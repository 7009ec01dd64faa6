"""The order service's HTTP API (FastAPI).

``POST /orders`` inserts the order and starts its saga in one database
transaction, through :func:`services.order.app.place_order`; the coordinator's
outbox relay, woken by the commit's notification, sends the first command.
``GET /orders/{order_id}`` reads the order and, for a rejected one, why (from
the saga's recorded failure).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated

import asyncpg
from fastapi import Depends, FastAPI, HTTPException, Request, Response, status
from pydantic import BaseModel

from sagaflow import Hooks, SagaClient
from sagaflow.config import Settings
from sagaflow.store import migrate_participant
from sagaflow.tracing_setup import tracing_configured
from services.order.app import (
    NewOrder,
    Order,
    OrderConflict,
    OrderStatus,
    PostgresOrders,
    place_order,
    setup,
)
from services.order.saga import SAGAS

__all__ = ["OrderPlaced", "OrderView", "create_app"]


class OrderPlaced(BaseModel):
    order_id: str
    saga_id: str
    status: OrderStatus


class OrderView(Order):
    """An order as ``GET /orders/{id}`` shows it."""

    reason: str | None = None
    failed_step: str | None = None


class _Resources:
    def __init__(self, pool: asyncpg.Pool, client: SagaClient) -> None:
        self.pool = pool
        self.client = client


def _resources(request: Request) -> _Resources:
    resources: _Resources = request.app.state.resources
    return resources


Resources = Annotated[_Resources, Depends(_resources)]


def create_app(settings: Settings, *, hooks: Hooks | None = None) -> FastAPI:
    """The order API, connected to ``settings.database_url`` while it runs.

    The coordinator's tables must exist (``sagaflow db migrate``); the order
    table is created here if needed.

    Args:
        settings: Where the database is, and the coordinator's schema.
        hooks: The saga client's hooks (tracing: a saga's trace starts here).
    """

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        pool = await asyncpg.create_pool(settings.database_url, min_size=1, max_size=10)
        store = settings.saga_store()
        try:
            async with pool.acquire() as conn:
                # the worker in this process migrates the same schema right now; sagaflow's
                # migration serializes itself, so let it create the schema, then add our table
                await migrate_participant(conn, "order")
                async with conn.transaction():
                    await setup(conn)
            await store.start()
            app.state.resources = _Resources(pool, SagaClient(SAGAS, store=store, hooks=hooks))
            yield
        finally:
            await store.close()
            await pool.close()

    app = FastAPI(title="sagaflow example: order service", lifespan=lifespan)

    @app.get("/health")
    async def health(resources: Resources) -> dict[str, str]:
        async with resources.pool.acquire() as conn:
            await conn.fetchval("SELECT 1")
        return {"status": "ok"}

    @app.post("/orders", status_code=status.HTTP_201_CREATED)
    async def create(new: NewOrder, resources: Resources, response: Response) -> OrderPlaced:
        try:
            async with resources.pool.acquire() as conn, conn.transaction():
                order, created = await place_order(resources.client, PostgresOrders(conn), new)
        except OrderConflict as exc:
            raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from None
        if not created:
            response.status_code = status.HTTP_200_OK
        return OrderPlaced(order_id=order.order_id, saga_id=order.saga_id, status=order.status)

    @app.get("/orders/{order_id}")
    async def show(order_id: str, resources: Resources) -> OrderView:
        async with resources.pool.acquire() as conn:
            order = await PostgresOrders(conn).get(order_id)
        if order is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"no order {order_id!r}")
        failure = None
        if order.status is OrderStatus.REJECTED:  # why: the saga recorded it
            saga = await resources.client.get(order.saga_id)
            failure = saga.failure if saga is not None else None
        return OrderView(
            **order.model_dump(),
            reason=failure.reason if failure else None,
            failed_step=failure.step if failure else None,
        )

    if tracing_configured():
        # a SERVER span per request: the trace of a saga started here begins with its request
        from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

        FastAPIInstrumentor.instrument_app(
            app, excluded_urls="/health", exclude_spans=["receive", "send"]
        )
    return app
