"""Bad configuration ends a process at start (issue 11, item 8).

Each test runs the real command (``python -m sagaflow coordinator``, ``worker``,
``python -m services.order``) against the real servers with one setting wrong
and the rest good (a fresh vhost and database). A permanent mistake (wrong
credentials, a missing database or vhost, an unmigrated schema, an
out-of-range or malformed setting) must end the process within seconds, exit
code 2, with one line on stderr that says what is wrong, no traceback and no
password. A server that does not answer is retried for
``SAGAFLOW_CONNECT_TIMEOUT`` seconds, then the same.

Before: the coordinator and the worker retried most of these forever (and the
coordinator logged "started" on an unmigrated schema), a prefetch of 70000
passed validation, and the order service's worker ran on after its API could
not bind.
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import orjson
import pytest
from pydantic import BaseModel

from sagaflow import Action, HandlerContext, Participant
from sagaflow.store import migrate
from tests.conftest import AMQP_BASE, PG_ADMIN_DSN

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

ROOT = Path(__file__).resolve().parents[2]
SAGAS = "tests.sample:saga"
WORKER = f"{__name__}:participant"
FAST = 10.0  # seconds a permanent mistake may take to end the process, at most
SECRET = "not-the-password-8d1c"


class Ping(BaseModel):
    n: int


participant = Participant("gate")


@participant.handler(Action("gate", "ping", Ping, Ping))
async def ping(command: Ping, ctx: HandlerContext) -> Ping:
    return command


@dataclass(frozen=True)
class Exited:
    code: int | None  # None: still running when the test gave up on it
    stderr: str
    seconds: float

    @property
    def lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.strip()]


def _env(**settings: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith(("SAGAFLOW_", "OTEL_"))}
    env["SAGAFLOW_LOG_FORMAT"] = "json"
    env.update(settings)
    return env


async def _run(*argv: str, env: Mapping[str, str], timeout: float = 25.0) -> Exited:
    """Run ``python <argv>`` until it exits or ``timeout`` passes (then kill it)."""
    began = time.monotonic()
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        *argv,
        cwd=ROOT,
        env=dict(env),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        _, err = await asyncio.wait_for(process.communicate(), timeout)
    except TimeoutError:
        process.kill()
        _, err = await process.communicate()
        return Exited(None, err.decode(errors="replace"), time.monotonic() - began)
    return Exited(process.returncode, err.decode(errors="replace"), time.monotonic() - began)


def sagaflow(*args: str) -> tuple[str, ...]:
    return ("-m", "sagaflow", *args)


def assert_refused(run: Exited, *expected: str, within: float = FAST) -> str:
    """Exit code 2 within ``within`` seconds; stderr ends with the one ``error:``
    line, holding ``expected``, and has no traceback, retry or password.
    Returns the line."""
    assert run.code == 2, f"exit code {run.code} after {run.seconds:.1f}s; stderr:\n{run.stderr}"
    assert run.seconds < within, f"took {run.seconds:.1f}s; stderr:\n{run.stderr}"
    *logs, line = run.lines
    assert line.startswith("error: "), run.stderr
    for log in logs:  # what ran before, such as the advice on autovacuum: log records only
        record = orjson.loads(log)
        assert record["level"] in ("info", "warning"), log
        assert "retry" not in record["message"], log
    for text in expected:
        assert text in line, line
    assert "Traceback" not in run.stderr
    assert SECRET not in run.stderr
    return line


def _with_userinfo(url: str, user: str, password: str | None = None) -> str:
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    userinfo = user if password is None else f"{user}:{password}"
    return urlunsplit(parts._replace(netloc=f"{userinfo}@{host}"))


def _with_port(url: str, port: int | str) -> str:
    parts = urlsplit(url)
    userinfo, at, hostport = parts.netloc.rpartition("@")
    host = hostport.rpartition(":")[0] or hostport
    return urlunsplit(parts._replace(netloc=f"{userinfo}{at}{host}:{port}"))


def _closed_port() -> int:
    """A local port nobody listens on (connections to it are refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@pytest.fixture
async def migrated(pg_url: str) -> str:
    await migrate(pg_url)
    return pg_url


@pytest.fixture
async def no_create_role(pg_url: str) -> AsyncIterator[str]:
    """A role that may connect to the test database but create nothing in it."""
    role = f"sagaflow_ro_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(PG_ADMIN_DSN)
    try:
        await admin.execute(f'CREATE ROLE "{role}" LOGIN')
        yield _with_userinfo(pg_url, role)
    finally:
        await admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1", role
        )
        database = urlsplit(pg_url).path.lstrip("/")
        await admin.execute(f'REVOKE ALL ON DATABASE "{database}" FROM "{role}"')
        await admin.execute(f'DROP ROLE IF EXISTS "{role}"')
        await admin.close()


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A port another process listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


# --------------------------------------------------------------------------- the database


@pytest.mark.parametrize("command", ["coordinator", "worker"])
async def test_an_unknown_database_role(command: str, pg_url: str, amqp_url: str) -> None:
    url = _with_userinfo(pg_url, "no_such_role", SECRET)
    args = (
        sagaflow("coordinator", SAGAS) if command == "coordinator" else sagaflow("worker", WORKER)
    )
    run = await _run(*args, env=_env(SAGAFLOW_DATABASE_URL=url, SAGAFLOW_AMQP_URL=amqp_url))
    line = assert_refused(run, "PostgreSQL", 'role "no_such_role" does not exist')
    assert "no_such_role:******@" in line  # which URL, its password masked


async def test_a_missing_database(pg_url: str, amqp_url: str) -> None:
    url = f"{PG_ADMIN_DSN.rsplit('/', 1)[0]}/no_such_database"
    run = await _run(
        *sagaflow("coordinator", SAGAS),
        env=_env(SAGAFLOW_DATABASE_URL=url, SAGAFLOW_AMQP_URL=amqp_url),
    )
    assert_refused(run, 'database "no_such_database" does not exist')


async def test_an_unmigrated_coordinator_schema(pg_url: str, amqp_url: str) -> None:
    run = await _run(
        *sagaflow("coordinator", SAGAS),
        env=_env(SAGAFLOW_DATABASE_URL=pg_url, SAGAFLOW_AMQP_URL=amqp_url),
    )
    assert "coordinator started" not in run.stderr
    assert_refused(run, "schema sagaflow is not migrated", "sagaflow db migrate")


async def test_a_half_migrated_coordinator_schema(migrated: str, amqp_url: str) -> None:
    conn = await asyncpg.connect(migrated)
    try:
        await conn.execute(
            "DELETE FROM sagaflow.schema_migrations WHERE version = '0002_commit_guard'"
        )
    finally:
        await conn.close()
    run = await _run(
        *sagaflow("coordinator", SAGAS),
        env=_env(SAGAFLOW_DATABASE_URL=migrated, SAGAFLOW_AMQP_URL=amqp_url),
    )
    assert_refused(run, "schema sagaflow", "0002_commit_guard", "sagaflow db migrate")


async def test_a_participant_schema_the_role_cannot_create(
    no_create_role: str, amqp_url: str
) -> None:
    run = await _run(
        *sagaflow("worker", WORKER),
        env=_env(SAGAFLOW_DATABASE_URL=no_create_role, SAGAFLOW_AMQP_URL=amqp_url),
    )
    assert_refused(run, "schema gate", "permission denied")


async def test_a_refused_database_is_retried_for_the_connect_timeout(amqp_url: str) -> None:
    url = _with_port(PG_ADMIN_DSN, _closed_port())
    run = await _run(
        *sagaflow("coordinator", SAGAS),
        env=_env(
            SAGAFLOW_DATABASE_URL=url, SAGAFLOW_AMQP_URL=amqp_url, SAGAFLOW_CONNECT_TIMEOUT="2"
        ),
    )
    assert run.code == 2, run.stderr
    assert 2 <= run.seconds < FAST, run.stderr
    assert "retrying" in run.stderr  # the attempts are logged
    last = run.lines[-1]
    assert last.startswith("error: "), run.stderr
    assert "PostgreSQL" in last and "2s" in last and "SAGAFLOW_CONNECT_TIMEOUT" in last, last
    assert "Traceback" not in run.stderr


# --------------------------------------------------------------------------- the broker


@pytest.mark.parametrize("command", ["coordinator", "worker"])
async def test_a_wrong_amqp_password(command: str, migrated: str, amqp_url: str) -> None:
    url = _with_userinfo(amqp_url, "guest", SECRET)
    args = (
        sagaflow("coordinator", SAGAS) if command == "coordinator" else sagaflow("worker", WORKER)
    )
    run = await _run(*args, env=_env(SAGAFLOW_DATABASE_URL=migrated, SAGAFLOW_AMQP_URL=url))
    line = assert_refused(run, "RabbitMQ", "refused the login", "check the user and password")
    assert "guest:******@" in line


async def test_an_unknown_vhost(migrated: str) -> None:
    url = f"{AMQP_BASE}/no-such-vhost-{uuid.uuid4().hex[:6]}"
    run = await _run(
        *sagaflow("coordinator", SAGAS),
        env=_env(SAGAFLOW_DATABASE_URL=migrated, SAGAFLOW_AMQP_URL=url),
    )
    line = assert_refused(run, "vhost 'no-such-vhost-")
    assert "Connection.Close" not in line


async def test_a_refused_broker_is_retried_for_the_connect_timeout(migrated: str) -> None:
    url = _with_port(AMQP_BASE, _closed_port()) + "/"
    run = await _run(
        *sagaflow("coordinator", SAGAS),
        env=_env(
            SAGAFLOW_DATABASE_URL=migrated, SAGAFLOW_AMQP_URL=url, SAGAFLOW_CONNECT_TIMEOUT="2"
        ),
    )
    assert run.code == 2, run.stderr
    assert 2 <= run.seconds < FAST, run.stderr
    assert "retrying" in run.stderr
    last = run.lines[-1]
    assert last.startswith("error: "), run.stderr
    assert "RabbitMQ" in last and "2s" in last and "SAGAFLOW_CONNECT_TIMEOUT" in last, last
    assert "Traceback" not in run.stderr


# --------------------------------------------------------------------------- settings


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("SAGAFLOW_WORKER_PREFETCH", "70000", "SAGAFLOW_WORKER_PREFETCH"),
        ("SAGAFLOW_COORDINATOR_PREFETCH", "70000", "SAGAFLOW_COORDINATOR_PREFETCH"),
        ("SAGAFLOW_CONNECT_TIMEOUT", "0", "SAGAFLOW_CONNECT_TIMEOUT"),
        ("SAGAFLOW_AMQP_URL", f"amqp://guest:{SECRET}@127.0.0.1:56x72/", "SAGAFLOW_AMQP_URL"),
        ("SAGAFLOW_AMQP_URL", "http://127.0.0.1:5672/", "SAGAFLOW_AMQP_URL"),
        (
            "SAGAFLOW_DATABASE_URL",
            f"postgresql://postgres:{SECRET}@127.0.0.1:99999/x",
            "SAGAFLOW_DATABASE_URL",
        ),
    ],
)
@pytest.mark.parametrize("command", ["coordinator", "worker"])
async def test_an_invalid_setting(
    command: str, variable: str, value: str, expected: str, migrated: str, amqp_url: str
) -> None:
    settings = {"SAGAFLOW_DATABASE_URL": migrated, "SAGAFLOW_AMQP_URL": amqp_url, variable: value}
    args = (
        sagaflow("coordinator", SAGAS) if command == "coordinator" else sagaflow("worker", WORKER)
    )
    run = await _run(*args, env=_env(**settings))
    assert_refused(run, "invalid settings", expected, within=FAST)


# --------------------------------------------------------------------------- the order service


@pytest.mark.parametrize("broker", ["up", "refusing connections"])
async def test_the_order_service_exits_when_its_api_cannot_bind(
    broker: str, migrated: str, amqp_url: str, taken_port: int
) -> None:
    if broker != "up":  # its worker is still connecting when the API gives up
        amqp_url = _with_port(AMQP_BASE, _closed_port()) + "/"
    run = await _run(
        "-m",
        "services.order",
        env=_env(
            SAGAFLOW_DATABASE_URL=migrated,
            SAGAFLOW_AMQP_URL=amqp_url,
            ORDER_HTTP_PORT=str(taken_port),
        ),
    )
    assert run.code == 1, run.stderr
    assert run.seconds < FAST, run.stderr
    assert "address already in use" in run.stderr
