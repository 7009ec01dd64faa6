"""Examples that ship with sagaflow; ``sagaflow demo`` runs :mod:`sagaflow.examples.shop`.

They use only sagaflow's public API (``sagaflow``, ``sagaflow.transport``,
``sagaflow.store``, ``sagaflow.testing``), as a user's code would.
"""
