"""Run the example system as real OS processes: the real demo, e2e, fault tests, benchmark.

``Stack`` migrates the coordinator's tables (``sagaflow db migrate``), then starts
one process each::

    coordinator   python -m sagaflow coordinator services.order.saga:SAGAS
    inventory     python -m sagaflow worker services.inventory.app:participant
    payment       python -m sagaflow worker services.payment.app:participant
    shipping      python -m sagaflow worker services.shipping.app:participant
    order         python -m services.order        (HTTP API + order participant)

and waits until they are ready: every service queue and the replies queue have
as many consumers as live processes serving them, and the order API answers
``/health``. Each process gets ``SAGAFLOW_*`` settings in its environment and
writes stdout and stderr to ``<log_dir>/<name>.log``; on a failure the tails of
those logs are part of the error.

Example::

    async with Stack(amqp_url, database_url) as stack:
        placed = await stack.place_order(customer_id="cust-1", sku="sku-widget",
                                         quantity=1, amount=1000, destination="US")
        states = await stack.wait_settled([placed["saga_id"]], timeout=30)
        await stack.kill("payment")       # SIGKILL by default
        await stack.restart("payment")
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import aio_pika
import httpx

from sagaflow import SagaState
from sagaflow.config import Settings
from sagaflow.store import PostgresSagaStore

__all__ = ["ROOT", "Stack", "StackError", "free_port"]

ROOT = Path(__file__).resolve().parent.parent
"""The repository root: the processes' working directory, so ``services`` imports."""

PARTICIPANTS = ("inventory", "payment", "shipping")

NODE_TWINS = {"inventory": ROOT / "services" / "inventory_node" / "index.js"}
"""Services that also exist as a Node.js participant (docs/participants-in-other-languages.md)."""
NODE_ENV = "SAGAFLOW_STACK_NODE"
"""The setting that picks them: service names, comma-separated (``inventory``)."""


class StackError(RuntimeError):
    """A process did not start, died, or the system did not settle in time."""


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _die_with_parent() -> None:  # pragma: no cover - runs in the child
    # Linux: a child gets SIGTERM when the test runner dies, so no orphan keeps consuming
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@dataclass
class _Process:
    name: str
    argv: list[str]
    queue: str | None  # the queue it consumes, to tell when it is ready
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)  # on top of the stack's environment
    # who it is (its broker user, say): under ``env``, and kept by restart(env=...)
    identity: dict[str, str] = field(default_factory=dict)
    process: asyncio.subprocess.Process | None = None

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.returncode is None


class Stack:
    """The example system as real processes (see the module docstring).

    Args:
        amqp_url: RabbitMQ URL with its vhost.
        database_url: PostgreSQL URL; the coordinator's schema and one schema
            per service (``order``, ``inventory``, ``payment``, ``shipping``)
            are created there.
        schema: The coordinator's schema (``SAGAFLOW_SCHEMA``).
        prefix: The broker namespace (``SAGAFLOW_PREFIX``).
        http_port: The order API's port; a free one by default.
        env_extra: More environment variables for every process.
        process_env: More environment variables for some processes, by process
            name (``{"payment": {"SAGAFLOW_WORKER_CONCURRENCY": "2"}}``);
            :meth:`restart` can replace them.
        launchers: The command that runs some coordinator or worker processes
            instead of ``python -m sagaflow``, by process name; the arguments
            stay (``coordinator SPECS...``, ``worker MODULE:ATTR``). A program
            of one's own that builds them with :func:`sagaflow.cli.run.run_worker`
            and :func:`~sagaflow.cli.run.run_coordinator`, say.
        log_dir: Where ``<name>.log`` files go; a new temporary directory by default.
        sagas: ``module:attr`` specs the coordinators run (by default both
            versions of create-order).
        coordinators: How many coordinator processes (``coordinator``,
            ``coordinator-2``, ...).
        participants: The services whose workers start with ``sagaflow worker``.
        worker_replicas: Worker processes per participant service (``payment``,
            ``payment-2``, ...).
        node: Services run by their Node.js twin (``node services/<service>_node/index.js``)
            instead of the Python worker; by default the ``SAGAFLOW_STACK_NODE``
            environment variable (service names, comma-separated). Their inbox
            is migrated with ``sagaflow db migrate --participant`` first.
        order_service: Also start ``python -m services.order`` (named ``order``).
        ready_timeout: Seconds each start may take.
    """

    def __init__(
        self,
        amqp_url: str,
        database_url: str,
        *,
        schema: str = "sagaflow",
        prefix: str = "sagaflow",
        http_port: int | None = None,
        env_extra: Mapping[str, str] | None = None,
        process_env: Mapping[str, Mapping[str, str]] | None = None,
        launchers: Mapping[str, Sequence[str]] | None = None,
        log_dir: str | Path | None = None,
        sagas: Sequence[str] = ("services.order.saga:SAGAS",),
        coordinators: int = 1,
        participants: Sequence[str] = PARTICIPANTS,
        worker_replicas: int = 1,
        order_service: bool = True,
        ready_timeout: float = 60.0,
        node: Sequence[str] | None = None,
    ) -> None:
        self.settings = Settings(
            amqp_url=amqp_url, database_url=database_url, db_schema=schema, prefix=prefix
        )
        self.http_port = http_port or free_port()
        self.base_url = f"http://127.0.0.1:{self.http_port}"
        self.log_dir = Path(log_dir or tempfile.mkdtemp(prefix="sagaflow-stack-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.ready_timeout = ready_timeout
        self.env = {
            **os.environ,
            "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
            "SAGAFLOW_AMQP_URL": amqp_url,
            "SAGAFLOW_DATABASE_URL": database_url,
            "SAGAFLOW_SCHEMA": schema,
            "SAGAFLOW_PREFIX": prefix,
            "SAGAFLOW_LOG_FORMAT": "console",
            "ORDER_HTTP_HOST": "127.0.0.1",
            "ORDER_HTTP_PORT": str(self.http_port),
            **(env_extra or {}),
        }
        topology = self.settings.topology()
        cli = [sys.executable, "-m", "sagaflow"]
        self.processes: dict[str, _Process] = {}
        for n in range(1, coordinators + 1):
            name = "coordinator" if n == 1 else f"coordinator-{n}"
            self._add(name, [*cli, "coordinator", *sagas], topology.replies_queue)
        if node is None:
            node = [s.strip() for s in os.environ.get(NODE_ENV, "").split(",") if s.strip()]
        unknown = sorted(set(node) - set(NODE_TWINS))
        if unknown:
            raise StackError(f"no Node.js twin of {unknown}; there is one of {sorted(NODE_TWINS)}")
        self.node = tuple(s for s in participants if s in node)
        for service in participants:
            spec = f"services.{service}.app:participant"
            argv = [*cli, "worker", spec]
            if service in self.node:
                argv = ["node", str(NODE_TWINS[service])]
            for n in range(1, worker_replicas + 1):
                name = service if n == 1 else f"{service}-{n}"
                self._add(name, argv, topology.service_queue(service))
        if order_service:
            self._add(
                "order", [sys.executable, "-m", "services.order"], topology.service_queue("order")
            )
        for name, extra in (process_env or {}).items():
            self._get(name).env = dict(extra)
        for name, launcher in (launchers or {}).items():
            proc = self._get(name)
            if proc.argv[: len(cli)] != cli:
                raise StackError(f"{name!r} is not run by sagaflow: no launcher to replace")
            proc.argv = [*launcher, *proc.argv[len(cli) :]]
        self.store = PostgresSagaStore(database_url, schema=schema)
        self.http = httpx.AsyncClient(base_url=self.base_url, timeout=30.0)

    def _add(self, name: str, argv: list[str], queue: str | None) -> None:
        self.processes[name] = _Process(name, argv, queue, self.log_dir / f"{name}.log")

    # ------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> Stack:
        try:
            await self.start()
        except BaseException:
            await self.terminate_all()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.terminate_all()

    async def start(self) -> None:
        """Migrate, start every process and wait until all are ready.

        Raises:
            StackError: the migration failed, or a process died or was not ready
                in time (the message holds the log tails).
        """
        await self.migrate()
        await self.store.start()
        for proc in self.processes.values():
            await self._spawn(proc)
        await self.wait_ready()

    async def migrate(self) -> None:
        """``sagaflow db migrate`` (idempotent)."""
        log_path = self.log_dir / "migrate.log"
        with log_path.open("ab") as out:
            migrate = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "sagaflow", "db", "migrate",
                cwd=ROOT, env=self.env, stdout=out, stderr=asyncio.subprocess.STDOUT,
            )  # fmt: skip
            code = await asyncio.wait_for(migrate.wait(), self.ready_timeout)
            if code != 0:
                raise StackError(f"sagaflow db migrate exited {code}:\n{_tail(log_path)}")
            for service in self.node:  # a Python worker migrates its inbox itself
                migrate = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "sagaflow", "db", "migrate", "--participant", service,
                    cwd=ROOT, env=self.env, stdout=out, stderr=asyncio.subprocess.STDOUT,
                )  # fmt: skip
                code = await asyncio.wait_for(migrate.wait(), self.ready_timeout)
                if code != 0:
                    raise StackError(
                        f"migrating {service}'s inbox exited {code}:\n{_tail(log_path)}"
                    )

    async def _spawn(self, proc: _Process) -> None:
        with proc.log_path.open("ab") as out:
            out.write(f"\n=== {time.strftime('%H:%M:%S')} start: {' '.join(proc.argv)}\n".encode())
            out.flush()
            proc.process = await asyncio.create_subprocess_exec(
                *proc.argv,
                cwd=ROOT,
                env={**self.env, **proc.identity, **proc.env},
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out,
                stderr=asyncio.subprocess.STDOUT,
                preexec_fn=_die_with_parent if sys.platform == "linux" else None,
            )

    async def wait_ready(self, timeout: float | None = None) -> None:
        """Wait until every live process consumes its queue and the API answers.

        Raises:
            StackError: a process died, or not ready within ``timeout``.
        """
        deadline = time.monotonic() + (timeout or self.ready_timeout)
        connection: aio_pika.abc.AbstractConnection | None = None
        try:
            while True:
                dead = [p.name for p in self.processes.values() if p.process and not p.alive]
                if dead:
                    raise StackError(f"exited while starting: {dead}\n{self.tails(dead)}")
                try:  # the broker may be restarting (fault tests): keep asking until the deadline
                    connection = connection or await _connect_any(self.settings.amqp_urls())
                    waiting = await self._not_ready(connection)
                except (aio_pika.exceptions.AMQPError, OSError) as exc:
                    waiting = [f"broker ({exc!r})"]
                    if connection is not None:
                        await _quiet_close(connection)
                        connection = None
                if not waiting:
                    return
                if time.monotonic() > deadline:
                    raise StackError(f"not ready in time: {waiting}\n{self.tails(waiting)}")
                await asyncio.sleep(0.2)
        finally:
            if connection is not None:
                await _quiet_close(connection)

    async def _not_ready(self, connection: aio_pika.abc.AbstractConnection) -> list[str]:
        expected: dict[str, list[str]] = {}
        for proc in self.processes.values():
            if proc.alive and proc.queue is not None:
                expected.setdefault(proc.queue, []).append(proc.name)
        waiting: list[str] = []
        for queue, names in expected.items():
            if await _consumers(connection, queue) < len(names):
                waiting.extend(names)
        if "order" in self.processes and self.processes["order"].alive:
            try:
                (await self.http.get("/health", timeout=2.0)).raise_for_status()
            except httpx.HTTPError:
                waiting.append("order (http)")
        return waiting

    async def kill(self, name: str, sig: int = signal.SIGKILL, *, timeout: float = 30.0) -> int:
        """Send ``sig`` to a process and wait until it exits; returns its exit code."""
        proc = self._get(name)
        assert proc.process is not None
        if proc.alive:
            proc.process.send_signal(sig)
        try:
            return await asyncio.wait_for(proc.process.wait(), timeout)
        except TimeoutError:
            raise StackError(f"{name} did not exit on signal {sig}\n{self.tails([name])}") from None

    async def stop(self, name: str, *, timeout: float = 20.0) -> int:
        """SIGTERM, then SIGKILL after ``timeout``; returns the exit code."""
        try:
            return await self.kill(name, signal.SIGTERM, timeout=timeout)
        except StackError:
            return await self.kill(name, signal.SIGKILL)

    def set_identity(self, name: str, env: Mapping[str, str]) -> None:
        """Environment that says who process ``name`` is (its broker user, say):
        applied under its own extra environment, and kept across restarts."""
        self._get(name).identity = dict(env)

    async def restart(
        self, name: str, *, wait: bool = True, env: Mapping[str, str] | None = None
    ) -> None:
        """Stop the process if it runs, start it again and (by default) wait until ready.

        Args:
            name: The process.
            wait: Wait until every process is ready again.
            env: Replaces the process's own extra environment (see
                ``process_env``); its identity (see :meth:`set_identity`) stays.
        """
        proc = self._get(name)
        if proc.alive:
            await self.stop(name)
        if env is not None:
            proc.env = dict(env)
        await self._spawn(proc)
        if wait:
            await self.wait_ready()

    async def terminate_all(self, timeout: float = 20.0) -> None:
        """SIGTERM every process, wait up to ``timeout``, SIGKILL the rest; close clients."""
        live = [p for p in self.processes.values() if p.alive]
        for proc in live:
            assert proc.process is not None
            proc.process.send_signal(signal.SIGTERM)
        waits = [asyncio.wait_for(p.process.wait(), timeout) for p in live if p.process]
        for proc, outcome in zip(
            live, await asyncio.gather(*waits, return_exceptions=True), strict=True
        ):
            if isinstance(outcome, TimeoutError) and proc.process is not None:
                proc.process.kill()
                await proc.process.wait()
        await self.http.aclose()
        await self.store.close()

    def alive(self, name: str) -> bool:
        return self._get(name).alive

    def pid(self, name: str) -> int | None:
        process = self._get(name).process
        return None if process is None else process.pid

    def _get(self, name: str) -> _Process:
        try:
            return self.processes[name]
        except KeyError:
            raise StackError(f"no process {name!r}; known: {sorted(self.processes)}") from None

    # ------------------------------------------------------------------ logs

    def log_path(self, name: str) -> Path:
        return self._get(name).log_path

    def tails(self, names: Sequence[str] | None = None, lines: int = 30) -> str:
        """The last ``lines`` of each process's log (all processes by default)."""
        chosen = [n.split(" ")[0] for n in names or ()]
        chosen = [n for n in chosen if n in self.processes] or list(self.processes)
        return "\n".join(
            f"--- {name} ({self.processes[name].log_path}):\n{_tail(self.processes[name].log_path, lines)}"
            for name in dict.fromkeys(chosen)
        )

    # ------------------------------------------------------------------ orders and sagas

    async def place_order(self, **order: Any) -> dict[str, Any]:
        """``POST /orders``; returns ``{order_id, saga_id, status}``.

        Raises:
            httpx.HTTPStatusError: the API refused the order.
        """
        response = await self.http.post("/orders", json=order)
        response.raise_for_status()
        placed: dict[str, Any] = response.json()
        return placed

    async def get_order(self, order_id: str) -> dict[str, Any]:
        """``GET /orders/{order_id}``."""
        response = await self.http.get(f"/orders/{order_id}")
        response.raise_for_status()
        found: dict[str, Any] = response.json()
        return found

    async def wait_settled(
        self, saga_ids: Sequence[str], timeout: float = 60.0, *, poll: float = 0.2
    ) -> dict[str, SagaState]:
        """Wait until every saga is in a terminal state; returns the final states.

        Raises:
            StackError: some sagas were not terminal within ``timeout`` (with
                their states and the log tails).
        """
        deadline = time.monotonic() + timeout
        settled: dict[str, SagaState] = {}
        pending = list(dict.fromkeys(saga_ids))
        while pending:
            states = await asyncio.gather(*(self.store.get(sid) for sid in pending))
            for sid, state in zip(pending, states, strict=True):
                if state is not None and state.status.terminal:
                    settled[sid] = state
            pending = [sid for sid in pending if sid not in settled]
            if not pending:
                break
            if time.monotonic() > deadline:
                stuck = {
                    sid: (s.status.value if s else None)
                    for sid, s in zip(pending, states, strict=True)
                }
                sample = dict(list(stuck.items())[:10])
                raise StackError(f"{len(pending)} sagas not settled, e.g. {sample}\n{self.tails()}")
            await asyncio.sleep(poll)
        return settled


async def _consumers(connection: aio_pika.abc.AbstractConnection, queue: str) -> int:
    # a passive declare reports the consumer count; on a missing queue the
    # broker closes the channel, so each probe gets its own
    try:
        async with connection.channel() as channel:
            declared = await channel.declare_queue(queue, passive=True)
            count = declared.declaration_result.consumer_count
            return int(count or 0)
    except aio_pika.exceptions.ChannelClosed:
        return 0


async def _connect_any(urls: Sequence[str]) -> aio_pika.abc.AbstractConnection:
    """A connection to the first broker node that answers (a cluster lists several)."""
    error: BaseException | None = None
    for url in urls:
        try:
            return await aio_pika.connect(url, timeout=5.0)
        except (aio_pika.exceptions.AMQPError, OSError) as exc:
            error = exc
    assert error is not None
    raise error


async def _quiet_close(connection: aio_pika.abc.AbstractConnection) -> None:
    with contextlib.suppress(Exception):
        await connection.close()


def _tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"<no log: {exc}>"
    return "\n".join(text.splitlines()[-lines:])
