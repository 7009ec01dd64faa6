"""The public API is exactly what ``sagaflow.__all__`` lists, and every name is documented.

Changing the list is a decision, not an accident: update ``EXPECTED`` in the
same change, and say so in the changelog.
"""

from __future__ import annotations

import importlib
import inspect

import pytest

import sagaflow

EXPECTED = [
    "Action",
    "BusinessFailure",
    "ConcurrencyConflict",
    "ConfigurationError",
    "Coordinator",
    "DefinitionError",
    "Group",
    "HandlerContext",
    "Hooks",
    "MessageRejected",
    "Participant",
    "RetryPolicy",
    "Saga",
    "SagaClient",
    "SagaHandle",
    "SagaState",
    "SagaStatus",
    "SagaView",
    "SagaflowError",
    "Step",
    "StoreError",
    "TransportError",
    "Wait",
    "Worker",
]


def test_all_is_pinned() -> None:
    assert sorted(sagaflow.__all__) == sagaflow.__all__, "keep __all__ sorted"
    assert sagaflow.__all__ == EXPECTED


def test_no_duplicates() -> None:
    assert len(set(sagaflow.__all__)) == len(sagaflow.__all__)


def test_star_import_gives_exactly_all() -> None:
    namespace: dict[str, object] = {}
    exec("from sagaflow import *", namespace)
    exported = {name for name in namespace if name != "__builtins__"}
    assert exported == set(EXPECTED)


@pytest.mark.parametrize("name", EXPECTED)
def test_name_is_importable_and_documented(name: str) -> None:
    module = importlib.import_module("sagaflow")
    obj = getattr(module, name)
    doc = inspect.getdoc(obj)
    assert doc, f"sagaflow.{name} has no docstring"
    # inherited docstrings do not count: each public name says what it is
    assert obj.__doc__ and obj.__doc__.strip(), f"sagaflow.{name} has no docstring of its own"


@pytest.mark.parametrize("name", EXPECTED)
def test_name_is_defined_inside_sagaflow(name: str) -> None:
    obj = getattr(sagaflow, name)
    assert obj.__module__.startswith("sagaflow."), f"{name} comes from {obj.__module__}"


def test_package_is_typed() -> None:
    from importlib import resources

    assert resources.files("sagaflow").joinpath("py.typed").is_file()


def test_the_packaged_example_uses_only_the_public_api() -> None:
    """``sagaflow.examples`` is written as a user would write it (and ``services/``
    builds on it): it imports ``sagaflow``, its adapters and itself, nothing private."""
    import ast
    from importlib import resources

    allowed = {"sagaflow", "sagaflow.store", "sagaflow.transport", "sagaflow.testing"}
    root = resources.files("sagaflow").joinpath("examples")
    files = [
        f for d in (root, root.joinpath("shop")) for f in d.iterdir() if f.name.endswith(".py")
    ]
    assert len(files) >= 5
    for file in files:
        for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
            if (
                isinstance(node, ast.ImportFrom)
                and node.module
                and node.module.startswith("sagaflow")
            ):
                module = node.module
                assert module in allowed or module.startswith("sagaflow.examples"), (
                    f"{file.name} imports {module}: the example must use the public API"
                )
