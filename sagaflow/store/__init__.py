"""Store adapters: PostgreSQL (asyncpg) for production, in-memory for tests and demos.

The PostgreSQL stores are imported on first use, so the in-memory stores work
without loading asyncpg.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from sagaflow.store.memory import InMemorySagaStore, InMemorySagaTransaction
from sagaflow.store.memory_participant import (
    InMemoryParticipantStore,
    InMemoryParticipantTransaction,
)

# Bound here so that the function, not the submodule of the same name, is
# ``sagaflow.store.migrate``.
from sagaflow.store.migrate import migrate, migrate_participant

if TYPE_CHECKING:
    from sagaflow.store.postgres import PostgresSagaStore, PostgresSagaTransaction
    from sagaflow.store.postgres_participant import (
        PostgresParticipantStore,
        PostgresParticipantTransaction,
    )

__all__ = [
    "InMemoryParticipantStore",
    "InMemoryParticipantTransaction",
    "InMemorySagaStore",
    "InMemorySagaTransaction",
    "PostgresParticipantStore",
    "PostgresParticipantTransaction",
    "PostgresSagaStore",
    "PostgresSagaTransaction",
    "migrate",
    "migrate_participant",
]

_LAZY = {
    "PostgresSagaStore": "sagaflow.store.postgres",
    "PostgresSagaTransaction": "sagaflow.store.postgres",
    "PostgresParticipantStore": "sagaflow.store.postgres_participant",
    "PostgresParticipantTransaction": "sagaflow.store.postgres_participant",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'sagaflow.store' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
