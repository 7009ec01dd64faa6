"""Create-order saga variants for the fault scenarios that need other timings.

The same steps and actions as ``services.order.saga.create_order`` (so the
services and the invariant checker know them), under other versions of the
same saga name, with other timeouts and retry policies:

- ``quick`` (v2): 3-second step timeouts and a short compensation budget, so
  a silent participant makes steps time out, and a failing compensation ends
  FAILED, within seconds (scenario 7);
- ``patient`` (v3): ten-minute timeouts, so nothing but the messages
  themselves moves the saga (scenario 8 replays a dead-lettered reply);
- ``approving`` (v2 itself, its approval wait timing out after 12 s) and
  ``hurried`` (v5, a 4-second deadline): the wait and deadline scenarios.

Coordinators load them with ``sagaflow coordinator tests.faults.sagas:quick``;
the processes run from the repository root, so ``tests`` imports.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from sagaflow import Group, RetryPolicy, Saga, Step, Wait
from services.order.saga import OrderData, create_order

__all__ = ["approving", "hurried", "patient", "quick"]

AnyStep = Step[OrderData] | Wait[OrderData]


def declared(
    saga: Saga[OrderData], change: Callable[[AnyStep], AnyStep] = lambda step: step
) -> list[AnyStep | Group[OrderData]]:
    """``saga``'s steps as declared, its parallel groups regrouped (``saga.steps``
    is flat), each step passed through ``change``: a variant keeps the shape."""
    items: list[AnyStep | Group[OrderData]] = []
    for index, step in enumerate(saga.steps):
        members = saga.groups.get(index)
        if members is None:
            items.append(change(step))
        elif index == members[0]:
            grouped = [change(saga.steps[i]) for i in members]
            items.append(Group(saga.group_names[index], grouped))  # type: ignore[arg-type]
    return items


def variant(
    version: int, *, timeout: float, retry: RetryPolicy, compensation_retry: RetryPolicy
) -> Saga[OrderData]:
    """``create_order`` as version ``version`` with these timings on every step
    (its waits as they are: the workloads' orders never wait for an approval)."""

    def timed(step: AnyStep) -> AnyStep:
        if not isinstance(step, Step):
            return step
        return replace(
            step,
            timeout=timeout,
            retry=retry,
            compensation_retry=compensation_retry
            if step.compensation is not None
            else step.compensation_retry,
        )

    return Saga(
        create_order.name, data=OrderData, steps=declared(create_order, timed), version=version
    )


QUICK_TIMEOUT = 3.0
QUICK_RETRY = RetryPolicy(max_attempts=3, initial_backoff=0.2, max_backoff=1.0)
QUICK_COMPENSATION_RETRY = RetryPolicy(max_attempts=4, initial_backoff=0.3, max_backoff=2.0)

quick = variant(
    4, timeout=QUICK_TIMEOUT, retry=QUICK_RETRY, compensation_retry=QUICK_COMPENSATION_RETRY
)
patient = variant(
    3,
    timeout=600.0,
    retry=RetryPolicy(max_attempts=3, initial_backoff=0.2, max_backoff=1.0),
    compensation_retry=RetryPolicy(max_attempts=8, initial_backoff=0.5, max_backoff=10.0),
)


APPROVAL_TIMEOUT = 12.0


def _with_approval_timeout(seconds: float) -> Saga[OrderData]:
    def waits(step: AnyStep) -> AnyStep:
        return replace(step, timeout=seconds) if isinstance(step, Wait) else step

    return Saga(
        create_order.name,
        data=OrderData,
        steps=declared(create_order, waits),
        version=create_order.version,
    )


approving = _with_approval_timeout(APPROVAL_TIMEOUT)
"""``create_order`` (v2) itself but for its approval timeout (12 s, not a day):
the same fingerprint, so the coordinator runs it for the sagas the order API
starts with the original (timeouts may change in place; steps may not)."""

DEADLINE = 4.0

hurried = Saga(
    create_order.name,
    data=OrderData,
    steps=declared(create_order),
    version=5,
    deadline=DEADLINE,
)
"""``create_order`` as v5 with a 4-second deadline: started by the test itself
(a deadline is set when a saga starts), so many sagas pass it in flight."""
