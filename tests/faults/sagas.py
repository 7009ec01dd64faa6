"""Create-order saga variants for the fault scenarios that need other timings.

The same steps and actions as ``services.order.saga.create_order`` (so the
services and the invariant checker know them), under other versions of the
same saga name, with other timeouts and retry policies:

- ``quick`` (v2): 3-second step timeouts and a short compensation budget, so
  a silent participant makes steps time out, and a failing compensation ends
  FAILED, within seconds (scenario 7);
- ``patient`` (v3): ten-minute timeouts, so nothing but the messages
  themselves moves the saga (scenario 8 replays a dead-lettered reply);
- ``approving`` (v1 itself, its approval wait timing out after 12 s) and
  ``hurried`` (v5, a 4-second deadline): the wait and deadline scenarios.

Coordinators load them with ``sagaflow coordinator tests.faults.sagas:quick``;
the processes run from the repository root, so ``tests`` imports.
"""

from __future__ import annotations

from dataclasses import replace

from sagaflow import RetryPolicy, Saga, Step, Wait
from services.order.saga import OrderData, create_order

__all__ = ["approving", "hurried", "patient", "quick"]


def variant(
    version: int, *, timeout: float, retry: RetryPolicy, compensation_retry: RetryPolicy
) -> Saga[OrderData]:
    """``create_order`` as version ``version`` with these timings on every step
    (its waits as they are: the workloads' orders never wait for an approval)."""
    steps = [
        replace(
            step,
            timeout=timeout,
            retry=retry,
            compensation_retry=compensation_retry
            if step.compensation is not None
            else step.compensation_retry,
        )
        if isinstance(step, Step)
        else step
        for step in create_order.steps
    ]
    return Saga(create_order.name, data=OrderData, steps=steps, version=version)


QUICK_TIMEOUT = 3.0
QUICK_RETRY = RetryPolicy(max_attempts=3, initial_backoff=0.2, max_backoff=1.0)
QUICK_COMPENSATION_RETRY = RetryPolicy(max_attempts=4, initial_backoff=0.3, max_backoff=2.0)

quick = variant(
    2, timeout=QUICK_TIMEOUT, retry=QUICK_RETRY, compensation_retry=QUICK_COMPENSATION_RETRY
)
patient = variant(
    3,
    timeout=600.0,
    retry=RetryPolicy(max_attempts=3, initial_backoff=0.2, max_backoff=1.0),
    compensation_retry=RetryPolicy(max_attempts=8, initial_backoff=0.5, max_backoff=10.0),
)


APPROVAL_TIMEOUT = 12.0


def _with_approval_timeout(seconds: float) -> Saga[OrderData]:
    steps = [
        replace(step, timeout=seconds) if isinstance(step, Wait) else step
        for step in create_order.steps
    ]
    return Saga(create_order.name, data=OrderData, steps=steps, version=create_order.version)


approving = _with_approval_timeout(APPROVAL_TIMEOUT)
"""``create_order`` v1 itself but for its approval timeout (12 s, not a day):
the same fingerprint, so the coordinator runs it for the sagas the order API
starts with the original (timeouts may change in place; steps may not)."""

DEADLINE = 4.0

hurried = Saga(
    create_order.name,
    data=OrderData,
    steps=create_order.steps,
    version=5,
    deadline=DEADLINE,
)
"""``create_order`` as v5 with a 4-second deadline: started by the test itself
(a deadline is set when a saga starts), so many sagas pass it in flight."""
