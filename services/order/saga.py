"""The create-order saga, declared as data (see :mod:`sagaflow.examples.shop.saga`).

::

    validate  (order)      compensation: reject   (order)
    in parallel (the group reserve-and-charge):
      reserve (inventory)  compensation: release  (inventory)
      charge  (payment)    compensation: refund   (payment)
    approval  (wait)       large orders only: a manager's signal ``approval``
    gift-wrap (shipping)   only when asked; compensation: unwrap (shipping)
    schedule  (shipping)   compensation: cancel   (shipping)
    approve   (order)      retriable: cannot fail once the rest succeeded

That is version 2 (``create_order``); version 1 (``create_order_v1``, reserve
then charge) stays loaded so that sagas started on it finish on it.
The saga ships with sagaflow as the example shop, so the embedded demo and
these services run the very same definitions; this module names them for the
processes: ``sagaflow coordinator services.order.saga:SAGAS`` (both versions).
``chain_saga(n)`` builds longer sagas from the same actions for the benchmark.
"""

from __future__ import annotations

from sagaflow.examples.shop import saga as _shop
from sagaflow.examples.shop.saga import *  # noqa: F403 - the same names, re-exported

__all__ = list(_shop.__all__)
