"""The coordinator: replies in, decisions committed, commands out through the outbox.

The path of a reply (docs/architecture.md draws it):

1. The transport delivers it to the reply consumer, which puts it on a
   :class:`~sagaflow.runtime.batching.Batcher` (a batch is whatever arrived
   while the previous one was handled).
2. :meth:`Coordinator._handle_batch` decodes each body; what cannot be parsed
   or is not a reply of a known saga is dead-lettered with its reason.
3. :class:`~sagaflow.runtime.writer.SagaWriter` locks the sagas of the batch,
   the pure engine decides each reply, and the new states, log entries and
   outgoing messages commit in one transaction (the messages as outbox rows).
4. The commit wakes :class:`~sagaflow.runtime.relay.OutboxRelay`, which
   publishes the rows with publisher confirms and deletes them.
5. The deliveries are acknowledged once their batch committed.

A failure of the store or the broker is retried until it heals; anything else
(a bug, a hook that raises) splits the batch, and the one reply that still
fails alone is given back to the queue and, on its last delivery,
dead-lettered with the error. The timer loop decides due step timeouts and
retry back-offs the same way. Several coordinators may run against one
database: row locks serialize each saga, ``SKIP LOCKED`` shares timers and
outbox rows.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any

from pydantic import BaseModel

from sagaflow.core import engine
from sagaflow.core.definition import Saga
from sagaflow.core.errors import ConfigurationError, MessageRejected
from sagaflow.core.fingerprint import drift, record_of
from sagaflow.core.messages import DEFAULT_MAX_MESSAGE_BYTES, Envelope, MessageKind, decode
from sagaflow.core.ports import Clock, Delivery, IdFactory, SagaStore, Transport
from sagaflow.core.schema import DEFAULT_STRICT
from sagaflow.core.state import SagaState
from sagaflow.logs import saga_fields
from sagaflow.runtime.batching import Batcher, Deadline, dead_letter, give_back, retry_healing
from sagaflow.runtime.client import SagaClient, SagaHandle
from sagaflow.runtime.hooks import Hooks
from sagaflow.runtime.relay import OutboxRelay
from sagaflow.runtime.retention import Retention, prune_sagas, repeat
from sagaflow.runtime.siblings import DEFAULT_LINGER, Event, Siblings
from sagaflow.runtime.writer import Decided, SagaRegistry

log = logging.getLogger("sagaflow.coordinator")


class Coordinator:
    """Runs sagas: reply consumer, outbox relay and timer loop in one process.

    It also starts, cancels and retries sagas, as a :class:`SagaClient` does.

    Args:
        sagas: The saga definitions this coordinator runs.
        store: Where state, log and outbox live.
        transport: The broker.
        max_batch: Replies handled per transaction at most.
        prefetch: Unacknowledged replies the broker may push at once.
        concurrency: Batches of replies in progress at once.
        timer_interval: Seconds between scans for due timers.
        relay_interval: Seconds between outbox polls when no commit wakes the relay.
        strict_payloads: Validate success replies strictly (see :mod:`sagaflow.core.schema`).
        max_message_bytes: Larger replies are dead-lettered.
        start_timeout: Seconds :meth:`start` keeps retrying a database or broker
            it cannot reach before it raises ``NotReachable``; ``None``: until
            they answer.
        retention: Finished sagas past it are deleted with their log every
            ``retention.interval`` seconds; ``None`` keeps them all.
        group_linger: Seconds a parallel group member's success reply waits, at
            most, for its siblings' so the group's replies commit together (see
            :mod:`sagaflow.runtime.siblings`); 0 decides each reply on arrival.
    """

    def __init__(
        self,
        sagas: Iterable[Saga[Any]] | SagaRegistry,
        *,
        store: SagaStore,
        transport: Transport,
        clock: Clock | None = None,
        ids: IdFactory | None = None,
        hooks: Hooks | None = None,
        max_batch: int = 200,
        prefetch: int = 400,
        concurrency: int = 2,
        timer_interval: float = 0.25,
        relay_interval: float = 1.0,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        strict_payloads: bool = DEFAULT_STRICT,
        start_timeout: float | None = None,
        retention: Retention | None = None,
        group_linger: float = DEFAULT_LINGER,
    ) -> None:
        self.client = SagaClient(sagas, store=store, clock=clock, ids=ids, hooks=hooks)
        self.registry = self.client.registry
        self.store = store
        self.transport = transport
        self.clock = self.client.clock
        self.hooks = self.client.hooks
        self.writer = self.client.writer
        self.prefetch = prefetch
        self.timer_interval = timer_interval
        self.max_message_bytes = max_message_bytes
        self.strict_payloads = strict_payloads
        self.start_timeout = start_timeout
        self.retention = retention
        self.relay = OutboxRelay(
            store, transport, self.hooks, interval=relay_interval, sleep=self.clock.sleep
        )
        self._batcher = Batcher(
            self._handle_batch,
            failed=self._give_back,
            max_batch=max_batch,
            concurrency=concurrency,
            name="coordinator",
        )
        self._siblings = Siblings(
            self.registry,
            linger=group_linger,
            release=self._batcher.put,
            together=self._decide_held,
        )
        self._tasks: list[asyncio.Task[None]] = []
        self._stopped = asyncio.Event()

    # ------------------------------------------------------------------ as a client

    async def start_saga(
        self,
        saga: Saga[Any],
        data: BaseModel | dict[str, Any],
        *,
        saga_id: str | None = None,
        connection: Any = None,
    ) -> SagaHandle:
        """Start a saga (see :meth:`SagaClient.start_saga`)."""
        return await self.client.start_saga(saga, data, saga_id=saga_id, connection=connection)

    async def run_saga(
        self, saga: Saga[Any], data: BaseModel | dict[str, Any], *, timeout: float = 60.0
    ) -> SagaState:
        """Start a saga and wait for its terminal state."""
        handle = await self.start_saga(saga, data)
        return await self.client.wait_for(handle.saga_id, timeout=timeout)

    async def cancel_saga(self, saga_id: str, *, by: str, reason: str) -> SagaState:
        """Compensate a running saga as a business decision (ends CANCELLED)."""
        return await self.client.cancel_saga(saga_id, by=by, reason=reason)

    async def retry_saga(self, saga_id: str, *, by: str, reason: str) -> SagaState:
        """Resume a FAILED saga where it stopped, with a fresh retry budget."""
        return await self.client.retry_saga(saga_id, by=by, reason=reason)

    async def signal_saga(
        self,
        saga_id: str,
        name: str,
        data: BaseModel | dict[str, Any] | None = None,
        *,
        by: str,
        reason: str,
        connection: Any = None,
    ) -> SagaState:
        """Send a signal to a saga's wait (see :meth:`SagaClient.signal_saga`)."""
        return await self.client.signal_saga(
            saga_id, name, data, by=by, reason=reason, connection=connection
        )

    async def get(self, saga_id: str) -> SagaState | None:
        """A saga's committed state (``self.client.get(saga_id, saga)`` reads it typed)."""
        return await self.client.get(saga_id)

    async def wait_for(
        self, saga_id: str, *, timeout: float = 60.0, poll: float = 0.05
    ) -> SagaState:
        """Poll until the saga is terminal."""
        return await self.client.wait_for(saga_id, timeout=timeout, poll=poll)

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Connect, declare, and start consumer, relay and timers (all eagerly).

        Raises:
            ConfigurationError: a definition differs from the one recorded under
                its name and version (edited in place: bump its version);
                messages are signed but a service has no key;
                the database or the broker refused this process (credentials, a
                missing database or vhost, an unmigrated schema); or
                ``NotReachable``: they did not answer within ``start_timeout``.
        """
        if self.transport.keys:
            self.transport.keys.require(self.registry.services, "the coordinator")
        deadline = None if self.start_timeout is None else Deadline(self.start_timeout)
        await retry_healing(
            self.store.start, what="store start", sleep=self.clock.sleep, deadline=deadline
        )
        await retry_healing(
            self._check_definitions,
            what="definition check",
            sleep=self.clock.sleep,
            deadline=deadline,
        )
        await retry_healing(
            lambda: self.transport.start(self.registry.services),
            what="transport start",
            sleep=self.clock.sleep,
            deadline=deadline,
        )
        await self.transport.consume(
            self.transport.topology.replies_queue, self._batcher.put, prefetch=self.prefetch
        )
        # no await from here on: a start cancelled earlier (a SIGTERM while
        # connecting) leaves no task behind to use the store its caller then closes
        self._batcher.start()
        self._tasks = [
            asyncio.create_task(self.relay.run(), name="outbox-relay"),
            asyncio.create_task(self._timer_loop(), name="timers"),
        ]
        if self.retention is not None and self.retention.prunes_sagas:
            self._tasks.append(asyncio.create_task(self._prune_loop(), name="retention"))
        log.info("coordinator started: sagas=%s", [f"{s.name}@{s.version}" for s in self.registry])

    async def _check_definitions(self) -> None:
        """Refuse definitions edited in place: a name and version the store knows
        with another fingerprint would run its sagas on steps they did not start on.

        Raises:
            ConfigurationError: one line per the first drifted definition, naming
                the difference and saying to bump the version.
        """
        loaded = [record_of(saga) for saga in self.registry]
        recorded = await self.store.record_definitions(loaded)
        for held, mine in zip(recorded, loaded, strict=True):
            difference = drift(held, mine)
            if difference is not None:
                raise ConfigurationError(difference)

    async def stop(self) -> None:
        """Stop consuming, finish the batches in hand, publish what they committed, close."""
        self._stopped.set()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        await self._batcher.stop()
        await self._siblings.settle()
        self._siblings.close()
        await self.relay.drain()
        await self.transport.close()
        await self.store.close()
        log.info("coordinator stopped")

    async def run(self) -> None:
        """Start, then run until ``stop()`` is called or the task is cancelled."""
        await self.start()
        try:
            await self._stopped.wait()
        finally:
            if self._tasks:
                await self.stop()

    def request_stop(self) -> None:
        self._stopped.set()

    @property
    def idle(self) -> bool:
        """No reply is waiting, held or being handled (the outbox may still hold rows)."""
        return self._batcher.idle and not self._siblings.holding

    async def relay_once(self) -> int:
        """Publish one batch of outbox rows; returns how many (tests drive it)."""
        return await self.relay.relay_once()

    # ------------------------------------------------------------------ replies

    async def _handle_batch(self, deliveries: Sequence[Delivery]) -> None:
        events: list[tuple[Delivery, Envelope]] = []
        rejects: list[tuple[Delivery, str]] = []
        for delivery in deliveries:
            try:
                events.append((delivery, self._parse(delivery)))
            except MessageRejected as exc:
                rejects.append((delivery, exc.reason))
        events = self._siblings.gather(events)
        verdicts: dict[int, str] = {}  # index in events -> why it is dead-lettered
        if events:
            saga_ids = sorted({envelope.saga_id for _, envelope in events})
            try:
                await self._commit_replies(events, verdicts, saga_ids)
            except Exception as exc:
                # the batcher hands back this batch's deliveries; held ones that
                # joined it came in earlier batches: give those back here
                mine = {id(delivery) for delivery in deliveries}
                for delivery, _ in events:
                    if id(delivery) not in mine:
                        await self._give_back(delivery, exc)
                raise
        await self._settle(events, verdicts, rejects)

    async def _commit_replies(
        self,
        events: Sequence[Event],
        verdicts: dict[int, str],
        saga_ids: Sequence[str],
        wait: Callable[[], Awaitable[object]] | None = None,
    ) -> None:
        """Decide ``events`` on their locked sagas in one transaction, retrying what
        heals; ``verdicts`` gets the index of each reply to dead-letter."""
        decided = await retry_healing(
            lambda: self.writer.commit(
                lambda states: self._decide(events, states, verdicts), lock=saga_ids, wait=wait
            ),
            what="reply transaction",
            sleep=self.clock.sleep,
        )
        self._log_ignored(decided)

    async def _decide_held(self, events: list[Event], arrived: asyncio.Event) -> None:
        """A group's held replies, in a transaction opened when the first arrived:
        the saga is locked while its siblings are on their way, and ``events``
        is decided once they are in it (or ``linger`` passed)."""
        saga_id = events[0][1].saga_id
        verdicts: dict[int, str] = {}
        try:
            await self._commit_replies(events, verdicts, [saga_id], wait=arrived.wait)
        except Exception as exc:  # what the batcher does for a batch that raised
            log.exception("saga %s: its group's replies could not be decided", saga_id)
            for delivery, _ in events:
                await self._give_back(delivery, exc)
            return
        try:
            await self._settle(events, verdicts, [])
        except Exception as exc:  # the channel is gone: the broker delivers them again
            log.warning("saga %s: settling its group's replies failed: %r", saga_id, exc)

    async def _settle(
        self,
        events: Sequence[Event],
        verdicts: Mapping[int, str],
        rejects: list[tuple[Delivery, str]],
    ) -> None:
        """Acknowledge the decided replies, dead-letter the rejected ones."""
        for index, (delivery, _) in enumerate(events):
            if index in verdicts:
                rejects.append((delivery, verdicts[index]))
            else:
                await delivery.ack()
        for delivery, reason in rejects:
            await self._dead_letter(delivery, reason)

    def _parse(self, delivery: Delivery) -> Envelope:
        envelope = decode(
            delivery.body, delivery.headers, self.max_message_bytes, self.transport.keys
        )
        if envelope.kind is not MessageKind.REPLY:
            raise MessageRejected(f"not_a_reply: {envelope.kind.value} on the replies queue")
        if self.registry.get(envelope.saga_name, envelope.saga_version) is None:
            raise MessageRejected(f"unknown_saga: {envelope.saga_name!r} v{envelope.saga_version}")
        return envelope

    def _decide(
        self,
        events: Sequence[tuple[Delivery, Envelope]],
        states: Mapping[str, SagaState],
        verdicts: dict[int, str],
    ) -> list[Decided]:
        """Each reply on the latest state of its saga (a batch may hold several)."""
        verdicts.clear()  # a retried transaction decides afresh
        now = self.clock.now()
        latest = dict(states)
        decided: list[Decided] = []
        for index, (delivery, envelope) in enumerate(events):
            state = latest.get(envelope.saga_id)
            saga = self.registry.get(envelope.saga_name, envelope.saga_version)
            if state is None or saga is None:
                verdicts[index] = f"unknown_saga_id: {envelope.saga_id!r}"
                continue
            with self.hooks.processing(envelope, delivery.queue):
                decision = engine.decide(
                    saga, state, engine.ReplyReceived(envelope, self.strict_payloads), now
                )
            if decision.rejected:
                verdicts[index] = f"rejected: {decision.rejected}"
                continue
            latest[envelope.saga_id] = decision.state
            decided.append(Decided(saga, state, decision))
        return decided

    @staticmethod
    def _log_ignored(decided: Sequence[Decided]) -> None:
        for one in decided:
            decision = one.decision
            if decision.ignored is None:
                continue
            # a duplicate or stale reply (redelivery, a retried attempt answering
            # late, a replay): acked and counted (metrics hooks), changes nothing
            state = decision.state
            log.info(
                "ignoring a reply for saga %s: %s",
                state.saga_id,
                decision.ignored,
                extra=saga_fields(state),
            )

    async def _give_back(self, delivery: Delivery, exc: Exception) -> None:
        await give_back(
            delivery,
            exc,
            limit=self.transport.topology.delivery_limit,
            dead_letter=self._dead_letter,
        )

    async def _dead_letter(self, delivery: Delivery, reason: str) -> None:
        await dead_letter(
            delivery, reason, transport=self.transport, hooks=self.hooks, what="message"
        )

    async def _prune_loop(self) -> None:
        retention = self.retention
        assert retention is not None
        await repeat(
            lambda: prune_sagas(self.store, retention, self.clock.now()),
            interval=retention.interval,
            what="saga retention",
            sleep=self.clock.sleep,
        )

    # ------------------------------------------------------------------ timers

    async def _timer_loop(self) -> None:
        while True:
            try:
                while await self.fire_timers() > 0:
                    pass
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("timer loop failed, retrying: %r", exc)
            await self.clock.sleep(self.timer_interval)

    async def fire_timers(self, limit: int = 200) -> int:
        """Apply every due timer of the sagas this coordinator knows once; returns
        how many fired. A saga whose definition raises is logged and postponed by
        ``UNDECIDABLE_RETRY`` seconds, so one bad saga cannot hold the others up."""
        now = self.clock.now()

        def decide(states: Mapping[str, SagaState]) -> list[Decided]:
            decided: list[Decided] = []
            for state in states.values():
                saga = self.registry.of(state)
                assert saga is not None  # lock_due took only kinds it knows
                try:
                    decision = engine.decide(saga, state, engine.TimerFired(), now)
                except Exception:  # one saga's bug must not hold up every other timer
                    log.exception(
                        "saga %s: deciding its due timer raised; retrying in %.0fs",
                        state.saga_id,
                        UNDECIDABLE_RETRY,
                        extra=saga_fields(state),
                    )
                    decision = engine.postpone(state, now + UNDECIDABLE_RETRY)
                if decision.changed:
                    decided.append(Decided(saga, state, decision))
            return decided

        kinds = [(saga.name, saga.version) for saga in self.registry]
        return len(await self.writer.commit(decide, due=(now, limit, kinds)))


UNDECIDABLE_RETRY = 60.0
"""Seconds before the timer of a saga whose definition raised is tried again."""


__all__ = ["Coordinator"]
