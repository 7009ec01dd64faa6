"""Secrets never printed: URLs whose passwords misparse, ``sagas show``, the order service's log.

The security review (issue 11) found passwords holding an unencoded ``/``,
``#``, ``?`` or ``@`` printed whole, because ``urlsplit`` cuts the user info
there and calls a piece of the password the host.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from typer.testing import CliRunner

from sagaflow import BusinessFailure, HandlerContext, Hooks, Participant, Saga, SagaStatus
from sagaflow.cli import app, common
from sagaflow.config import MASK, Settings, redact_url
from sagaflow.store import InMemorySagaStore
from sagaflow.testing import SagaTestEnvironment
from tests.sample import Cmd, Ok, reserve, saga

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"

PASSWORDS = [
    "plain",
    "p/ss",
    "p#ss",
    "p?ss",
    "p@ss",
    "a/b?c#d@e",
    "@/#?:@",
    "pa:ss",
    "%2Fenc%40oded",
    "trailing@",
]


@pytest.mark.parametrize("password", PASSWORDS)
@pytest.mark.parametrize(
    "template",
    [
        "amqp://app:{}@mq:5672/shop",
        "amqp://app:{}@mq",
        "postgresql://app:{}@db:5432/shop?sslmode=require",
        "postgresql://app:{}@[::1]:5432/shop",
        "http://admin:{}@jaeger:16686/",
        "app:{}@host/db",
    ],
)
def test_a_password_is_masked_whatever_it_holds(template: str, password: str) -> None:
    assert redact_url(template.format(password)) == template.format(MASK)


@pytest.mark.parametrize(
    ("url", "redacted"),
    [
        ("amqp://guest:guest@host/", "amqp://guest:******@host/"),
        ("amqp://app:p/ss@mq:5672/shop", "amqp://app:******@mq:5672/shop"),
        ("amqp://app:p#ss@mq:5672/shop", "amqp://app:******@mq:5672/shop"),
        ("amqp://app:p?ss@mq:5672/shop", "amqp://app:******@mq:5672/shop"),
        ("amqp://app:p@ss@mq:5672/shop", "amqp://app:******@mq:5672/shop"),
        ("postgresql://app@db/shop", "postgresql://app@db/shop"),
        ("postgresql://db/shop", "postgresql://db/shop"),
        ("http://jaeger:16686", "http://jaeger:16686"),
        # the rest of the URL is kept as written
        (
            "postgresql://app:x@db/shop?sslmode=require&application_name=a%20b",
            "postgresql://app:******@db/shop?sslmode=require&application_name=a%20b",
        ),
    ],
)
def test_what_stays_readable(url: str, redacted: str) -> None:
    assert redact_url(url) == redacted


@pytest.mark.parametrize(
    ("url", "redacted"),
    [
        ("postgresql://app@db/shop?password=pg/pa#ss", "postgresql://app@db/shop?password=******"),
        (
            "postgresql://app@db/shop?sslmode=require&PASSWORD=pg/pa#ss",
            "postgresql://app@db/shop?sslmode=require&PASSWORD=******",
        ),
        (
            "postgresql://app@db/shop?sslpassword=pg/pa#ss&x=1",
            "postgresql://app@db/shop?sslpassword=******&x=1",
        ),
        ("http://jaeger:16686/?token=pg/pa#ss", "http://jaeger:16686/?token=******"),
        (
            "postgresql://app:x@db/shop?password=y",
            "postgresql://app:******@db/shop?password=******",
        ),
    ],
)
def test_a_secret_in_the_query_is_masked_whole(url: str, redacted: str) -> None:
    assert redact_url(url) == redacted


def test_secrets_lists_the_passwords_that_misparse() -> None:
    settings = Settings(
        amqp_url="amqp://app:mq/pa#ss@mq:5672/shop",
        database_url="postgresql://app:pg?p@ss@db/shop",
        jaeger_url="http://admin:j%2Fpass@jaeger:16686",
    )
    found = set(settings.secrets())
    assert {"mq/pa#ss", "pg?p@ss", "j%2Fpass", "j/pass"} <= found
    for text in (repr(settings), str(settings), str(settings.redacted())):
        for secret in ("mq/pa#ss", "pa#ss", "pg?p@ss", "p@ss", "j%2Fpass"):
            assert secret not in text, text


# --------------------------------------------------------------------------- sagas show


@pytest.fixture
def _no_sagaflow_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name in list(os.environ):
        if name.upper().startswith(("SAGAFLOW_", "ORDER_")):
            monkeypatch.delenv(name)
    monkeypatch.setenv("SAGAFLOW_LOG_FORMAT", "console")
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


class _Traced(Hooks):
    def saga_started(self, saga: Saga[Any], saga_id: str) -> dict[str, str]:
        return {"traceparent": f"00-{TRACE_ID}-00f067aa0ba902b7-01"}


def _refused_saga() -> tuple[InMemorySagaStore, str]:
    """A sample saga whose first step is refused: compensated, with a trace."""
    inventory = Participant("inventory")

    @inventory.handler(reserve)
    async def refuse(cmd: Cmd, ctx: HandlerContext) -> Ok:
        raise BusinessFailure("out_of_stock")

    async def run() -> tuple[InMemorySagaStore, str]:
        env = SagaTestEnvironment([saga], [inventory], hooks=_Traced())
        async with env:
            handle = await env.start_saga(saga, {"order_id": "o-1"})
            await env.drain()
            assert (await env.get(handle.saga_id)).status is SagaStatus.COMPENSATED
        return env.store, handle.saga_id

    return asyncio.run(run())


@pytest.mark.usefixtures("_no_sagaflow_env")
@pytest.mark.parametrize("as_json", [False, True])
def test_sagas_show_prints_the_jaeger_url_without_its_password(
    monkeypatch: pytest.MonkeyPatch, as_json: bool
) -> None:
    memory, saga_id = _refused_saga()
    monkeypatch.setattr(common, "saga_store", lambda settings: memory)
    monkeypatch.setenv("SAGAFLOW_JAEGER_URL", "http://admin:j/ss#w?rd@jaeger:16686/")
    args = ["sagas", "show", saga_id] + (["--json"] if as_json else [])
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    for piece in ("j/ss#w?rd", "j/ss", "w?rd", "rd@"):
        assert piece not in result.output
    link = f"http://admin:******@jaeger:16686/trace/{TRACE_ID}"
    if as_json:
        assert orjson.loads(result.stdout)["jaeger_url"] == link
    else:
        assert link in result.stdout.replace("\n", "")


# --------------------------------------------------------------------------- the order service


@pytest.mark.usefixtures("_no_sagaflow_env")
def test_the_order_service_logs_only_redacted_urls(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import services.order.__main__ as order_main

    async def serve(*args: object) -> bool:
        logging.getLogger("services.order").info("serving")
        return True

    monkeypatch.setattr(order_main, "serve", serve)
    monkeypatch.setenv("SAGAFLOW_AMQP_URL", "amqp://app:mq/pa#ss@mq:5672/shop")
    monkeypatch.setenv("SAGAFLOW_DATABASE_URL", "postgresql://app:pg?p@ss@db/shop")
    monkeypatch.setenv("ORDER_API_TOKEN", "t0ken-that-is-long-enough")
    with caplog.at_level(logging.INFO, logger="services.order"):
        order_main.main([])
    text = "\n".join(record.getMessage() for record in caplog.records)
    assert "order service on http://127.0.0.1:8000" in text
    for secret in ("mq/pa#ss", "pa#ss", "pg?p@ss", "p@ss", "t0ken-that-is-long-enough"):
        assert secret not in text, text
