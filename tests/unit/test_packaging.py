"""The core works without any extra, and what needs one says which.

Each check runs in a fresh interpreter in which the optional packages cannot
be imported, as after ``pip install sagaflow`` with no extras.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

OPTIONAL = (
    "typer",
    "rich",
    "prometheus_client",
    "opentelemetry.exporter",
    "opentelemetry.instrumentation",
    "fastapi",
    "uvicorn",
    "httpx",
    "celery",
    "structlog",
)

BLOCK = f"""
import importlib.abc, sys

class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if any(name == b or name.startswith(b + ".") for b in {OPTIONAL!r}):
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None

sys.meta_path.insert(0, _Block())
"""


def run_without_extras(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "SAGAFLOW_"))}
    return subprocess.run(
        [sys.executable, "-c", BLOCK + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env={**environ, **env},
        check=False,
    )


def test_a_saga_runs_in_memory_with_the_core_alone() -> None:
    done = run_without_extras(
        """
        import asyncio
        from pydantic import BaseModel
        from sagaflow import (
            Action, BusinessFailure, Coordinator, HandlerContext, Participant, Saga,
            SagaStatus, Step, Worker,
        )
        from sagaflow.store import InMemoryParticipantStore, InMemorySagaStore
        from sagaflow.transport import InMemoryTransport
        import sagaflow.telemetry, sagaflow.tracing, sagaflow.metrics, sagaflow.testing

        class Cmd(BaseModel):
            n: int

        class Ok(BaseModel):
            n: int

        act = Action("svc", "act", Cmd, Ok)
        undo = Action("svc", "undo", Cmd, Ok)
        fail = Action("svc", "fail", Cmd, Ok)

        class Data(BaseModel):
            n: int

        saga = Saga("s", data=Data, steps=[
            Step("a", act, lambda d: Cmd(n=d.n), compensation=undo),
            Step("b", fail, lambda d: Cmd(n=d.n)),
        ])
        p = Participant("svc")

        @p.handler(act)
        async def a(c: Cmd, ctx: HandlerContext) -> Ok:
            return Ok(n=c.n)

        @p.handler(undo)
        async def u(c: Cmd, ctx: HandlerContext) -> Ok:
            return Ok(n=c.n)

        @p.handler(fail)
        async def f(c: Cmd, ctx: HandlerContext) -> Ok:
            if c.n:
                raise BusinessFailure("no")
            return Ok(n=c.n)

        async def main() -> None:
            transport, store = InMemoryTransport(), InMemorySagaStore()
            coordinator = Coordinator([saga], store=store, transport=transport)
            worker = Worker(p, transport=transport, store=InMemoryParticipantStore())
            await coordinator.start()
            await worker.start()
            ok = await coordinator.start_saga(saga, Data(n=0))
            bad = await coordinator.start_saga(saga, Data(n=1))
            await transport.wait_idle(10)
            for handle in (ok, bad):
                print((await store.get(handle.saga_id)).status.value)
            await worker.stop()
            await coordinator.stop()

        asyncio.run(main())
        """
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["COMPLETED", "COMPENSATED"]


def test_the_command_says_to_install_the_cli_extra() -> None:
    done = run_without_extras(
        "import sys; sys.argv = ['sagaflow']; from sagaflow.cli import main; main()"
    )
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "pip install 'sagaflow[cli]'" in lines[0]


def test_tracing_export_names_the_tracing_extra() -> None:
    done = run_without_extras(
        """
        from sagaflow import ConfigurationError
        from sagaflow.tracing_setup import configure_tracing
        try:
            configure_tracing("x", database=False)
        except ConfigurationError as exc:
            print(exc)
        try:
            configure_tracing("x")
        except ConfigurationError as exc:
            print(exc)
        from opentelemetry import trace
        print(type(trace.get_tracer_provider()).__name__)
        """,
        OTEL_EXPORTER_OTLP_ENDPOINT="http://127.0.0.1:4318",
    )
    assert done.returncode == 0, done.stderr
    exporter, database, provider = done.stdout.strip().splitlines()
    assert "pip install 'sagaflow[tracing]'" in exporter
    assert "pip install 'sagaflow[tracing]'" in database
    assert provider == "ProxyTracerProvider", "nothing is installed when configuration fails"


def test_console_tracing_needs_no_extra() -> None:
    done = run_without_extras(
        """
        from sagaflow.tracing_setup import configure_tracing
        print(configure_tracing("x", database=False) is not None)
        """,
        OTEL_TRACES_EXPORTER="console",
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "True"


def test_metrics_name_the_metrics_extra() -> None:
    done = run_without_extras(
        """
        from sagaflow import ConfigurationError
        from sagaflow.metrics import configure_metrics
        try:
            configure_metrics(9464)
        except ConfigurationError as exc:
            print(exc)
        """
    )
    assert done.returncode == 0, done.stderr
    assert "pip install 'sagaflow[metrics]'" in done.stdout


def test_the_version_has_one_source() -> None:
    import sagaflow

    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert sagaflow.__version__ == project["version"], "reinstall: pip install -e '.[dev]'"
    source = (ROOT / "sagaflow" / "__init__.py").read_text(encoding="utf-8")
    assert project["version"] not in source


def test_core_dependencies_stay_light() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    core = {dep.split(">")[0].split("=")[0].strip() for dep in project["dependencies"]}
    assert core.isdisjoint(
        {"typer", "rich", "structlog", "prometheus-client", "fastapi", "uvicorn", "celery"}
    )
    assert not any(dep.startswith("opentelemetry-exporter") for dep in core)
    extras = project["optional-dependencies"]
    assert {"tracing", "metrics", "cli", "services", "bench", "all", "dev"} <= set(extras)
    everything = " ".join(dep for deps in extras.values() for dep in deps)
    assert "structlog" not in everything
    assert all(
        ">=" in dep or dep.startswith("sagaflow[") for deps in extras.values() for dep in deps
    )


def test_the_otlp_protocol_picks_the_exporter_opentelemetry_registers() -> None:
    from sagaflow import ConfigurationError
    from sagaflow.tracing_setup import _exporter, _exporters

    endpoint = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"}
    assert _exporters(endpoint) == ["otlp_proto_http"]
    assert _exporters({**endpoint, "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "grpc"}) == [
        "otlp_proto_grpc"
    ]
    assert _exporters({"OTEL_TRACES_EXPORTER": "console,none"}) == ["console"]
    with pytest.raises(ConfigurationError, match="protocol 'http/json'"):
        _exporters({**endpoint, "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"})
    with pytest.raises(ConfigurationError, match="opentelemetry-exporter-otlp-proto-grpc"):
        _exporter("otlp_proto_grpc")
    with pytest.raises(ConfigurationError, match="'zipkin_json' span exporter"):
        _exporter("zipkin_json")
