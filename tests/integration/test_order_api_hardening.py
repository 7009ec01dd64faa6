"""The order HTTP API against hostile clients: the real app, over real HTTP, on PostgreSQL.

Each test serves ``services.order.api.create_app`` with uvicorn on a free port
and attacks it the way the security review did (issue 11): bodies too large to
hold, values that break the database or the JSON encoder, ids that are not
ids, missing or wrong tokens. Every bad request gets a short 4xx; nothing a
participant's exception says reaches a client.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import asyncpg
import httpx
import orjson
import pytest
import uvicorn

from sagaflow.config import Settings
from sagaflow.store import migrate
from services.order.api import MAX_AMOUNT, create_app
from services.stack import free_port

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

ORDER = {
    "customer_id": "cust-1",
    "sku": "sku-widget",
    "quantity": 1,
    "amount": 1000,
    "destination": "US",
}
TOKEN = "s3cret-token-for-the-order-api"
SHORT = 1024
"""No error answer is longer than this, whatever the request held."""


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield  # pytest owns the signals


@contextlib.asynccontextmanager
async def serving(pg_url: str, **api: Any) -> AsyncIterator[httpx.AsyncClient]:
    """The order API on a free port of 127.0.0.1; a client for it."""
    await migrate(pg_url)
    settings = Settings(database_url=pg_url)
    if api:
        from services.order.api import ApiSettings

        app = create_app(settings, api=ApiSettings(**api))
    else:
        app = create_app(settings)
    port = free_port()
    server = _Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, access_log=False)
    )
    task = asyncio.create_task(server.serve())
    try:
        while not server.started:
            if task.done():
                task.result()
                raise RuntimeError("the order API did not start")
            await asyncio.sleep(0.02)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            yield client
    finally:
        server.should_exit = True
        await task


@pytest.fixture
async def api(pg_url: str) -> AsyncIterator[httpx.AsyncClient]:
    async with serving(pg_url) as client:
        yield client


async def _raw(client: httpx.AsyncClient, head: bytes, chunks: Iterator[bytes]) -> bytes:
    """Send a hand-made request on a fresh socket; the start of the answer."""
    url = client.base_url
    reader, writer = await asyncio.open_connection(url.host, url.port)
    try:
        writer.write(head)
        with contextlib.suppress(ConnectionError):  # the server may answer before it all arrived
            for chunk in chunks:
                writer.write(chunk)
                await writer.drain()
        return await asyncio.wait_for(reader.read(4096), timeout=5)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


def _short_error(response: httpx.Response, status: int = 422) -> dict[str, Any]:
    assert response.status_code == status, response.text[:SHORT]
    assert len(response.content) <= SHORT, f"{len(response.content)} bytes"
    body: dict[str, Any] = response.json()
    return body


# --------------------------------------------------------------------------- sizes


async def test_a_body_announced_too_large_is_refused_before_it_is_read(
    api: httpx.AsyncClient,
) -> None:
    head = (
        b"POST /orders HTTP/1.1\r\nhost: test\r\ncontent-type: application/json\r\n"
        b"content-length: 104857600\r\n\r\n"
    )
    answer = await _raw(api, head, iter([b'{"customer_id": "']))
    assert answer.startswith(b"HTTP/1.1 413 "), answer[:200]


async def test_a_chunked_body_is_cut_at_the_limit(api: httpx.AsyncClient) -> None:
    head = (
        b"POST /orders HTTP/1.1\r\nhost: test\r\ncontent-type: application/json\r\n"
        b"transfer-encoding: chunked\r\n\r\n"
    )
    piece = b"x" * 65536

    def chunks() -> Iterator[bytes]:
        yield b'11\r\n{"customer_id": "\r\n'
        for _ in range(16):  # 1 MiB of one string
            yield b"%x\r\n%s\r\n" % (len(piece), piece)
        yield b'2\r\n"}\r\n0\r\n\r\n'

    answer = await _raw(api, head, chunks())
    assert answer.startswith(b"HTTP/1.1 413 "), answer[:200]


async def test_the_body_limit_is_a_setting(pg_url: str) -> None:
    async with serving(pg_url, max_body_bytes=2048) as client:
        padded = {**ORDER, "padding": "x" * 4096}
        assert (await client.post("/orders", json=padded)).status_code == 413
        assert (await client.post("/orders", json=ORDER)).status_code == 201


async def test_a_large_invalid_field_is_not_echoed(api: httpx.AsyncClient) -> None:
    huge = "A" * 60_000
    body = _short_error(await api.post("/orders", json={**ORDER, "customer_id": huge}))
    assert huge[:100] not in orjson.dumps(body).decode()
    assert body["detail"][0]["loc"] == ["body", "customer_id"]


async def test_many_errors_still_make_a_short_answer(api: httpx.AsyncClient) -> None:
    junk = {name: ["x" * 5000] for name in ORDER}
    _short_error(await api.post("/orders", json=junk))


# --------------------------------------------------------------------------- values


async def _post_json(api: httpx.AsyncClient, body: dict[str, Any]) -> httpx.Response:
    # json.dumps writes what orjson refuses (10**20, a lone surrogate as \\ud800)
    content = json.dumps(body).encode()
    return await api.post("/orders", content=content, headers={"content-type": "application/json"})


async def test_numbers_out_of_range_are_422(api: httpx.AsyncClient) -> None:
    for change in (
        {"amount": 1e20},
        {"amount": 10**20},
        {"amount": 2**63},
        {"amount": MAX_AMOUNT + 1},
        {"amount": 0},
        {"amount": -5},
        {"amount": 12.5},
        {"quantity": 10**12},
        {"quantity": 0},
    ):
        response = await _post_json(api, {**ORDER, **change})
        assert response.status_code == 422, (change, response.text[:SHORT])
        assert len(response.content) <= SHORT, change
    assert (await _post_json(api, {**ORDER, "amount": MAX_AMOUNT})).status_code == 201


async def test_an_integer_too_long_to_parse_is_4xx(api: httpx.AsyncClient) -> None:
    body = b'{"customer_id": "cust-1", "sku": "sku-widget", "quantity": 1,'
    body += b' "amount": 1' + b"0" * 5000 + b', "destination": "US"}'
    response = await api.post("/orders", content=body, headers={"content-type": "application/json"})
    assert 400 <= response.status_code < 500, response.text[:SHORT]
    assert len(response.content) <= SHORT


@pytest.mark.parametrize("value", ["a\x00b", "\ud800", "ab\udfff", "a\x07b", "a\nb"], ids=repr)
async def test_control_characters_and_lone_surrogates_are_422(
    api: httpx.AsyncClient, value: str
) -> None:
    for field in ("customer_id", "sku", "destination", "order_id"):
        response = await _post_json(api, {**ORDER, field: value})
        assert response.status_code == 422, (field, response.text[:SHORT])
        assert len(response.content) <= SHORT, field


@pytest.mark.parametrize(
    "body",
    [b"\xff\xfe\x00garbage", b'{"customer_id": "\xed\xa0\x80"}', b"[1, 2", b"null", b"[]"],
    ids=repr,
)
async def test_bodies_that_are_not_an_order_are_4xx(api: httpx.AsyncClient, body: bytes) -> None:
    response = await api.post("/orders", content=body, headers={"content-type": "application/json"})
    assert 400 <= response.status_code < 500, response.text[:SHORT]
    assert len(response.content) <= SHORT


# --------------------------------------------------------------------------- paths


@pytest.mark.parametrize(
    "path",
    ["/orders/a%00b", "/orders/%ED%A0%80", "/orders/a%07b", "/orders/" + "x" * 5000],
    ids=lambda p: p[:24],
)
async def test_bad_ids_in_the_path_are_4xx(api: httpx.AsyncClient, path: str) -> None:
    response = await api.get(path)
    assert 400 <= response.status_code < 500, response.text[:SHORT]
    assert len(response.content) <= SHORT


async def test_a_placed_order_is_still_shown(api: httpx.AsyncClient) -> None:
    placed = await api.post("/orders", json={**ORDER, "order_id": "ord-1"})
    assert placed.status_code == 201, placed.text
    again = await api.post("/orders", json={**ORDER, "order_id": "ord-1"})
    assert again.status_code == 200
    shown = await api.get("/orders/ord-1")
    assert shown.status_code == 200
    assert shown.json()["status"] == "PENDING" and shown.json()["reason"] is None
    assert (await api.get("/orders/nope")).status_code == 404


# --------------------------------------------------------------------------- failure reasons


async def _reject(pg_url: str, order_id: str, reason: str) -> None:
    """Mark the order rejected and its saga failed with ``reason``, as a coordinator would."""
    failure = {"step": "charge", "reason": reason, "cause": "retries_exhausted"}
    conn = await asyncpg.connect(pg_url)
    try:
        await conn.execute(
            """UPDATE "order".orders SET status = 'REJECTED' WHERE order_id = $1""", order_id
        )
        await conn.execute(
            "UPDATE sagaflow.sagas SET state = jsonb_set(state, '{failure}', $2::jsonb)"
            " WHERE saga_id = $1",
            f"order-{order_id}",
            orjson.dumps(failure).decode(),
        )
    finally:
        await conn.close()


@pytest.mark.parametrize(
    ("recorded", "shown"),
    [
        ("insufficient_funds", "insufficient_funds"),
        ("out_of_stock", "out_of_stock"),
        ("RuntimeError: connect to 10.1.2.3:5432 as admin:hunter2 failed", "failed"),
        ("insufficient_funds (after 5 attempts)", "failed"),
    ],
)
async def test_a_rejected_order_shows_a_known_code_only(
    api: httpx.AsyncClient, pg_url: str, recorded: str, shown: str
) -> None:
    assert (await api.post("/orders", json={**ORDER, "order_id": "ord-2"})).status_code == 201
    await _reject(pg_url, "ord-2", recorded)
    view = (await api.get("/orders/ord-2")).json()
    assert view["status"] == "REJECTED"
    assert view["reason"] == shown
    assert view["failed_step"] == "charge"


# --------------------------------------------------------------------------- token


async def test_with_a_token_every_request_but_health_needs_it(pg_url: str) -> None:
    async with serving(pg_url, api_token=TOKEN) as client:
        assert (await client.get("/health")).status_code == 200
        for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": TOKEN}):
            for method, path in (("POST", "/orders"), ("GET", "/orders/x"), ("GET", "/docs")):
                response = await client.request(method, path, json=ORDER, headers=headers)
                assert response.status_code == 401, (method, path, headers, response.text)
                assert response.headers["www-authenticate"] == "Bearer"
                assert TOKEN not in response.text
        good = {"authorization": f"Bearer {TOKEN}"}
        placed = await client.post("/orders", json={**ORDER, "order_id": "ord-3"}, headers=good)
        assert placed.status_code == 201
        assert (await client.get("/orders/ord-3", headers=good)).status_code == 200


async def test_a_short_token_is_refused_at_startup() -> None:
    from pydantic import ValidationError

    from services.order.api import ApiSettings

    with pytest.raises(ValidationError):
        ApiSettings(api_token="short")
