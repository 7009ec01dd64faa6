"""CPU time and memory of the process groups taking part in a run (psutil).

A sampler thread reads every relevant process every ``interval`` seconds:
the processes the harness started (by pid), RabbitMQ (``beam.smp``) and
PostgreSQL (``postgres``). CPU is user + system time between ``begin()`` and
``end()``; a process that appears in between counts from zero, and one that
exits in between keeps its last sample (PostgreSQL backends of the run live in
connection pools that outlast the window, so little is lost that way).

PostgreSQL is shared with whatever else runs on the machine, so besides all
``postgres`` processes (``postgres``) the sampler reports the backends of the
run's own database (``postgres_bench``, read from the process title) and the
server's background processes (``postgres_background``: WAL writer,
checkpointer...). RabbitMQ is its node's ``beam.smp`` process (the
short-lived ones ``rabbitmqctl`` starts are left out); it cannot be split
further: other users of the broker show up in its figure.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import psutil  # type: ignore[import-untyped]  # no stubs in the dev extra

RABBITMQ = "rabbitmq"
POSTGRES = "postgres"
POSTGRES_BENCH = "postgres_bench"
POSTGRES_BACKGROUND = "postgres_background"
CLIENT = "client"

_PG_BACKGROUND = (
    "checkpointer",
    "background writer",
    "walwriter",
    "autovacuum launcher",
    "logical replication launcher",
    "archiver",
    "stats collector",
    "startup",
)


@dataclass
class _Tracked:
    groups: tuple[str, ...]
    baseline: float
    last: float
    rss: int = 0


@dataclass
class Usage:
    """What the sampler measured for each group between ``begin`` and ``end``."""

    cpu_seconds: dict[str, float]
    peak_rss_bytes: dict[str, int]
    first_rss_bytes: dict[str, int]
    last_rss_bytes: dict[str, int]
    samples: int
    sampler_cpu_seconds: float


def _cpu(times: Any) -> float:
    return float(times.user + times.system)


class Sampler:
    """Samples CPU and RSS of process groups in a background thread.

    Args:
        database: The run's database name (to tell its PostgreSQL backends apart).
        pids: Processes the harness started, by group (``coordinator``...).
        interval: Seconds between samples.
        include_self: Count this process as the ``client`` group, minus the
            sampler thread's own CPU.
    """

    def __init__(
        self,
        database: str | None,
        pids: Mapping[str, list[int]],
        *,
        interval: float = 0.5,
        include_self: bool = True,
    ) -> None:
        self._database = database
        self._own: dict[int, str] = {pid: group for group, ps in pids.items() for pid in ps}
        if include_self:
            self._own[os.getpid()] = CLIENT
        self._groups = sorted({*self._own.values(), RABBITMQ, POSTGRES})
        if database is not None:
            self._groups += [POSTGRES_BENCH, POSTGRES_BACKGROUND]
        self._interval = interval
        self._tracked: dict[tuple[int, float], _Tracked] = {}
        self._ignored: set[tuple[int, float]] = set()
        self._peak: dict[str, int] = dict.fromkeys(self._groups, 0)
        self._first: dict[str, int] | None = None
        self._last: dict[str, int] = dict.fromkeys(self._groups, 0)
        self._samples = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._thread_cpu = 0.0
        self._lock = threading.Lock()
        self._began = False

    def _classify(self, proc: psutil.Process, name: str) -> tuple[str, ...]:
        group = self._own.get(proc.pid)
        if group is not None:
            return (group,)
        if name == "beam.smp":
            # the broker's node, not the short-lived VMs of rabbitmqctl
            try:
                cli = "escript" in " ".join(proc.cmdline())
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                return ()
            return () if cli else (RABBITMQ,)
        if name != "postgres":
            return ()
        if self._database is None:
            return (POSTGRES,)
        try:
            title = " ".join(proc.cmdline())
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            return (POSTGRES,)
        if f" {self._database} " in f"{title} ":
            return (POSTGRES, POSTGRES_BENCH)
        if not title.startswith("postgres:") or any(k in title for k in _PG_BACKGROUND):
            return (POSTGRES, POSTGRES_BACKGROUND)
        return (POSTGRES,)  # another database's backend: someone else's work

    def _sample(self, *, baseline: bool) -> None:
        rss: dict[str, int] = dict.fromkeys(self._groups, 0)
        for proc in psutil.process_iter(["name"]):
            name = proc.info.get("name") or ""
            if proc.pid not in self._own and name not in ("beam.smp", "postgres"):
                continue
            try:
                with proc.oneshot():
                    key = (proc.pid, proc.create_time())
                    cpu = _cpu(proc.cpu_times())
                    mem = proc.memory_info()
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
            tracked = self._tracked.get(key)
            if tracked is None:
                if key in self._ignored:
                    continue
                groups = self._classify(proc, name)
                if not groups:
                    self._ignored.add(key)
                    continue
                tracked = _Tracked(groups, cpu if baseline else 0.0, cpu)
                self._tracked[key] = tracked
            tracked.last = cpu
            # PostgreSQL backends map the shared buffers: count their private part only
            tracked.rss = mem.rss - mem.shared if name == "postgres" else mem.rss
            for group in tracked.groups:
                rss[group] += tracked.rss
        for group, value in rss.items():
            self._peak[group] = max(self._peak[group], value)
        if self._first is None and not baseline:
            self._first = rss
        self._last = rss
        self._samples += 1

    def _run(self) -> None:
        started = time.thread_time()
        try:
            while not self._stop.wait(self._interval):
                with self._lock:
                    self._sample(baseline=False)
        finally:
            self._thread_cpu = time.thread_time() - started

    def begin(self) -> None:
        """Take the baseline and start sampling."""
        with self._lock:
            self._sample(baseline=True)
            self._peak = dict.fromkeys(self._groups, 0)
            self._began = True
        self._thread = threading.Thread(target=self._run, name="bench-sampler", daemon=True)
        self._thread.start()

    def end(self) -> Usage:
        """Take the last sample, stop the thread and return the usage per group."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        end_started = time.thread_time()
        with self._lock:
            self._sample(baseline=False)
        sampler_cpu = self._thread_cpu + (time.thread_time() - end_started)
        cpu = dict.fromkeys(self._groups, 0.0)
        for tracked in self._tracked.values():
            for group in tracked.groups:
                cpu[group] += max(0.0, tracked.last - tracked.baseline)
        if CLIENT in cpu:
            cpu[CLIENT] = max(0.0, cpu[CLIENT] - sampler_cpu)
        return Usage(
            cpu_seconds=cpu,
            peak_rss_bytes=dict(self._peak),
            first_rss_bytes=dict(self._first or self._last),
            last_rss_bytes=dict(self._last),
            samples=self._samples,
            sampler_cpu_seconds=sampler_cpu,
        )
