"""The in-memory participant store: supported code for tests and the demo.

It keeps the semantics of the PostgreSQL participant store (the contract suite
runs on both): a transaction stages its inbox writes and applies them when its
block exits cleanly; claimed keys stay locked until the transaction ends.
Handlers' effects live in the services' own objects, which a rollback cannot
undo: a handler that refuses must write nothing before it raises.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from types import TracebackType
from typing import NamedTuple

from sagaflow.core.errors import StoreError
from sagaflow.core.messages import Envelope
from sagaflow.core.ports import TOMBSTONE, Clock, Tombstone
from sagaflow.store.locks import KeyedLocks, staged

__all__ = ["InMemoryParticipantStore", "InMemoryParticipantTransaction"]


class _InboxEntry(NamedTuple):
    status: str  # "pending" | "done" | "tombstone"
    reply: Envelope | None
    created_at: float = 0.0  # set when first committed, like the table's now()


def _stored(entry: _InboxEntry) -> Envelope | Tombstone | None:
    if entry.status == "tombstone":
        return TOMBSTONE
    return entry.reply if entry.status == "done" else None


class InMemoryParticipantTransaction:
    """The :class:`~sagaflow.core.ports.ParticipantTransaction` in memory.

    Inbox writes are staged and applied at commit. Keys claimed here stay locked
    until the transaction ends, even when a savepoint undoes the claim.
    """

    __slots__ = ("_held", "_store", "_writes")

    def __init__(self, store: InMemoryParticipantStore) -> None:
        self._store = store
        self._writes: dict[str, _InboxEntry] = {}
        self._held: set[str] = set()

    @property
    def connection(self) -> None:
        """Always ``None``: handlers get no database connection in memory."""
        return None

    def savepoint(self) -> _Savepoint:
        """A block whose inbox writes are undone if it raises."""
        return _Savepoint(self)

    def _commit(self) -> None:
        inbox = self._store._inbox
        now = self._store._now()
        for command_id, entry in self._writes.items():
            stored = inbox.get(command_id)
            created_at = now if stored is None else stored.created_at
            inbox[command_id] = entry._replace(created_at=created_at)

    def _release(self) -> None:
        locks = self._store._locks
        for key in self._held:
            locks.release(key, self)
        self._held.clear()

    async def _entry(self, command_id: str) -> _InboxEntry | None:
        locks = self._store._locks
        if not locks.try_acquire(command_id, self):
            await locks.acquire(command_id, self)
        self._held.add(command_id)
        entry = self._writes.get(command_id)
        return self._store._inbox.get(command_id) if entry is None else entry

    async def claim(self, command_ids: Sequence[str]) -> dict[str, Envelope | Tombstone]:
        """Claim command ids (in id order): what was stored for those seen before.

        A concurrent claim of the same id waits until the first transaction ends.
        """
        stored: dict[str, Envelope | Tombstone] = {}
        for command_id in sorted(set(command_ids)):
            entry = await self._entry(command_id)
            found = None if entry is None else _stored(entry)
            if found is None:
                self._writes[command_id] = _InboxEntry("pending", None)
            else:
                stored[command_id] = found
        return stored

    async def complete(self, replies: Sequence[Envelope]) -> None:
        """Store the replies of claimed (or not yet seen) commands.

        Raises:
            StoreError: a command is already done or tombstoned.
        """
        for reply in replies:
            entry = await self._entry(reply.command_id)
            if entry is not None and entry.status != "pending":
                raise StoreError(f"command {reply.command_id!r} is already done or tombstoned")
            self._writes[reply.command_id] = _InboxEntry("done", reply)

    async def tombstone(self, command_id: str) -> Envelope | Tombstone | None:
        """Mark a command as never to be applied, unless it already was.

        Returns:
            ``None`` when the tombstone is now set, else what was stored.
        """
        entry = await self._entry(command_id)
        if entry is None or entry.status == "pending":
            self._writes[command_id] = _InboxEntry("tombstone", None)
            return None
        return _stored(entry)


class _Savepoint:
    __slots__ = ("_snapshot", "_txn")

    def __init__(self, txn: InMemoryParticipantTransaction) -> None:
        self._txn = txn
        self._snapshot: dict[str, _InboxEntry] = {}

    async def __aenter__(self) -> None:
        self._snapshot = dict(self._txn._writes)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is not None:
            self._txn._writes = self._snapshot


class InMemoryParticipantStore:
    """The :class:`~sagaflow.core.ports.ParticipantStore` in memory.

    Args:
        clock: Stamps inbox rows when they are first committed (for
            :meth:`prune_inbox`); the system clock by default.
    """

    def __init__(self, *, clock: Clock | None = None) -> None:
        self._now = time.time if clock is None else clock.now
        self._inbox: dict[str, _InboxEntry] = {}
        self._locks = KeyedLocks()

    async def start(self) -> None:
        """Nothing to open."""

    async def close(self) -> None:
        """Nothing to close."""

    def transaction(self) -> AbstractAsyncContextManager[InMemoryParticipantTransaction]:
        """A transaction: the inbox records of the commands it handles."""
        return staged(InMemoryParticipantTransaction(self))

    async def prune_inbox(self, before: float, limit: int) -> int:
        """Delete up to ``limit`` inbox rows first committed before ``before``;
        rows a transaction holds are skipped. Returns how many."""
        locks = self._locks
        old = (
            command_id
            for command_id, entry in self._inbox.items()
            if entry.created_at < before and locks.owner(command_id) is None
        )
        doomed = list(itertools.islice(old, limit))
        for command_id in doomed:
            del self._inbox[command_id]
        return len(doomed)
