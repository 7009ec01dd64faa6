"""docs/testing.md, run as the user's project it describes, outside this repository.

The page's code blocks are the files of a small project (each starts with
``# file: NAME``; ``shop.py`` starts with the README's "A saga in forty
lines"). The wheel is built offline and installed into a fresh virtualenv
with only what its ``testing`` extra asks for (pytest, pytest-asyncio) and the
core's dependencies, linked from this environment as tests/unit/test_wheel.py
does; then pytest runs the project there against a real PostgreSQL, with the
plugin found through its entry point, and ``--saga-coverage-fail-under=100``.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from tests.conftest import PG_ADMIN_DSN
from tests.unit.test_wheel import closure, link, run, wheel_requirements

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.timeout(240)


PLAIN = """
def test_pytest_still_works():
    assert True


def test_a_fixture_of_the_plugin(saga_env):
    pass
"""


def readme_saga() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## A saga in forty lines", 1)[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


def doc_project(dest: Path) -> list[str]:
    """Write docs/testing.md's project into ``dest``; returns its ``text`` blocks
    (output the page shows, which the run must print)."""
    page = (ROOT / "docs" / "testing.md").read_text(encoding="utf-8")
    files: dict[str, str] = {}
    shown: list[str] = []
    for lang, body in re.findall(r"```(\w*)\n(.*?)```", page, re.S):
        if lang == "text":
            shown.append(body)
            continue
        assert lang in ("python", "toml"), f"a {lang or 'plain'} block nothing runs"
        first, _, rest = body.partition("\n")
        assert first.startswith("# file: "), f"a block that is no file: {first!r}"
        name = first.removeprefix("# file: ").strip()
        files[name] = files.get(name, "") + rest + "\n"
    files["shop.py"] = readme_saga() + "\n\n" + files["shop.py"]
    assert set(files) == {"pyproject.toml", "shop.py", "test_shop.py"}
    for name, content in files.items():
        (dest / name).write_text(content, encoding="utf-8")
    return shown


def lines(text: str) -> list[str]:
    """Non-blank lines, spaces collapsed, the rules of a pytest heading dropped."""
    return [" ".join(line.strip("= ").split()) for line in text.splitlines() if line.strip("= ")]


def test_the_testing_guide_runs_in_a_fresh_venv_with_the_wheel(tmp_path: Path) -> None:
    built = run(
        sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
        "--wheel-dir", tmp_path / "dist", ROOT,
        cwd=tmp_path,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr
    (wheel,) = (tmp_path / "dist").glob("sagaflow-*.whl")
    venv = tmp_path / "venv"
    assert run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=tmp_path).returncode == 0
    python = venv / "bin" / "python"
    pip = (sys.executable, "-m", "pip", "--python", python)
    installed = run(*pip, "install", "--quiet", "--no-deps", "--no-index", wheel, cwd=tmp_path)
    assert installed.returncode == 0, installed.stderr
    site = Path(
        run(
            python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=tmp_path
        ).stdout.strip()
    )
    own = wheel_requirements(wheel)
    needed = closure(own, {"testing"})
    assert {"pytest", "pytest-asyncio"} <= needed
    assert not needed & {"typer", "fastapi", "hypothesis"}  # only what testing asks for

    # sagaflow and pytest without the extra: pytest works, the fixtures say what is missing
    bare = closure(own, set()) | closure([Requirement("pytest")], set())
    assert "pytest-asyncio" not in bare
    link(bare, site)
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "test_plain.py").write_text(PLAIN, encoding="utf-8")
    without = run(python, "-m", "pytest", "-p", "no:cacheprovider", "-q", cwd=plain)
    assert without.returncode == 1, without.stdout + without.stderr
    assert "1 passed, 1 error" in without.stdout, without.stdout
    assert "saga_env needs pytest-asyncio: pip install 'sagaflow[testing]'" in without.stdout

    link(needed - bare, site)
    assert run(*pip, "check", cwd=tmp_path).returncode == 0

    project = tmp_path / "project"
    project.mkdir()
    shown = doc_project(project)
    done = run(
        python, "-m", "pytest", "-p", "no:cacheprovider", "-q", "--saga-coverage-fail-under=100",
        cwd=project, SAGAFLOW_TEST_PG=PG_ADMIN_DSN,
    )  # fmt: skip
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert "9 passed" in output, output
    where = run(python, "-c", "import sagaflow; print(sagaflow.__file__)", cwd=project)
    assert where.stdout.startswith(str(venv)), "the checkout leaked into the venv"
    printed = lines(output)
    for block in shown:
        for line in lines(block):
            assert line in printed, f"the page shows {line!r}; the run printed:\n{output}"


def test_coverage_fails_a_run_that_never_compensated(tmp_path: Path) -> None:
    """The same project with only its happy-path test: the report names the
    compensation no test exercised, and the threshold fails the run."""
    doc_project(tmp_path)
    test = (tmp_path / "test_shop.py").read_text(encoding="utf-8")
    head = test.split("async def test_too_many", 1)[0]
    (tmp_path / "test_shop.py").write_text(head, encoding="utf-8")
    done = run(
        sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q",
        "--saga-coverage-fail-under=50",
        cwd=tmp_path, SAGAFLOW_TEST_PG=PG_ADMIN_DSN,
    )  # fmt: skip
    output = done.stdout + done.stderr
    assert "1 passed" in output, output
    assert done.returncode == 1, output
    assert "create-order 0/1 0.0% never compensated: reserve" in lines(output)
    assert "FAIL: compensation coverage 0.0% is under 50%" in output


def test_a_database_without_a_server_configured_fails_and_says_how(tmp_path: Path) -> None:
    (tmp_path / "test_db.py").write_text(
        "async def test_needs_a_database(saga_database):\n    pass\n", encoding="utf-8"
    )
    (tmp_path / "pytest.ini").write_text("[pytest]\nasyncio_mode = auto\n", encoding="utf-8")
    done = run(sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", cwd=tmp_path)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "1 error" in done.stdout
    assert "saga_database needs a PostgreSQL server: pass --saga-postgres=URL" in done.stdout
