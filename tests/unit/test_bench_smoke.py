"""The benchmark harness: a tiny embedded run, its JSON shape, the plan, the checks, the
comparisons and the Celery chain's set-up (everything that needs no server)."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest

from bench.cli import main, parser, plan
from bench.harness import (
    BenchFailure,
    Params,
    Proc,
    _processes,
    _start_all,
    _stop_all,
    _tracing_outcome,
    verify,
)
from bench.infra import Infra
from bench.report import (
    compare,
    comparison_table,
    scaling_compare,
    signing_compare,
    tracing_compare,
)
from bench.workload import expected, fail_step, failing_count, fails, percentiles

pytestmark = pytest.mark.timeout(30)


def test_embedded_run_prints_one_verified_json_object(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    out = tmp_path / "runs.jsonl"
    assert main(["--embedded", "--mode", "throughput", "--sagas", "50", "--out", str(out)]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert len(lines) == 1
    assert out.read_text().splitlines() == lines
    result = json.loads(lines[0])
    assert result["kind"] == "run"
    assert result["system"] == "embedded"
    assert result["mode"] == "throughput"
    assert result["sagas"] == 50
    assert result["statuses"] == {"COMPLETED": 45, "COMPENSATED": 5}
    assert result["expected"] == {"completed": 45, "compensated": 5}
    assert result["verified"] is True
    assert result["sagas_per_s"] > 0
    assert set(result["latency_ms"]) == {"p50", "p90", "p99", "max", "mean"}
    assert result["cpu_ms_per_saga"]["total"] > 0
    assert result["peak_rss_mb"]["process"] > 0
    assert result["messages_per_saga"] == 6.0
    assert result["params"]["steps"] == 3


def test_embedded_latency_run_with_more_steps(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    argv = ["--embedded", "--mode", "latency", "--sagas", "20", "--steps", "6"]
    assert main([*argv, "--out", str(tmp_path / "runs.jsonl")]) == 0
    result = json.loads(capsys.readouterr().out.splitlines()[0])
    assert result["params"]["inflight"] == 1
    assert result["statuses"] == {"COMPLETED": 18, "COMPENSATED": 2}
    # a failing 6-step saga fails at step 4 and undoes steps 0-3: 2 * (4 + 1 + 4) messages
    assert result["messages_per_saga"] == pytest.approx((18 * 12 + 2 * 18) / 20)


def test_default_plan_interleaves_raw_sagaflow_and_celery() -> None:
    runs = plan(parser().parse_args([]))
    assert [(r.mode, r.system) for r in runs] == [
        ("throughput", "raw"),
        ("throughput", "sagaflow"),
        ("throughput", "celery"),
        ("throughput", "raw"),
        ("throughput", "sagaflow"),
        ("throughput", "celery"),
        ("latency", "raw"),
        ("latency", "sagaflow"),
        ("latency", "celery"),
    ]
    assert runs[0].sagas == 2000 and runs[0].inflight == 200
    assert runs[-1].sagas == 200 and runs[-1].inflight == 1


def test_system_flag_selects_systems_in_a_fixed_order() -> None:
    def systems(*argv: str) -> list[str]:
        args = parser().parse_args(["--mode", "latency", *argv])
        return [r.system for r in plan(args)]

    assert systems("--system", "both") == ["raw", "sagaflow"]
    assert systems("--system", "celery,sagaflow") == ["sagaflow", "celery"]
    assert systems("--system", "celery") == ["celery"]
    assert systems("--system", "all") == ["raw", "sagaflow", "celery"]
    for bad in ("temporal", "raw,raw", ""):
        with pytest.raises(SystemExit):
            parser().parse_args(["--system", bad])


def test_plan_sweeps_steps_and_coordinators_for_sagaflow_only() -> None:
    args = parser().parse_args(
        [
            "--mode",
            "throughput",
            "--steps",
            "3,6",
            "--coordinators",
            "1,2",
            "--repeat",
            "1",
            "--system",
            "both",
        ]
    )
    runs = [(r.steps, r.system, r.coordinators) for r in plan(args)]
    assert runs == [
        (3, "raw", 1),
        (3, "sagaflow", 1),
        (3, "sagaflow", 2),
        (6, "raw", 1),
        (6, "sagaflow", 1),
        (6, "sagaflow", 2),
    ]


def test_failing_sagas_are_spread_and_counted_exactly() -> None:
    assert [i for i in range(30) if fails(i, 0.1)] == [9, 19, 29]
    assert failing_count(2000, 0.1) == 200 == sum(fails(i, 0.1) for i in range(2000))
    assert failing_count(7, 0.0) == 0
    assert [fail_step(n) for n in (3, 6, 12)] == [1, 4, 10]


def test_expected_effects_per_service() -> None:
    want = expected(10, 3, 0.1)
    assert (want.completed, want.compensated) == (9, 1)
    # the failing saga reserves (then releases) and is refused at payment
    assert want.effects == {"inventory": (10, 1), "payment": (9, 0), "shipping": (9, 0)}
    assert want.messages == 9 * 6 + 1 * 6


def test_verify_raises_on_any_gap() -> None:
    params = Params(system="raw", mode="throughput", sagas=10, inflight=5)
    good = {
        "sagas": 10,
        "statuses": {"COMPLETED": 9, "COMPENSATED": 1},
        "effects": {"inventory": (10, 1), "payment": (9, 0), "shipping": (9, 0)},
    }
    result: dict[str, object] = {}
    verify(params, result, good)
    assert result["verified"] is True
    bad = {**good, "statuses": {"COMPLETED": 8, "COMPENSATED": 1, "RUNNING": 1}}
    with pytest.raises(BenchFailure, match="1 sagas ended RUNNING"):
        verify(params, {}, bad)
    lost = {**good, "effects": {**good["effects"], "payment": (8, 0)}}  # type: ignore[dict-item]
    with pytest.raises(BenchFailure, match="payment: 8 effects"):
        verify(params, {}, lost)


def test_percentiles_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    p = percentiles(values)
    assert (p["p50"], p["p90"], p["p99"], p["max"]) == (50.0, 90.0, 99.0, 100.0)
    assert percentiles([])["p50"] == 0.0


def test_plan_interleaves_tracing_off_and_on_for_sagaflow_only() -> None:
    args = parser().parse_args(["--mode", "throughput", "--system", "both", "--tracing", "off,on"])
    runs = [(r.system, r.tracing) for r in plan(args)]
    assert runs == [
        ("raw", ""),
        ("sagaflow", "off"),
        ("sagaflow", "on"),
        ("raw", ""),
        ("sagaflow", "off"),
        ("sagaflow", "on"),
    ]
    with pytest.raises(SystemExit):
        parser().parse_args(["--tracing", "maybe"])


def _traced_run(tracing: str, rate: float, trace_bytes: int) -> dict[str, object]:
    params = Params("sagaflow", "throughput", 100, 200, tracing=tracing)
    return {
        "system": "sagaflow",
        "mode": "throughput",
        "params": dataclasses.asdict(params),
        "sagas": 100,
        "sagas_per_s": rate,
        "latency_ms": {"p50": 10.0, "p99": 20.0},
        "cpu_ms_per_saga": {"coordinator": 2.0, "participants": 3.0, "total": 10.0},
        "tracing": {"mode": tracing, "otlp_received": {"/v1/traces": {"bytes": trace_bytes}}},
    }


def test_tracing_comparison_is_on_over_off_with_the_15_percent_target() -> None:
    rows = tracing_compare(
        [
            _traced_run("off", 200.0, 0),
            _traced_run("on", 180.0, 50_000),
            _traced_run("off", 100.0, 0),
            _traced_run("on", 60.0, 70_000),
        ]
    )
    assert len(rows) == 1
    row = rows[0]
    assert row["kind"] == "tracing_comparison"
    assert row["compare"] == "on/off"
    assert row["throughput_ratio"] == pytest.approx(120.0 / 150.0, abs=1e-3)
    assert row["targets_met"] == {"tracing_throughput": False}
    assert row["otlp_trace_bytes_per_saga"] == 600.0


def test_tracing_none_off_on_gives_both_ratios_and_only_on_has_a_target() -> None:
    rows = tracing_compare(
        [
            _traced_run("none", 100.0, 0),
            _traced_run("off", 99.0, 0),
            _traced_run("on", 90.0, 40_000),
        ]
    )
    by = {row["compare"]: row for row in rows}
    assert set(by) == {"on/off", "off/none"}
    assert by["off/none"]["throughput_ratio"] == 0.99
    assert by["off/none"]["targets_met"] == {}
    assert by["on/off"]["targets_met"] == {"tracing_throughput": True}
    plan_runs = plan(parser().parse_args(["--system", "sagaflow", "--tracing", "none,off,on"]))
    assert [r.tracing for r in plan_runs if r.mode == "throughput"] == ["none", "off", "on"] * 2


def test_a_tracing_on_run_that_exported_no_span_fails() -> None:
    params = Params("sagaflow", "throughput", 10, 10, tracing="on")
    with pytest.raises(BenchFailure, match="no spans"):
        _tracing_outcome(params, {"paths": {"/v1/metrics": {"requests": 1, "bytes": 10}}})
    received = {"paths": {"/v1/traces": {"requests": 1, "bytes": 10}}}
    assert _tracing_outcome(params, received)["otlp_received"]["/v1/traces"]["bytes"] == 10


async def test_a_process_dying_at_start_fails_the_run_and_the_rest_stop_cleanly(
    tmp_path: Path,
) -> None:
    # The others' "ready" readers are cancelled: stopping them reads their output
    # again, which failed with "readuntil() called while another coroutine is
    # already waiting" and hid the real error.
    procs = [
        Proc(name, "participants", ["tests.unit.fake_bench_process", mode], tmp_path)
        for name, mode in (("slow", "ready"), ("broken", "die"), ("fine", "ready"))
    ]
    with pytest.raises(BenchFailure, match=r"broken exited \(code 3\) before 'ready'"):
        await _start_all(procs)
    stopped = await _stop_all(procs)
    assert stopped[0] == {"event": "stopped"}
    assert stopped[2] == {"event": "stopped"}


def _run(
    system: str, mode: str, rate: float, p50: float, coordinator_cpu: float
) -> dict[str, object]:
    params = Params(system, mode, 100, 200 if mode == "throughput" else 1)
    return {
        "system": system,
        "mode": mode,
        "params": dataclasses.asdict(params),
        "sagas": 100,
        "sagas_per_s": rate,
        "latency_ms": {"p50": p50, "p99": 2 * p50},
        "cpu_ms_per_saga": {"coordinator": coordinator_cpu, "client": 0.0, "total": 6.0},
    }


def test_comparison_has_a_row_per_baseline_with_its_own_targets() -> None:
    rows = compare(
        [
            _run("raw", "throughput", 200.0, 800.0, 2.0),
            _run("sagaflow", "throughput", 320.0, 600.0, 1.2),
            _run("celery", "throughput", 250.0, 700.0, 0.8),
            _run("raw", "latency", 60.0, 12.0, 2.0),
            _run("sagaflow", "latency", 70.0, 11.0, 1.2),
            _run("celery", "latency", 80.0, 10.0, 0.8),
        ]
    )
    by = {(row["baseline"], row["mode"]): row for row in rows}
    assert set(by) == {
        ("raw", "throughput"),
        ("celery", "throughput"),
        ("raw", "latency"),
        ("celery", "latency"),
    }
    assert by["raw", "throughput"]["throughput_ratio"] == 1.6
    assert by["raw", "throughput"]["targets_met"] == {"throughput": True, "coordinator_cpu": True}
    # against Celery only the throughput has a target (its "coordinator" is the driver)
    assert by["celery", "throughput"]["throughput_ratio"] == 1.28
    assert by["celery", "throughput"]["targets_met"] == {"throughput": False}
    assert by["celery", "throughput"]["sagas_per_s"] == {"celery": [250.0], "sagaflow": [320.0]}
    assert by["celery", "latency"]["targets_met"] == {}
    assert by["raw", "latency"]["targets_met"] == {"latency_p50": True}
    assert comparison_table(rows).row_count == 4


def test_celery_runs_one_worker_per_service_queue_and_a_driver(tmp_path: Path) -> None:
    params = Params("celery", "throughput", 20, 10)
    procs = _processes(params, Infra("bench_celery_x", "bench-celery-x"), "r1", tmp_path)
    assert [(p.name, p.group, p.drives) for p in procs] == [
        ("inventory", "participants", False),
        ("payment", "participants", False),
        ("shipping", "participants", False),
        ("driver", "coordinator", True),
    ]
    assert all(p.argv[0] == "bench.celery_chain" for p in procs)
    driver = procs[-1].argv
    assert driver[driver.index("--sagas") + 1] == "20"
    assert driver[driver.index("--fail-rate") + 1] == "0.1"


def test_verify_catches_a_wrong_celery_outcome() -> None:
    params = Params(system="celery", mode="throughput", sagas=10, inflight=5)
    good = {
        "sagas": 10,
        "statuses": {"COMPLETED": 9, "COMPENSATED": 1},
        "effects": {"inventory": (10, 1), "payment": (9, 0), "shipping": (9, 0)},
    }
    verify(params, {}, good)
    # a compensation that never ran: the saga is stuck and inventory stays reserved
    stuck = {
        **good,
        "statuses": {"COMPLETED": 9, "RUNNING": 1},
        "effects": {**good["effects"], "inventory": (10, 0)},  # type: ignore[dict-item]
    }
    with pytest.raises(BenchFailure, match=r"0 COMPENSATED, expected 1.*inventory: 10 effects"):
        verify(params, {}, stuck)


def test_celery_app_is_configured_as_a_careful_user_would() -> None:
    celery_chain = pytest.importorskip("bench.celery_chain")
    chains = celery_chain.make_app(
        "amqp://guest:guest@127.0.0.1:5672/bench-x", "postgresql://postgres@127.0.0.1/x"
    )
    conf = chains.app.conf
    assert conf.broker_url == "pyamqp://guest:guest@127.0.0.1:5672/bench-x"
    assert conf.broker_transport_options == {"confirm_publish": True}
    assert conf.task_acks_late and conf.task_reject_on_worker_lost
    assert conf.task_default_delivery_mode == "persistent"
    assert conf.result_backend is None and conf.task_ignore_result
    queues = {q.name: q for q in conf.task_queues}
    assert set(queues) == {"inventory", "payment", "shipping"}
    for queue in queues.values():
        assert queue.durable
        assert queue.queue_arguments == {"x-queue-type": "quorum", "x-delivery-limit": 5}
    # the forward steps in order, each on its service's queue, each linked to the errback
    saga = chains.saga({"saga": "s-1", "steps": 6, "fail_at": 4})
    names = [task.task for task in saga.tasks]
    assert names == [
        "inventory.reserve",
        "payment.charge",
        "shipping.schedule",
        "inventory.reserve",
        "payment.charge",
        "shipping.schedule",
    ]
    assert [task.kwargs["step"] for task in saga.tasks] == list(range(6))
    assert saga.options["link_error"][0].task == "saga.compensate"
    routes = {name: chains.app.amqp.router.route({}, name)["queue"].name for name in names[:3]}
    assert routes == {
        "inventory.reserve": "inventory",
        "payment.charge": "payment",
        "shipping.schedule": "shipping",
    }


ROOT = Path(__file__).resolve().parents[2]


def test_docs_links_resolve_and_benchmark_runs_stay_out_of_the_repository() -> None:
    # raw runs go to the ignored bench/results/; docs/performance.md has the numbers
    assert not (ROOT / "docs" / "bench-runs").exists()
    broken = []
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text("utf-8")):
            if "://" not in target and not (page.parent / target).exists():
                broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert broken == []
    assert "bench/results/" in (ROOT / ".gitignore").read_text("utf-8").split()


def test_signing_runs_interleave_and_compare_on_over_off() -> None:
    args = parser().parse_args(
        ["--mode", "throughput", "--system", "sagaflow", "--signing", "off,on"]
    )
    assert [r.signing for r in plan(args)] == ["off", "on", "off", "on"]

    def run(signing: str, rate: float, cpu: float) -> dict[str, object]:
        params = Params("sagaflow", "throughput", 100, 200, signing=signing)
        return {
            "system": "sagaflow",
            "mode": "throughput",
            "params": dataclasses.asdict(params),
            "sagas_per_s": rate,
            "latency_ms": {"p50": 10.0, "p99": 20.0},
            "cpu_ms_per_saga": {"coordinator": cpu},
        }

    (row,) = signing_compare([run("off", 200.0, 2.0), run("on", 190.0, 2.2)])
    assert (row["throughput_ratio"], row["coordinator_cpu_ratio"]) == (0.95, 1.1)
    with pytest.raises(SystemExit):
        parser().parse_args(["--signing", "maybe"])


def test_cluster_and_coordinator_runs_interleave_and_compare() -> None:
    args = parser().parse_args(
        ["--mode", "throughput", "--system", "both", "--broker", "single,cluster",
         "--coordinators", "1,2", "--repeat", "1"]
    )  # fmt: skip
    runs = [(r.system, r.broker, r.coordinators) for r in plan(args)]
    assert runs == [
        ("raw", "single", 1),  # the raw ceiling talks to one node only
        ("sagaflow", "single", 1),
        ("sagaflow", "single", 2),
        ("sagaflow", "cluster", 1),
        ("sagaflow", "cluster", 2),
    ]

    def run(broker: str, coordinators: int, rate: float) -> dict[str, object]:
        params = Params(
            "sagaflow", "throughput", 100, 200, coordinators=coordinators, broker=broker
        )
        return {
            "system": "sagaflow",
            "mode": "throughput",
            "params": dataclasses.asdict(params),
            "sagas_per_s": rate,
            "latency_ms": {"p50": 10.0, "p99": 20.0},
            "cpu_ms_per_saga": {"rabbitmq": 1.0},
        }

    results = [run("single", 1, 200.0), run("single", 2, 220.0), run("cluster", 1, 150.0)]
    rows = {row["compare"]: row["throughput_ratio"] for row in scaling_compare(results)}
    assert rows == {"2/1 coordinators, single broker": 1.1, "cluster/single, 1 coordinators": 0.75}
    # the sagaflow/raw comparison leaves the cluster runs out
    assert all(row["coordinators"] in (1, 2) for row in compare(results))
    with pytest.raises(SystemExit):
        parser().parse_args(["--broker", "three"])
