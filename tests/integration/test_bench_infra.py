"""The benchmark's server-side helpers, against the real PostgreSQL."""

from __future__ import annotations

import asyncpg
import pytest

from bench import infra

pytestmark = pytest.mark.integration


async def test_each_run_records_the_settings_the_server_runs_with(pg_url: str) -> None:
    settings = await infra.server_settings(pg_url.rsplit("/", 1)[1])
    assert list(settings) == list(infra.SETTINGS)
    conn = await asyncpg.connect(pg_url)
    try:
        for name in ("autovacuum", "fsync", "shared_buffers"):
            assert settings[name] == await conn.fetchval(f"SHOW {name}")
    finally:
        await conn.close()
