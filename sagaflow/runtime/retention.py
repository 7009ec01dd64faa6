"""Retention: finished sagas and participants' inbox rows are deleted after a while.

Without it the saga tables and every participant's inbox only grow. A
:class:`Retention` says how long each kind of row is kept; the coordinator
prunes sagas with their log, and each worker its service's inbox, every
``interval`` seconds (``sagaflow db prune`` does the same once, by hand).

Each batch is one short transaction of at most ``batch`` rows, and the next
one waits at least as long as the last one took, so pruning never holds a lock
for long nor takes more than half of one connection: replies and commands go
on being committed between batches. A prune that fails (the database is away)
is logged and tried again at the next interval; it never stops the process.

Rows are chosen by age only:

- a saga by its last change (``updated_at``: when it finished), and only in a
  status that never changes again (COMPLETED, COMPENSATED, CANCELLED); FAILED
  sagas wait for an operator (``sagaflow sagas retry``) and are kept unless
  ``failed`` says otherwise;
- an inbox row by when it was first written. It must outlive every copy of its
  command: a command redelivered after its row is gone runs its handler again.
  Keep it well beyond the longest a command can wait (a queue's backlog, a
  step's retries and timeouts, a dead letter waiting for replay); see
  docs/operations.md.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from sagaflow.core.ports import ParticipantStore, Pruned, SagaStore
from sagaflow.core.state import SagaStatus

__all__ = [
    "DAY",
    "FINISHED",
    "Retention",
    "prune_inbox",
    "prune_sagas",
    "repeat",
]

log = logging.getLogger("sagaflow.retention")

DAY = 86_400.0
FINISHED = (SagaStatus.COMPLETED, SagaStatus.COMPENSATED, SagaStatus.CANCELLED)
"""The statuses a saga never leaves: pruned after ``Retention.finished``."""
MIN_PAUSE = 0.01  # seconds between two batches at least


@dataclass(frozen=True)
class Retention:
    """How long rows are kept and how they are pruned; ``None`` keeps them forever.

    Attributes:
        finished: Seconds a COMPLETED, COMPENSATED or CANCELLED saga (and its
            log) is kept after its last change.
        failed: The same for FAILED sagas, which wait for an operator.
        inbox: Seconds a participant's inbox row is kept after it was written.
        interval: Seconds between two prune runs of a process.
        batch: Rows deleted per transaction at most (a saga's log rows go with it).
    """

    finished: float | None = 30 * DAY
    failed: float | None = None
    inbox: float | None = 7 * DAY
    interval: float = 300.0
    batch: int = 1000

    def __post_init__(self) -> None:
        for name in ("finished", "failed", "inbox"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"retention {name} must be positive (or None: keep forever)")
        if self.interval <= 0 or self.batch < 1:
            raise ValueError("retention interval must be positive and batch at least 1")

    @property
    def prunes_sagas(self) -> bool:
        """Whether a coordinator has anything to prune."""
        return self.finished is not None or self.failed is not None


async def prune_sagas(
    store: SagaStore,
    retention: Retention,
    now: float,
    *,
    pause: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> Pruned:
    """Delete every saga (and its log) past its retention at ``now``, batch by batch.

    Args:
        store: The coordinator's store.
        retention: What to keep.
        now: The current time (seconds since the epoch), of the clock that
            stamps the sagas.
        pause: Sleeps between two batches.

    Returns:
        How many sagas and log entries were deleted.
    """
    total = Pruned()
    for statuses, keep in (
        (FINISHED, retention.finished),
        ((SagaStatus.FAILED,), retention.failed),
    ):
        if keep is None:
            continue
        before = now - keep
        while True:
            started = time.monotonic()
            pruned = await store.prune(statuses, before, retention.batch)
            total += pruned
            if pruned.sagas < retention.batch:
                break
            await pause(max(MIN_PAUSE, time.monotonic() - started))
    return total


async def prune_inbox(
    store: ParticipantStore,
    keep: float,
    now: float,
    *,
    batch: int = 1000,
    pause: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> int:
    """Delete every inbox row older than ``keep`` seconds at ``now``, batch by batch.

    Returns:
        How many rows were deleted.
    """
    total = 0
    while True:
        started = time.monotonic()
        count = await store.prune_inbox(now - keep, batch)
        total += count
        if count < batch:
            return total
        await pause(max(MIN_PAUSE, time.monotonic() - started))


async def repeat(
    work: Callable[[], Awaitable[Pruned | int]],
    *,
    interval: float,
    what: str,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> None:
    """Run ``work`` every ``interval`` seconds until cancelled; never raises otherwise.

    The first run comes after a random part of ``interval``, so processes
    started together do not prune together. A failure is logged and the work
    runs again at the next interval.
    """
    await sleep(interval * random.uniform(0.1, 1.0))
    while True:
        started = time.monotonic()
        try:
            result = await work()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("%s failed, trying again in %.0fs: %r", what, interval, exc)
        else:
            if isinstance(result, Pruned):
                deleted = result.sagas
                said = f"{result.sagas} sagas and {result.log_entries} log entries deleted"
            else:
                deleted, said = result, f"{result} rows deleted"
            level = logging.INFO if deleted else logging.DEBUG
            log.log(level, "%s: %s in %.2fs", what, said, time.monotonic() - started)
        await sleep(interval)
