"""End-to-end fixtures: the example system as real processes on a fresh vhost and database."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from services.stack import Stack


@pytest.fixture
async def stack(amqp_url: str, pg_url: str, tmp_path: Path) -> AsyncIterator[Stack]:
    """Coordinator, three workers and the order service, started and ready; stopped after."""
    async with Stack(amqp_url, pg_url, log_dir=tmp_path / "logs") as running:
        yield running
