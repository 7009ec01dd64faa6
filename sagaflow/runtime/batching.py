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
from typing import TypeVar

from sagaflow.core.ports import Delivery

T = TypeVar("T")
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
        self._busy = 0
        self._inflight: set[asyncio.Future[None]] = set()
        self._name = name

    async def put(self, delivery: Delivery) -> None:
        self._queue.put_nowait(delivery)

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._loop(), name=f"{self._name}-{i}")
            for i in range(self._concurrency)
        ]

    @property
    def idle(self) -> bool:
        return self._queue.empty() and self._busy == 0

    async def stop(self) -> None:
        """Stop taking new batches; wait for the ones being handled to finish."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.gather(*self._inflight, return_exceptions=True)
        self._tasks = []

    async def _loop(self) -> None:
        while True:
            first = await self._queue.get()
            self._busy += 1
            try:
                batch = [first]
                while len(batch) < self._max_batch and not self._queue.empty():
                    batch.append(self._queue.get_nowait())
                # shield: a stop request lets the batch in hand finish (commit, settle)
                inner = asyncio.ensure_future(self._handle(batch))
                self._inflight.add(inner)
                inner.add_done_callback(self._inflight.discard)
                try:
                    await asyncio.shield(inner)
                except asyncio.CancelledError:
                    raise
                except Exception:
                    # a bug, not a fault of the infrastructure (handlers retry those):
                    # hand the messages back rather than leave them unacked forever
                    log.exception("%s: batch of %d failed; returning it", self._name, len(batch))
                    for delivery in batch:
                        await delivery.nack(requeue=True)
            finally:
                self._busy -= 1


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
