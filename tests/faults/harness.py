"""What the fault scenarios share: the summary line, settling, and restarting servers.

Every scenario records one summary line (scenario, sagas, faults injected,
invariants checked, result); ``conftest.py`` prints them at the end of the
session, whatever pytest captured.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg

from sagaflow import SagaState
from services.stack import ROOT, Stack, StackError
from tests.faults.invariants import Verdict
from tests.faults.workload import workload_size

SUMMARIES: list[str] = []
"""The summary lines of this session, printed by ``pytest_terminal_summary``."""


@dataclass
class Scenario:
    """One scenario's account: what it injected and what it found."""

    name: str
    sagas: int = 0
    faults: list[str] = field(default_factory=list)
    hit: list[int] = field(default_factory=list)  # sagas in flight at each fault
    verdict: Verdict | None = None
    notes: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)

    def fault(self, what: str) -> None:
        self.faults.append(what)

    async def strike(self, stack: Stack, what: str) -> None:
        """Record a fault about to be injected, with the sagas in flight at that moment."""
        self.hit.append(await in_flight(stack))
        self.fault(what)

    def line(self, result: str) -> str:
        counts: dict[str, int] = {}
        for fault in self.faults:
            counts[fault] = counts.get(fault, 0) + 1
        faults = ", ".join(f"{n}x {what}" for what, n in counts.items()) or "none"
        checked = self.verdict.describe() if self.verdict else f"{self.sagas} sagas, not checked"
        notes = list(self.notes)
        if self.hit:
            notes.insert(0, f"{min(self.hit)}-{max(self.hit)} sagas in flight at each fault")
        notes_text = f" | {'; '.join(notes)}" if notes else ""
        seconds = time.monotonic() - self.started
        return (
            f"[faults] {self.name}: {result} | sagas={self.sagas} | faults: {faults}"
            f" | invariants: {checked} | {seconds:.0f}s{notes_text}"
        )


@contextlib.asynccontextmanager
async def scenario(name: str) -> AsyncIterator[Scenario]:
    """Record the scenario's summary line, PASS or FAIL, when the block ends."""
    account = Scenario(name)
    try:
        yield account
    except BaseException as exc:
        SUMMARIES.append(account.line(f"FAIL ({type(exc).__name__})"))
        raise
    SUMMARIES.append(account.line("PASS"))


INJECTING = (sys.executable, "-m", "tests.faults.proc")
"""Runs a coordinator or worker with faults injected as its environment says (``proc.py``)."""


def injecting(*names: str) -> dict[str, Sequence[str]]:
    """``Stack(launchers=...)``: these processes run through :data:`INJECTING`."""
    return dict.fromkeys(names, INJECTING)


def saga_ids(order_ids: Iterable[str]) -> list[str]:
    """The saga of each order (the order service names it after the order)."""
    return [f"order-{order_id}" for order_id in order_ids]


async def settle(
    stack: Stack, order_ids: Sequence[str], *, timeout: float | None = None
) -> dict[str, SagaState]:
    """Wait until every order's saga is terminal and the outbox is empty.

    The default timeout is 3 minutes, more for long soaks.

    Raises:
        StackError: not settled in time (with the states and log tails).
    """
    timeout = timeout or max(180.0, 0.2 * workload_size())
    deadline = time.monotonic() + timeout
    states = await stack.wait_settled(saga_ids(order_ids), timeout=timeout)
    # a message published after commit has its outbox row deleted right after;
    # a failed delete leaves the row for the relay (a duplicate, then deleted)
    conn = await asyncpg.connect(stack.settings.database_url)
    try:
        while True:
            left = await conn.fetchval(f'SELECT count(*) FROM "{stack.settings.db_schema}".outbox')
            if left == 0:
                return states
            if time.monotonic() > deadline:
                raise StackError(f"{left} outbox rows never published\n{stack.tails()}")
            await asyncio.sleep(0.5)
    finally:
        await conn.close()


async def at_random_moments(
    count: int,
    within: float,
    action: Callable[[int], object],
    *,
    rng: random.Random,
    min_gap: float = 1.0,
) -> None:
    """Run ``action(n)`` (awaited if it returns an awaitable) ``count`` times at random
    moments spread over ``within`` seconds, at least ``min_gap`` apart."""
    slots = sorted(rng.uniform(0, within) for _ in range(count))
    start = time.monotonic()
    last = -min_gap
    for n, at in enumerate(slots):
        at = max(at, last + min_gap)
        await asyncio.sleep(max(0.0, start + at - time.monotonic()))
        result = action(n)
        if asyncio.iscoroutine(result):
            await result
        last = time.monotonic() - start


# --------------------------------------------------------------------------- servers


def _run(*argv: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, check=False)


def postgres_cluster() -> tuple[str, str]:
    """The local PostgreSQL cluster's version and name (``ls /etc/postgresql``)."""
    versions = sorted(
        (p.name for p in Path("/etc/postgresql").iterdir() if p.name[:1].isdigit()),
        key=lambda name: float(name),
    )
    if not versions:
        raise RuntimeError("no PostgreSQL cluster under /etc/postgresql")
    return versions[-1], "main"


async def restart_postgres() -> float:
    """``pg_ctlcluster restart`` (every connection is killed); returns the seconds it took."""
    version, cluster = postgres_cluster()
    started = time.monotonic()
    done = await asyncio.to_thread(
        _run, "pg_ctlcluster", "--skip-systemctl-redirect", version, cluster, "restart"
    )
    if done.returncode != 0:
        raise RuntimeError(f"pg_ctlcluster restart failed: {done.stderr or done.stdout}")
    return time.monotonic() - started


def ensure_postgres_up() -> None:
    """Start the cluster if it is down (a finally after a failed restart)."""
    version, cluster = postgres_cluster()
    status = _run("pg_ctlcluster", version, cluster, "status")
    if status.returncode != 0:
        _run("pg_ctlcluster", "--skip-systemctl-redirect", version, cluster, "start")


async def stop_rabbitmq_app() -> None:
    done = await asyncio.to_thread(_run, "rabbitmqctl", "-q", "stop_app")
    if done.returncode != 0:
        raise RuntimeError(f"rabbitmqctl stop_app failed: {done.stderr or done.stdout}")


async def start_rabbitmq_app() -> None:
    done = await asyncio.to_thread(_run, "rabbitmqctl", "-q", "start_app")
    if done.returncode != 0:
        raise RuntimeError(f"rabbitmqctl start_app failed: {done.stderr or done.stdout}")


def ensure_rabbitmq_up() -> None:
    """``rabbitmqctl start_app`` (a no-op when it runs): a finally after a stop."""
    _run("rabbitmqctl", "-q", "start_app")
    _run("rabbitmqctl", "-q", "await_startup")


async def kill_and_restart(
    stack: Stack, name: str, *, down: float = 0.0, sig: int = signal.SIGKILL
) -> int:
    """Kill a process, leave it down ``down`` seconds, start it again (not waiting
    until ready: other processes may be down at the same moment); returns its exit code."""
    code = await stack.kill(name, sig)
    await asyncio.sleep(down)
    await stack.restart(name, wait=False)
    return code


def log_count(stack: Stack, name: str, needle: str) -> int:
    """How many lines of a process's log contain ``needle``."""
    try:
        text = stack.log_path(name).read_text(errors="replace")
    except OSError:
        return 0
    return sum(1 for line in text.splitlines() if needle in line)


async def sagaflow_cli(stack: Stack, *args: str, timeout: float = 60.0) -> tuple[int, str, str]:
    """Run ``python -m sagaflow ARGS`` with the stack's settings; (exit code, stdout, stderr)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "sagaflow",
        *args,
        cwd=ROOT,
        env={**stack.env, "SAGAFLOW_LOG_FORMAT": "console"},
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def in_flight(stack: Stack) -> int:
    """Sagas not yet terminal right now: what a fault injected now hits."""
    conn = await asyncpg.connect(stack.settings.database_url)
    try:
        count: int = await conn.fetchval(
            f'SELECT count(*) FROM "{stack.settings.db_schema}".sagas'
            " WHERE status IN ('RUNNING', 'COMPENSATING')"
        )
        return count
    finally:
        await conn.close()
