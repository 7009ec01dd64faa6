"""Compensation coverage: which steps' compensations the tests exercised.

Every :class:`~sagaflow.testing.SagaTestEnvironment` reports, when it closes,
the saga definitions it ran and the compensations that succeeded in its sagas.
The pytest plugin prints the total per saga definition at the end of the
session (``--saga-coverage-fail-under=PERCENT`` fails the run below that).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from sagaflow.core.definition import Saga

__all__ = ["COVERAGE", "CompensationCoverage", "SagaCoverage"]


@dataclass
class SagaCoverage:
    """One saga definition: its compensatable steps and those whose undo ran."""

    name: str
    compensatable: tuple[str, ...]
    exercised: set[str] = field(default_factory=set)

    @property
    def missing(self) -> list[str]:
        return [step for step in self.compensatable if step not in self.exercised]

    @property
    def percent(self) -> float:
        if not self.compensatable:
            return 100.0
        done = sum(1 for step in self.compensatable if step in self.exercised)
        return 100.0 * done / len(self.compensatable)


def flat(steps: Iterable[Any]) -> Iterator[Any]:
    """The steps of a definition, those inside groups of steps included."""
    for step in steps:
        inner = getattr(step, "steps", None)
        if isinstance(inner, list | tuple):
            yield from flat(inner)
        else:
            yield step


class CompensationCoverage:
    """Collects what the environments of a test session did."""

    def __init__(self) -> None:
        self.sagas: dict[str, SagaCoverage] = {}

    def define(self, saga: Saga[Any]) -> None:
        """A saga definition a test ran."""
        steps = tuple(
            step.name
            for step in flat(saga.steps)
            if getattr(step, "compensation", None) is not None
        )
        known = self.sagas.get(saga.name)
        if known is None:
            self.sagas[saga.name] = SagaCoverage(saga.name, steps)
        else:  # another version: the union of its steps
            known.compensatable = tuple(dict.fromkeys([*known.compensatable, *steps]))

    def exercised(self, saga_name: str, steps: Iterable[str]) -> None:
        """Compensations of a saga of ``saga_name`` that succeeded."""
        coverage = self.sagas.get(saga_name)
        if coverage is not None:
            coverage.exercised.update(steps)

    @property
    def percent(self) -> float:
        """Exercised compensations over all, every saga definition together."""
        total = sum(len(c.compensatable) for c in self.sagas.values())
        if total == 0:
            return 100.0
        done = sum(len(c.compensatable) - len(c.missing) for c in self.sagas.values())
        return 100.0 * done / total

    def report(self) -> list[str]:
        """The report's lines: one per saga definition, then the total."""
        lines = []
        width = max((len(name) for name in self.sagas), default=4)
        for name in sorted(self.sagas):
            coverage = self.sagas[name]
            done = len(coverage.compensatable) - len(coverage.missing)
            missing = ", ".join(coverage.missing) or "-"
            lines.append(
                f"{name:<{width}}  {done}/{len(coverage.compensatable)}"
                f"  {coverage.percent:5.1f}%  never compensated: {missing}"
            )
        lines.append(f"{'TOTAL':<{width}}  {self.percent:5.1f}%")
        return lines

    def clear(self) -> None:
        self.sagas.clear()


COVERAGE = CompensationCoverage()
"""The session's coverage (what the pytest plugin reports)."""
