"""Turning a stream of deliveries into batches, and retrying infrastructure work.

Both the coordinator and the participant worker handle deliveries in batches:
one database transaction per batch instead of one per message is most of
their speed. A batch is whatever has arrived when the previous one finished,
up to ``max_batch``: under light load a batch is one message (no added
latency), under heavy load it grows by itself (group commit).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

from sagaflow.core.ports import Delivery

T = TypeVar("T")
Item = TypeVar("Item")
log = logging.getLogger("sagaflow.runtime")


class Batcher:
    """Collects deliveries and runs ``handle`` on batches, ``concurrency`` at a time."""

    def __init__(
        self,
        handle: Callable[[Sequence[Delivery]], Awaitable[None]],
        *,
        max_batch: int,
        concurrency: int = 1,
        name: str = "batcher",
    ) -> None:
        self._handle = handle
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
                try:
                    await self._handle(batch)
                except asyncio.CancelledError:
                    raise
                except Exception:
                    # a bug, not a fault of the infrastructure (handlers retry those):
                    # hand the messages back rather than leave them unacked forever
                    log.exception("%s: batch of %d failed; returning it", self._name, len(batch))
                    for delivery in batch:
                        await delivery.nack(requeue=True)
            finally:
                self._busy.discard(task)


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


async def retry_forever(
    operation: Callable[[], Awaitable[T]],
    *,
    what: str,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    initial: float = 0.1,
    maximum: float = 5.0,
) -> T:
    """Run ``operation`` until it succeeds: the broker or database may be restarting.

    Cancellation is never swallowed.
    """
    delay = initial
    while True:
        try:
            return await operation()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("%s failed, retrying in %.1fs: %r", what, delay, exc)
            await sleep(delay)
            delay = min(maximum, delay * 2)
