"""Every listening socket binds 127.0.0.1 unless configured (issue 11's review).

The metrics endpoint used to bind every interface with no way to change it.
Whether a socket listens beyond 127.0.0.1 is checked from outside: Linux
routes all of 127.0.0.0/8 to loopback, so 127.0.0.2 reaches a socket bound to
0.0.0.0 and is refused by one bound to 127.0.0.1.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from pydantic import ValidationError

from sagaflow.config import Settings
from services.order.api import ApiSettings
from services.stack import free_port

ROOT = Path(__file__).resolve().parents[2]

_SERVE_METRICS = textwrap.dedent(
    """
    import sys
    from sagaflow.config import Settings
    from sagaflow.telemetry import setup_telemetry

    telemetry = setup_telemetry(Settings(), "inventory", database=False)
    print("ready", flush=True)
    sys.stdin.read()  # until the test closes it
    telemetry.shutdown()
    """
)


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.upper().startswith(("SAGAFLOW_", "ORDER_", "OTEL_")):
            monkeypatch.delenv(name)


def _reachable(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(2)
        try:
            sock.connect((host, port))
        except ConnectionRefusedError:
            return False
        return True


@pytest.fixture
def serve_metrics() -> Iterator[Callable[..., int]]:
    """Start a process that serves metrics with the given ``SAGAFLOW_*``; its port."""
    children: list[subprocess.Popen[str]] = []

    def start(**env: str) -> int:
        port = free_port()
        child = subprocess.Popen(
            [sys.executable, "-c", _SERVE_METRICS],
            env={**os.environ, "SAGAFLOW_METRICS_PORT": str(port), **env},
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        children.append(child)
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "ready"
        return port

    yield start
    for child in children:
        child.communicate(timeout=10)


def test_the_metrics_endpoint_listens_on_loopback_by_default(
    serve_metrics: Callable[..., int],
) -> None:
    port = serve_metrics()
    assert _reachable("127.0.0.1", port)
    assert not _reachable("127.0.0.2", port), "the metrics endpoint listens on every interface"


def test_the_metrics_host_is_a_setting(serve_metrics: Callable[..., int]) -> None:
    port = serve_metrics(SAGAFLOW_METRICS_HOST="0.0.0.0")
    assert _reachable("127.0.0.2", port)


def test_metrics_host_reads_its_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings().metrics_host == "127.0.0.1"
    monkeypatch.setenv("SAGAFLOW_METRICS_HOST", "10.0.0.7")
    assert Settings().metrics_host == "10.0.0.7"
    assert Settings().redacted()["metrics_host"] == "10.0.0.7"


def test_the_order_api_listens_on_loopback_unless_told(monkeypatch: pytest.MonkeyPatch) -> None:
    api = ApiSettings()
    assert (api.http_host, api.http_port) == ("127.0.0.1", 8000)
    assert api.api_token is None and api.max_body_bytes == 64 * 1024
    monkeypatch.setenv("ORDER_HTTP_HOST", "0.0.0.0")
    monkeypatch.setenv("ORDER_HTTP_PORT", "9000")
    monkeypatch.setenv("ORDER_API_TOKEN", "a-token-long-enough-to-use")
    monkeypatch.setenv("ORDER_MAX_BODY_BYTES", "4096")
    api = ApiSettings()
    assert (api.http_host, api.http_port, api.max_body_bytes) == ("0.0.0.0", 9000, 4096)
    assert api.api_token is not None
    assert api.api_token.get_secret_value() == "a-token-long-enough-to-use"
    assert "a-token" not in repr(api)


@pytest.mark.parametrize("token", ["", "short", "has a space in it!!", "n\u00f6n-ascii-token-long"])
def test_an_unusable_token_is_refused_without_repeating_it(
    monkeypatch: pytest.MonkeyPatch, token: str
) -> None:
    monkeypatch.setenv("ORDER_API_TOKEN", token)
    with pytest.raises(ValidationError) as refused:
        ApiSettings()
    if token:
        assert token not in str(refused.value)
