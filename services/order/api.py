"""The order service's HTTP API (FastAPI).

``POST /orders`` inserts the order and starts its saga in one database
transaction, through :func:`services.order.app.place_order`; the coordinator's
outbox relay, woken by the commit's notification, sends the first command.
``GET /orders/{order_id}`` reads the order and, for a rejected one, why (from
the saga's recorded failure, shown as a known code: the full text stays in the
saga's log). An order of ``ORDER_APPROVAL_THRESHOLD`` cents or more waits for a
manager: ``POST /orders/{order_id}/approval`` sends its saga the signal
``approval`` (in one transaction with nothing else here; a second approval
changes nothing).

The API faces strangers, so it refuses early and says little (docs/security.md):
a body larger than ``max_body_bytes`` is answered 413 before it is read, every
field is bounded and plain printable text, a bad request gets a short 422 that
never repeats its input, and with ``api_token`` set every request but
``/health`` needs ``Authorization: Bearer <token>``.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Annotated, Any

import asyncpg
import orjson
from fastapi import Depends, FastAPI, HTTPException, Path, Request, Response, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import AfterValidator, BaseModel, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sagaflow import Hooks, SagaClient, SagaflowError, SagaStatus
from sagaflow.config import Settings
from sagaflow.examples.shop.contracts import ManagerApproval, Reason
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

__all__ = [
    "MAX_AMOUNT",
    "ApiSettings",
    "OrderPlaced",
    "OrderRequest",
    "OrderView",
    "create_app",
    "public_reason",
]

MAX_AMOUNT = 10**10
"""The largest order in cents (100 million): far inside PostgreSQL's bigint."""

_MIN_TOKEN = 16
_MAX_ERRORS = 10  # a 422 lists this many problems at most
_MAX_ECHO = 80  # characters of a location or a message a 422 repeats at most
_KNOWN_REASONS = frozenset(reason.value for reason in Reason)


class ApiSettings(BaseSettings):
    """The order API's own settings, read from ``ORDER_*`` environment variables.

    Attributes:
        http_host: The address to listen on (``ORDER_HTTP_HOST``): loopback
            unless set; a container sets ``0.0.0.0`` to be reachable at all.
        http_port: The port (``ORDER_HTTP_PORT``).
        api_token: ``ORDER_API_TOKEN``: when set, every request but ``/health``
            needs ``Authorization: Bearer <token>``. At least 16 visible ASCII
            characters.
        max_body_bytes: ``ORDER_MAX_BODY_BYTES``: a larger request body is
            answered 413 before it is read.
        approval_threshold: ``ORDER_APPROVAL_THRESHOLD``: orders of this many
            cents or more wait for a manager's approval (default 1,000,000:
            ten thousand in the shop's currency).
    """

    # a rejected setting may be the token itself: keep it out of the error
    model_config = SettingsConfigDict(
        env_prefix="ORDER_",
        frozen=True,
        extra="ignore",
        case_sensitive=False,
        hide_input_in_errors=True,
    )

    http_host: str = "127.0.0.1"
    http_port: int = Field(default=8000, ge=1, le=65535)
    api_token: SecretStr | None = None
    max_body_bytes: int = Field(default=64 * 1024, ge=1024)
    approval_threshold: int = Field(default=1_000_000, ge=1)

    @field_validator("api_token")
    @classmethod
    def _usable_token(cls, token: SecretStr | None) -> SecretStr | None:
        if token is not None:
            value = token.get_secret_value()
            if len(value) < _MIN_TOKEN or not all("!" <= c <= "~" for c in value):
                raise ValueError(
                    f"must be at least {_MIN_TOKEN} visible ASCII characters (no spaces)"
                )
        return token


def _printable(value: str) -> str:
    # NUL breaks PostgreSQL's text, control characters break logs and terminals
    if not value.isprintable():
        raise ValueError("must be printable text, without control characters")
    return value


class OrderRequest(NewOrder):
    """The body of ``POST /orders``: a :class:`NewOrder` with every value bounded.

    Strings are plain printable text (PostgreSQL refuses a NUL; a lone
    surrogate cannot be encoded at all) and the amount fits the database.
    """

    amount: int = Field(ge=1, le=MAX_AMOUNT, description="in cents")

    @field_validator("order_id", "customer_id", "sku", "destination")
    @classmethod
    def _plain_text(cls, value: str | None) -> str | None:
        return None if value is None else _printable(value)


OrderIdPath = Annotated[str, Path(min_length=1, max_length=100), AfterValidator(_printable)]


class ApprovalRequest(BaseModel):
    """The body of ``POST /orders/{id}/approval``."""

    approved_by: str = Field(min_length=1, max_length=100)
    note: str = Field(default="", max_length=500)

    @field_validator("approved_by", "note")
    @classmethod
    def _plain_text(cls, value: str) -> str:
        return _printable(value)


class ApprovalAccepted(BaseModel):
    order_id: str
    saga_status: SagaStatus
    kept: bool  # the saga has not reached its wait yet: the approval waits for it


class OrderPlaced(BaseModel):
    order_id: str
    saga_id: str
    status: OrderStatus


class OrderView(Order):
    """An order as ``GET /orders/{id}`` shows it."""

    reason: str | None = None
    failed_step: str | None = None


def public_reason(reason: str) -> str:
    """What a client may see of a saga's failure: a business code it knows, else ``failed``.

    Anything else (a participant's exception text, a timeout's details) can
    hold hosts, queries or secrets; it stays in the saga's log for operators.
    """
    return reason if reason in _KNOWN_REASONS else "failed"


class _Resources:
    def __init__(self, pool: asyncpg.Pool, client: SagaClient) -> None:
        self.pool = pool
        self.client = client


def _resources(request: Request) -> _Resources:
    resources: _Resources = request.app.state.resources
    return resources


Resources = Annotated[_Resources, Depends(_resources)]


class _Guard:
    """Before the app sees a request: its bearer token (when one is set), then its size.

    The body is read here, up to the limit and no further, then handed to the
    app: a client announcing or streaming more gets 413 and costs the limit.
    """

    def __init__(self, app: ASGIApp, *, max_body_bytes: int, token: str | None) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.token = token.encode() if token is not None else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])  # the last of a repeated header
        token = self.token if scope["path"] != "/health" else None
        if token is not None and not _authorized(headers.get(b"authorization", b""), token):
            await _refuse(send, 401, "a valid bearer token is required", bearer=True)
            return
        declared = headers.get(b"content-length", b"0")
        if not declared.isdigit() or int(declared) > self.max_body_bytes:
            await _refuse(send, 413, f"the body is larger than {self.max_body_bytes} bytes")
            return
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            body += message.get("body", b"")
            if len(body) > self.max_body_bytes:
                await _refuse(send, 413, f"the body is larger than {self.max_body_bytes} bytes")
                return
            if not message.get("more_body", False):
                break
        await self.app(scope, _replay(bytes(body), receive), send)


def _authorized(header: bytes, token: bytes) -> bool:
    """``Authorization: Bearer <token>``, compared in constant time whatever was sent."""
    scheme, _, credentials = header.partition(b" ")
    # digests of equal length: the comparison tells neither a prefix nor the token's length
    matches = hmac.compare_digest(_digest(credentials.strip()), _digest(token))
    return matches and scheme.lower() == b"bearer"


def _digest(value: bytes) -> bytes:
    return hashlib.sha256(value).digest()


def _replay(body: bytes, receive: Receive) -> Receive:
    """``receive`` for the app: the body read already, then the connection's own events."""
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def replay() -> Message:
        return pending.pop() if pending else await receive()

    return replay


async def _refuse(send: Send, status_code: int, detail: str, *, bearer: bool = False) -> None:
    content = orjson.dumps({"detail": detail})
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(content)).encode()),
        (b"connection", b"close"),  # what the client still sends is not read
    ]
    if bearer:
        headers.append((b"www-authenticate", b"Bearer"))
    await send({"type": "http.response.start", "status": status_code, "headers": headers})
    await send({"type": "http.response.body", "body": content})


def _cut(value: Any) -> Any:
    """A location part or a message as a 422 may repeat it: short, and encodable."""
    if not isinstance(value, str):
        return value
    if len(value) > _MAX_ECHO:
        value = value[:_MAX_ECHO] + "..."
    return value.encode("utf-8", "replace").decode()  # a lone surrogate cannot be sent


def _short_errors(errors: Sequence[Any]) -> list[dict[str, Any]]:
    """FastAPI's validation errors without the input (or its context): it may be huge."""
    return [
        {
            "loc": [_cut(part) for part in error.get("loc", ())],
            "msg": _cut(error.get("msg", "")),
            "type": _cut(error.get("type", "")),
        }
        for error in errors[:_MAX_ERRORS]
    ]


async def _invalid(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return JSONResponse({"detail": _short_errors(exc.errors())}, status_code=422)


def create_app(
    settings: Settings, *, api: ApiSettings | None = None, hooks: Hooks | None = None
) -> FastAPI:
    """The order API, connected to ``settings.database_url`` while it runs.

    The coordinator's tables must exist (``sagaflow db migrate``); the order
    table is created here if needed.

    Args:
        settings: Where the database is, and the coordinator's schema.
        api: The token and the body limit; by default ``ApiSettings()`` from
            the environment.
        hooks: The saga client's hooks (tracing: a saga's trace starts here).
    """
    api = api if api is not None else ApiSettings()

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

    app = FastAPI(
        title="sagaflow example: order service",
        lifespan=lifespan,
        exception_handlers={RequestValidationError: _invalid},
    )
    app.add_middleware(
        _Guard,
        max_body_bytes=api.max_body_bytes,
        token=api.api_token.get_secret_value() if api.api_token is not None else None,
    )

    @app.get("/health")
    async def health(resources: Resources) -> dict[str, str]:
        async with resources.pool.acquire() as conn:
            await conn.fetchval("SELECT 1")
        return {"status": "ok"}

    @app.post("/orders", status_code=status.HTTP_201_CREATED)
    async def create(new: OrderRequest, resources: Resources, response: Response) -> OrderPlaced:
        try:
            async with resources.pool.acquire() as conn, conn.transaction():
                order, created = await place_order(
                    resources.client,
                    PostgresOrders(conn),
                    new,
                    approval_threshold=api.approval_threshold,
                )
        except OrderConflict as exc:
            raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from None
        if not created:
            response.status_code = status.HTTP_200_OK
        return OrderPlaced(order_id=order.order_id, saga_id=order.saga_id, status=order.status)

    @app.post("/orders/{order_id}/approval")
    async def approve(
        order_id: OrderIdPath, approval: ApprovalRequest, resources: Resources
    ) -> ApprovalAccepted:
        async with resources.pool.acquire() as conn, conn.transaction():
            order = await PostgresOrders(conn).get(order_id)
            if order is None:
                raise HTTPException(status.HTTP_404_NOT_FOUND, f"no order {order_id!r}")
            saga = await resources.client.get(order.saga_id)
            if saga is not None and not saga.data.get("needs_approval"):
                raise HTTPException(status.HTTP_409_CONFLICT, "this order needs no approval")
            try:
                state = await resources.client.signal_saga(
                    order.saga_id,
                    "approval",
                    ManagerApproval(approved_by=approval.approved_by, note=approval.note),
                    by=approval.approved_by,
                    reason=approval.note or "approved",
                    connection=conn,
                )
            except SagaflowError as exc:  # finished, not waiting for an approval...
                raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from None
        kept = "approval" in state.signals
        return ApprovalAccepted(order_id=order_id, saga_status=state.status, kept=kept)

    @app.get("/orders/{order_id}")
    async def show(order_id: OrderIdPath, resources: Resources) -> OrderView:
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
            reason=public_reason(failure.reason) if failure else None,
            failed_step=failure.step if failure else None,
        )

    if tracing_configured():
        # a SERVER span per request: the trace of a saga started here begins with its request
        from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

        FastAPIInstrumentor.instrument_app(
            app, excluded_urls="/health", exclude_spans=["receive", "send"]
        )
    return app
