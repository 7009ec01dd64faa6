"""The ports: the small protocols the runtime talks to, and nothing else.

Adapters come in pairs, technology + role: ``RabbitMQTransport`` /
``InMemoryTransport``, ``PostgresSagaStore`` / ``InMemorySagaStore``,
``PostgresParticipantStore`` / ``InMemoryParticipantStore``. A contract test
suite runs against both members of each pair.
"""

from __future__ import annotations

import builtins
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from sagaflow.core.fingerprint import DefinitionRecord
from sagaflow.core.messages import Envelope
from sagaflow.core.signing import Keys
from sagaflow.core.state import LogEntry, SagaState, SagaStatus


class Clock(Protocol):
    def now(self) -> float:
        """Seconds since the epoch."""
        ...

    async def sleep(self, seconds: float) -> None: ...


class IdFactory(Protocol):
    def new_saga_id(self) -> str: ...


# --------------------------------------------------------------------------- transport


@dataclass(frozen=True)
class Topology:
    """Names of the broker objects; one namespace per deployment (``prefix``)."""

    prefix: str = "sagaflow"
    delivery_limit: int = 5

    @property
    def commands_exchange(self) -> str:
        return f"{self.prefix}.commands"

    @property
    def replies_exchange(self) -> str:
        return f"{self.prefix}.replies"

    @property
    def replies_queue(self) -> str:
        return f"{self.prefix}.replies"

    @property
    def dead_letter_exchange(self) -> str:
        return f"{self.prefix}.dlx"

    @property
    def dead_letter_queue(self) -> str:
        return f"{self.prefix}.dead-letter"

    def service_queue(self, service: str) -> str:
        return f"{self.prefix}.service.{service}"


class Delivery(Protocol):
    """One received message, not yet settled."""

    @property
    def body(self) -> bytes: ...

    @property
    def headers(self) -> Mapping[str, str]:
        """String AMQP headers (``traceparent``, ``x-saga-*``...), and
        ``x-delivery-count``, the broker's count of earlier deliveries, when the
        message was delivered before."""
        ...

    @property
    def queue(self) -> str: ...

    @property
    def redelivered(self) -> bool: ...

    async def ack(self) -> None: ...

    async def nack(self, requeue: bool = True) -> None:
        """Return the message; each return counts toward the queue's delivery limit."""
        ...


@dataclass(frozen=True)
class DeadLetter:
    """A dead-lettered message as the operator sees it."""

    id: str
    reason: str
    source_queue: str
    body: bytes
    headers: Mapping[str, str]


DeliveryCallback = Callable[[Delivery], Awaitable[None] | None]
"""Called once per delivery; it must settle the delivery, now or later.

A callback that returns ``None`` took the delivery synchronously (the
coordinator and the worker put it on their batch queue): transports call it
inline, with no task per message. One that returns an awaitable runs in a task
of its own. If it raises, the delivery is nacked (requeued).
"""


class Transport(Protocol):
    """Moves envelopes. Publishing is confirmed; consuming is acknowledged.

    With ``keys``, every message published is signed, and receivers (the
    runtime's ``decode``, dead-letter replay) accept only messages signed by
    the key of the service whose action they are about.
    """

    topology: Topology
    keys: Keys | None

    async def start(self, services: Sequence[str]) -> None:
        """Connect and declare the topology, with a durable queue per service."""
        ...

    async def close(self) -> None: ...

    async def publish(self, envelopes: Sequence[Envelope]) -> None:
        """Publish persistently; return only when every message is confirmed.

        Commands and compensations go to the commands exchange with the service
        as routing key; replies to the replies exchange.

        Raises:
            TransportError: a message was nacked, unroutable or the link failed.
            MessageRejected: a message can never be sent (``too_large``); none
                of the batch was.
        """
        ...

    async def consume(self, queue: str, callback: DeliveryCallback, *, prefetch: int) -> None:
        """Start a consumer that survives reconnects and consumer cancellation."""
        ...

    async def dead_letter(self, delivery: Delivery, reason: str) -> None:
        """Move a delivery to the dead-letter queue with ``reason`` in its headers."""
        ...

    async def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        """Peek at dead-lettered messages without removing them."""
        ...

    async def replay_dead_letters(self, ids: Sequence[str] | None = None) -> list[str]:
        """Re-publish dead-lettered messages to where their envelopes say; returns
        the ids of those re-published (a message that is not a valid, signed
        envelope stays)."""
        ...


# --------------------------------------------------------------------------- saga store


@dataclass(frozen=True)
class OutboxItem:
    id: int
    envelope: Envelope


@dataclass(frozen=True)
class Pruned:
    """What one prune deleted: sagas and their log entries."""

    sagas: int = 0
    log_entries: int = 0

    def __add__(self, other: Pruned) -> Pruned:
        return Pruned(self.sagas + other.sagas, self.log_entries + other.log_entries)


@dataclass(frozen=True)
class UnitOfWork:
    """Everything one transaction writes for a batch of decisions.

    ``inserts`` are new sagas; ``states`` are sagas read in the transaction,
    saved back (each at the ``version`` it was read at, which the store bumps);
    ``log`` is appended in order; ``messages`` go to the outbox, in order, for
    the relay to publish once the transaction has committed.
    """

    inserts: Sequence[SagaState] = ()
    states: Sequence[SagaState] = ()
    log: Sequence[LogEntry] = ()
    messages: Sequence[Envelope] = ()

    def __bool__(self) -> bool:
        return bool(self.inserts or self.states or self.log or self.messages)


class SagaTransaction(Protocol):
    """One atomic unit of coordinator work: read and lock, then write it all at once."""

    async def lock(self, saga_ids: Sequence[str]) -> dict[str, SagaState]:
        """Load and lock sagas (in id order, so concurrent lockers never deadlock);
        unknown ids are absent from the result."""
        ...

    async def lock_due(
        self, now: float, limit: int, kinds: Sequence[tuple[str, int]]
    ) -> list[SagaState]:
        """Lock up to ``limit`` sagas whose timer is due, earliest first, skipping
        ones locked elsewhere and ones whose ``(saga_name, saga_version)`` is not
        in ``kinds`` (a coordinator takes only what it can decide: sagas of a
        definition it does not know must not fill its batches for ever)."""
        ...

    async def write(self, unit: UnitOfWork) -> None:
        """Write ``unit`` (one round trip where the store can); it commits with
        the transaction.

        Raises:
            StoreError: a saga of ``unit.inserts`` exists (the transaction is
                then unusable: roll it back), or the store failed.
            ConcurrencyConflict: a saga of ``unit.states`` is no longer at its
                version.
            ValueError: a saga appears twice in ``unit.states``.
        """
        ...


class SagaStore(Protocol):
    """Where sagas, their logs and the outbox live."""

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    def transaction(self, connection: Any = None) -> AbstractAsyncContextManager[SagaTransaction]:
        """A transaction, committed when the block exits cleanly; with ``connection``
        (the caller's, already in a transaction) the work joins the caller's
        transaction and commits with it. A commit that queued messages wakes
        :meth:`wait_for_outbox` (in this process at once, in others by a hint)."""
        ...

    def claim_outbox(self, limit: int) -> AbstractAsyncContextManager[list[OutboxItem]]:
        """Claim up to ``limit`` outbox rows, oldest first, skipping rows claimed
        elsewhere; they are deleted when the block exits without error."""
        ...

    async def wait_for_outbox(self, timeout: float) -> None:
        """Return when outbox rows may be waiting (a hint), or after ``timeout``."""
        ...

    async def get(self, saga_id: str) -> SagaState | None: ...

    async def list(
        self,
        *,
        status: SagaStatus | None = None,
        name: str | None = None,
        limit: int = 100,
        overdue_at: float | None = None,
    ) -> list[SagaState]:
        """Sagas, newest first; with ``overdue_at``, only those overdue then: marked
        overdue, or unfinished with their deadline at or before it."""
        ...

    async def log(self, saga_id: str) -> builtins.list[LogEntry]: ...

    async def outbox_stats(self, now: float) -> tuple[int, float]:
        """Backlog size and age in seconds of its oldest row."""
        ...

    async def record_definitions(
        self, records: Sequence[DefinitionRecord]
    ) -> builtins.list[DefinitionRecord]:
        """Record each definition's fingerprint unless its name and version are
        recorded already (the first record wins, even when two processes race),
        and return the records the store holds for those names and versions."""
        ...

    async def prune(self, statuses: Sequence[SagaStatus], before: float, limit: int) -> Pruned:
        """Delete up to ``limit`` sagas in ``statuses`` (terminal ones only) whose
        last change is older than ``before`` (seconds since the epoch), with their
        log, in one short transaction; sagas locked elsewhere are skipped.

        Raises:
            ValueError: a status is not terminal (running sagas are never pruned).
        """
        ...


# --------------------------------------------------------------------------- participant store

Tombstone = Literal["tombstone"]
TOMBSTONE: Tombstone = "tombstone"


class ParticipantTransaction(Protocol):
    """A participant's transaction: the business effect and the inbox commit together."""

    @property
    def connection(self) -> Any:
        """The database connection handed to handlers (``None`` in memory)."""
        ...

    def savepoint(self) -> AbstractAsyncContextManager[None]:
        """Undo everything done inside the block if it raises (the handler's SQL
        and the inbox writes); nothing else of the transaction. Entering costs
        one round trip where the store has one; leaving cleanly, none."""
        ...

    async def claim(self, command_ids: Sequence[str]) -> dict[str, Envelope | Tombstone]:
        """Claim command ids, in one round trip where the store can.

        Returns what was stored for the ids seen before (their reply, or a
        tombstone); every other id is now claimed by this transaction. A
        concurrent claim of the same id waits until the first transaction ends.
        """
        ...

    async def complete(self, replies: Sequence[Envelope]) -> None:
        """Store the replies of claimed commands (by their ``command_id``).

        Raises:
            StoreError: a command is already done or tombstoned.
        """
        ...

    async def tombstone(self, command_id: str) -> Envelope | Tombstone | None:
        """Mark a command as never to be applied, unless it already was.

        Returns what was stored before (``None`` if nothing: the tombstone is now set).
        """
        ...


class ParticipantStore(Protocol):
    """A participant's database: its inbox, and the connections handlers write on."""

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    def transaction(self) -> AbstractAsyncContextManager[ParticipantTransaction]:
        """One command's transaction, committed when the block exits cleanly: the
        one commit point of a command (the worker publishes its reply only after).

        An exception leaving the block rolls it back and propagates, except a
        failure that heals: a database error from a handler's own SQL that means
        a lost deadlock or serialization check leaves as ``ConcurrencyConflict``,
        a lost connection as ``StoreError``.
        """
        ...

    async def prune_inbox(self, before: float, limit: int) -> int:
        """Delete up to ``limit`` inbox rows written before ``before`` (seconds
        since the epoch), in one short transaction; returns how many.

        A row must outlive every copy of its command (docs/operations.md,
        "Retention"): a command redelivered after its row is gone runs again.
        """
        ...
