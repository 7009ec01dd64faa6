"""A large order waits for its manager, end to end: real processes, real servers.

The order API (with ``ORDER_APPROVAL_THRESHOLD`` at 5,000 cents) starts the
saga; it reserves and charges, then waits. ``POST /orders/{id}/approval``
signals it; it gift-wraps (asked for), ships, and the order is approved. The
same approval sent again changes nothing; an order below the threshold needs
none and never waits.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import asyncpg
import pytest

from services.stack import Stack

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

ORDER = {"customer_id": "cust-2", "sku": "sku-gizmo", "quantity": 1, "destination": "GB"}


async def test_a_large_order_is_approved_over_http_and_completes(
    amqp_url: str, pg_url: str, tmp_path: Path
) -> None:
    async with Stack(
        amqp_url,
        pg_url,
        log_dir=tmp_path / "logs",
        env_extra={"ORDER_APPROVAL_THRESHOLD": "5000"},
    ) as stack:
        large = await stack.place_order(order_id="big-1", amount=9000, gift_wrap=True, **ORDER)
        small = await stack.place_order(order_id="small-1", amount=900, **ORDER)
        saga_id = large["saga_id"]
        for _ in range(300):
            state = await stack.store.get(saga_id)
            if state is not None and state.waiting_for == "approval":
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError(f"saga {saga_id} never reached its approval: {state}")
        assert (await stack.get_order("big-1"))["status"] == "PENDING"

        approved = await stack.http.post("/orders/big-1/approval", json={"approved_by": "ann"})
        assert approved.status_code == 200, approved.text
        again = await stack.http.post("/orders/big-1/approval", json={"approved_by": "bob"})
        assert again.status_code in (200, 409), again.text  # ignored, or the saga has finished
        states = await stack.wait_settled([saga_id, small["saga_id"]], timeout=60)

        assert states[saga_id].data["approved_by"] == "ann"
        assert states[saga_id].data["wrap_id"] == "wrap-big-1"
        assert (await stack.get_order("big-1"))["status"] == "APPROVED"
        assert (await stack.get_order("small-1"))["status"] == "APPROVED"
        assert states[small["saga_id"]].waiting_for is None
        assert 3 in states[small["saga_id"]].skipped  # the approval
        conn = await asyncpg.connect(pg_url)
        try:
            wraps = await conn.fetch("SELECT order_id, status FROM shipping.gift_wraps")
            taken = await conn.fetchval(
                "SELECT count(*) FROM sagaflow.saga_log WHERE saga_id = $1"
                " AND event = 'signal_received'",
                saga_id,
            )
        finally:
            await conn.close()
        assert [(r["order_id"], r["status"]) for r in wraps] == [("big-1", "wrapped")]
        assert taken == 1
