"""The create-order saga, declared as data (see :mod:`sagaflow.examples.shop.saga`).

::

    validate  (order)      compensation: reject   (order)
    reserve   (inventory)  compensation: release  (inventory)
    charge    (payment)    compensation: refund   (payment)
    schedule  (shipping)   compensation: cancel   (shipping)
    approve   (order)      retriable: cannot fail once the rest succeeded

The saga ships with sagaflow as the example shop, so the embedded demo and
these services run the very same definition; this module names it for the
processes: ``sagaflow coordinator services.order.saga:create_order``.
``chain_saga(n)`` builds longer sagas from the same actions for the benchmark.
"""

from __future__ import annotations

from sagaflow.examples.shop import saga as _shop
from sagaflow.examples.shop.saga import *  # noqa: F403 - the same names, re-exported

__all__ = list(_shop.__all__)
