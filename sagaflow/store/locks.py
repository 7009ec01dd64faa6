"""What the in-memory stores share: per-key locks owned by transactions (their row
locks), and running a block on a transaction that stages its writes."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Protocol, TypeVar

__all__ = ["KeyedLocks", "staged"]


class _Staged(Protocol):
    def _commit(self) -> None: ...

    def _release(self) -> None: ...


T = TypeVar("T", bound=_Staged)


@asynccontextmanager
async def staged(txn: T) -> AsyncIterator[T]:
    """Run a block on ``txn``: apply its staged writes if the block exits cleanly
    (all at once, with no ``await`` in between), release its locks either way."""
    try:
        yield txn
        txn._commit()
    finally:
        txn._release()


class KeyedLocks:
    """Exclusive per-key locks owned by transactions, granted first come first served."""

    __slots__ = ("_owners", "_waiters")

    def __init__(self) -> None:
        self._owners: dict[str, object] = {}
        self._waiters: dict[str, deque[tuple[object, asyncio.Future[None]]]] = {}

    def owner(self, key: str) -> object | None:
        return self._owners.get(key)

    def try_acquire(self, key: str, owner: object) -> bool:
        current = self._owners.get(key)
        if current is None:
            self._owners[key] = owner
            return True
        return current is owner

    async def acquire(self, key: str, owner: object) -> None:
        if self.try_acquire(key, owner):
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        queue = self._waiters.setdefault(key, deque())
        queue.append((owner, future))
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self.release(key, owner)  # granted just as we were cancelled: pass it on
            else:
                queue.remove((owner, future))
                if not queue and self._waiters.get(key) is queue:
                    del self._waiters[key]
            raise

    def release(self, key: str, owner: object) -> None:
        if self._owners.get(key) is not owner:
            return
        queue = self._waiters.get(key)
        while queue:
            next_owner, future = queue.popleft()
            if not future.done():
                self._owners[key] = next_owner
                future.set_result(None)
                if not queue:
                    del self._waiters[key]
                return
        self._waiters.pop(key, None)
        del self._owners[key]
