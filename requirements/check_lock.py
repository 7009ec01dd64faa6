"""Check, offline, that the lock files still satisfy pyproject.toml.

`make deps` (part of `make check`) runs it. `make venv` installs the lock and
then sagaflow without its dependencies, so a requirement added to
pyproject.toml but not to the lock would otherwise surface later as an
ImportError in some test. For each lock it checks that every requirement of
its extras (followed through `sagaflow[...]` self-references) has a pin that
satisfies it, and that the services lock pins the versions CI tests. Only the
standard library and `packaging` (in the lock) are used; nothing is fetched.
"""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path
from typing import Any

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
# lock file -> the extras of sagaflow it was compiled for (see `make lock`)
LOCKS = {"ci.lock": ("dev",), "services.lock": ("services",)}
# the lock whose versions every other lock must repeat
REFERENCE = "ci.lock"


def read_pins(path: Path) -> dict[str, str]:
    """Name -> version of each `name==version` line, whatever its marker.

    A pin for another platform (`colorama ; sys_platform == 'win32'`) counts
    too: the lock is universal, and this check is about names and versions.
    """
    pins: dict[str, str] = {}
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].rstrip(" \\").strip()
        if not line or line.startswith("-"):
            continue
        req = Requirement(line)
        (spec,) = req.specifier  # the compiler writes exactly one `==` each
        pins[canonicalize_name(req.name)] = spec.version
    return pins


def requirements_for(project: dict[str, Any], extras: tuple[str, ...]) -> list[Requirement]:
    """The requirements of sagaflow with `extras`, self-references expanded."""
    name = canonicalize_name(project["name"])
    optional = project.get("optional-dependencies", {})
    todo, seen = list(extras), set()
    reqs = [Requirement(r) for r in project["dependencies"]]
    while todo:
        extra = todo.pop()
        if extra in seen:
            continue
        seen.add(extra)
        for text in optional[extra]:
            req = Requirement(text)
            if canonicalize_name(req.name) == name:
                todo.extend(req.extras)
            else:
                reqs.append(req)
    return reqs


def main() -> int:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    problems: list[str] = []
    reference = read_pins(ROOT / "requirements" / REFERENCE)
    for lock, extras in LOCKS.items():
        pins = read_pins(ROOT / "requirements" / lock)
        before = len(problems)
        for req in requirements_for(project, extras):
            if req.marker is not None and not req.marker.evaluate():
                continue
            pinned = pins.get(canonicalize_name(req.name))
            if pinned is None:
                problems.append(f"{lock}: {req} is not pinned")
            elif not req.specifier.contains(pinned, prereleases=True):
                problems.append(f"{lock}: {req.name}=={pinned} does not satisfy {req}")
        if lock != REFERENCE:
            for name, version in pins.items():
                if reference.get(name) != version:
                    problems.append(
                        f"{lock}: {name}=={version}, but {REFERENCE} has {reference.get(name)}"
                    )
        if len(problems) == before:
            print(f"requirements/{lock}: {len(pins)} pins satisfy sagaflow[{','.join(extras)}]")
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    if problems:
        print("error: the lock files are stale; run `make lock` and commit them", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
