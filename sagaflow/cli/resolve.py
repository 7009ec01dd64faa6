"""``MODULE:ATTR`` resolution: how the CLI finds the user's sagas and participants.

Like uvicorn, the current directory goes first on the import path, so
``sagaflow coordinator services.order.sagas:create_order`` works from the root
of a project that is not installed.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from collections.abc import Iterable
from typing import Any

from sagaflow.cli.common import CliError, UsageProblem
from sagaflow.core.definition import Saga
from sagaflow.core.errors import DefinitionError
from sagaflow.runtime.participant import Participant

__all__ = [
    "describe",
    "ensure_cwd_importable",
    "import_module",
    "load_participant",
    "load_sagas",
    "resolve",
    "split_specs",
]


def ensure_cwd_importable() -> None:
    """Put the current working directory first on ``sys.path`` (once)."""
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)


def import_module(name: str) -> Any:
    """Import ``name`` with the current directory on the path, with clear errors.

    Raises:
        UsageProblem: no such module, or its definitions are invalid.
        CliError: the module raised while being imported.
    """
    ensure_cwd_importable()
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        missing = exc.name or ""
        if missing and (name == missing or name.startswith(missing + ".")):
            raise UsageProblem(
                f"cannot import {name!r}: no module named {missing!r} "
                f"(looked in the current directory {os.getcwd()!r} and sys.path)"
            ) from exc
        raise CliError(f"cannot import {name!r}: {exc}") from exc
    except DefinitionError as exc:
        raise UsageProblem(f"cannot import {name!r}: invalid definition: {exc}") from exc
    except Exception as exc:
        raise CliError(f"cannot import {name!r}: {type(exc).__name__}: {exc}") from exc


def resolve(spec: str) -> Any:
    """The object named by ``MODULE:ATTR`` (``ATTR`` may be dotted: ``mod:obj.attr``).

    Raises:
        UsageProblem: the spec is malformed, the module cannot be found, or it
            has no such attribute.
        CliError: the module raised while being imported.
    """
    module_name, sep, attr = spec.strip().partition(":")
    parts = attr.split(".")
    if not sep or not module_name or not all(part.isidentifier() for part in parts):
        raise UsageProblem(f"{spec!r} is not MODULE:ATTR (for example 'myapp.sagas:create_order')")
    value = import_module(module_name)
    owner = module_name
    for part in parts:
        try:
            value = getattr(value, part)
        except AttributeError:
            raise UsageProblem(f"{owner!r} has no attribute {part!r}") from None
        owner = f"{owner}.{part}" if owner != module_name else f"{module_name}:{part}"
    return value


def describe(value: Any) -> str:
    """What a value is, for "is a ..., expected a Saga" messages."""
    if inspect.isclass(value):
        return f"class ({value.__name__})"
    if inspect.ismodule(value):
        return "module"
    if inspect.isroutine(value):
        return "function"
    return type(value).__name__


def split_specs(values: Iterable[str]) -> list[str]:
    """Specs given as repeated options, commas or whitespace (``SAGAFLOW_SAGAS="a:b,c:d"``)."""
    specs: list[str] = []
    for value in values:
        specs.extend(part for part in value.replace(",", " ").split() if part)
    return specs


def load_sagas(specs: Iterable[str]) -> list[Saga[Any]]:
    """The sagas named by ``specs``: each a ``Saga`` or a list/tuple of them.

    Raises:
        UsageProblem: no spec, or one names something else.
    """
    specs = list(specs)
    if not specs:
        raise UsageProblem("no saga definitions: pass MODULE:ATTR (--module) or set SAGAFLOW_SAGAS")
    sagas: list[Saga[Any]] = []
    for spec in specs:
        value = resolve(spec)
        items = list(value) if isinstance(value, list | tuple) else [value]
        if not items:
            raise UsageProblem(f"{spec!r} is an empty {type(value).__name__}, expected Sagas")
        for item in items:
            if not isinstance(item, Saga):
                what = describe(item)
                if item is value:
                    raise UsageProblem(f"{spec!r} is a {what}, expected a Saga")
                raise UsageProblem(f"{spec!r} holds a {what}, expected only Sagas")
            if not any(item is known for known in sagas):
                sagas.append(item)
    return sagas


def load_participant(spec: str) -> Participant:
    """The participant named by ``spec``.

    Raises:
        UsageProblem: the spec does not resolve to a ``Participant``.
    """
    value = resolve(spec)
    if not isinstance(value, Participant):
        raise UsageProblem(f"{spec!r} is a {describe(value)}, expected a Participant")
    return value
