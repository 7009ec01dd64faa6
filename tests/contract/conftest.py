"""The stores under contract: each test runs on the in-memory stores and on
PostgreSQL (a fresh database per test, marked ``integration``)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from sagaflow.core.ports import ParticipantStore, SagaStore
from sagaflow.store import (
    InMemoryParticipantStore,
    InMemorySagaStore,
    PostgresParticipantStore,
    PostgresSagaStore,
)
from sagaflow.store.migrate import migrate

BACKENDS = ["memory", pytest.param("postgres", marks=pytest.mark.integration)]


@pytest.fixture(params=BACKENDS)
def database(request: pytest.FixtureRequest) -> str | None:
    """``None`` for the in-memory stores, else the URL of a fresh PostgreSQL database."""
    if request.param == "memory":
        return None
    url: str = request.getfixturevalue("pg_url")
    return url


@pytest.fixture
async def store(database: str | None) -> AsyncIterator[SagaStore]:
    saga_store: SagaStore
    if database is None:
        saga_store = InMemorySagaStore()
    else:
        await migrate(database)
        saga_store = PostgresSagaStore(database)
    await saga_store.start()
    yield saga_store
    await saga_store.close()


@pytest.fixture
async def participant(database: str | None) -> AsyncIterator[ParticipantStore]:
    inbox: ParticipantStore
    if database is None:
        inbox = InMemoryParticipantStore()
    else:
        inbox = PostgresParticipantStore(database, schema="inventory")
    await inbox.start()
    yield inbox
    await inbox.close()
