"""The invariants every fault scenario ends with, judged from the databases alone.

After a run has settled, :func:`check` reads the coordinator's tables (sagas,
log, outbox) and every service's own tables (orders, stock, reservations,
accounts, charges, shipments, inboxes) and checks:

- every saga is terminal; none is lost (each order has its saga and each saga
  its order; each order the workload was told about exists); nothing is left
  in the outbox or half-claimed in an inbox;
- each order's status matches its saga's outcome, and its outcome is the one
  its contents call for (a sold-out sku, a broke customer, an unserved
  destination fail at their own step with their own reason);
- every APPROVED order has each effect once and in force (one reservation, one
  charge, one shipment); every REJECTED order has none left in force;
- stock, balances and shipment counts add up to the seeds;
- in every saga's log each step outcome is recorded once, the compensations
  ran in exact reverse order of the completed steps (plus the abandoned one
  first, when a step was abandoned), and the terminal entries match the state.

Nothing here trusts the workload's own bookkeeping beyond the list of orders
it placed.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import orjson

from sagaflow import SagaState, SagaStatus
from services.inventory.app import SEED_STOCK
from services.order.saga import create_order, create_order_v1
from services.payment.app import SEED_BALANCES

STEPS = [step.name for step in create_order.steps]
"""Every create-order version and variant of the suite has these steps, in this order."""
COMPENSATABLE = {i for i, step in enumerate(create_order.steps) if step.compensation is not None}
WAITS = {i for i, step in enumerate(create_order.steps) if step.kind.value == "wait"}
GROUPS: dict[int, tuple[int, ...]] = {}
"""The parallel groups of the saga being checked (set per saga: create-order v1
has none; v2, and the suite's variants built from it, group reserve and charge)."""


def _groups_of(state: SagaState) -> dict[int, tuple[int, ...]]:
    if state.saga_name != create_order.name or state.saga_version == create_order_v1.version:
        return {}
    return create_order.groups


def unit(index: int) -> int:
    """A step's place in the undo order: a parallel group's steps share one."""
    return GROUPS.get(index, (index,))[0]


def units(indexes: Sequence[int]) -> list[int]:
    return [unit(i) for i in indexes]


TERMINAL_EVENTS = {
    "saga_completed": SagaStatus.COMPLETED,
    "saga_compensated": SagaStatus.COMPENSATED,
    "saga_failed": SagaStatus.FAILED,
    "saga_cancelled": SagaStatus.CANCELLED,
}
ABANDONING_CAUSES = {"timeout", "retries_exhausted", "cancelled", "deadline"}

# the reason and step each kind of bad order fails with (see services/demo.py)
EXPECTED_FAILURE = {
    "out_of_stock": ("reserve", "out_of_stock"),
    "insufficient_funds": ("charge", "insufficient_funds"),
    "unsupported_destination": ("schedule", "unsupported_destination"),
}


def order_kind(order: asyncpg.Record | dict[str, Any]) -> str:
    """What an order's contents call for: ``success`` or the failure it must meet."""
    if order["sku"] == "sku-sold-out":
        return "out_of_stock"
    if order["customer_id"] == "cust-broke":
        return "insufficient_funds"
    if order["destination"] == "AQ":
        return "unsupported_destination"
    return "success"


@dataclass
class Verdict:
    """What :func:`check` found."""

    sagas: int = 0
    statuses: Counter[str] = field(default_factory=Counter)
    causes: Counter[str] = field(default_factory=Counter)
    checks: int = 0
    violations: list[str] = field(default_factory=list)

    def expect(self, condition: bool, message: str) -> None:
        self.checks += 1
        if not condition and len(self.violations) < 200:
            self.violations.append(message)

    @property
    def ok(self) -> bool:
        return not self.violations

    def describe(self) -> str:
        statuses = ",".join(f"{k}={v}" for k, v in sorted(self.statuses.items()))
        return f"{self.sagas} sagas ({statuses}), {self.checks} invariant checks"

    def raise_if_violated(self) -> None:
        if self.violations:
            shown = "\n  ".join(self.violations[:40])
            raise AssertionError(
                f"{len(self.violations)} invariant violations ({self.describe()}):\n  {shown}"
            )


async def check(
    database_url: str,
    *,
    placed: Iterable[str] = (),
    schema: str = "sagaflow",
    allow_failed: bool = False,
    allow_abandoned: bool = False,
) -> Verdict:
    """Check every invariant; returns the verdict (``verdict.raise_if_violated()``).

    Args:
        database_url: The database of the run.
        placed: Order ids the workload was told were placed.
        schema: The coordinator's schema.
        allow_failed: FAILED sagas are accepted (an operator has not acted yet).
        allow_abandoned: A saga whose orders should succeed may compensate after a
            step was abandoned (timed out or out of retries): scenarios that make
            participants silent on purpose.
    """
    conn = await asyncpg.connect(database_url)
    try:
        return await _check(conn, set(placed), schema, allow_failed, allow_abandoned)
    finally:
        await conn.close()


async def _check(
    conn: asyncpg.Connection,
    placed: set[str],
    schema: str,
    allow_failed: bool,
    allow_abandoned: bool,
) -> Verdict:
    v = Verdict()
    s = f'"{schema}"'
    states = {
        row["saga_id"]: SagaState.model_validate_json(row["state"])
        for row in await conn.fetch(f"SELECT saga_id, state::text FROM {s}.sagas")
    }
    logs: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in await conn.fetch(
        f"SELECT saga_id, event, step, step_index, kind, attempt, detail::text AS detail"
        f" FROM {s}.saga_log ORDER BY id"
    ):
        entry = dict(row)
        entry["detail"] = orjson.loads(entry["detail"])
        logs[row["saga_id"]].append(entry)
    outbox = await conn.fetchval(f"SELECT count(*) FROM {s}.outbox")
    orders = {r["order_id"]: dict(r) for r in await conn.fetch('SELECT * FROM "order".orders')}
    reservations = {
        r["order_id"]: r for r in await conn.fetch("SELECT * FROM inventory.reservations")
    }
    charges = {r["order_id"]: r for r in await conn.fetch("SELECT * FROM payment.charges")}
    shipments = {r["order_id"]: r for r in await conn.fetch("SELECT * FROM shipping.shipments")}
    stock = {r["sku"]: r["available"] for r in await conn.fetch("SELECT * FROM inventory.stock")}
    balances = {
        r["customer_id"]: r["balance"] for r in await conn.fetch("SELECT * FROM payment.accounts")
    }
    pending_inbox = 0
    for service in ("order", "inventory", "payment", "shipping"):
        pending_inbox += await conn.fetchval(
            f"SELECT count(*) FROM \"{service}\".inbox WHERE status = 'pending'"
        )

    v.sagas = len(states)
    v.statuses = Counter(state.status.value for state in states.values())
    v.causes = Counter(state.failure.cause for state in states.values() if state.failure)

    # ---------------------------------------------------------------- nothing lost or stuck
    v.expect(outbox == 0, f"{outbox} messages still in the outbox")
    v.expect(pending_inbox == 0, f"{pending_inbox} inbox rows claimed without a reply")
    for order_id in sorted(placed - orders.keys()):
        v.expect(False, f"order {order_id} was placed but is not in the order table")
    by_saga = {order["saga_id"]: order for order in orders.values()}
    for saga_id in sorted(states.keys() - by_saga.keys()):
        v.expect(False, f"saga {saga_id} has no order")
    for saga_id in sorted(by_saga.keys() - states.keys()):
        v.expect(False, f"order {by_saga[saga_id]['order_id']} has no saga {saga_id}")

    # ---------------------------------------------------------------- each saga
    for saga_id, state in sorted(states.items()):
        order = by_saga.get(saga_id)
        v.expect(state.status.terminal, f"saga {saga_id} is not terminal: {state.status.value}")
        if not allow_failed:
            v.expect(
                state.status is not SagaStatus.FAILED,
                f"saga {saga_id} FAILED: {state.failure}",
            )
        _check_log(v, state, logs.get(saga_id, []))
        if order is not None:
            _check_order(
                v, state, order, logs.get(saga_id, []), reservations, charges, shipments,
                allow_abandoned,
            )  # fmt: skip

    # ---------------------------------------------------------------- the books balance
    for sku, seed in SEED_STOCK.items():
        held = sum(
            r["quantity"]
            for r in reservations.values()
            if r["sku"] == sku and r["status"] == "reserved"
        )
        v.expect(
            stock.get(sku) == seed - held, f"stock of {sku}: {stock.get(sku)} != {seed} - {held}"
        )
    for customer, seed in SEED_BALANCES.items():
        paid = sum(
            r["amount"]
            for r in charges.values()
            if r["customer_id"] == customer and r["status"] == "charged"
        )
        v.expect(
            balances.get(customer) == seed - paid,
            f"balance of {customer}: {balances.get(customer)} != {seed} - {paid}",
        )
    approved = sum(1 for order in orders.values() if order["status"] == "APPROVED")
    scheduled = sum(1 for r in shipments.values() if r["status"] == "scheduled")
    v.expect(
        scheduled == approved, f"{scheduled} shipments scheduled for {approved} approved orders"
    )
    return v


def _check_order(
    v: Verdict,
    state: SagaState,
    order: dict[str, Any],
    entries: Sequence[dict[str, Any]],
    reservations: dict[str, asyncpg.Record],
    charges: dict[str, asyncpg.Record],
    shipments: dict[str, asyncpg.Record],
    allow_abandoned: bool,
) -> None:
    oid, status = order["order_id"], order["status"]
    effects = {
        "reservation": _in_force(reservations.get(oid), "reserved"),
        "charge": _in_force(charges.get(oid), "charged"),
        "shipment": _in_force(shipments.get(oid), "scheduled"),
    }
    kind = order_kind(order)
    if state.status is SagaStatus.COMPLETED:
        v.expect(status == "APPROVED", f"order {oid}: saga COMPLETED but order {status}")
        for name, live in effects.items():
            v.expect(live, f"order {oid} APPROVED without its {name} in force")
        v.expect(kind == "success", f"order {oid} ({kind}) was approved")
    elif state.status in (SagaStatus.COMPENSATED, SagaStatus.CANCELLED):
        v.expect(status == "REJECTED", f"order {oid}: saga {state.status.value} but order {status}")
        for name, live in effects.items():
            v.expect(not live, f"order {oid} REJECTED with its {name} still in force")
        # why it compensated: the log's compensation_started entry (the state's
        # failure is replaced by a compensation's failure when it ended FAILED first)
        started = [e for e in entries if e["event"] == "compensation_started"]
        v.expect(bool(started), f"saga {state.saga_id} compensated without compensation_started")
        if not started or state.status is SagaStatus.CANCELLED:
            return
        why = started[0]
        cause, reason, step = why["detail"].get("cause"), why["detail"].get("reason"), why["step"]
        if cause == "failure":
            want = EXPECTED_FAILURE.get(kind)
            v.expect(
                want == (step, reason), f"order {oid} ({kind}) failed at {step} with {reason!r}"
            )
        else:
            v.expect(
                allow_abandoned and cause in ABANDONING_CAUSES,
                f"order {oid} ({kind}) compensated after {cause}: {reason}",
            )


def _in_force(row: asyncpg.Record | None, live: str) -> bool:
    return row is not None and row["status"] == live


def _check_log(v: Verdict, state: SagaState, entries: Sequence[dict[str, Any]]) -> None:
    GROUPS.clear()
    GROUPS.update(_groups_of(state))
    sid = state.saga_id
    events = [e["event"] for e in entries]
    v.expect(events[:1] == ["saga_started"], f"saga {sid}: log does not start with saga_started")
    v.expect(
        events.count("saga_started") == 1,
        f"saga {sid}: started {events.count('saga_started')} times",
    )

    # each step outcome (success or business failure) is recorded once
    outcomes = Counter(
        (e["step_index"], e["kind"])
        for e in entries
        if e["event"] == "reply_received" and e["detail"].get("outcome") in ("success", "failure")
    )
    for (index, kind), count in outcomes.items():
        v.expect(count == 1, f"saga {sid}: outcome of {STEPS[index]} {kind} recorded {count} times")

    # the terminal entries: one per terminal state reached, the last one the state's
    terminal = [TERMINAL_EVENTS[e] for e in events if e in TERMINAL_EVENTS]
    retries = events.count("retry_requested")
    if state.status.terminal:
        v.expect(
            terminal[-1:] == [state.status],
            f"saga {sid}: last terminal entry {terminal[-1:]} != {state.status.value}",
        )
        v.expect(
            len(terminal) == retries + 1,
            f"saga {sid}: {len(terminal)} terminal entries for {retries} operator retries",
        )

    succeeded = [
        e["step_index"]
        for e in entries
        if e["event"] == "reply_received"
        and e["kind"] == "command"
        and e["detail"].get("outcome") == "success"
    ]
    completed = [i for i in succeeded if i in COMPENSATABLE]
    v.expect(
        list(state.completed) == completed,
        f"saga {sid}: state says completed {state.completed}, log says {completed}",
    )
    if state.status is SagaStatus.COMPLETED:
        # every step but those skipped by their condition (and waits, which send nothing)
        sent = [i for i in range(len(STEPS)) if i not in state.skipped and i not in WAITS]
        # a group's steps answer in any order; the groups and steps around them in order
        v.expect(
            sorted(succeeded) == sent and units(succeeded) == sorted(units(succeeded)),
            f"saga {sid}: completed steps {succeeded}",
        )
        v.expect(
            not any(e["kind"] == "compensation" for e in entries),
            f"saga {sid}: COMPLETED but compensations in its log",
        )
        return
    if state.status not in (SagaStatus.COMPENSATED, SagaStatus.CANCELLED, SagaStatus.FAILED):
        return

    started = [i for i, e in enumerate(entries) if e["event"] == "compensation_started"]
    if not started:  # a FAILED retriable step, or a saga that failed before any step
        v.expect(
            state.status is SagaStatus.FAILED,
            f"saga {sid}: {state.status.value} without compensation_started",
        )
        return
    v.expect(len(started) == 1, f"saga {sid}: compensation started {len(started)} times")
    at = started[0]
    undo = [STEPS.index(name) for name in entries[at]["detail"].get("undo", [])]
    expected = list(reversed(completed))
    cause = entries[at]["detail"].get("cause")
    abandoned = entries[at]["step_index"]
    if cause in ABANDONING_CAUSES and abandoned in COMPENSATABLE and abandoned not in completed:
        expected = [abandoned, *expected]
    # a parallel group's branches in flight when it failed are abandoned: undone too
    extra = set(undo) - set(expected)
    v.expect(
        all(i in GROUPS for i in extra) and set(expected) <= set(undo),
        f"saga {sid}: undo {undo} is not what completed ({completed}) calls for",
    )
    v.expect(
        units(undo) == sorted(units(undo), reverse=True) and len(set(undo)) == len(undo),
        f"saga {sid}: undo {undo} is not in reverse order of {completed}",
    )
    v.expect(
        not any(e["event"] == "command_sent" for e in entries[at:]),
        f"saga {sid}: a command was sent after compensation started",
    )
    undone = [
        e["step_index"]
        for e in entries[at:]
        if e["event"] == "reply_received"
        and e["kind"] == "compensation"
        and e["detail"].get("outcome") == "success"
    ]
    sent: list[int] = []
    for e in entries[at:]:
        if e["event"] == "compensation_sent" and e["step_index"] not in sent:
            sent.append(e["step_index"])
    # in order by unit: a group's steps are undone together, in any order among them
    if state.status is SagaStatus.FAILED:
        v.expect(
            units(undone) == units(undo)[: len(undone)]
            or sorted(units(undone)) == sorted(units(undo)[: len(undone)]),
            f"saga {sid}: undid {undone}, not a prefix of {undo}",
        )
        v.expect(
            sorted(units(sent)) == sorted(units(undo)[: len(sent)]),
            f"saga {sid}: compensations sent {sent} for {undo}",
        )
    else:
        v.expect(
            sorted(undone) == sorted(undo) and units(undone) == units(undo),
            f"saga {sid}: compensations ran in order {undone}, expected {undo}",
        )
        v.expect(
            sorted(sent) == sorted(undo) and units(sent) == units(undo),
            f"saga {sid}: compensations sent in order {sent}, expected {undo}",
        )
