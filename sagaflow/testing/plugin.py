"""The pytest plugin of sagaflow (loaded by its ``pytest11`` entry point).

Fixtures:
    saga_env: ``await saga_env(sagas, participants, **options)`` starts a
        :class:`~sagaflow.testing.SagaTestEnvironment`; it is closed after the test.
    saga_database: a :class:`~sagaflow.testing.ThrowawayDatabase` created for the
        test on the server of ``--saga-postgres`` (or ``SAGAFLOW_TEST_PG``, or the
        ``saga_postgres`` ini option) and dropped after it.

At the end of the session it prints the compensation coverage of every saga
definition the tests ran; ``--saga-coverage-fail-under=PERCENT`` fails the run
below it. The async fixtures need pytest-asyncio (``pip install 'sagaflow[testing]'``).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Iterable
from typing import Any

import pytest

from sagaflow.core.definition import Saga
from sagaflow.runtime.participant import Participant
from sagaflow.testing.coverage import COVERAGE
from sagaflow.testing.database import ThrowawayDatabase
from sagaflow.testing.env import SagaTestEnvironment

try:
    import pytest_asyncio
except ImportError:  # pragma: no cover - the testing extra brings it
    pytest_asyncio = None  # type: ignore[assignment]  # without it, the fixtures say so

EnvFactory = Callable[..., Awaitable[SagaTestEnvironment]]
PG_ENV = "SAGAFLOW_TEST_PG"
_FAILED = pytest.StashKey[bool]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("sagaflow", "sagaflow saga testing")
    group.addoption(
        "--saga-postgres",
        dest="saga_postgres",
        default=None,
        help=f"PostgreSQL URL of a role that may create databases: saga_database makes"
        f" a throwaway database there per test (else ${PG_ENV}, else the saga_postgres ini)",
    )
    group.addoption(
        "--saga-coverage-fail-under",
        dest="saga_coverage_fail_under",
        type=float,
        default=None,
        help="fail the session when less than PERCENT of the sagas' compensations were exercised",
    )
    parser.addini("saga_postgres", "PostgreSQL URL for saga_database (see --saga-postgres)")
    parser.addini("saga_coverage_fail_under", "see --saga-coverage-fail-under", default="")


def _fail_under(config: pytest.Config) -> float | None:
    value = config.getoption("saga_coverage_fail_under")
    if value is None and config.getini("saga_coverage_fail_under"):
        value = float(str(config.getini("saga_coverage_fail_under")))
    return None if value is None else float(value)


def postgres_url(config: pytest.Config) -> str:
    """The server ``saga_database`` creates its databases on.

    Raises:
        pytest.fail: none was configured (a missing server is a failure, not a skip).
    """
    url = (
        config.getoption("saga_postgres")
        or os.environ.get(PG_ENV)
        or config.getini("saga_postgres")
    )
    if not url:
        pytest.fail(
            f"saga_database needs a PostgreSQL server: pass --saga-postgres=URL, set {PG_ENV},"
            " or set saga_postgres in the pytest ini options",
            pytrace=False,
        )
    return str(url)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.when == "call" and report.failed:
        item.stash[_FAILED] = True
    return report


if pytest_asyncio is not None:

    @pytest_asyncio.fixture
    async def saga_database(request: pytest.FixtureRequest) -> AsyncIterator[ThrowawayDatabase]:
        """A PostgreSQL database for this test, dropped after it."""
        async with ThrowawayDatabase(postgres_url(request.config)) as database:
            yield database

    @pytest_asyncio.fixture
    async def saga_env(request: pytest.FixtureRequest) -> AsyncIterator[EnvFactory]:
        """``await saga_env(sagas, participants, database=..., **options)``: a
        started environment, closed after the test (whose faults must all have
        fired, when the test passed)."""
        envs: list[SagaTestEnvironment] = []

        async def make(
            sagas: Iterable[Saga[Any]], participants: Iterable[Participant], **options: Any
        ) -> SagaTestEnvironment:
            env = SagaTestEnvironment(sagas, participants, **options)
            await env.__aenter__()
            envs.append(env)
            return env

        yield make
        for env in reversed(envs):
            await env.aclose()
        if not request.node.stash.get(_FAILED, False):
            for env in envs:
                env.faults.check_all_fired()

else:  # pragma: no cover

    @pytest.fixture
    def saga_database() -> None:
        pytest.fail("saga_database needs pytest-asyncio: pip install 'sagaflow[testing]'")

    @pytest.fixture
    def saga_env() -> None:
        pytest.fail("saga_env needs pytest-asyncio: pip install 'sagaflow[testing]'")


def pytest_sessionstart(session: pytest.Session) -> None:
    COVERAGE.clear()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    threshold = _fail_under(session.config)
    if threshold is None or not COVERAGE.sagas:
        return
    if COVERAGE.percent < threshold and session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    if not COVERAGE.sagas:
        return
    terminalreporter.section("saga compensation coverage")
    for line in COVERAGE.report():
        terminalreporter.write_line(line)
    threshold = _fail_under(config)
    if threshold is not None and COVERAGE.percent < threshold:
        terminalreporter.write_line(
            f"FAIL: compensation coverage {COVERAGE.percent:.1f}% is under {threshold:g}%",
            red=True,
        )
