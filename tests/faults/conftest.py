"""Fault-injection fixtures: the example system as real processes, one stack per test.

Each test gets a fresh RabbitMQ vhost and PostgreSQL database (``amqp_url`` and
``pg_url`` from ``tests/conftest.py``); ``make_stack`` starts
:class:`services.stack.Stack` on them and stops whatever is left at the end.
Process logs go to ``<tmp_path>/logs``. The summary line of each scenario is
printed at the end of the session (``pytest_terminal_summary``).
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from services.stack import PARTICIPANTS, Stack
from tests.faults.harness import SUMMARIES

StackFactory = Callable[..., Awaitable[Stack]]

SIGNING_KEYS = ",".join(
    f"{service}:{service}-fault-1:{secrets.token_urlsafe(32)}"
    for service in (*PARTICIPANTS, "order")
)
"""A key per service of the example, made for this test session."""


@pytest.fixture
async def make_stack(amqp_url: str, pg_url: str, tmp_path: Path) -> AsyncIterator[StackFactory]:
    """``await make_stack(**Stack options)``: a started stack, torn down after the test."""
    stacks: list[Stack] = []

    async def make(**options: Any) -> Stack:
        options.setdefault("log_dir", tmp_path / "logs")
        # every scenario runs with signed messages, as a deployment should
        options["env_extra"] = {
            "SAGAFLOW_SIGNING_KEYS": SIGNING_KEYS,
            **options.get("env_extra", {}),
        }
        stack = Stack(amqp_url, pg_url, **options)
        stacks.append(stack)
        await stack.start()
        return stack

    try:
        yield make
    finally:
        for stack in reversed(stacks):
            await stack.terminate_all()


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if SUMMARIES:
        terminalreporter.section("fault scenarios")
        for line in sorted(SUMMARIES):  # by scenario number
            terminalreporter.write_line(line)
