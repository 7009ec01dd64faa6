"""Saga definitions: actions, steps, retry policies and the saga itself.

A saga is data: an ordered list of steps, each naming a participant action and
the compensation that undoes it. Definitions are validated when built, so a
mistake fails at import of the user's module, never in the middle of a saga.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Generic, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from sagaflow.core.errors import DefinitionError
from sagaflow.core.fingerprint import record_of

D = TypeVar("D", bound=BaseModel)
C = TypeVar("C", bound=BaseModel)
R = TypeVar("R", bound=BaseModel)

_NAME = re.compile(r"^[a-z][a-z0-9_\-]{0,99}$")


def check_name(what: str, name: str) -> None:
    if not _NAME.match(name):
        raise DefinitionError(
            f"{what} {name!r} must be 1 to 100 lower case letters, digits, '_' or '-',"
            " starting with a letter"
        )


class RetryPolicy(BaseModel):
    """How often and how fast a failed attempt is retried.

    Delays grow exponentially: ``initial_backoff * multiplier ** (n - 1)``, capped
    at ``max_backoff``, each with up to ``jitter`` (a fraction) removed at random so
    that retries of many sagas do not arrive together.
    """

    model_config = ConfigDict(frozen=True)

    max_attempts: int = Field(default=3, ge=1)
    initial_backoff: float = Field(default=0.2, ge=0)
    max_backoff: float = Field(default=30.0, ge=0)
    multiplier: float = Field(default=2.0, ge=1)
    jitter: float = Field(default=0.2, ge=0, le=1)

    def backoff(self, retry_number: int, seed: str) -> float:
        """Delay before retry ``retry_number`` (1-based); deterministic per seed."""
        base = min(self.max_backoff, self.initial_backoff * self.multiplier ** (retry_number - 1))
        return base * (1 - self.jitter * random.Random(seed).random())


@dataclass(frozen=True)
class Action(Generic[C, R]):
    """A participant action: the service that runs it, its name and typed contract.

    Declare actions once in a module that the saga and the participant both
    import; the saga sends ``command`` models, the participant replies with
    ``reply`` models.

    Example:
        ``reserve = Action("inventory", "reserve", ReserveStock, Reservation)``
    """

    service: str
    name: str
    command: type[C]
    reply: type[R]

    def __post_init__(self) -> None:
        check_name("service", self.service)
        check_name("action", self.name)
        for label, model in (("command", self.command), ("reply", self.reply)):
            if not (isinstance(model, type) and issubclass(model, BaseModel)):
                raise DefinitionError(f"{self.type}: {label} must be a pydantic model class")

    @property
    def type(self) -> str:
        """The message type on the wire, ``service.action``."""
        return f"{self.service}.{self.name}"


class StepKind(StrEnum):
    """A step's place in the saga (Garcia-Molina's saga, Richardson's pattern)."""

    COMPENSATABLE = "compensatable"  # has a compensation; undone on failure
    PIVOT = "pivot"  # the go/no-go step: no compensation, nothing after it is undone
    RETRIABLE = "retriable"  # after the pivot: retried until it succeeds


@dataclass(frozen=True)
class Step(Generic[D]):
    """One step of a saga.

    Args:
        name: Unique within the saga.
        action: The participant action to invoke.
        command: Builds the action's command from the saga data.
        compensation: The action that undoes this one; ``None`` for a pivot or
            retriable step.
        compensation_command: Builds the compensation's command; by default the
            step's command is re-validated as the compensation's command model.
        on_reply: Merges the action's reply into the saga data, returning new data.
        retry: Retry policy of the action (ignored in count for retriable steps,
            which are retried until they succeed).
        compensation_retry: Retry policy of the compensation; when exhausted the
            saga ends FAILED and needs an operator.
        timeout: Seconds to wait for a reply before the attempt counts as failed.
        retriable: Marks a step after the pivot: it cannot fail for good.
        when: A pure predicate over the saga data, evaluated when the saga reaches
            the step: when it returns false the step is skipped (logged as
            skipped, never sent, never compensated). Not allowed on the pivot,
            whose outcome decides whether the saga can still be undone.
    """

    name: str
    action: Action[Any, Any]
    command: Callable[[D], BaseModel]
    compensation: Action[Any, Any] | None = None
    compensation_command: Callable[[D], BaseModel] | None = None
    on_reply: Callable[[D, Any], D] | None = None
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    compensation_retry: RetryPolicy = field(
        default_factory=lambda: RetryPolicy(max_attempts=10, initial_backoff=0.5, max_backoff=60)
    )
    timeout: float = 30.0
    retriable: bool = False
    when: Callable[[D], bool] | None = None

    @property
    def kind(self) -> StepKind:
        if self.compensation is not None:
            return StepKind.COMPENSATABLE
        return StepKind.RETRIABLE if self.retriable else StepKind.PIVOT


class Saga(Generic[D]):
    """A saga definition: a name, a version, a data model and ordered steps.

    Raises:
        DefinitionError: when the definition is invalid (duplicate step names,
            a compensatable step after the pivot, a retriable step with a
            compensation, bad names, a non-positive timeout...).
    """

    def __init__(
        self,
        name: str,
        *,
        data: type[D],
        steps: Sequence[Step[D]],
        version: int = 1,
    ) -> None:
        check_name("saga", name)
        if not (isinstance(data, type) and issubclass(data, BaseModel)):
            raise DefinitionError(f"saga {name!r}: data must be a pydantic model class")
        if version < 1:
            raise DefinitionError(f"saga {name!r}: version must be >= 1")
        if not steps:
            raise DefinitionError(f"saga {name!r}: needs at least one step")
        self.name = name
        self.version = version
        self.data_model: type[D] = data
        self.steps: tuple[Step[D], ...] = tuple(steps)
        self._validate()
        self.fingerprint: str = record_of(self).fingerprint
        """A hash of the definition's shape (steps, actions, kinds, order): see
        :mod:`sagaflow.core.fingerprint`."""

    def _validate(self) -> None:
        seen: set[str] = set()
        past_pivot: str | None = None
        for step in self.steps:
            where = f"saga {self.name!r} step {step.name!r}"
            check_name("step", step.name)
            if step.name in seen:
                raise DefinitionError(f"saga {self.name!r}: duplicate step name {step.name!r}")
            seen.add(step.name)
            if not isinstance(step.action, Action):
                raise DefinitionError(f"{where}: action must be an Action")
            if step.compensation is not None and not isinstance(step.compensation, Action):
                raise DefinitionError(f"{where}: compensation must be an Action")
            if step.timeout <= 0:
                raise DefinitionError(f"{where}: timeout must be positive")
            if step.retriable and step.compensation is not None:
                raise DefinitionError(
                    f"{where}: a retriable step comes after the pivot and cannot have a compensation"
                )
            if step.compensation is not None and step.compensation.service != step.action.service:
                raise DefinitionError(
                    f"{where}: compensation {step.compensation.type} must be served by "
                    f"{step.action.service!r}, the service of the action it undoes"
                )
            if past_pivot is not None and not step.retriable:
                raise DefinitionError(
                    f"{where}: comes after the point of no return ({past_pivot!r}); "
                    "it must be retriable (retriable=True, no compensation)"
                )
            if step.when is not None and not callable(step.when):
                raise DefinitionError(f"{where}: when must be a function of the saga data")
            if step.when is not None and step.kind is StepKind.PIVOT:
                raise DefinitionError(
                    f"{where}: the pivot cannot be conditional (when=): whether the saga "
                    "can still be undone must not depend on the data; make the steps "
                    "around it conditional instead"
                )
            if step.kind is not StepKind.COMPENSATABLE:
                past_pivot = step.name

    @property
    def services(self) -> frozenset[str]:
        """The participant services this saga sends commands to."""
        return frozenset(step.action.service for step in self.steps)

    def step_index(self, name: str) -> int:
        for index, step in enumerate(self.steps):
            if step.name == name:
                return index
        raise KeyError(name)

    def __repr__(self) -> str:
        return f"Saga({self.name!r}, version={self.version}, steps={[s.name for s in self.steps]})"


def to_mermaid(saga: Saga[Any]) -> str:
    """Render a saga definition as a Mermaid flowchart."""
    lines = ["flowchart TD", f'    start(["{saga.name} v{saga.version}"])']
    previous = "start"
    for index, step in enumerate(saga.steps):
        node = f"s{index}"
        kind = step.kind.value if step.when is None else f"{step.kind.value}, when"
        label = f"{step.name}<br/>{step.action.type}<br/><i>{kind}</i>"
        lines.append(f'    {node}["{label}"]')
        lines.append(f"    {previous} --> {node}")
        if step.compensation is not None:
            lines.append(f'    c{index}["{step.compensation.type}"]')
        previous = node
    lines.append('    done(["COMPLETED"])')
    lines.append(f"    {previous} --> done")
    for index, step in enumerate(saga.steps):
        if step.when is not None:  # a condition that is false goes straight on
            came = "start" if index == 0 else f"s{index - 1}"
            goes = "done" if index == len(saga.steps) - 1 else f"s{index + 1}"
            lines.append(f"    {came} -. skipped .-> {goes}")
    comps = [i for i, s in enumerate(saga.steps) if s.compensation is not None]
    if comps:
        lines.append('    compensated(["COMPENSATED"])')
        for index, step in enumerate(saga.steps):
            # a failing step undoes the compensatable steps completed before it
            before = [i for i in comps if i < index]
            if step.kind is StepKind.RETRIABLE:
                continue
            target = f"c{before[-1]}" if before else "compensated"
            lines.append(f"    s{index} -. fails .-> {target}")
        order = list(reversed(comps))
        for i, nxt in zip(order, [*order[1:], None], strict=True):
            lines.append(f"    c{i} -.-> {'compensated' if nxt is None else f'c{nxt}'}")
    return "\n".join(lines) + "\n"
