"""Test sagas like sagaflow tests its own: real coordinator and workers in one
process, real participant code (with a throwaway PostgreSQL database), faults
on demand, a fake clock that never hangs, an effects-once check and
compensation coverage. docs/testing.md is the guide; the pytest plugin
(``sagaflow.testing.plugin``, loaded automatically) gives the fixtures
``saga_env`` and ``saga_database``.
"""

from sagaflow.core.errors import NoConnection
from sagaflow.testing.clock import FakeClock
from sagaflow.testing.coverage import COVERAGE, CompensationCoverage
from sagaflow.testing.database import ThrowawayDatabase
from sagaflow.testing.effects import EffectsNotOnce, EffectsReport, check_effects_once
from sagaflow.testing.env import HandlerFailed, HarnessTimeout, SagaTestEnvironment
from sagaflow.testing.faults import Faults, InjectedCrash
from sagaflow.testing.history import SagaHistory

__all__ = [
    "COVERAGE",
    "CompensationCoverage",
    "EffectsNotOnce",
    "EffectsReport",
    "FakeClock",
    "Faults",
    "HandlerFailed",
    "HarnessTimeout",
    "InjectedCrash",
    "NoConnection",
    "SagaHistory",
    "SagaTestEnvironment",
    "ThrowawayDatabase",
    "check_effects_once",
]
