"""``sagaflow.core`` knows no I/O: it imports without asyncio, the broker, the
database driver or OpenTelemetry.

Checked twice: by importing every core module in a fresh interpreter where
those packages cannot be imported, and by reading the sources, so an import
hidden inside a function is caught too.
"""

from __future__ import annotations

import ast
import pkgutil
import subprocess
import sys
import textwrap
from pathlib import Path

import sagaflow.core

FORBIDDEN = ("asyncio", "aio_pika", "aiormq", "asyncpg", "opentelemetry")
CORE_DIR = Path(sagaflow.core.__file__).parent
CORE_MODULES = sorted(
    f"sagaflow.core.{info.name}" for info in pkgutil.iter_modules([str(CORE_DIR)])
)

_BLOCKED_IMPORT = textwrap.dedent(
    """
    import importlib.abc
    import sys

    FORBIDDEN = {forbidden!r}

    class Blocker(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in FORBIDDEN:
                raise ImportError(f"{{name}} is blocked: sagaflow.core must not import it")
            return None

    for name in list(sys.modules):
        if name.split(".")[0] in FORBIDDEN:
            del sys.modules[name]
    sys.meta_path.insert(0, Blocker())

    # sagaflow/__init__.py re-exports the runtime (which rightly uses asyncio);
    # register the package without running it, so only the core's own imports
    # are exercised.
    import importlib
    import types

    package = types.ModuleType("sagaflow")
    package.__path__ = [{package_dir!r}]
    sys.modules["sagaflow"] = package
    for module in {modules!r}:
        importlib.import_module(module)

    loaded = sorted(n for n in sys.modules if n.split(".")[0] in FORBIDDEN)
    assert not loaded, loaded
    print("imported", len({modules!r}), "core modules")
    """
)


def test_core_modules_are_found() -> None:
    assert {"sagaflow.core.definition", "sagaflow.core.engine"} <= set(CORE_MODULES)


def test_core_imports_with_io_packages_blocked() -> None:
    script = _BLOCKED_IMPORT.format(
        forbidden=set(FORBIDDEN), modules=CORE_MODULES, package_dir=str(CORE_DIR.parent)
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert f"imported {len(CORE_MODULES)} core modules" in result.stdout


def test_blocker_really_blocks() -> None:
    # guard against a blocker that silently lets everything through
    script = _BLOCKED_IMPORT.format(
        forbidden=set(FORBIDDEN), modules=["asyncio"], package_dir=str(CORE_DIR.parent)
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert result.returncode != 0
    assert "asyncio is blocked" in result.stderr


def _imported_modules(source: str) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute | ast.Name)
            and getattr(node.func, "attr", getattr(node.func, "id", "")) == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            found.add(node.args[0].value)
    return found


def test_core_sources_do_not_import_io_packages() -> None:
    offenders = {}
    for path in sorted(CORE_DIR.glob("*.py")):
        bad = {
            name
            for name in _imported_modules(path.read_text(encoding="utf-8"))
            if name.split(".")[0] in FORBIDDEN
        }
        if bad:
            offenders[path.name] = sorted(bad)
    assert not offenders, f"sagaflow/core imports I/O packages: {offenders}"


def test_core_sources_do_not_import_the_runtime_or_adapters() -> None:
    # the dependency points inwards only: runtime and adapters import the core
    outer = ("sagaflow.runtime", "sagaflow.transport", "sagaflow.store", "sagaflow.cli")
    offenders = {}
    for path in sorted(CORE_DIR.glob("*.py")):
        bad = {
            name
            for name in _imported_modules(path.read_text(encoding="utf-8"))
            if name.startswith(outer)
        }
        if bad:
            offenders[path.name] = sorted(bad)
    assert not offenders, f"sagaflow/core imports outer layers: {offenders}"
