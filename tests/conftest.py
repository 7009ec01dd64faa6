"""Shared fixtures: every test session gets its own RabbitMQ vhost and PostgreSQL
database, created here and dropped at the end, so runs never collide."""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Iterator
from urllib.parse import urlsplit

import asyncpg
import pytest

PG_ADMIN_DSN = os.environ.get("SAGAFLOW_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
AMQP_BASE = os.environ.get("SAGAFLOW_TEST_AMQP", "amqp://guest:guest@127.0.0.1:5672")


def _rabbitmqctl(*args: str) -> None:
    """Run rabbitmqctl; if the broker is restarting (a fault test restarts it),
    wait for it to be up and try again rather than fail an unrelated test."""
    for attempt in range(3):
        done = subprocess.run(["rabbitmqctl", "-q", *args], capture_output=True, timeout=60)
        if done.returncode == 0:
            return
        if attempt < 2:
            subprocess.run(
                ["rabbitmqctl", "-q", "await_startup", "--timeout", "60"],
                capture_output=True,
                timeout=90,
            )
    raise RuntimeError(
        f"rabbitmqctl {' '.join(args)} failed: {done.stderr.decode(errors='replace')}"
    )


def new_vhost() -> str:
    name = f"sagaflow-test-{uuid.uuid4().hex[:10]}"
    _rabbitmqctl("add_vhost", name)
    user = urlsplit(AMQP_BASE).username or "guest"
    _rabbitmqctl("set_permissions", "-p", name, user, ".*", ".*", ".*")
    return name


def drop_vhost(name: str) -> None:
    subprocess.run(["rabbitmqctl", "-q", "delete_vhost", name], capture_output=True, timeout=60)


async def new_database() -> str:
    name = f"sagaflow_test_{uuid.uuid4().hex[:10]}"
    conn = await asyncpg.connect(PG_ADMIN_DSN)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return name


async def drop_database(name: str) -> None:
    conn = await asyncpg.connect(PG_ADMIN_DSN)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


def database_url(name: str) -> str:
    base = PG_ADMIN_DSN.rsplit("/", 1)[0]
    return f"{base}/{name}"


@pytest.fixture
def amqp_url() -> Iterator[str]:
    """A fresh RabbitMQ vhost for one test, deleted afterwards."""
    vhost = new_vhost()
    try:
        yield f"{AMQP_BASE}/{vhost}"
    finally:
        drop_vhost(vhost)


@pytest.fixture
async def pg_url() -> object:
    """A fresh PostgreSQL database for one test, dropped afterwards."""
    name = await new_database()
    try:
        yield database_url(name)
    finally:
        await drop_database(name)
