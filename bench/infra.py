"""A fresh PostgreSQL database and RabbitMQ vhost per benchmark run.

Each run gets its own database and vhost, created before the processes start
and dropped when the run ends (also when it fails), so runs never see each
other's rows or queues and a crashed run leaves nothing behind but a name.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import uuid
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import asyncpg

PG_ADMIN_DSN = os.environ.get("SAGAFLOW_BENCH_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
AMQP_BASE = os.environ.get("SAGAFLOW_BENCH_AMQP", "amqp://guest:guest@127.0.0.1:5672")
AMQP_USER = os.environ.get("SAGAFLOW_BENCH_AMQP_USER", "guest")


class InfraError(RuntimeError):
    """The database or the vhost could not be created."""


@dataclass(frozen=True)
class Infra:
    """The database and vhost of one run, and how to reach them."""

    database: str
    vhost: str
    cluster: Any = None  # scripts.local_cluster.RabbitCluster: the vhost is on it

    @property
    def dsn(self) -> str:
        return f"{PG_ADMIN_DSN.rsplit('/', 1)[0]}/{self.database}"

    @property
    def amqp_url(self) -> str:
        if self.cluster is not None:  # one URL naming every node
            return str(self.cluster.amqp_url(quote(self.vhost, safe="")))
        return f"{AMQP_BASE}/{quote(self.vhost, safe='')}"


async def _rabbitmqctl(*args: str) -> None:
    proc = await asyncio.create_subprocess_exec(
        "rabbitmqctl",
        "-q",
        *args,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(60):
            out, err = await proc.communicate()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise InfraError(f"rabbitmqctl {' '.join(args)} timed out") from None
    if proc.returncode != 0:
        raise InfraError(f"rabbitmqctl {' '.join(args)} failed: {(err or out).decode().strip()}")


async def create(label: str, *, cluster: Any = None) -> Infra:
    """Create a database and a vhost named after ``label`` and a random suffix
    (the vhost on ``cluster``, a local RabbitMQ cluster, when given)."""
    suffix = uuid.uuid4().hex[:8]
    infra = Infra(database=f"bench_{label}_{suffix}", vhost=f"bench-{label}-{suffix}")
    if cluster is not None:
        infra = Infra(infra.database, infra.vhost, cluster=cluster)
    try:
        conn = await asyncpg.connect(PG_ADMIN_DSN)
    except (OSError, asyncpg.PostgresError) as exc:
        raise InfraError(f"cannot reach PostgreSQL at {PG_ADMIN_DSN}: {exc!r}") from exc
    try:
        await conn.execute(f'CREATE DATABASE "{infra.database}"')
    finally:
        await conn.close()
    try:
        if cluster is not None:
            await asyncio.to_thread(cluster.add_vhost, infra.vhost)
        else:
            await _rabbitmqctl("add_vhost", infra.vhost)
            await _rabbitmqctl("set_permissions", "-p", infra.vhost, AMQP_USER, ".*", ".*", ".*")
    except BaseException:
        await drop(infra)
        raise
    return infra


async def drop(infra: Infra) -> None:
    """Drop the database (closing any session still in it) and delete the vhost."""
    try:
        conn = await asyncpg.connect(PG_ADMIN_DSN)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{infra.database}" WITH (FORCE)')
        finally:
            await conn.close()
    finally:
        if infra.cluster is not None:
            with contextlib.suppress(Exception):
                node = infra.cluster.up()[0]
                await asyncio.to_thread(node.ctl, "delete_vhost", infra.vhost, check=False)
        else:
            with contextlib.suppress(InfraError):  # never created, or already gone
                await _rabbitmqctl("delete_vhost", infra.vhost)


# Settings that change what a run measures; recorded with every run.
SETTINGS = (
    "server_version",
    "fsync",
    "synchronous_commit",
    "full_page_writes",
    "autovacuum",
    "shared_buffers",
    "max_wal_size",
)


async def server_settings(database: str) -> dict[str, str]:
    """The PostgreSQL settings of :data:`SETTINGS` as the server reports them.

    ``autovacuum`` matters for long runs: the machines this project runs on
    start PostgreSQL with it off, and unvacuumed churning tables slow every
    commit as a soak goes on (docs/operations.md).
    """
    conn = await asyncpg.connect(f"{PG_ADMIN_DSN.rsplit('/', 1)[0]}/{database}")
    try:
        rows = await conn.fetch(
            "SELECT name, current_setting(name) AS value FROM pg_settings"
            " WHERE name = ANY($1::text[])",
            list(SETTINGS),
        )
    finally:
        await conn.close()
    values = {row["name"]: row["value"] for row in rows}
    return {name: values[name] for name in SETTINGS if name in values}


async def xact_counts(database: str) -> tuple[int, int]:
    """Committed and rolled-back transactions of ``database`` so far (pg_stat_database).

    Read from the admin database, so the reading itself is not counted. Backends
    flush their counters on exit and at most once a second while busy; callers
    read the final value after the benchmark's processes have exited.
    """
    conn = await asyncpg.connect(PG_ADMIN_DSN)
    try:
        await conn.execute("SELECT pg_stat_clear_snapshot()")
        row = await conn.fetchrow(
            "SELECT xact_commit, xact_rollback FROM pg_stat_database WHERE datname = $1",
            database,
        )
    finally:
        await conn.close()
    if row is None:
        return 0, 0
    return int(row["xact_commit"]), int(row["xact_rollback"])
