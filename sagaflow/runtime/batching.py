"""Turning a stream of deliveries into batches; retrying what heals, returning what does not.

The coordinator handles replies in batches: one database transaction per
batch instead of one per message is most of its speed. A batch is whatever
has arrived when the previous one finished, up to ``max_batch``: under light
load a batch is one message (no added latency), under heavy load it grows by
itself (group commit).

Failures come in two kinds. The store or the broker being away heals by
waiting: :func:`retry_healing` retries exactly those (``StoreError``,
``TransportError``). Anything else is a bug or a poison message and must not
loop: the batch is split so the innocent messages go through, and the one that
fails is handed to :func:`give_back`, which returns it to the queue (counting
toward the queue's delivery limit) and dead-letters it, with the error as its
reason, on its last delivery.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from sagaflow.core.errors import NotReachable, StoreError, TransportError
from sagaflow.core.ports import Delivery, Transport
from sagaflow.runtime.hooks import Hooks

T = TypeVar("T")
HEALING: tuple[type[Exception], ...] = (StoreError, TransportError)
"""The failures that heal by waiting: the database or the broker being away."""
DELIVERY_COUNT = "x-delivery-count"
"""The header in which the broker counts a message's earlier deliveries."""
Item = TypeVar("Item")
log = logging.getLogger("sagaflow.runtime")


class Batcher:
    """Collects deliveries and runs ``handle`` on batches, ``concurrency`` at a time.

    ``handle`` must settle every delivery of its batch. If it raises, the batch
    is handled again one delivery at a time, so that one poison message does
    not hold up the others; a delivery that still raises alone is passed to
    ``failed`` with the exception (which gives it back: :func:`give_back`).
    """

    def __init__(
        self,
        handle: Callable[[Sequence[Delivery]], Awaitable[None]],
        *,
        failed: Callable[[Delivery, Exception], Awaitable[None]],
        max_batch: int,
        concurrency: int = 1,
        name: str = "batcher",
    ) -> None:
        self._handle = handle
        self._failed = failed
        self._max_batch = max_batch
        self._concurrency = concurrency
        self._queue: asyncio.Queue[Delivery] = asyncio.Queue()
        self._tasks: list[asyncio.Task[None]] = []
        self._busy: set[asyncio.Task[None]] = set()  # loops handling a batch
        self._stopping = False
        self._name = name

    def put(self, delivery: Delivery) -> None:
        """Take a delivery (a synchronous ``DeliveryCallback``: no task per message)."""
        self._queue.put_nowait(delivery)

    def start(self) -> None:
        self._stopping = False
        self._tasks = [
            asyncio.create_task(self._loop(), name=f"{self._name}-{i}")
            for i in range(self._concurrency)
        ]

    @property
    def idle(self) -> bool:
        return self._queue.empty() and not self._busy

    async def stop(self) -> None:
        """Stop taking new batches; wait for the ones being handled to finish.

        Only loops waiting for a delivery are cancelled: a loop in the middle of a
        batch finishes it (commit, publish, settle) and then sees ``_stopping``.
        The batch runs in the loop's own task, with no extra task or shield each.
        """
        self._stopping = True
        for task in self._tasks:
            if task not in self._busy:
                task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []

    async def _loop(self) -> None:
        task = asyncio.current_task()
        assert task is not None
        while not self._stopping:
            first = await self._queue.get()
            self._busy.add(task)
            try:
                batch = [first]
                while len(batch) < self._max_batch and not self._queue.empty():
                    batch.append(self._queue.get_nowait())
                await self._run(batch)
            finally:
                self._busy.discard(task)

    async def _run(self, batch: Sequence[Delivery]) -> None:
        try:
            await self._handle(batch)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if len(batch) == 1:
                log.exception("%s: a message could not be handled", self._name)
                await self._failed(batch[0], exc)
                return
            log.warning(
                "%s: a batch of %d failed (%r); handling its messages one by one",
                self._name,
                len(batch),
                exc,
            )
            for delivery in batch:
                await self._run([delivery])


class GroupCommit(Generic[Item]):
    """Writes concurrent requests together: whatever was submitted while the
    previous write ran goes in the next one (one statement, one commit).

    ``write`` takes a batch; when it raises for a batch of several, each item is
    written again on its own, so one bad item (a duplicate saga id) fails only
    its own caller. A lone request is written at once: no added latency.
    """

    def __init__(self, write: Callable[[Sequence[Item]], Awaitable[None]]) -> None:
        self._write = write
        self._pending: list[tuple[Item, asyncio.Future[None]]] = []
        self._flusher: asyncio.Task[None] | None = None

    async def submit(self, item: Item) -> None:
        """Return once ``item`` is written; raise what writing it raised."""
        done = asyncio.get_running_loop().create_future()
        self._pending.append((item, done))
        if self._flusher is None:
            self._flusher = asyncio.create_task(self._flush(), name="group-commit")
        await done

    async def _flush(self) -> None:
        try:
            while self._pending:
                batch, self._pending = self._pending, []
                await self._write_batch(batch)
        finally:
            self._flusher = None

    async def _write_batch(self, batch: Sequence[tuple[Item, asyncio.Future[None]]]) -> None:
        try:
            await self._write([item for item, _ in batch])
        except Exception as exc:
            if len(batch) > 1:
                for one in batch:
                    await self._write_batch([one])
                return
            _, done = batch[0]
            if not done.done():
                done.set_exception(exc)
            return
        except BaseException as exc:  # cancelled while writing: the outcome is unknown
            for _, done in batch:
                if not done.done():
                    done.set_exception(exc)
            raise
        for _, done in batch:
            if not done.done():
                done.set_result(None)


@dataclass(frozen=True)
class Deadline:
    """When start-up stops retrying: ``seconds`` after it began.

    Attributes:
        seconds: The time start-up may take.
        began: When it began (``time.monotonic()``).
    """

    seconds: float
    began: float = field(default_factory=time.monotonic)

    def left(self) -> float:
        """Seconds until the deadline (negative once it passed)."""
        return self.began + self.seconds - time.monotonic()


async def retry_healing(
    operation: Callable[[], Awaitable[T]],
    *,
    what: str,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    initial: float = 0.1,
    maximum: float = 5.0,
    unless: Callable[[Exception], bool] = lambda exc: False,
    deadline: Deadline | None = None,
) -> T:
    """Run ``operation`` until it succeeds while it fails in a way that heals.

    ``StoreError`` and ``TransportError`` (the database or the broker
    restarting, a lost deadlock) are retried with exponential back-off, unless
    ``unless(exc)`` says the caller handles that one; any other exception is
    raised at once: a bug retried forever is a stall. Cancellation is never
    swallowed.

    Raises:
        NotReachable: it still failed in a way that heals once ``deadline``
            passed (start-up bounds its retries with one).
    """
    delay = initial
    while True:
        try:
            return await operation()
        except HEALING as exc:
            if unless(exc):
                raise
            wait = delay
            if deadline is not None:
                left = deadline.left()
                if left <= 0:
                    raise NotReachable(
                        f"{exc}; gave up after {deadline.seconds:g}s", seconds=deadline.seconds
                    ) from exc
                wait = min(delay, left)
            log.warning("%s failed, retrying in %.1fs: %r", what, wait, exc)
            await sleep(wait)
            delay = min(maximum, delay * 2)


def deliveries(delivery: Delivery) -> int:
    """How many times this message has been delivered, this time included."""
    try:
        return int(delivery.headers.get(DELIVERY_COUNT, "0")) + 1
    except ValueError:
        return 1


def failure_reason(exc: BaseException) -> str:
    """An unexpected exception as a dead letter's reason."""
    return f"unhandled: {type(exc).__name__}: {exc}"


async def dead_letter(
    delivery: Delivery, reason: str, *, transport: Transport, hooks: Hooks, what: str
) -> None:
    """Move a delivery (a ``what``: "message", "command") to the dead-letter queue
    with ``reason``, logged and counted. If the broker fails it, the delivery
    stays unsettled: it comes back and is judged again."""
    log.warning("dead-lettering a %s from %s: %s", what, delivery.queue, reason)
    hooks.dead_lettered(delivery.queue, reason)
    try:
        await transport.dead_letter(delivery, reason)
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        log.warning("dead-lettering failed: %r", exc)


async def give_back(
    delivery: Delivery,
    exc: Exception,
    *,
    limit: int,
    dead_letter: Callable[[Delivery, str], Awaitable[None]],
) -> None:
    """Return a message whose handling raised something that does not heal.

    Before its last delivery it is nacked and requeued (each return counts
    toward the queue's ``limit``: a bug that a redeploy fixes, or a race, gets
    another chance); on its last it is dead-lettered with the exception as the
    reason, instead of by the broker with only ``delivery_limit``.
    """
    if deliveries(delivery) > limit:
        await dead_letter(delivery, failure_reason(exc))
        return
    try:
        await delivery.nack(requeue=True)
    except asyncio.CancelledError:
        raise
    except Exception as nack_failed:  # the channel is gone: the broker redelivers it anyway
        log.warning("returning a message failed: %r", nack_failed)
