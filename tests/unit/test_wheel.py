"""The wheel, installed on its own, is a working library and runs ``sagaflow demo``.

The wheel is built offline (``pip wheel --no-build-isolation``) and installed
with ``--no-deps`` into a fresh virtualenv that sees neither this checkout nor
the system's packages. Its dependencies are then linked in from this
environment, but only those the *wheel's own metadata* asks for: first the
core, then the ``cli`` extra. A dependency the package imports without
declaring it fails here as it would for a user. (No network: about 10 s.)
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from collections.abc import Iterable
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.timeout(180)


def run(*argv: str | Path, cwd: Path, **kwargs: str) -> subprocess.CompletedProcess[str]:
    environ = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SAGAFLOW_", "OTEL_", "PYTHON", "VIRTUAL_ENV"))
    }
    environ.update(PYTHONNOUSERSITE="1", PYTHONDONTWRITEBYTECODE="1", **kwargs)
    return subprocess.run(
        [str(a) for a in argv],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
        env=environ,
        check=False,
    )


def wheel_requirements(wheel: Path) -> list[Requirement]:
    with zipfile.ZipFile(wheel) as archive:
        name = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        text = archive.read(name).decode()
    return [
        Requirement(line.partition(":")[2].strip())
        for line in text.splitlines()
        if line.startswith("Requires-Dist:")
    ]


def closure(own: list[Requirement], extras: set[str]) -> set[str]:
    """The distributions (canonical names) the wheel needs with ``extras``,
    resolved against what this environment has installed."""
    needed: set[str] = set()
    todo: list[tuple[list[Requirement], set[str]]] = [(own, extras)]
    seen: set[tuple[str, frozenset[str]]] = set()
    while todo:
        requirements, wanted = todo.pop()
        for requirement in requirements:
            applies = requirement.marker is None or any(
                requirement.marker.evaluate({"extra": extra}) for extra in (wanted or {""})
            )
            if not applies:
                continue
            name = canonicalize_name(requirement.name)
            key = (name, frozenset(requirement.extras))
            if key in seen:
                continue
            seen.add(key)
            if name == "sagaflow":  # an extra naming other extras
                todo.append((own, set(requirement.extras)))
                continue
            needed.add(name)
            dist = metadata.distribution(name)
            todo.append(([Requirement(r) for r in dist.requires or []], set(requirement.extras)))
    return needed


def link(names: Iterable[str], site: Path) -> None:
    """Symlink each distribution's top-level files into ``site`` (dist-info included)."""
    for name in names:
        dist = metadata.distribution(name)
        tops = {Path(str(f)).parts[0] for f in dist.files or []} - {".."}
        base = Path(str(dist.locate_file("")))
        for top in tops:
            target = site / top
            if not target.exists() and (base / top).exists():
                target.symlink_to(base / top)


def test_the_wheel_is_a_library_and_runs_the_demo(tmp_path: Path) -> None:
    built = run(
        sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
        "--wheel-dir", tmp_path / "dist", ROOT,
        cwd=tmp_path,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr
    (wheel,) = (tmp_path / "dist").glob("sagaflow-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
    assert "sagaflow/examples/shop/demo.py" in names
    assert "sagaflow/py.typed" in names
    assert any(n.startswith("sagaflow/store/migrations/") and n.endswith(".sql") for n in names)
    # the dashboard's pages and script ship in the wheel: no build step, no Node
    for shipped in ("templates/saga.html", "templates/base.html", "static/live.js"):
        assert f"sagaflow/dashboard/{shipped}" in names, shipped
    assert not any(n.startswith(("services/", "tests/", "bench/")) for n in names)

    venv = tmp_path / "venv"
    made = run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    python, sagaflow = venv / "bin" / "python", venv / "bin" / "sagaflow"
    pip = (sys.executable, "-m", "pip", "--python", python)
    installed = run(*pip, "install", "--quiet", "--no-deps", "--no-index", wheel, cwd=tmp_path)
    assert installed.returncode == 0, installed.stderr
    site = Path(
        run(
            python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=tmp_path
        ).stdout.strip()
    )

    # the core alone: the library imports and the command says what to install
    own = wheel_requirements(wheel)
    core = closure(own, set())
    assert not core & {"typer", "rich", "structlog", "prometheus-client"}
    link(core, site)
    assert run(*pip, "check", cwd=tmp_path).returncode == 0
    library = run(
        python, "-c",
        "import sagaflow, sagaflow.testing, sagaflow.telemetry, sagaflow.transport, "
        "sagaflow.store, sagaflow.examples.shop.participants; print(sagaflow.__file__)",
        cwd=tmp_path,
    )  # fmt: skip
    assert library.returncode == 0, library.stderr
    assert library.stdout.startswith(str(venv)), "the checkout leaked into the venv"
    bare = run(sagaflow, "--version", cwd=tmp_path)
    assert bare.returncode == 1
    assert "pip install 'sagaflow[cli]'" in bare.stderr

    # with the cli extra: the embedded demo, from the wheel alone
    link(closure(own, {"cli"}) - core, site)
    version = run(sagaflow, "--version", cwd=tmp_path)
    assert version.stdout.strip() == f"sagaflow {metadata.version('sagaflow')}", version.stderr
    demo = run(sagaflow, "demo", "--orders", "40", cwd=tmp_path, COLUMNS="120")
    assert demo.returncode == 0, demo.stderr + demo.stdout
    assert "create-order sagas (embedded)" in demo.stdout
    assert "COMPLETED" in demo.stdout
    assert "COMPENSATED" in demo.stdout
    assert "40 sagas in" in demo.stdout
    assert "timeline of compensated saga" in demo.stdout

    real = run(sagaflow, "demo", "--real", cwd=tmp_path)
    assert real.returncode == 2
    assert "not installed with the package" in real.stderr
