"""``sagaflow dashboard``: binds 127.0.0.1 unless told otherwise; bad settings are usage errors."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest
import uvicorn
from typer.testing import CliRunner

from sagaflow.cli import app


@pytest.fixture(autouse=True)
def _isolate(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name in list(os.environ):
        if name.upper().startswith("SAGAFLOW_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("SAGAFLOW_LOG_FORMAT", "console")
    yield


@pytest.fixture
def served(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """What uvicorn was asked to serve (nothing listens)."""
    calls: list[dict[str, Any]] = []

    def run(app: Any, **kwargs: Any) -> None:
        calls.append({"app": app, **kwargs})

    monkeypatch.setattr(uvicorn, "run", run)
    return calls


def test_it_listens_on_loopback_by_default(served: list[dict[str, Any]]) -> None:
    result = CliRunner().invoke(app, ["dashboard", "-m", "tests.sample:saga"])
    assert result.exit_code == 0, result.output
    (call,) = served
    assert (call["host"], call["port"]) == ("127.0.0.1", 8089)
    dashboard = call["app"].state.dashboard
    assert [s.name for s in dashboard.registry] == ["sample"]
    assert not dashboard.access.actions_enabled  # no token: actions are off


def test_read_only_and_token_from_the_environment(
    served: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SAGAFLOW_DASHBOARD_TOKEN", "t" * 24)
    result = CliRunner().invoke(app, ["dashboard", "--host", "0.0.0.0", "--port", "9000"])
    assert result.exit_code == 0, result.output
    assert served[-1]["app"].state.dashboard.access.actions_enabled
    assert (served[-1]["host"], served[-1]["port"]) == ("0.0.0.0", 9000)
    result = CliRunner().invoke(app, ["dashboard", "--read-only"])
    assert result.exit_code == 0, result.output
    assert not served[-1]["app"].state.dashboard.access.actions_enabled


def test_bad_settings_are_a_usage_error(
    served: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SAGAFLOW_DASHBOARD_REFRESH", "0")
    result = CliRunner().invoke(app, ["dashboard"])
    assert result.exit_code == 2
    assert "invalid settings" in result.stderr and "refresh" in result.stderr
    assert not served
