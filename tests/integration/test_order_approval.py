"""The order API's approval endpoint: the real app over real HTTP, on PostgreSQL.

No coordinator runs here: each saga stays at its first command, so an approval
is kept until the saga reaches its wait (docs/concepts.md, "Waiting for a
signal"). What the saga then does with it is the engine's (unit tests) and the
end-to-end run's (tests/e2e) to show.
"""

from __future__ import annotations

import asyncpg
import pytest

from tests.integration.test_order_api_hardening import ORDER, serving

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

THRESHOLD = 5000


async def _signals(pg_url: str, saga_id: str) -> tuple[str, int]:
    conn = await asyncpg.connect(pg_url)
    try:
        kept = await conn.fetchval(
            "SELECT state->'signals'->'approval'->>'approved_by' FROM sagaflow.sagas"
            " WHERE saga_id = $1",
            saga_id,
        )
        logged = await conn.fetchval(
            "SELECT count(*) FROM sagaflow.saga_log WHERE saga_id = $1 AND event = $2",
            saga_id,
            "signal_received",
        )
    finally:
        await conn.close()
    return kept, logged


async def test_approvals_of_large_orders_count_once_and_bad_ones_change_nothing(
    pg_url: str,
) -> None:
    async with serving(pg_url, approval_threshold=THRESHOLD) as api:
        small = await api.post("/orders", json={**ORDER, "order_id": "small", "amount": 1000})
        large = await api.post("/orders", json={**ORDER, "order_id": "large", "amount": 9000})
        assert small.status_code == large.status_code == 201

        refused = await api.post("/orders/small/approval", json={"approved_by": "ann"})
        assert refused.status_code == 409 and "needs no approval" in refused.text
        missing = await api.post("/orders/nope/approval", json={"approved_by": "ann"})
        assert missing.status_code == 404
        invalid = await api.post("/orders/large/approval", json={"approved_by": ""})
        assert invalid.status_code == 422
        assert await _signals(pg_url, "order-large") == (None, 0)

        first = await api.post("/orders/large/approval", json={"approved_by": "ann"})
        assert first.status_code == 200, first.text
        assert first.json() == {"order_id": "large", "saga_status": "RUNNING", "kept": True}
        again = await api.post("/orders/large/approval", json={"approved_by": "bob"})
        assert again.status_code == 200, again.text
        assert await _signals(pg_url, "order-large") == ("ann", 1)

        conn = await asyncpg.connect(pg_url)
        try:  # the saga ended (as if the coordinator compensated it)
            await conn.execute(
                "UPDATE sagaflow.sagas SET status = 'COMPENSATED',"
                " state = jsonb_set(state, '{status}', '\"COMPENSATED\"')"
                " WHERE saga_id = 'order-large'"
            )
        finally:
            await conn.close()
        late = await api.post("/orders/large/approval", json={"approved_by": "cy"})
        assert late.status_code == 409 and "saga is COMPENSATED" in late.text
