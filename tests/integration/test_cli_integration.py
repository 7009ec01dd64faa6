"""The ``sagaflow`` command as real subprocesses against real PostgreSQL and RabbitMQ."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
SAGAS = "tests.sample:saga"


@dataclass(frozen=True)
class Run:
    code: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        return orjson.loads(self.stdout)


def _env(**settings: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("SAGAFLOW_")}
    env["SAGAFLOW_LOG_FORMAT"] = "json"
    env.update(settings)
    return env


async def sagaflow(*args: str, env: Mapping[str, str], timeout: float = 60) -> Run:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "sagaflow",
        *args,
        cwd=ROOT,
        env=dict(env),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), timeout)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    assert process.returncode is not None
    return Run(process.returncode, out.decode(), err.decode())


async def test_db_migrate_is_idempotent(pg_url: str) -> None:
    env = _env(SAGAFLOW_DATABASE_URL=pg_url)
    first = await sagaflow("db", "migrate", env=env)
    assert first.code == 0, first.stderr
    assert "applied 0001_saga_tables" in first.stdout
    again = await sagaflow("db", "migrate", "--json", env=env)
    assert again.code == 0, again.stderr
    assert again.json() == {"schema": "sagaflow", "applied": []}


async def test_the_autovacuum_advice_comes_from_db_migrate_not_from_reads(pg_url: str) -> None:
    env = _env(SAGAFLOW_DATABASE_URL=pg_url)
    assert (await sagaflow("db", "migrate", env=env)).code == 0
    conn = await asyncpg.connect(pg_url)
    try:  # whatever the server's setting, this table will not be vacuumed
        await conn.execute("ALTER TABLE sagaflow.outbox SET (autovacuum_enabled = off)")
    finally:
        await conn.close()
    again = await sagaflow("db", "migrate", env=env)
    assert again.code == 0, again.stderr
    assert again.stderr.count("will not vacuum the saga tables") == 1
    assert "table outbox" in again.stderr
    for read in (("sagas", "list"), ("sagas", "list", "--json")):
        run = await sagaflow(*read, env=env)
        assert run.code == 0, run.stderr
        assert "vacuum" not in run.stderr


async def test_db_migrate_three_at_once(pg_url: str) -> None:
    env = _env(SAGAFLOW_DATABASE_URL=pg_url, SAGAFLOW_SCHEMA="racing")
    runs = await asyncio.gather(*(sagaflow("db", "migrate", "--json", env=env) for _ in range(3)))
    assert [run.code for run in runs] == [0, 0, 0], [run.stderr for run in runs]
    applied = [version for run in runs for version in run.json()["applied"]]
    assert sorted(applied) == sorted(set(applied))  # each version applied exactly once
    assert "0001_saga_tables" in applied


async def test_start_list_show_cancel(pg_url: str) -> None:
    env = _env(SAGAFLOW_DATABASE_URL=pg_url, SAGAFLOW_SAGAS=SAGAS)
    assert (await sagaflow("db", "migrate", env=env)).code == 0

    started = await sagaflow("start", "sample", "--data", '{"order_id": "o-1"}', "--json", env=env)
    assert started.code == 0, started.stderr
    saga_id = started.json()["saga_id"]

    listed = await sagaflow("sagas", "list", "--json", env=env)
    assert listed.code == 0, listed.stderr
    rows = listed.json()
    assert isinstance(rows, list)
    assert [(r["saga_id"], r["saga_name"], r["status"]) for r in rows] == [
        (saga_id, "sample", "RUNNING")
    ]

    shown = await sagaflow("sagas", "show", saga_id, "--json", env=env)
    assert shown.code == 0, shown.stderr
    doc = shown.json()
    assert isinstance(doc, dict)
    assert doc["status"] == "RUNNING"
    assert doc["data"]["order_id"] == "o-1"
    (step,) = doc["steps"]
    assert (step["step"], step["kind"], step["type"], step["outcome"]) == (
        "reserve",
        "command",
        "inventory.reserve",
        "pending",
    )
    assert [e["event"] for e in doc["log"]] == ["saga_started", "command_sent"]

    human = await sagaflow("sagas", "show", saga_id, env=env)
    assert human.code == 0, human.stderr
    assert saga_id in human.stdout and "reserve" in human.stdout

    cancelled = await sagaflow(
        "sagas", "cancel", saga_id, "--reason", "test", "--by", "pytest", "--json", env=env
    )
    assert cancelled.code == 0, cancelled.stderr
    assert cancelled.json()["status"] == "COMPENSATING"

    missing = await sagaflow("sagas", "show", "no-such-saga", env=env)
    assert missing.code == 1
    assert missing.stderr.strip().splitlines()[-1] == "error: no saga with id 'no-such-saga'"


async def test_coordinator_starts_and_stops_on_sigterm(pg_url: str, amqp_url: str) -> None:
    env = _env(SAGAFLOW_DATABASE_URL=pg_url, SAGAFLOW_AMQP_URL=amqp_url)
    assert (await sagaflow("db", "migrate", env=env)).code == 0
    conn = await asyncpg.connect(pg_url)
    try:  # the coordinator, the tables' writer, gives the advice at start
        await conn.execute("ALTER TABLE sagaflow.sagas SET (autovacuum_enabled = off)")
    finally:
        await conn.close()
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "sagaflow",
        "coordinator",
        SAGAS,
        cwd=ROOT,
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    assert process.stderr is not None
    lines: list[dict[str, object]] = []
    try:
        async with asyncio.timeout(30):
            while True:
                raw = await process.stderr.readline()
                assert raw, f"coordinator exited early: {lines}"
                lines.append(orjson.loads(raw))
                if lines[-1]["message"] == "coordinator started":
                    break
        ready = lines[-1]
        assert ready["sagas"] == ["sample@1"]
        advice = [line for line in lines if "will not vacuum" in str(line["message"])]
        assert len(advice) == 1 and "table sagas" in str(advice[0]["message"])
        assert "guest:guest" not in str(ready["amqp_url"])  # the password is masked

        process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(10):
            rest = await process.stderr.read()
            code = await process.wait()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert code == 0, rest.decode()
    messages = [orjson.loads(line)["message"] for line in rest.decode().splitlines()]
    assert "coordinator stopping" in messages
    assert "coordinator exited" in messages


async def test_dlq_list_on_an_empty_vhost(amqp_url: str) -> None:
    env = _env(SAGAFLOW_AMQP_URL=amqp_url)
    as_json = await sagaflow("dlq", "list", "--json", env=env)
    assert as_json.code == 0, as_json.stderr
    assert as_json.json() == []
    human = await sagaflow("dlq", "list", env=env)
    assert human.code == 0, human.stderr
    assert human.stdout == ""


async def test_unreachable_database_is_one_line_and_exit_1() -> None:
    env = _env(SAGAFLOW_DATABASE_URL="postgresql://nobody:topsecret@127.0.0.1:1/none")
    run = await sagaflow("sagas", "list", env=env)
    assert run.code == 1
    assert run.stderr.startswith("error: ")
    assert "Traceback" not in run.stderr
    assert "topsecret" not in run.stderr
