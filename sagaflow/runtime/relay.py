"""The outbox relay: the one way a coordinator's messages reach the broker.

A commit that queues messages wakes the relay (in this process at once, in
other processes by PostgreSQL's ``NOTIFY``; a slow poll is the safety net).
It claims the oldest rows (``FOR UPDATE SKIP LOCKED``, so several relays
share the work and never publish the same row at the same time), publishes
them with publisher confirms, and deletes them in the claim's transaction.
If the publish fails the transaction rolls back and the rows are published on
the next pass. Under load one pass carries everything committed since the
last one: the relay batches by itself.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from sagaflow.core.errors import MessageRejected
from sagaflow.core.messages import Envelope
from sagaflow.core.ports import SagaStore, Transport
from sagaflow.runtime.hooks import Hooks

__all__ = ["OutboxRelay"]

log = logging.getLogger("sagaflow.relay")


class OutboxRelay:
    """Publishes committed outbox rows.

    Args:
        store: The saga store whose outbox it drains.
        transport: The broker.
        hooks: ``publishing`` wraps every publish (PRODUCER spans).
        interval: Seconds between polls when no commit wakes it.
        batch: Rows claimed per pass at most.
    """

    def __init__(
        self,
        store: SagaStore,
        transport: Transport,
        hooks: Hooks,
        *,
        interval: float = 1.0,
        batch: int = 500,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.store = store
        self.transport = transport
        self.hooks = hooks
        self.interval = interval
        self.batch = batch
        self._sleep = sleep

    async def run(self) -> None:
        """Relay until cancelled."""
        while True:
            await self.store.wait_for_outbox(self.interval)
            await self.drain()

    async def drain(self) -> int:
        """Publish until the outbox is empty or the relay fails; returns how many
        messages went out. A failure is logged and left for the next pass: the
        rows stay in the outbox."""
        sent = 0
        while True:
            try:
                published = await self.relay_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the broker or the store is away: the rows wait
                log.warning("outbox relay failed; retrying in %.1fs: %r", self.interval, exc)
                await self._sleep(self.interval)
                return sent
            sent += published
            if published < self.batch:
                return sent

    async def relay_once(self) -> int:
        """Claim, publish and delete one batch of rows; returns how many.

        A message the broker can never take (``MessageRejected``: larger than
        the limit) must not hold up every message behind it: the batch is
        published one message at a time and the refused one is dropped with an
        error in the log and a ``dead_lettered`` count (queue ``outbox``). Its
        saga's step then times out, as if the message were lost, and the step's
        retries and compensation take over.
        """
        async with self.store.claim_outbox(self.batch) as items:
            envelopes = [item.envelope for item in items]
            try:
                await self._publish(envelopes)
            except MessageRejected:
                for envelope in envelopes:
                    try:
                        await self._publish([envelope])
                    except MessageRejected as exc:
                        log.error("dropping outbox message %s: %s", envelope.message_id, exc)
                        self.hooks.dead_lettered("outbox", str(exc))
            return len(items)

    async def _publish(self, envelopes: list[Envelope]) -> None:
        if envelopes:
            with self.hooks.publishing(envelopes) as outgoing:
                await self.transport.publish(outgoing)
