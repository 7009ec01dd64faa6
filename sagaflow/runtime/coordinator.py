"""The coordinator: consumes replies, runs the engine, commits, publishes.

Per batch of replies it does: decode; decide each event on the state of the
saga it remembers from its last commit; write states, log and outbox rows in
one statement committed on its own, whose version check fails it whole if
another writer moved a saga; then publish the new commands (their outbox rows
are deleted with the next commit). A saga it does not remember, a conflict,
or a reply that looks stale to the remembered state sends the batch through
the locking path: read the sagas with ``SELECT ... FOR UPDATE``, decide,
write, commit. Starts submitted together share one statement. The outbox
relay publishes whatever a crash left behind (rows become due
``outbox_grace`` seconds after commit), and the timer loop fires due step
timeouts and retry back-offs. Several coordinators may run against one
database: versions (and, on the locking path, row locks) serialize each
saga, ``SKIP LOCKED`` shares timers and outbox rows.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

from sagaflow.core import engine
from sagaflow.core.definition import Saga
from sagaflow.core.errors import (
    ConcurrencyConflict,
    ConfigurationError,
    MessageRejected,
    SagaflowError,
)
from sagaflow.core.fast import replace
from sagaflow.core.messages import DEFAULT_MAX_MESSAGE_BYTES, Envelope, MessageKind, decode
from sagaflow.core.ports import (
    Clock,
    Delivery,
    IdFactory,
    SagaStore,
    SagaTransaction,
    Transport,
)
from sagaflow.core.state import LogEntry, SagaState
from sagaflow.logs import saga_fields
from sagaflow.runtime.batching import Batcher, GroupCommit, give_back, retry_healing
from sagaflow.runtime.clock import SystemClock, UUIDFactory
from sagaflow.runtime.hooks import Hooks

log = logging.getLogger("sagaflow.coordinator")


class SagaRegistry:
    """The saga definitions a process knows, by name and version."""

    def __init__(self, sagas: Iterable[Saga[Any]]) -> None:
        self._by_key: dict[tuple[str, int], Saga[Any]] = {}
        self._latest: dict[str, Saga[Any]] = {}
        for saga in sagas:
            key = (saga.name, saga.version)
            if key in self._by_key:
                raise ConfigurationError(
                    f"saga {saga.name!r} version {saga.version} registered twice"
                )
            self._by_key[key] = saga
            if saga.name not in self._latest or self._latest[saga.name].version < saga.version:
                self._latest[saga.name] = saga

    def get(self, name: str, version: int | None = None) -> Saga[Any] | None:
        if version is None:
            return self._latest.get(name)
        return self._by_key.get((name, version))

    def of(self, state: SagaState) -> Saga[Any] | None:
        return self.get(state.saga_name, state.saga_version)

    @property
    def services(self) -> list[str]:
        return sorted({s for saga in self._by_key.values() for s in saga.services})

    def __iter__(self) -> Any:
        return iter(self._by_key.values())


@dataclass
class _Changes:
    """What a batch of decisions writes in one transaction."""

    states: dict[str, SagaState] = field(default_factory=dict)
    log: list[LogEntry] = field(default_factory=list)
    messages: list[Envelope] = field(default_factory=list)

    def add(self, decision: engine.Decision) -> None:
        self.states[decision.state.saga_id] = decision.state
        self.log.extend(decision.log)
        self.messages.extend(decision.messages)

    async def write(self, tx: SagaTransaction, publish_after: float) -> list[int]:
        if not (self.states or self.log or self.messages):
            return []
        return await tx.write(
            list(self.states.values()), self.log, self.messages, publish_after=publish_after
        )


class _StateCache:
    """The last committed state of the running sagas this coordinator wrote or read.

    A batch of replies for sagas found here is decided without reading them
    and written in one statement. Every save is still guarded by the version
    it was decided on, so an entry gone stale (another coordinator, an
    operator's ``sagas cancel``) costs a conflict and a pass through the
    locking path, never a wrong write.
    """

    def __init__(self, size: int) -> None:
        self._size = size
        self._states: OrderedDict[str, SagaState] = OrderedDict()

    def get_all(self, saga_ids: Iterable[str]) -> dict[str, SagaState] | None:
        """The states of all ``saga_ids``, or ``None`` if one is missing."""
        found: dict[str, SagaState] = {}
        for saga_id in saga_ids:
            state = self._states.get(saga_id)
            if state is None:
                return None
            found[saga_id] = state
        return found

    def put(self, state: SagaState) -> None:
        """Remember a committed state (its ``version`` the stored one)."""
        saga_id = state.saga_id
        if state.status.terminal or self._size <= 0:
            self._states.pop(saga_id, None)
            return
        known = self._states.get(saga_id)
        if known is not None and known.version > state.version:
            return  # a later commit got here first
        self._states[saga_id] = state
        self._states.move_to_end(saga_id)
        if len(self._states) > self._size:
            self._states.popitem(last=False)

    def saved(self, states: Iterable[SagaState]) -> None:
        """Remember states just saved: stored at their version + 1."""
        for state in states:
            self.put(replace(state, version=state.version + 1))

    def drop(self, saga_ids: Iterable[str]) -> None:
        for saga_id in saga_ids:
            self._states.pop(saga_id, None)


@dataclass
class _Replies:
    """A batch of replies decided against some states, before it is written."""

    acks: list[Delivery] = field(default_factory=list)
    rejects: list[tuple[Delivery, str]] = field(default_factory=list)
    changes: _Changes = field(default_factory=_Changes)
    decided: list[tuple[Saga[Any], SagaState, engine.Decision]] = field(default_factory=list)
    ignored: list[tuple[Envelope, str]] = field(default_factory=list)


@dataclass(frozen=True)
class SagaHandle:
    """A started saga: its id, and the state as committed when it started."""

    saga_id: str
    state: SagaState


class SagaClient:
    """Starts, cancels and retries sagas through the store alone.

    Use it from application code that is not a coordinator: messages it queues
    are published by a running coordinator's outbox relay (woken at once by a
    notification on commit). ``Coordinator`` offers the same calls and also
    publishes right after commit.
    """

    def __init__(
        self,
        sagas: Iterable[Saga[Any]] | SagaRegistry,
        *,
        store: SagaStore,
        clock: Clock | None = None,
        ids: IdFactory | None = None,
        hooks: Hooks | None = None,
    ) -> None:
        self.registry = sagas if isinstance(sagas, SagaRegistry) else SagaRegistry(sagas)
        self.store = store
        self.clock: Clock = clock or SystemClock()
        self.ids: IdFactory = ids or UUIDFactory()
        self.hooks = hooks or Hooks()
        self._starts = GroupCommit(self._commit_starts)
        self._cache = _StateCache(0)  # a client remembers nothing
        self._published: list[int] = []  # outbox rows published, to delete with the next commit

    async def start_saga(
        self,
        saga: Saga[Any],
        data: BaseModel | dict[str, Any],
        *,
        saga_id: str | None = None,
        connection: Any = None,
    ) -> SagaHandle:
        """Start a saga; with ``connection`` inside the caller's open transaction.

        Its first command goes out once the work commits: published by this
        process when it can (a ``Coordinator`` right after its own commit), else
        by a coordinator's outbox relay, woken by the commit's notification.

        Raises:
            pydantic.ValidationError: ``data`` does not fit the saga's data model.
            ConfigurationError: the saga is not registered with this client.
        """
        if self.registry.get(saga.name, saga.version) is not saga:
            raise ConfigurationError(f"saga {saga.name!r} v{saga.version} is not registered here")
        now = self.clock.now()
        sid = saga_id or self.ids.new_saga_id()
        decision = engine.start(saga, sid, data, now, trace=self.hooks.saga_started(saga, sid))
        if connection is None:
            await self._starts.submit((saga, decision))
            return SagaHandle(sid, decision.state)
        # in the caller's transaction, only the relay can publish (after it commits)
        async with self.store.transaction(connection) as tx:
            await tx.insert(decision.state)
            await tx.write((), decision.log, decision.messages, publish_after=now)
        self.hooks.decided(saga, None, decision)
        return SagaHandle(sid, decision.state)

    async def _commit_starts(self, starts: Sequence[tuple[Saga[Any], engine.Decision]]) -> None:
        """Write starts that arrived together in one commit, then publish them together."""
        decisions = [decision for _, decision in starts]
        ids = await self._commit(
            inserts=[d.state for d in decisions],
            log=[entry for d in decisions for entry in d.log],
            envelopes=[message for d in decisions for message in d.messages],
            publish_after=self._publish_after(self.clock.now()),
        )
        for saga, decision in starts:
            self.hooks.decided(saga, None, decision)
        self._committed([message for d in decisions for message in d.messages], ids)

    async def cancel_saga(self, saga_id: str, *, by: str, reason: str) -> SagaState:
        """Compensate a running saga as a business decision (ends CANCELLED)."""
        return await self._event(saga_id, engine.CancelRequested(by=by, reason=reason))

    async def retry_saga(self, saga_id: str, *, by: str, reason: str) -> SagaState:
        """Resume a FAILED saga where it stopped, with a fresh retry budget."""
        return await self._event(saga_id, engine.RetryRequested(by=by, reason=reason))

    def _publish_after(self, now: float) -> float:
        """When the relay may publish what this process queues: at once, since a
        client publishes nothing itself."""
        return now

    def _committed(self, messages: Sequence[Envelope], outbox_ids: Sequence[int]) -> None:
        """Called with the messages a committed start, cancel or retry queued."""

    async def _commit(
        self,
        *,
        inserts: Sequence[SagaState] = (),
        states: Sequence[SagaState] = (),
        log: Sequence[LogEntry] = (),
        envelopes: Sequence[Envelope] = (),
        publish_after: float,
    ) -> list[int]:
        """One unit of work in a transaction of its own (``SagaStore.commit``),
        taking along the outbox rows published since the last commit (a
        coordinator's; a client publishes nothing), and remembering what it
        wrote (a coordinator's memory; a client's holds nothing)."""
        published, self._published = self._published, []
        try:
            ids = await self.store.commit(
                inserts=inserts,
                states=states,
                log=log,
                envelopes=envelopes,
                publish_after=publish_after,
                delete_outbox=published,
            )
        except BaseException:
            self._published.extend(published)
            self._cache.drop(s.saga_id for s in states)
            raise
        for state in inserts:
            self._cache.put(state)
        self._cache.saved(states)
        return ids

    async def _event(self, saga_id: str, event: engine.Event) -> SagaState:
        now = self.clock.now()
        async with self.store.transaction() as tx:
            states = await tx.lock([saga_id])
            if saga_id not in states:
                raise SagaflowError(f"no saga with id {saga_id!r}")
            state = states[saga_id]
            saga = self.registry.of(state)
            if saga is None:
                raise ConfigurationError(
                    f"saga {state.saga_name!r} v{state.saga_version} is not registered here"
                )
            decision = engine.decide(saga, state, event, now)
            if decision.rejected:
                raise SagaflowError(decision.rejected)
            changes = _Changes()
            changes.add(decision)
            ids = await changes.write(tx, self._publish_after(now))
        self.hooks.decided(saga, state, decision)
        self._committed(changes.messages, ids)
        return decision.state

    async def get(self, saga_id: str) -> SagaState | None:
        return await self.store.get(saga_id)

    async def wait_for(
        self, saga_id: str, *, timeout: float = 60.0, poll: float = 0.05
    ) -> SagaState:
        """Poll until the saga is terminal (``run_*``-style helpers build on this)."""
        async with asyncio.timeout(timeout):
            while True:
                state = await self.store.get(saga_id)
                if state is not None and state.status.terminal:
                    return state
                await asyncio.sleep(poll)


class Coordinator(SagaClient):
    """Runs sagas: reply consumer, outbox relay and timer loop in one process.

    Args:
        sagas: The saga definitions this coordinator runs.
        store: Where state, log and outbox live.
        transport: The broker.
        max_batch: Replies handled per transaction at most.
        outbox_grace: Seconds after commit before the relay publishes a message
            the coordinator has not (it publishes right after commit itself).
        timer_interval: Seconds between scans for due timers.
        max_message_bytes: Larger replies are dead-lettered.
        cache_size: Running sagas whose last state is kept in memory, so that
            their replies are applied in one round trip; 0 reads every saga
            under a row lock first.
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
        outbox_grace: float = 5.0,
        timer_interval: float = 0.25,
        relay_interval: float = 1.0,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        cache_size: int = 10_000,
    ) -> None:
        super().__init__(sagas, store=store, clock=clock, ids=ids, hooks=hooks)
        self.transport = transport
        self.prefetch = prefetch
        self.outbox_grace = outbox_grace
        self.timer_interval = timer_interval
        self.relay_interval = relay_interval
        self.max_message_bytes = max_message_bytes
        self._batcher = Batcher(
            self._handle_batch,
            failed=self._give_back,
            max_batch=max_batch,
            concurrency=concurrency,
            name="coordinator",
        )
        self._tasks: list[asyncio.Task[None]] = []
        self._settling: set[asyncio.Task[None]] = set()
        self._stopped = asyncio.Event()
        self._cache = _StateCache(cache_size)

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Connect, declare, and start consumer, relay and timers (all eagerly)."""
        await retry_healing(self.store.start, what="store start", sleep=self.clock.sleep)
        await retry_healing(
            lambda: self.transport.start(self.registry.services),
            what="transport start",
            sleep=self.clock.sleep,
        )
        self._batcher.start()
        await self.transport.consume(
            self.transport.topology.replies_queue, self._batcher.put, prefetch=self.prefetch
        )
        self._tasks = [
            asyncio.create_task(self._relay_loop(), name="outbox-relay"),
            asyncio.create_task(self._timer_loop(), name="timers"),
        ]
        log.info("coordinator started: sagas=%s", [f"{s.name}@{s.version}" for s in self.registry])

    async def stop(self) -> None:
        """Stop consuming, finish batches in hand, publish what they produced, close."""
        self._stopped.set()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._batcher.stop()
        await asyncio.gather(*self._settling, return_exceptions=True)
        await self._delete_published()
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
        return self._batcher.idle and not self._settling

    # ------------------------------------------------------------------ starting

    def _publish_after(self, now: float) -> float:
        return now + self.outbox_grace  # published right after commit; the relay is the net

    def _committed(self, messages: Sequence[Envelope], outbox_ids: Sequence[int]) -> None:
        if messages:
            self._settle([], [], messages, outbox_ids)

    async def _delete_published(self) -> None:
        """Delete the published outbox rows no commit has taken along yet."""
        published, self._published = self._published, []
        try:
            await self.store.delete_outbox(published)
        except asyncio.CancelledError:
            self._published.extend(published)
            raise
        except Exception as exc:
            self._published.extend(published)
            log.warning("deleting published outbox rows failed: %r", exc)

    async def run_saga(
        self, saga: Saga[Any], data: BaseModel | dict[str, Any], *, timeout: float = 60.0
    ) -> SagaState:
        """Start a saga and wait for its terminal state."""
        handle = await self.start_saga(saga, data)
        return await self.wait_for(handle.saga_id, timeout=timeout)

    # ------------------------------------------------------------------ replies

    async def _handle_batch(self, deliveries: Sequence[Delivery]) -> None:
        events: list[tuple[Delivery, Envelope]] = []
        rejects: list[tuple[Delivery, str]] = []
        for delivery in deliveries:
            try:
                envelope = decode(delivery.body, dict(delivery.headers), self.max_message_bytes)
                if envelope.kind is not MessageKind.REPLY:
                    raise MessageRejected(
                        f"not_a_reply: {envelope.kind.value} on the replies queue"
                    )
                if self.registry.get(envelope.saga_name, envelope.saga_version) is None:
                    raise MessageRejected(
                        f"unknown_saga: {envelope.saga_name!r} v{envelope.saga_version}"
                    )
                events.append((delivery, envelope))
            except MessageRejected as exc:
                rejects.append((delivery, exc.reason))

        async def transact() -> tuple[
            list[Delivery], list[tuple[Delivery, str]], _Changes, list[int]
        ]:
            return await self._apply_replies(events)

        acks: list[Delivery] = []
        changes = _Changes()
        ids: list[int] = []
        if events:
            acks, more_rejects, changes, ids = await retry_healing(
                transact, what="reply transaction", sleep=self.clock.sleep
            )
            rejects.extend(more_rejects)
        self._settle(acks, rejects, changes.messages, ids)

    async def _apply_replies(
        self, events: Sequence[tuple[Delivery, Envelope]]
    ) -> tuple[list[Delivery], list[tuple[Delivery, str]], _Changes, list[int]]:
        saga_ids = sorted({env.saga_id for _, env in events})
        cached = self._cache.get_all(saga_ids)
        if cached is not None:
            # Decided on the remembered states and written in one statement. Only
            # when every reply changes its saga: a stale state could make a
            # current reply look like a duplicate, and duplicates are not guarded.
            now = self.clock.now()
            replies = self._decide(events, cached, now)
            if not (replies.rejects or replies.ignored):
                changes = replies.changes
                try:
                    ids = await self._commit(
                        states=list(changes.states.values()),
                        log=changes.log,
                        envelopes=changes.messages,
                        publish_after=now + self.outbox_grace,
                    )
                except ConcurrencyConflict as exc:
                    log.debug("remembered states went stale, locking instead: %s", exc)
                else:
                    return self._decided(replies, ids)
            self._cache.drop(saga_ids)
        now = self.clock.now()
        async with self.store.transaction() as tx:
            states = await tx.lock(saga_ids)
            replies = self._decide(events, states, now)
            ids = await replies.changes.write(tx, now + self.outbox_grace)
        for state in states.values():
            self._cache.put(state)
        self._cache.saved(replies.changes.states.values())
        return self._decided(replies, ids)

    def _decide(
        self,
        events: Sequence[tuple[Delivery, Envelope]],
        states: dict[str, SagaState],
        now: float,
    ) -> _Replies:
        replies = _Replies()
        changes = replies.changes
        for delivery, env in events:
            state = changes.states.get(env.saga_id) or states.get(env.saga_id)
            saga = self.registry.get(env.saga_name, env.saga_version)
            if state is None or saga is None:
                replies.rejects.append((delivery, f"unknown_saga_id: {env.saga_id!r}"))
                continue
            with self.hooks.processing(env, delivery.queue):
                decision = engine.decide(saga, state, engine.ReplyReceived(env), now)
            if decision.rejected:
                replies.rejects.append((delivery, f"rejected: {decision.rejected}"))
                continue
            replies.acks.append(delivery)
            if decision.changed:
                changes.add(decision)
            else:
                replies.ignored.append((env, decision.ignored or "unchanged"))
            replies.decided.append((saga, state, decision))
        return replies

    def _decided(
        self, replies: _Replies, ids: list[int]
    ) -> tuple[list[Delivery], list[tuple[Delivery, str]], _Changes, list[int]]:
        """After commit: log ignored replies, tell the hooks."""
        for env, why in replies.ignored:
            # a duplicate or stale reply (redelivery, a retried attempt answering
            # late, a replay): acked and counted (metrics hooks), changes nothing
            log.info(
                "ignoring a reply for saga %s step %s attempt %d: %s",
                env.saga_id,
                env.step,
                env.attempt,
                why,
                extra=saga_fields(env),
            )
        for saga, before, decision in replies.decided:
            self.hooks.decided(saga, before, decision)
        return replies.acks, replies.rejects, replies.changes, ids

    # ------------------------------------------------------------------ settle

    def _settle(
        self,
        acks: Sequence[Delivery],
        rejects: Sequence[tuple[Delivery, str]],
        messages: Sequence[Envelope],
        outbox_ids: Sequence[int],
    ) -> None:
        """After commit: publish, drop the outbox rows, settle deliveries (in the background)."""
        task = asyncio.create_task(self._settle_now(acks, rejects, messages, outbox_ids))
        self._settling.add(task)
        task.add_done_callback(self._settling.discard)

    async def _settle_now(
        self,
        acks: Sequence[Delivery],
        rejects: Sequence[tuple[Delivery, str]],
        messages: Sequence[Envelope],
        outbox_ids: Sequence[int],
    ) -> None:
        if messages:
            try:
                await self._publish(messages)
                self._published.extend(outbox_ids)  # deleted with the next commit
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the relay publishes them once the outbox rows are due
                log.warning("publish after commit failed; the relay will retry: %r", exc)
        for delivery in acks:
            await delivery.ack()
        for delivery, reason in rejects:
            await self._dead_letter(delivery, reason)

    async def _publish(self, envelopes: Sequence[Envelope]) -> None:
        with self.hooks.publishing(envelopes) as outgoing:
            await self.transport.publish(outgoing)

    async def _give_back(self, delivery: Delivery, exc: Exception) -> None:
        await give_back(
            delivery,
            exc,
            limit=self.transport.topology.delivery_limit,
            dead_letter=self._dead_letter,
        )

    async def _dead_letter(self, delivery: Delivery, reason: str) -> None:
        log.warning("dead-lettering a message from %s: %s", delivery.queue, reason)
        self.hooks.dead_lettered(delivery.queue, reason)
        try:
            await self.transport.dead_letter(delivery, reason)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # not acked: it comes back and is judged again
            log.warning("dead-lettering failed: %r", exc)

    # ------------------------------------------------------------------ relay and timers

    async def _relay_loop(self) -> None:
        while True:
            try:
                await self.store.wait_for_outbox(self.relay_interval)
                if self._published:  # no commit took them along: none since the last wake
                    await self._delete_published()
                while await self.relay_once() > 0:
                    pass
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("outbox relay failed, retrying: %r", exc)
                await self.clock.sleep(self.relay_interval)

    async def relay_once(self, limit: int = 500) -> int:
        """Publish due outbox rows once; returns how many were published."""
        async with self.store.claim_outbox(self.clock.now(), limit) as items:
            if items:
                envelopes = [item.envelope for item in items]
                await self._publish(envelopes)
            return len(items)

    async def _timer_loop(self) -> None:
        while True:
            try:
                while await self.fire_timers() > 0:
                    pass
                await self.clock.sleep(self.timer_interval)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("timer loop failed, retrying: %r", exc)
                await self.clock.sleep(self.timer_interval)

    async def fire_timers(self, limit: int = 200) -> int:
        """Apply every due timer once; returns how many fired."""
        now = self.clock.now()
        changes = _Changes()
        decided: list[tuple[Saga[Any], SagaState, engine.Decision]] = []
        async with self.store.transaction() as tx:
            for state in await tx.lock_due(now, limit):
                saga = self.registry.of(state)
                if saga is None:
                    log.error(
                        "saga %s: definition %s v%s not registered here",
                        state.saga_id,
                        state.saga_name,
                        state.saga_version,
                        extra=saga_fields(state),
                    )
                    continue
                decision = engine.decide(saga, state, engine.TimerFired(), now)
                if decision.changed:
                    changes.add(decision)
                    decided.append((saga, state, decision))
            ids = await changes.write(tx, now + self.outbox_grace)
        self._cache.saved(changes.states.values())
        for saga, before, decision in decided:
            self.hooks.decided(saga, before, decision)
        if changes.messages:
            self._settle([], [], changes.messages, ids)
        return len(decided)


__all__ = ["Coordinator", "SagaClient", "SagaHandle", "SagaRegistry"]
