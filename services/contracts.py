"""The contract between the create-order saga and its participants.

The commands, replies and actions ship with sagaflow as the example shop
(:mod:`sagaflow.examples.shop.contracts`), so the embedded demo of an installed
sagaflow and these services speak exactly the same contract; this module
re-exports them under the services' names.
"""

from __future__ import annotations

from sagaflow.examples.shop import contracts as _shop
from sagaflow.examples.shop.contracts import *  # noqa: F403 - the same names, re-exported

__all__ = list(_shop.__all__)
