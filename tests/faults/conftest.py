"""Fault-injection fixtures: the example system as real processes, one stack per test.

Each test gets a fresh RabbitMQ vhost and PostgreSQL database (``amqp_url`` and
``pg_url`` from ``tests/conftest.py``); ``make_stack`` starts
:class:`services.stack.Stack` on them and stops whatever is left at the end.
Process logs go to ``<tmp_path>/logs``. The summary line of each scenario is
printed at the end of the session (``pytest_terminal_summary``).
"""

from __future__ import annotations

import asyncio
import json
import secrets
import subprocess
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import pytest

from sagaflow.cli.broker import definitions, roles, user_url, with_passwords
from sagaflow.transport import RabbitMQTransport
from services.stack import PARTICIPANTS, Stack
from tests.faults.harness import SUMMARIES

StackFactory = Callable[..., Awaitable[Stack]]

SERVICES = (*PARTICIPANTS, "order")
"""The example's services: the order service runs a worker of its own."""

SIGNING_KEYS = ",".join(
    f"{service}:{service}-fault-1:{secrets.token_urlsafe(32)}" for service in SERVICES
)
"""A key per service of the example, made for this test session."""


async def least_privilege(stack: Stack, amqp_url: str) -> list[str]:
    """Give each process of ``stack`` a broker user with only what its role needs,
    as ``sagaflow broker users`` makes them (docs/security.md): the test, as the
    administrator, declares the topology; the processes declare nothing. Returns
    the users made (global to the broker: the caller deletes them).

    A process keeps its user across restarts (``Stack.set_identity``).
    """
    topology = stack.settings.topology()
    users = with_passwords(
        roles(topology, SERVICES, user_prefix=f"fault-{uuid.uuid4().hex[:8]}"), {}
    )
    vhost = unquote(urlsplit(amqp_url).path.lstrip("/"))
    document = json.dumps(definitions(users, vhost))
    await asyncio.to_thread(
        subprocess.run,
        ["rabbitmqctl", "-q", "import_definitions"],
        input=document,
        text=True,
        check=True,
        capture_output=True,
        timeout=120,
    )
    admin = RabbitMQTransport(amqp_url, topology, connection_name="fault-admin")
    await admin.start(list(SERVICES))
    await admin.close()
    by_role = {user.role: user for user in users}
    for name in stack.processes:
        base = name.rsplit("-", 1)[0] if name.rsplit("-", 1)[-1].isdigit() else name
        role = "coordinator" if base == "coordinator" else f"service:{base}"
        if role in by_role:
            stack.set_identity(
                name,
                {
                    "SAGAFLOW_AMQP_URL": user_url(amqp_url, by_role[role]),
                    "SAGAFLOW_DECLARE_TOPOLOGY": "false",
                },
            )
    return [user.user for user in users]


def delete_users(names: list[str]) -> None:
    for name in names:
        subprocess.run(["rabbitmqctl", "-q", "delete_user", name], capture_output=True, timeout=60)


@pytest.fixture
async def make_stack(amqp_url: str, pg_url: str, tmp_path: Path) -> AsyncIterator[StackFactory]:
    """``await make_stack(**Stack options)``: a started stack, torn down after the test."""
    stacks: list[Stack] = []
    users: list[str] = []

    async def make(**options: Any) -> Stack:
        options.setdefault("log_dir", tmp_path / "logs")
        # every scenario runs with signed messages, as a deployment should
        options["env_extra"] = {
            "SAGAFLOW_SIGNING_KEYS": SIGNING_KEYS,
            **options.get("env_extra", {}),
        }
        stack = Stack(amqp_url, pg_url, **options)
        stacks.append(stack)
        # ... and a broker user per process with only its role's rights
        users.extend(await least_privilege(stack, amqp_url))
        await stack.start()
        return stack

    try:
        yield make
    finally:
        for stack in reversed(stacks):
            await stack.terminate_all()
        await asyncio.to_thread(delete_users, users)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if SUMMARIES:
        terminalreporter.section("fault scenarios")
        for line in sorted(SUMMARIES):  # by scenario number
            terminalreporter.write_line(line)
