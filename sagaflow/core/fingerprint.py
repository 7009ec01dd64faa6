"""A definition's fingerprint: what a saga in flight depends on, hashed.

A saga that started on ``create-order`` v1 is driven, step by step, by whatever
definition the coordinator loads under that name and version. Editing v1 in
place (a step removed, an action swapped, a step made a pivot) while v1 sagas
are in flight would run them on a definition they did not start with: a
compensation that no longer exists, a reservation nobody releases. So each
definition has a *shape* (its steps in order, with their kind, action,
compensation and whether they are conditional) and a fingerprint of that shape;
the fingerprint is stored with every saga and, per name and version, in the
store. A coordinator that loads a definition whose name and version the store
knows with another fingerprint refuses to start (:func:`drift`), naming the
difference: change a definition by bumping its version, and run both versions
until the old sagas finish.

Timeouts, retry policies and the code of the command builders are not part of
the shape: they may change in place (the fault scenarios run the same steps
under other timings as other versions, but could as well use the same one).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sagaflow.core.definition import Saga, Step, Wait

__all__ = ["DefinitionRecord", "drift", "fingerprint", "record_of", "shape"]


def shape(saga: Saga[Any]) -> dict[str, Any]:
    """What a saga in flight depends on, as plain data (the fingerprint's input)."""
    return {
        "saga": saga.name,
        "version": saga.version,
        "steps": [
            _step_shape(step, _group_name(saga, index)) for index, step in enumerate(saga.steps)
        ],
    }


def _group_name(saga: Saga[Any], index: int) -> str | None:
    members = saga.groups.get(index)
    return None if members is None else saga.group_names[members[0]]


def _step_shape(step: Step[Any] | Wait[Any], group: str | None = None) -> dict[str, Any]:
    # features a step does not use are left out, so that a definition's
    # fingerprint does not change when sagaflow learns a new one
    from sagaflow.core.definition import Wait

    if isinstance(step, Wait):
        wait: dict[str, Any] = {
            "name": step.name,
            "kind": step.kind.value,
            "signal": step.signal_name,
            "on_timeout": "none"
            if step.timeout is None
            else ("compensate" if step.on_timeout is None else "default"),
        }
        if step.when is not None:
            wait["conditional"] = True
        return wait
    out: dict[str, Any] = {
        "name": step.name,
        "kind": step.kind.value,
        "action": step.action.type,
        "compensation": None if step.compensation is None else step.compensation.type,
    }
    if step.when is not None:
        out["conditional"] = True
    if group is not None:
        out["group"] = group
    return out


def fingerprint(shape_: dict[str, Any]) -> str:
    """A short stable hash of a shape (sha256 of its canonical JSON, 16 hex digits)."""
    canonical = json.dumps(shape_, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class DefinitionRecord:
    """A definition's name, version, fingerprint and shape, as the store keeps it."""

    name: str
    version: int
    fingerprint: str
    shape: dict[str, Any]


def record_of(saga: Saga[Any]) -> DefinitionRecord:
    """The record a store keeps for ``saga``."""
    s = shape(saga)
    return DefinitionRecord(saga.name, saga.version, fingerprint(s), s)


def drift(recorded: DefinitionRecord, loaded: DefinitionRecord) -> str | None:
    """``None`` when ``loaded`` is the definition ``recorded`` was made from; else one
    line naming the first difference and saying to bump the version."""
    if recorded.fingerprint == loaded.fingerprint:
        return None
    return (
        f"saga {loaded.name!r} v{loaded.version} is not the definition its sagas were "
        f"started with (fingerprint {recorded.fingerprint}, now {loaded.fingerprint}): "
        f"{_difference(recorded.shape, loaded.shape)}; leave v{loaded.version} as it was "
        f"and declare the change as version {loaded.version + 1}"
    )


def _difference(before: dict[str, Any], after: dict[str, Any]) -> str:
    old = {s["name"]: s for s in before.get("steps", [])}
    new = {s["name"]: s for s in after.get("steps", [])}
    removed = [name for name in old if name not in new]
    added = [name for name in new if name not in old]
    if removed or added:
        parts = [f"step {name!r} removed" for name in removed]
        parts += [f"step {name!r} added" for name in added]
        return ", ".join(parts)
    if list(old) != list(new):
        return f"steps reordered: was {list(old)}, now {list(new)}"
    for name, was in old.items():
        now = new[name]
        for key in sorted(set(was) | set(now)):
            if was.get(key) != now.get(key):
                return f"step {name!r} {key} was {was.get(key)!r}, now {now.get(key)!r}"
    for key in sorted(set(before) | set(after)):
        if before.get(key) != after.get(key):
            return f"{key} was {before.get(key)!r}, now {after.get(key)!r}"
    return "the shape changed"
