"""The example shop: a create-order saga over order, inventory, payment and shipping.

- :mod:`~sagaflow.examples.shop.contracts`: the commands, replies and actions;
- :mod:`~sagaflow.examples.shop.saga`: the create-order saga, declared as data;
- :mod:`~sagaflow.examples.shop.participants`: the four participants' handlers,
  their business rules, an in-memory repository each, and ``place_order``;
- :mod:`~sagaflow.examples.shop.demo`: the embedded demo (``sagaflow demo``),
  in one process over the in-memory transport and stores (needs ``rich``, in
  the ``cli`` extra).

The repository's ``services/`` runs the same participants as real processes,
with PostgreSQL repositories in place of the in-memory ones.
"""
