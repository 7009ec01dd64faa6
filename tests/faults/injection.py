"""Fault injection the fault suite wraps around a real coordinator or worker.

None of this ships in sagaflow: ``python -m tests.faults.proc`` (see
``proc.py``) builds the same processes as ``sagaflow coordinator`` and
``sagaflow worker`` and wraps their parts in these, as its environment says:

- :class:`DuplicatingTransport` (``FAULTS_DUPLICATE=1``): every message is
  published twice, out of order;
- :class:`KillAfterCommit` (``FAULTS_KILL_AFTER_COMMIT``, a worker): the
  process SIGKILLs itself right after a command's transaction committed,
  before the reply is published and the command acked;
- :class:`Poison` (``FAULTS_POISON_SAGA``): the messages of one saga make the
  runtime's ``processing`` hook raise, as a bug in a user's hook would.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import signal
import sys
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import AbstractContextManager, asynccontextmanager, contextmanager
from typing import Any

from sagaflow import Hooks
from sagaflow.core.messages import Envelope
from sagaflow.core.ports import (
    DeadLetter,
    Delivery,
    DeliveryCallback,
    ParticipantStore,
    ParticipantTransaction,
    Topology,
    Transport,
)
from sagaflow.core.signing import Keys

__all__ = [
    "DUPLICATE_ENV",
    "KILL_AFTER_COMMIT_ENV",
    "POISON_ENV",
    "DuplicatingTransport",
    "KillAfterCommit",
    "Poison",
    "PoisonedMessage",
    "kill_rule",
]

log = logging.getLogger("tests.faults")

DUPLICATE_ENV = "FAULTS_DUPLICATE"
"""``1``: the process publishes every message twice, out of order."""
KILL_AFTER_COMMIT_ENV = "FAULTS_KILL_AFTER_COMMIT"
"""A worker SIGKILLs itself after committing: a probability ``0..1`` per
transaction, or ``once:<N>`` after its N-th."""
POISON_ENV = "FAULTS_POISON_SAGA"
"""A saga id: handling any of its messages raises :class:`PoisonedMessage`."""

KILLED_AFTER_COMMIT = "fault injection: SIGKILL after commit"
"""The log line written right before the kill (the crash scenario counts them)."""


# --------------------------------------------------------------------------- duplicates


class DuplicatingTransport:
    """A transport decorator that publishes every message twice, out of order.

    Each ``publish`` sends the batch in a shuffled order and returns once the
    inner transport confirmed it, exactly as the wrapped transport would; then,
    in the background and after a random delay, it publishes every message a
    second time, each copy on its own, so a copy can arrive after messages the
    saga sent later (a stale command, a reply for a step already finished).
    Consuming, dead-lettering and the dead-letter queue are passed through.

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

    @property
    def keys(self) -> Keys | None:
        return self.inner.keys

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
            "fault injection: %d duplicate messages sent, %d lost",
            self.duplicates_sent,
            self.duplicates_lost,
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

    async def replay_dead_letters(self, ids: Sequence[str] | None = None) -> list[str]:
        return await self.inner.replay_dead_letters(ids)


# --------------------------------------------------------------------------- kill after commit


def _kill_self() -> None:
    log.warning(KILLED_AFTER_COMMIT)
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def kill_rule(spec: str, *, rng: Callable[[], float] = random.random) -> Callable[[int], bool]:
    """Whether to kill after the N-th commit, from ``FAULTS_KILL_AFTER_COMMIT``.

    Args:
        spec: A probability ``0..1`` of a kill after each commit, or ``once:<N>``
            for a kill after the N-th commit of this process.
        rng: Random numbers in [0, 1).

    Raises:
        ValueError: the spec is neither form.
    """
    text = spec.strip().lower()
    if text.startswith("once:"):
        try:
            nth = int(text.removeprefix("once:"))
        except ValueError:
            nth = 0
        if nth < 1:
            raise ValueError(f"{KILL_AFTER_COMMIT_ENV}={spec!r}: 'once:<N>' needs N >= 1")
        return lambda committed: committed == nth
    try:
        probability = float(text)
    except ValueError:
        probability = -1.0
    if not 0.0 <= probability <= 1.0:
        raise ValueError(
            f"{KILL_AFTER_COMMIT_ENV}={spec!r}: expected a probability 0..1 or 'once:<N>'"
        )
    return lambda committed: rng() < probability


class _Claiming:
    """A transaction that notes whether it claimed commands (the rest is passed through)."""

    def __init__(self, inner: ParticipantTransaction) -> None:
        self._inner = inner
        self.claimed = False

    async def claim(self, command_ids: Sequence[str]) -> Any:
        self.claimed = self.claimed or bool(command_ids)
        return await self._inner.claim(command_ids)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class KillAfterCommit:
    """A participant store decorator: SIGKILL right after a command's transaction commits.

    ``transaction()`` is the one commit point of a command (the worker publishes
    the reply and acks only after it), so dying right after it is the worst
    moment: the effect is in the database, the broker will deliver the command
    again. Only transactions that claimed commands count (not a participant's
    setup).

    Args:
        inner: The real store.
        should_kill: Given the number of commits so far (this one included),
            whether to die now (:func:`kill_rule`).
        kill: What dying means (SIGKILL of this process by default).
    """

    def __init__(
        self,
        inner: ParticipantStore,
        should_kill: Callable[[int], bool],
        *,
        kill: Callable[[], None] = _kill_self,
    ) -> None:
        self.inner = inner
        self.should_kill = should_kill
        self.kill = kill
        self.committed = 0

    async def start(self) -> None:
        await self.inner.start()

    async def close(self) -> None:
        await self.inner.close()

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[ParticipantTransaction]:
        async with self.inner.transaction() as tx:
            claiming = _Claiming(tx)
            yield claiming  # a ParticipantTransaction: claim() here, the rest by __getattr__
        if claiming.claimed:  # committed: the block left without an exception
            self.committed += 1
            if self.should_kill(self.committed):
                self.kill()


# --------------------------------------------------------------------------- poison


class PoisonedMessage(Exception):
    """What handling a poisoned message raises (a bug in a hook, say)."""


class Poison(Hooks):
    """Hooks whose ``processing`` raises for every message of one saga, until
    its first message was dead-lettered: then the poison is spent.

    A message that always raises must be returned to the queue and
    dead-lettered on its last delivery, never retried forever; once it is, the
    saga carries on through its step timeout and retry policy (a new attempt,
    the same command, the worker answering from its inbox).

    Attributes:
        raised: How many times ``processing`` raised.
        spent: The first poisoned message was dead-lettered.
    """

    def __init__(self, saga_id: str) -> None:
        self.saga_id = saga_id
        self.raised = 0
        self.spent = False

    def processing(self, envelope: Envelope, queue: str) -> AbstractContextManager[dict[str, str]]:
        if self.spent or envelope.saga_id != self.saga_id:
            return super().processing(envelope, queue)
        return self._raising(envelope, queue)

    @contextmanager
    def _raising(self, envelope: Envelope, queue: str) -> Iterator[dict[str, str]]:
        self.raised += 1
        log.warning(
            "fault injection: poisoned %s %s of saga %s (%d so far)",
            envelope.kind.value,
            envelope.type,
            envelope.saga_id,
            self.raised,
        )
        raise PoisonedMessage(f"poisoned message of saga {self.saga_id} on {queue}")
        yield envelope.trace  # unreachable: makes this a generator

    def dead_lettered(self, queue: str, reason: str) -> None:
        if f"PoisonedMessage: poisoned message of saga {self.saga_id} " in reason:
            self.spent = True
            log.warning("fault injection: the poison of saga %s is spent: %s", self.saga_id, reason)
