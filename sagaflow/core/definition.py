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
    WAIT = "wait"  # waits for a signal from outside; nothing to undo
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


@dataclass(frozen=True)
class Wait(Generic[D]):
    """A step that waits for a named signal sent from outside the saga (a manager's
    approval, a payment provider's webhook): see ``SagaClient.signal_saga``.

    The signal's data is validated against ``model`` and merged into the saga
    data. A signal sent before the saga reaches the wait is kept and used when it
    does; a second signal of the same name is ignored.

    Args:
        name: Unique within the saga.
        model: The pydantic model of the signal's data (required).
        signal: The signal's name; by default the step's name.
        on_signal: ``(saga data, signal data) -> new saga data``; by default the
            signal's fields that the data model also has are copied into it.
        timeout: Seconds to wait once the saga reaches the step; ``None`` waits
            until the signal comes (or the saga's deadline passes).
        on_timeout: What the timeout means: ``None`` (the default) fails the
            wait, so the saga compensates; an instance of ``model`` is taken as
            the signal's data (a declared default) and the saga goes on.
        when: A condition, as for :class:`Step`.
    """

    name: str
    model: type[BaseModel] | None = None
    signal: str | None = None
    on_signal: Callable[[D, Any], D] | None = None
    timeout: float | None = None
    on_timeout: BaseModel | None = None
    when: Callable[[D], bool] | None = None

    @property
    def kind(self) -> StepKind:
        return StepKind.WAIT

    @property
    def signal_name(self) -> str:
        return self.signal if self.signal is not None else self.name

    @property
    def compensation(self) -> None:
        """A wait has nothing to undo."""
        return None

    def merge(self, data: D, received: BaseModel) -> D:
        """The saga data with the signal's data merged in."""
        if self.on_signal is not None:
            return self.on_signal(data, received)
        fields = type(data).model_fields
        update = {k: v for k, v in received.model_dump().items() if k in fields}
        return data.model_copy(update=update)


AnyStep = Step[Any] | Wait[Any]
"""A saga's step: one that sends a command, or one that waits for a signal."""


@dataclass(frozen=True)
class Group(Generic[D]):
    """Steps whose commands are sent together; the saga goes on when all succeeded.

    Only compensatable steps, before the pivot: when one fails for good, no
    new branch starts, those in flight are abandoned (tombstoned), the
    branches that took effect are compensated in parallel, then the earlier
    steps in reverse order (docs/concepts.md, "Parallel groups"). Their
    ``on_reply`` merges run one at a time, each on the data the previous
    left, so branches never lose each other's data.

    Example:
        ``Group("reserve-and-pay", [reserve, charge])``
    """

    name: str
    steps: Sequence[Step[D]]


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
        steps: Sequence[Step[D] | Wait[D] | Group[D]],
        version: int = 1,
        deadline: float | None = None,
    ) -> None:
        check_name("saga", name)
        if not (isinstance(data, type) and issubclass(data, BaseModel)):
            raise DefinitionError(f"saga {name!r}: data must be a pydantic model class")
        if version < 1:
            raise DefinitionError(f"saga {name!r}: version must be >= 1")
        if not steps:
            raise DefinitionError(f"saga {name!r}: needs at least one step")
        if deadline is not None and not deadline > 0:
            raise DefinitionError(f"saga {name!r}: deadline must be a positive number of seconds")
        self.name = name
        self.version = version
        self.data_model: type[D] = data
        flat: list[Step[D] | Wait[D]] = []
        self.groups: dict[int, tuple[int, ...]] = {}
        """Each member's index -> the indexes of its group's members, in order."""
        self.group_names: dict[int, str] = {}
        """The first member's index -> the group's name."""
        for item in steps:
            if isinstance(item, Group):
                _validate_group(name, item)
                members = tuple(range(len(flat), len(flat) + len(item.steps)))
                self.group_names[members[0]] = item.name
                for index in members:
                    self.groups[index] = members
                flat.extend(item.steps)
            else:
                flat.append(item)
        self.steps: tuple[Step[D] | Wait[D], ...] = tuple(flat)
        self.deadline = deadline
        """Seconds from its start within which a saga should finish: before the
        pivot it is then cancelled and compensates; after, it is marked overdue."""
        self._validate()
        self.fingerprint: str = record_of(self).fingerprint
        """A hash of the definition's shape (steps, actions, kinds, order): see
        :mod:`sagaflow.core.fingerprint`."""

    def _validate(self) -> None:
        seen: set[str] = set()
        past_pivot: str | None = None
        signals: set[str] = set()
        for step in self.steps:
            where = f"saga {self.name!r} step {getattr(step, 'name', step)!r}"
            if not isinstance(step, Step | Wait):
                raise DefinitionError(f"{where}: a step must be a Step, a Wait or a Group")
            check_name("step", step.name)
            if step.name in seen:
                raise DefinitionError(f"saga {self.name!r}: duplicate step name {step.name!r}")
            seen.add(step.name)
            if step.when is not None and not callable(step.when):
                raise DefinitionError(f"{where}: when must be a function of the saga data")
            if isinstance(step, Wait):
                _validate_wait(step, where, past_pivot)
                if step.signal_name in signals:
                    raise DefinitionError(
                        f"{where}: another wait of this saga waits for signal "
                        f"{step.signal_name!r}; a signal name must name one wait"
                    )
                signals.add(step.signal_name)
                continue
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
        return frozenset(step.action.service for step in self.steps if isinstance(step, Step))

    @property
    def point_of_no_return(self) -> int:
        """The index of the pivot (or of the first retriable step); past the last
        step when every step can be undone. A saga may be cancelled, and is
        cancelled by its deadline, only while it is before this step."""
        for index, step in enumerate(self.steps):
            if step.kind in (StepKind.PIVOT, StepKind.RETRIABLE):
                return index
        return len(self.steps)

    def wait_for(self, signal: str) -> tuple[int, Wait[D]] | None:
        """The wait of this saga that waits for ``signal``, with its index."""
        for index, step in enumerate(self.steps):
            if isinstance(step, Wait) and step.signal_name == signal:
                return index, step
        return None

    def step_index(self, name: str) -> int:
        for index, step in enumerate(self.steps):
            if step.name == name:
                return index
        raise KeyError(name)

    def __repr__(self) -> str:
        return f"Saga({self.name!r}, version={self.version}, steps={[s.name for s in self.steps]})"


def _validate_group(saga: str, group: Group[Any]) -> None:
    where = f"saga {saga!r} group {getattr(group, 'name', group)!r}"
    check_name("group", group.name)
    members = list(group.steps)
    if len(members) < 2:
        raise DefinitionError(f"{where}: a group needs at least two steps")
    for step in members:
        if not isinstance(step, Step):
            what = (
                "a wait"
                if isinstance(step, Wait)
                else "a group"
                if isinstance(step, Group)
                else repr(step)
            )
            raise DefinitionError(f"{where}: holds {what}; a group holds steps only")
        if step.kind is StepKind.PIVOT:
            raise DefinitionError(
                f"{where}: step {step.name!r} is the pivot; a group cannot contain it (the pivot's "
                "outcome must be known on its own before anything after it runs)"
            )
        if step.kind is StepKind.RETRIABLE:
            raise DefinitionError(
                f"{where}: step {step.name!r} is retriable; a group runs before the pivot "
                "and holds compensatable steps only"
            )


def _validate_wait(step: Wait[Any], where: str, past_pivot: str | None) -> None:
    if step.model is None:
        raise DefinitionError(
            f"{where}: a wait needs the pydantic model of its signal's data (model=...)"
        )
    if not (isinstance(step.model, type) and issubclass(step.model, BaseModel)):
        raise DefinitionError(f"{where}: model must be a pydantic model class")
    check_name("signal", step.signal_name)
    if step.timeout is not None and not step.timeout > 0:
        raise DefinitionError(f"{where}: timeout must be positive (or None: wait until signalled)")
    if step.on_timeout is not None:
        if step.timeout is None:
            raise DefinitionError(f"{where}: on_timeout needs a timeout")
        if not isinstance(step.on_timeout, step.model):
            raise DefinitionError(
                f"{where}: on_timeout must be a {step.model.__name__}, the signal's model"
            )
    if past_pivot is not None and step.timeout is not None and step.on_timeout is None:
        raise DefinitionError(
            f"{where}: comes after the point of no return ({past_pivot!r}), so its timeout "
            "cannot compensate: give it on_timeout (a default signal) or no timeout"
        )


def to_mermaid(saga: Saga[Any]) -> str:
    """Render a saga definition as a Mermaid flowchart.

    A parallel group's steps are drawn side by side in a subgraph: the step
    before it leads to each of them, each leads to the step after it, and
    their compensations likewise run side by side. A group member that fails
    goes to its siblings' compensations (they ran alongside).
    """
    title = f"{saga.name} v{saga.version}"
    if saga.deadline is not None:
        title += f"<br/><i>deadline {saga.deadline:g}s</i>"
    lines = ["flowchart TD", f'    start(["{title}"])']
    # units: a step alone, or a parallel group's steps together, in order
    units: list[tuple[int, ...]] = []
    for index in range(len(saga.steps)):
        unit = saga.groups.get(index, (index,))
        if unit[0] == index:
            units.append(unit)
    place = {index: n for n, unit in enumerate(units) for index in unit}

    def nodes(n: int, end: str) -> list[str]:  # the nodes of unit n, or the start/end
        return [f"s{i}" for i in units[n]] if 0 <= n < len(units) else [end]

    for index, step in enumerate(saga.steps):
        node = f"s{index}"
        kind = step.kind.value if step.when is None else f"{step.kind.value}, when"
        if isinstance(step, Wait):
            if step.timeout is not None:
                kind += f", {step.timeout:g}s" + (", default" if step.on_timeout else "")
            label = f"{step.name}<br/>signal {step.signal_name}<br/><i>{kind}</i>"
            lines.append(f'    {node}{{{{"{label}"}}}}')
        else:
            label = f"{step.name}<br/>{step.action.type}<br/><i>{kind}</i>"
            lines.append(f'    {node}["{label}"]')
        lines.extend(f"    {came} --> {node}" for came in nodes(place[index] - 1, "start"))
        if step.compensation is not None:
            lines.append(f'    c{index}["{step.compensation.type}"]')
    lines.append('    done(["COMPLETED"])')
    lines.extend(f"    {came} --> done" for came in nodes(len(units) - 1, "start"))
    for first, name in saga.group_names.items():  # a group's steps run side by side
        members = saga.groups[first]
        lines.append(f'    subgraph g{first}["{name} (in parallel)"]')
        lines.extend(f"        s{i}" for i in members)
        lines.append("    end")
    for index, step in enumerate(saga.steps):
        if step.when is not None and index not in saga.groups:
            # a condition that is false goes straight on (a group member's
            # siblings still run: its label says "when")
            n = place[index]
            for came in nodes(n - 1, "start"):
                lines.extend(f"    {came} -. skipped .-> {goes}" for goes in nodes(n + 1, "done"))
    # undo units: the compensations of a unit run together, the units in reverse
    undo = [
        tuple(i for i in unit if saga.steps[i].compensation is not None)
        for unit in units
        if any(saga.steps[i].compensation is not None for i in unit)
    ]
    if undo:
        lines.append('    compensated(["COMPENSATED"])')
        for index, step in enumerate(saga.steps):
            if step.kind is StepKind.RETRIABLE:
                continue
            # a failing step undoes what completed before it; a group member,
            # also its siblings, which ran alongside
            siblings = [i for i in saga.groups.get(index, ()) if i != index]
            first = units[place[index]][0]
            before = [u for u in undo if u[0] < first]
            targets = (
                [f"c{i}" for i in siblings]
                if siblings
                else [f"c{i}" for i in before[-1]]
                if before
                else ["compensated"]
            )
            if isinstance(step, Wait):
                if step.timeout is not None and step.on_timeout is None:
                    lines.extend(f"    s{index} -. times out .-> {t}" for t in targets)
                continue
            lines.extend(f"    s{index} -. fails .-> {t}" for t in targets)
        order = list(reversed(undo))
        for unit, nxt in zip(order, [*order[1:], None], strict=True):
            goes = ["compensated"] if nxt is None else [f"c{i}" for i in nxt]
            lines.extend(f"    c{i} -.-> {g}" for i in unit for g in goes)
    return "\n".join(lines) + "\n"
