"""The embedded demo: place a stream of orders and watch sagas complete or compensate.

Orders are drawn by a seeded RNG: most succeed; some ask for a sold-out sku
(``reserve`` is refused: the charge made alongside it is refunded), come from
a customer with no money (``charge`` is refused: the stock reserved alongside
is released), or ship to a country nobody serves (``schedule`` fails: refund
and release together, then reject). Reserve and charge run in one parallel
group; the undo order is the group's branches together, then ``validate``.

``sagaflow demo`` calls :func:`main`: the coordinator and the four participants
run in this process, over the in-memory transport and stores. The repository's
``services/demo.py`` runs the same orders on real processes (``sagaflow demo
--real``) through :func:`run_orders`. Printing needs ``rich`` (the ``cli`` extra).
"""

from __future__ import annotations

import asyncio
import logging
import random
import statistics
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from sagaflow import Coordinator, SagaState, SagaStatus, Worker
from sagaflow.examples.shop.participants import (
    MemoryInventory,
    MemoryOrders,
    MemoryPayments,
    MemoryShipping,
    NewOrder,
    in_memory,
    inventory_participant,
    order_participant,
    payment_participant,
    place_order,
    shipping_participant,
)
from sagaflow.examples.shop.saga import SAGAS
from sagaflow.store import InMemoryParticipantStore, InMemorySagaStore
from sagaflow.transport import InMemoryTransport

__all__ = [
    "SCENARIOS",
    "DemoResult",
    "PlaceOrder",
    "SagaOutcome",
    "TimelineEntry",
    "demo_orders",
    "main",
    "print_result",
    "quiet_logs",
    "run_embedded",
    "run_orders",
    "timeline",
    "undo_order",
]

SUCCESS = "success"
SCENARIOS: dict[str, float] = {
    SUCCESS: 0.7,
    "out_of_stock": 0.1,
    "insufficient_funds": 0.1,
    "unsupported_destination": 0.1,
}
"""Each kind of order and its share of the mix; a failure's name is its expected reason."""

_SKUS = ("sku-widget", "sku-gadget", "sku-gizmo")
_CUSTOMERS = tuple(f"cust-{n}" for n in range(1, 6))
_DESTINATIONS = ("US", "CA", "GB", "DE", "FR", "JP")


def demo_orders(count: int, seed: int = 7) -> list[tuple[str, NewOrder]]:
    """``count`` orders as (scenario, order): every scenario at least once when count >= 4."""
    rng = random.Random(seed)
    kinds = list(SCENARIOS)[:count]
    kinds += rng.choices(list(SCENARIOS), weights=list(SCENARIOS.values()), k=count - len(kinds))
    rng.shuffle(kinds)
    orders = []
    for kind in kinds:
        new = NewOrder(
            customer_id=rng.choice(_CUSTOMERS),
            sku=rng.choice(_SKUS),
            quantity=rng.randint(1, 5),
            amount=rng.randint(500, 50_000),
            destination=rng.choice(_DESTINATIONS),
        )
        change = {
            "out_of_stock": {"sku": "sku-sold-out"},
            "insufficient_funds": {"customer_id": "cust-broke"},
            "unsupported_destination": {"destination": "AQ"},
        }.get(kind, {})
        orders.append((kind, new.model_copy(update=change)))
    return orders


@dataclass(frozen=True)
class SagaOutcome:
    """How one order's saga ended."""

    order_id: str
    saga_id: str
    scenario: str
    status: SagaStatus
    failed_step: str | None
    reason: str | None
    seconds: float

    @property
    def as_expected(self) -> bool:
        if self.scenario == SUCCESS:
            return self.status is SagaStatus.COMPLETED
        return self.status is SagaStatus.COMPENSATED and self.reason == self.scenario


@dataclass(frozen=True)
class TimelineEntry:
    """One line of a saga's log, as the demo shows it."""

    offset: float  # seconds since the saga started
    event: str
    step: str | None
    kind: str | None
    attempt: int | None
    detail: dict[str, Any]


def timeline(entries: Sequence[Any]) -> list[TimelineEntry]:
    """Turn a saga's log (``SagaStore.log``) into timeline entries."""
    start = entries[0].at if entries else 0.0
    return [
        TimelineEntry(
            offset=e.at - start,
            event=str(e.event),
            step=e.step,
            kind=None if e.kind is None else str(e.kind),
            attempt=e.attempt,
            detail=dict(e.detail),
        )
        for e in entries
    ]


@dataclass
class DemoResult:
    """What a demo run did: every saga's outcome, timings, one compensation's timeline."""

    mode: str
    outcomes: list[SagaOutcome]
    elapsed: float
    timeline_saga: str | None = None
    timeline: list[TimelineEntry] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Every saga ended as its scenario expects."""
        return all(o.as_expected for o in self.outcomes)

    @property
    def throughput(self) -> float:
        """Sagas settled per second, from the first order placed to the last saga settled."""
        return len(self.outcomes) / self.elapsed if self.elapsed > 0 else 0.0

    def counts(self) -> Counter[tuple[SagaStatus, str | None, str | None]]:
        """How many sagas ended per (status, failed step, reason)."""
        return Counter((o.status, o.failed_step, o.reason) for o in self.outcomes)


# --------------------------------------------------------------------------- running

PlaceOrder = Callable[[NewOrder], Awaitable[str]]
"""Places one order, returns its saga id."""


async def run_orders(
    mode: str,
    orders: Sequence[tuple[str, NewOrder]],
    place: PlaceOrder,
    get: Callable[[str], Awaitable[SagaState | None]],
    log: Callable[[str], Awaitable[Sequence[Any]]],
    console: Console,
    *,
    timeout: float,
    concurrency: int = 16,
) -> DemoResult:
    """Place the orders, wait for every saga to settle, collect the outcomes.

    Args:
        mode: How the sagas run, for the report (``embedded``, ``real``).
        orders: (scenario, order) pairs, as :func:`demo_orders` makes them.
        place: Places one order, returns its saga id.
        get: A saga's state by id (``SagaStore.get``).
        log: A saga's log by id (``SagaStore.log``).
        console: Where the progress bars go.
        timeout: Seconds every saga has to settle.
        concurrency: Orders placed at once.

    Raises:
        TimeoutError: some saga did not settle in time.
    """
    started = time.monotonic()
    limit = asyncio.Semaphore(concurrency)
    saga_ids: dict[str, str] = {}  # saga id -> scenario

    async def one(kind: str, new: NewOrder) -> None:
        async with limit:
            saga_ids[await place(new)] = kind

    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    ) as progress:
        placing = progress.add_task("orders placed", total=len(orders))
        settling = progress.add_task("sagas settled", total=len(orders))
        tasks = [asyncio.create_task(one(kind, new)) for kind, new in orders]
        for task in asyncio.as_completed(tasks):
            await task
            progress.advance(placing)
        final: dict[str, SagaState] = {}
        deadline = time.monotonic() + timeout
        while len(final) < len(saga_ids):
            for sid in [s for s in saga_ids if s not in final]:
                state = await get(sid)
                if state is not None and state.status.terminal:
                    final[sid] = state
            progress.update(settling, completed=len(final))
            if len(final) < len(saga_ids):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{len(saga_ids) - len(final)} sagas did not settle")
                await asyncio.sleep(0.05)
    elapsed = time.monotonic() - started

    outcomes = [
        SagaOutcome(
            order_id=str(state.data["order_id"]),
            saga_id=sid,
            scenario=saga_ids[sid],
            status=state.status,
            failed_step=state.failure.step if state.failure else None,
            reason=state.failure.reason if state.failure else None,
            seconds=state.updated_at - state.created_at,
        )
        for sid, state in final.items()
    ]
    result = DemoResult(mode, outcomes, elapsed)
    # the longest compensation shows the reverse order best
    compensated = [o for o in outcomes if o.status is SagaStatus.COMPENSATED]
    if compensated:
        deepest = max(compensated, key=lambda o: list(SCENARIOS).index(o.scenario))
        result.timeline_saga = deepest.saga_id
        result.timeline = timeline(await log(deepest.saga_id))
    return result


async def run_embedded(
    orders: int = 200, seed: int = 7, *, console: Console | None = None, timeout: float = 120.0
) -> DemoResult:
    """Run the demo in this process, in memory (fresh state each call)."""
    transport = InMemoryTransport()
    store = InMemorySagaStore()
    coordinator = Coordinator(SAGAS, store=store, transport=transport, timer_interval=0.05)
    order_memory = MemoryOrders()
    participants = [
        order_participant(in_memory(order_memory)),
        inventory_participant(in_memory(MemoryInventory())),
        payment_participant(in_memory(MemoryPayments())),
        shipping_participant(in_memory(MemoryShipping())),
    ]
    workers = [
        Worker(p, transport=transport, store=InMemoryParticipantStore()) for p in participants
    ]
    await coordinator.start()
    for worker in workers:
        await worker.start()

    async def place(new: NewOrder) -> str:
        # the same call as POST /orders; in memory the "transaction" is just these two steps
        order, _ = await place_order(coordinator, order_memory, new)
        return order.saga_id

    try:
        return await run_orders(
            "embedded",
            demo_orders(orders, seed),
            place,
            store.get,
            store.log,
            console or Console(stderr=True),
            timeout=timeout,
        )
    finally:
        for worker in workers:
            await worker.stop()
        await coordinator.stop()


# --------------------------------------------------------------------------- output


def print_result(result: DemoResult, console: Console) -> None:
    """Print outcome counts, throughput and latency, and one compensated saga's timeline."""
    summary = Table(title=f"create-order sagas ({result.mode})")
    summary.add_column("status")
    summary.add_column("failed step")
    summary.add_column("reason")
    summary.add_column("sagas", justify="right")
    for (status, step, reason), count in sorted(result.counts().items(), key=lambda kv: -kv[1]):
        color = "green" if status is SagaStatus.COMPLETED else "yellow"
        # saga data as Text: never read as markup or emoji codes
        summary.add_row(Text(status.value, color), Text(step or ""), Text(reason or ""), str(count))
    console.print(summary)

    latencies = sorted(o.seconds for o in result.outcomes)
    if latencies:
        p95 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.95))]
        console.print(
            f"{len(result.outcomes)} sagas in {result.elapsed:.2f}s: "
            f"[bold]{result.throughput:.0f} sagas/s[/]; "
            f"saga duration p50 {statistics.median(latencies) * 1000:.0f} ms, "
            f"p95 {p95 * 1000:.0f} ms"
        )
    unexpected = [o for o in result.outcomes if not o.as_expected]
    if unexpected:
        console.print(
            f"[red]{len(unexpected)} sagas did not end as expected[/], e.g. "
            + escape(str(unexpected[0]))
        )

    if result.timeline:
        table = Table(title=Text(f"timeline of compensated saga {result.timeline_saga}"))
        table.add_column("+ms", justify="right")
        table.add_column("event", no_wrap=True)
        table.add_column("step")
        table.add_column("kind")
        table.add_column("#", justify="right")
        table.add_column("detail", overflow="fold")
        for entry in result.timeline:
            table.add_row(
                f"{entry.offset * 1000:.1f}",
                Text(entry.event),
                Text(entry.step or ""),
                Text(entry.kind or ""),
                "" if entry.attempt is None else str(entry.attempt),
                Text(_detail(entry.detail)),
            )
        console.print(table)


def _detail(detail: dict[str, Any]) -> str:
    if "undo" in detail:  # compensation started: what will be undone, in order
        if not detail["undo"]:
            return "nothing to undo"
        return "undo " + undo_order(detail["undo"], detail.get("parallel", ()))
    if "outcome" in detail:
        return str(detail["outcome"]) + (f": {detail['reason']}" if detail.get("reason") else "")
    if "type" in detail:
        return str(detail["type"])
    return ", ".join(f"{k}={v}" for k, v in detail.items() if k != "data" and v is not None)


def undo_order(steps: Sequence[str], together: Collection[str]) -> str:
    """``charge + reserve, validate``: steps in the order undone, those of
    ``together`` (a parallel group's, undone at once) joined by ``+``."""
    units: list[list[str]] = []
    for step in steps:
        if units and step in together and units[-1][-1] in together:
            units[-1].append(step)
        else:
            units.append([step])
    return ", ".join(" + ".join(unit) for unit in units)


def quiet_logs() -> None:
    """Keep per-request and lifecycle logs out of the way: the tables tell the story."""
    for noisy in ("httpx", "sagaflow.worker", "sagaflow.coordinator"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def main(orders: int = 200, seed: int = 7) -> int:
    """Run the embedded demo and print the result; returns the exit code (0: all as expected)."""
    console = Console()
    quiet_logs()
    result = asyncio.run(run_embedded(orders, seed, console=console))
    print_result(result, console)
    from sagaflow.examples.shop.shapes_demo import print_shapes, run_shapes

    shapes = asyncio.run(run_shapes())
    print_shapes(shapes, console)
    return 0 if result.ok and all(o.as_expected for o in shapes) else 1
