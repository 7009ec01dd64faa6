"""The conformance kit (``sagaflow participant-check``) on real participants.

It passes for every Python example service and for the Node.js inventory,
and fails, with a line naming the obligation, for participants broken on
purpose: each broken one here is a real worker on the real broker with one
part swapped (a store that forgets, a transport that nacks instead of
dead-lettering, lax validation, replies that lie...).
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest

from sagaflow import BusinessFailure, HandlerContext, Participant, Worker
from sagaflow.conformance import Check, Result, run_checks, steps_of
from sagaflow.core.messages import Envelope
from sagaflow.core.ports import Delivery, Topology, Transport
from sagaflow.examples.shop.contracts import (
    OrderRef,
    ReserveStock,
    StockReserved,
    Undone,
    release_stock,
    reserve_stock,
)
from sagaflow.store.memory_participant import InMemoryParticipantStore
from sagaflow.transport import RabbitMQTransport
from services.order.saga import create_order
from services.stack import ROOT, Stack

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

SAMPLES = orjson.loads((ROOT / "services" / "conformance.json").read_bytes())
REFUSALS = SAMPLES.pop("refusals")
EFFECT_QUERIES = SAMPLES.pop("effects")
COUNTED = {"inventory", "payment", "shipping"}
"""The services whose effects the kit counts (the queries are in conformance.json)."""
PREPARE = {  # the order service's actions need the order row the API would have written
    "order": 'INSERT INTO "order".orders (order_id, customer_id, sku, quantity, amount,'
    " destination, status, saga_id) VALUES ($1, 'cust-1', 'sku-widget', 1, 100, 'US',"
    " 'PENDING', $1 || '-saga') ON CONFLICT DO NOTHING"
}
KIT_EFFECTS = "SELECT count(*) FROM kit_effects WHERE order_id = $1"


def _check(
    amqp_url: str,
    pg_url: str,
    service: str,
    query: str | None,
    refusals: dict[str, Any] = REFUSALS,
    **extra: Any,
) -> Check:
    return Check(
        amqp_url=amqp_url,
        service=service,
        steps=steps_of([create_order], service),
        samples=SAMPLES,
        refusals=refusals,
        effects_query=query,
        effects_queries=EFFECT_QUERIES if query is None else {},
        database_url=pg_url,
        timeout=4.0,
        quiet=2.0,  # a loaded CI machine may take a while to answer a late command
        **extra,
    )


def _failures(results: Sequence[Result]) -> list[str]:
    return [r.line() for r in results if not r.passed]


# --------------------------------------------------------------------------- passing


async def test_every_python_example_participant_passes(
    amqp_url: str, pg_url: str, tmp_path: Path
) -> None:
    async with Stack(amqp_url, pg_url, coordinators=0, log_dir=tmp_path / "logs", ready_timeout=90):
        for service in ("inventory", "payment", "shipping", "order"):
            check = _check(amqp_url, pg_url, service, None, prepare_sql=PREPARE.get(service))
            results = await run_checks(check)
            assert not _failures(results), "\n".join(r.line() for r in results)
            obligations = {r.obligation for r in results}
            assert {"reply", "duplicate", "redelivery", "tombstone", "flows-on"} <= obligations
            assert "dead-letter invalid_command" in obligations
            if service in COUNTED:
                assert "effects-once" in obligations
                refused = [r for r in results if r.obligation == "refusal"]
                assert len(refused) == sum(
                    len(v) for k, v in REFUSALS.items() if k.startswith(service)
                )


async def test_the_node_participant_passes_through_the_cli_with_signatures(
    amqp_url: str, pg_url: str, tmp_path: Path
) -> None:
    keys = "inventory:inv-kit-1:" + "k" * 32
    env = {
        **os.environ,
        "SAGAFLOW_AMQP_URL": amqp_url,
        "SAGAFLOW_DATABASE_URL": pg_url,
        "SAGAFLOW_SIGNING_KEYS": keys,
    }
    async with Stack(
        amqp_url,
        pg_url,
        coordinators=0,
        participants=["inventory"],
        order_service=False,
        node=["inventory"],
        env_extra={"SAGAFLOW_SIGNING_KEYS": keys},
        log_dir=tmp_path / "logs",
    ) as stack:
        assert stack.processes["inventory"].argv[0] == "node"
        kit = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "sagaflow", "participant-check",
            "services.order.saga:create_order", "--service", "inventory",
            "--samples", str(ROOT / "services" / "conformance.json"),
            "--timeout", "5", "--quiet", "1",
            cwd=ROOT, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(kit.communicate(), 120)
    report = out.decode()
    assert kit.returncode == 0, f"{report}\n{err.decode()}\n{stack.tails(['inventory'])}"
    lines = report.splitlines()
    assert all(line.startswith("PASS") for line in lines[:-1]), report
    refusals = [line for line in lines if line.startswith("PASS  refusal")]
    assert any("'unknown_sku'" in line for line in refusals), report
    assert any("'out_of_stock'" in line for line in refusals), report
    for obligation in ("dead-letter unsigned", "dead-letter bad_signature", "effects-once"):
        assert any(obligation in line for line in lines), (obligation, report)
    assert lines[-1].endswith("(obligations: docs/protocol.md#participant-obligations)")


# --------------------------------------------------------------------------- broken on purpose


class _Forgetful:
    """A participant store that remembers nothing: no dedup, no tombstones."""

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    def transaction(self) -> Any:
        return InMemoryParticipantStore().transaction()

    async def prune_inbox(self, before: float, *, limit: int) -> int:
        return 0


class _Wrapped:
    """A transport with one behaviour swapped; the rest is the real one."""

    def __init__(self, inner: Transport, mode: str) -> None:
        self.inner = inner
        self.mode = mode
        self.topology: Topology = inner.topology

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def publish(self, envelopes: Sequence[Envelope]) -> None:
        if self.mode == "lying-replies":
            envelopes = [e.model_copy(update={"step_index": e.step_index + 7}) for e in envelopes]
        await self.inner.publish(envelopes)

    async def dead_letter(self, delivery: Delivery, reason: str) -> None:
        if self.mode == "nack":  # the broker dead-letters it, with no reason of ours
            await delivery.nack(requeue=False)
            return
        await self.inner.dead_letter(delivery, reason)


def _inventory(pool: asyncpg.Pool, *, refuse_release: bool, serve_release: bool) -> Participant:
    inventory = Participant("inventory")

    @inventory.handler(reserve_stock)
    async def reserve(command: ReserveStock, ctx: HandlerContext) -> StockReserved:
        await pool.execute("INSERT INTO kit_effects (order_id) VALUES ($1)", command.order_id)
        return StockReserved(reservation_id=f"res-{command.order_id}")

    if serve_release:

        @inventory.handler(release_stock)
        async def release(command: OrderRef, ctx: HandlerContext) -> Undone:
            if refuse_release:
                raise BusinessFailure("cannot release")
            return Undone(undone=True)

    return inventory


@asynccontextmanager
async def _broken(amqp_url: str, pg_url: str, kind: str) -> AsyncIterator[None]:
    pool = await asyncpg.create_pool(pg_url, min_size=1, max_size=2)
    assert pool is not None
    await pool.execute("CREATE TABLE IF NOT EXISTS kit_effects (order_id text NOT NULL)")
    transport: Transport = RabbitMQTransport(amqp_url, connection_name=f"broken-{kind}")
    if kind in ("nack", "lying-replies"):
        transport = _Wrapped(transport, kind)
    worker = Worker(
        _inventory(
            pool, refuse_release=kind == "refusing-compensation", serve_release=kind != "no-release"
        ),
        transport=transport,
        store=_Forgetful() if kind == "forgetful" else InMemoryParticipantStore(),  # type: ignore[arg-type]
        strict_payloads=kind != "lax",
        concurrency=2,
    )
    await worker.start()
    try:
        yield
    finally:
        await worker.stop()
        await pool.close()


BROKEN = [
    ("forgetful", "duplicate", "another reply than the stored one"),
    ("forgetful", "effects-once", "counts 7 after 7 copies"),
    ("forgetful", "tombstone", "arrived after its compensation was answered"),
    ("nack", "dead-letter too_large", "the broker's reason: rejected"),
    ("nack", "dead-letter invalid_command", "expected `invalid_command: ...`"),
    ("lax", "dead-letter invalid_command", "instead of dead-lettered `invalid_command`"),
    ("refusing-compensation", "compensation", "answered error (compensation refused"),
    ("no-release", "compensation", "dead-lettered: unknown_action"),
    ("lying-replies", "reply", "step_index is 8, not 1"),
    ("never-refuses", "refusal", "answered success None, not failure 'unknown_sku'"),
]


@pytest.mark.parametrize("kind", sorted({kind for kind, _, _ in BROKEN}))
async def test_a_broken_participant_fails_the_obligation_it_breaks(
    amqp_url: str, pg_url: str, kind: str
) -> None:
    async with _broken(amqp_url, pg_url, kind):
        refusals = REFUSALS if kind == "never-refuses" else {}
        results = await run_checks(_check(amqp_url, pg_url, "inventory", KIT_EFFECTS, refusals))
    report = "\n".join(r.line() for r in results)
    failed = _failures(results)
    for _, obligation, text in [b for b in BROKEN if b[0] == kind]:
        assert any(line.startswith(f"FAIL  {obligation} ") and text in line for line in failed), (
            f"{kind}: no FAIL line for {obligation} saying {text!r}:\n{report}"
        )
    if kind == "lax":  # everything else it does right
        assert len(failed) == 1, report
