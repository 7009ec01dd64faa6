"""Test-only fault injection: a transport that delivers every message twice, out of order.

Never use this in production. The fault-injection suite (``tests/faults``)
turns it on in real coordinator and worker processes with the environment
variable ``SAGAFLOW_FAULT_DUPLICATE=1`` (read by the CLI when it builds its
transport), to show that at-least-once delivery with duplicates and
reordering still yields each effect once.

:class:`DuplicatingTransport` wraps any :class:`~sagaflow.core.ports.Transport`.
Each ``publish`` sends the batch in a shuffled order and returns once the
inner transport confirmed it, exactly as the wrapped transport would; then,
in the background and after a random delay, it publishes every message a
second time, each copy on its own, so a copy can arrive after messages the
saga sent later (a stale command, a reply for a step already finished).
Consuming, dead-lettering and the dead-letter queue are passed through.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
from collections.abc import Sequence

from sagaflow.core.messages import Envelope
from sagaflow.core.ports import DeadLetter, Delivery, DeliveryCallback, Topology, Transport

__all__ = ["DUPLICATE_ENV", "DuplicatingTransport", "duplicating_from_env"]

log = logging.getLogger("sagaflow.faults")

DUPLICATE_ENV = "SAGAFLOW_FAULT_DUPLICATE"
"""Test-only: ``1`` makes ``sagaflow coordinator`` and ``sagaflow worker`` publish
every message twice, out of order (:class:`DuplicatingTransport`)."""


class DuplicatingTransport:
    """A transport decorator that publishes every message twice, out of order (test-only).

    Args:
        inner: The transport that really moves the messages.
        seed: Seeds the random order and delays (``None``: unpredictable).
        max_delay: The copy of a message goes out 0 to ``max_delay`` seconds
            after the original was confirmed.
        close_timeout: Seconds ``close()`` waits for copies still to be sent.
    """

    def __init__(
        self,
        inner: Transport,
        *,
        seed: int | None = None,
        max_delay: float = 0.5,
        close_timeout: float = 5.0,
    ) -> None:
        self.inner = inner
        self.topology: Topology = inner.topology
        self.max_delay = max_delay
        self.close_timeout = close_timeout
        self.duplicates_sent = 0
        self.duplicates_lost = 0
        self._rng = random.Random(seed)
        self._copies: set[asyncio.Task[None]] = set()

    async def start(self, services: Sequence[str]) -> None:
        await self.inner.start(services)

    async def close(self) -> None:
        """Send the copies still waiting (up to ``close_timeout``), then close the inner."""
        if self._copies:
            _, pending = await asyncio.wait(set(self._copies), timeout=self.close_timeout)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)
        log.warning(
            "fault injection: %d duplicate messages sent, %d lost (%s)",
            self.duplicates_sent,
            self.duplicates_lost,
            DUPLICATE_ENV,
        )
        await self.inner.close()

    async def publish(self, envelopes: Sequence[Envelope]) -> None:
        """Publish the batch shuffled (confirmed on return); copies follow later."""
        batch = list(envelopes)
        self._rng.shuffle(batch)
        await self.inner.publish(batch)
        for envelope in batch:
            delay = self._rng.uniform(0.0, self.max_delay)
            task = asyncio.create_task(self._send_copy(envelope, delay), name="duplicate")
            self._copies.add(task)
            task.add_done_callback(self._copies.discard)

    async def _send_copy(self, envelope: Envelope, delay: float) -> None:
        await asyncio.sleep(delay)
        try:
            await self.inner.publish([envelope])
        except asyncio.CancelledError:
            self.duplicates_lost += 1
            raise
        except Exception as exc:  # a lost copy is a duplicate less, never a lost message
            self.duplicates_lost += 1
            log.debug("fault injection: a duplicate was not sent: %r", exc)
            return
        self.duplicates_sent += 1

    async def consume(self, queue: str, callback: DeliveryCallback, *, prefetch: int) -> None:
        await self.inner.consume(queue, callback, prefetch=prefetch)

    async def dead_letter(self, delivery: Delivery, reason: str) -> None:
        await self.inner.dead_letter(delivery, reason)

    async def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        return await self.inner.dead_letters(limit)

    async def replay_dead_letters(self, ids: Sequence[str] | None = None) -> int:
        return await self.inner.replay_dead_letters(ids)


def duplicating_from_env(inner: Transport) -> Transport:
    """``inner`` wrapped in a :class:`DuplicatingTransport` when ``SAGAFLOW_FAULT_DUPLICATE``
    is set to a true value (``1``, ``true``, ``yes``), else ``inner`` itself."""
    if os.environ.get(DUPLICATE_ENV, "").strip().lower() not in {"1", "true", "yes"}:
        return inner
    log.warning("fault injection: every message is published twice (%s)", DUPLICATE_ENV)
    return DuplicatingTransport(inner)
