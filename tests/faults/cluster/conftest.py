"""What the cluster scenarios share: the local cluster as fixtures, a stack on
it, and the completion rate before, during and after a fault.

The RabbitMQ cluster (three nodes, ``scripts/local_cluster.py``) is started
once per session and removed after; each scenario gets a vhost of its own on
it. The PostgreSQL primary and standby are made per scenario: the failover
scenario leaves its old primary dead.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import pytest

from sagaflow.transport import RabbitMQTransport
from scripts.local_cluster import PostgresPair, RabbitCluster
from services.stack import Stack
from tests.faults.conftest import SERVICES, SIGNING_KEYS

GROUP_SIZE = 3
"""Each quorum queue has a replica on every node (SAGAFLOW_QUORUM_INITIAL_GROUP_SIZE)."""


@pytest.fixture(scope="session")
def rabbit_cluster() -> Iterator[RabbitCluster]:
    """Three RabbitMQ nodes joined into one cluster, for the whole session."""
    with RabbitCluster.started() as cluster:
        yield cluster


@pytest.fixture
def cluster_vhost(rabbit_cluster: RabbitCluster) -> Iterator[str]:
    """A fresh vhost on the cluster; deleted after the test."""
    vhost = f"cluster-{uuid.uuid4().hex[:8]}"
    rabbit_cluster.add_vhost(vhost)
    try:
        yield vhost
    finally:
        with contextlib.suppress(Exception):
            rabbit_cluster.up()[0].ctl("delete_vhost", vhost, check=False)


@pytest.fixture(scope="session")
def cluster_postgres() -> Iterator[PostgresPair]:
    """A PostgreSQL server of our own for the RabbitMQ scenarios: the machine's
    is shared by every test run on it, and its 100 connections run out."""
    with PostgresPair.started(standby=False) as server:
        yield server


@pytest.fixture
def cluster_pg_url(cluster_postgres: PostgresPair) -> str:
    """A fresh database on that server (dropped with it)."""
    name = f"cluster_{uuid.uuid4().hex[:8]}"
    cluster_postgres.create_database(name)
    return cluster_postgres.database_url(name)


@pytest.fixture
def postgres_pair() -> Iterator[PostgresPair]:
    """A throwaway primary with a synchronous streaming standby."""
    with PostgresPair.started(synchronous=True) as pair:
        yield pair


@contextlib.asynccontextmanager
async def cluster_stack(
    amqp_url: str, database_url: str, *, declare_via: str | None = None, **options: Any
) -> AsyncIterator[Stack]:
    """The example system on the cluster: every process gets the URL naming all
    nodes. ``declare_via``, a single node's URL: the topology is declared there
    first, so that node holds every queue's leader (RabbitMQ places a new
    quorum queue's leader on the node its declaring client is connected to)."""
    env = {
        "SAGAFLOW_SIGNING_KEYS": SIGNING_KEYS,
        "SAGAFLOW_QUORUM_INITIAL_GROUP_SIZE": str(GROUP_SIZE),
        **options.pop("env_extra", {}),
    }
    stack = Stack(amqp_url, database_url, env_extra=env, **options)
    if declare_via is not None:
        admin = RabbitMQTransport(
            declare_via,
            stack.settings.topology(),
            connection_name="cluster-admin",
            quorum_initial_group_size=GROUP_SIZE,
        )
        await admin.start(list(SERVICES))
        await admin.close()
    try:
        await stack.start()
        yield stack
    finally:
        await stack.terminate_all()


TERMINAL = "('COMPLETED', 'COMPENSATED', 'FAILED', 'CANCELLED')"


@dataclass
class Rates:
    """Finished sagas over time, sampled from the coordinator's table.

    A sample that cannot be taken (the database is failing over) is skipped.
    """

    database_url: str
    schema: str = "sagaflow"
    interval: float = 0.5
    samples: list[tuple[float, int]] = field(default_factory=list)
    began: float = field(default_factory=time.monotonic)
    _task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        conn: asyncpg.Connection | None = None
        sql = f'SELECT count(*) FROM "{self.schema}".sagas WHERE status IN {TERMINAL}'
        while True:
            try:
                if conn is None or conn.is_closed():
                    conn = await asyncpg.connect(self.database_url, timeout=2)
                count = await conn.fetchval(sql, timeout=2)
                self.samples.append((time.monotonic(), int(count)))
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError):
                if conn is not None:
                    conn.terminate()
                conn = None
            await asyncio.sleep(self.interval)

    def start(self) -> None:
        self.began = time.monotonic()
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def _count_at(self, moment: float) -> tuple[float, int] | None:
        before = [s for s in self.samples if s[0] <= moment]
        return before[-1] if before else None

    def rate(self, start: float, end: float) -> float:
        """Sagas finished per second between two moments (by the nearest samples)."""
        inside = [s for s in self.samples if start <= s[0] <= end]
        first = self._count_at(start) or (inside[0] if inside else None)
        last = inside[-1] if inside else None
        if first is None or last is None or last[0] <= first[0]:
            return 0.0
        return (last[1] - first[1]) / (last[0] - first[0])

    def longest_pause(self, start: float, end: float) -> tuple[float, float]:
        """The longest time no saga finished that began in [start, end]: its
        length and when it began, in seconds from ``start``."""
        # the moment of each increase; a pause runs from one increase to the next
        inside = [s for s in self.samples if s[0] >= start]
        best, at = 0.0, 0.0
        last_change = start
        previous = self._count_at(start)
        count = previous[1] if previous else (inside[0][1] if inside else 0)
        for moment, value in inside:
            if value != count:
                if last_change <= end and moment - last_change > best:
                    best, at = moment - last_change, last_change - start
                last_change, count = moment, value
        return best, at

    def finished_at(self, total: int) -> float | None:
        return next((t for t, c in self.samples if c >= total), None)

    def report(self, fault_start: float, fault_end: float, total: int) -> str:
        """``sagas/s before X, during Y, after Z; no saga finished for P s ...``.

        "After" covers at most 15 s, and only while sagas were left to finish.
        """
        before = self.rate(max(self.began, fault_start - 10.0), fault_start)
        during = self.rate(fault_start, fault_end)
        done = self.finished_at(total) or (self.samples[-1][0] if self.samples else fault_end)
        if done > fault_end + 1.0:
            after = f"{self.rate(fault_end, min(done, fault_end + 15.0)):.0f}"
        else:
            after = "- (every saga had finished)"
        pause, at = self.longest_pause(fault_start, fault_end + 5.0)
        return (
            f"sagas/s before {before:.0f}, during {during:.0f} ({fault_end - fault_start:.0f}s),"
            f" after {after}; no saga finished for {pause:.1f}s"
            f" from +{at:.1f}s after the fault"
        )
