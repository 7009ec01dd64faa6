"""``python -m bench``: plan the runs, run them, print JSON (stdout) and tables (stderr).

Without arguments (``make bench``) it runs the raw ceiling, sagaflow and a
Celery chain interleaved in one invocation: throughput raw, sagaflow, celery,
twice, then latency raw, sagaflow, celery; and prints the sagaflow/raw and
sagaflow/celery ratios. Every run prints
one JSON object (``"kind": "run"``) on its own line; every comparison one more
(``"kind": "comparison"``). A run whose outcome is not what the workload
implies stops everything with exit code 1.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from bench.harness import ROOT, BenchFailure, Params, run_in_memory, run_servers
from bench.infra import InfraError
from bench.report import (
    compare,
    comparison_table,
    console,
    embedded_verdict,
    runs_table,
    scaling_compare,
    signing_compare,
    tracing_compare,
    tracing_table,
)

RESULTS = ROOT / "bench" / "results"  # in .gitignore
DEFAULT_SAGAS = {"throughput": 2000, "latency": 200, "soak": 0}
QUICK_SAGAS = {"throughput": 300, "latency": 50, "soak": 0}
EMBEDDED_SAGAS = {"throughput": 10_000, "latency": 1000, "soak": 0}
DEFAULT_INFLIGHT = {"throughput": 200, "latency": 1, "soak": 200}


def _ints(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected integers separated by commas: {text!r}"
        ) from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers: {text!r}")
    return values


SYSTEMS = ("raw", "sagaflow", "celery")
SYSTEM_ALIASES = {"all": list(SYSTEMS), "both": ["raw", "sagaflow"]}


def _systems(text: str) -> list[str]:
    if text in SYSTEM_ALIASES:
        return SYSTEM_ALIASES[text]
    values = [part.strip() for part in text.split(",") if part.strip()]
    if not values or any(v not in SYSTEMS for v in values) or len(set(values)) < len(values):
        raise argparse.ArgumentTypeError(
            f"expected all, both, or some of {', '.join(SYSTEMS)} (e.g. sagaflow,celery): {text!r}"
        )
    return [s for s in SYSTEMS if s in values]


def _tracing(text: str) -> list[str]:
    values = [part.strip() for part in text.split(",") if part.strip()]
    if not values or any(v not in ("none", "off", "on") for v in values):
        raise argparse.ArgumentTypeError(f"expected none, off and/or on (e.g. off,on): {text!r}")
    return values


def _signing(text: str) -> list[str]:
    values = [part.strip() for part in text.split(",") if part.strip()]
    if not values or any(v not in ("off", "on") for v in values):
        raise argparse.ArgumentTypeError(f"expected off and/or on (e.g. off,on): {text!r}")
    return values


def _brokers(text: str) -> list[str]:
    values = [part.strip() for part in text.split(",") if part.strip()]
    if not values or any(v not in ("single", "cluster") for v in values):
        raise argparse.ArgumentTypeError(f"expected single and/or cluster: {text!r}")
    return values


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="sagaflow benchmark: the raw ceiling, sagaflow and a Celery chain on real "
        "RabbitMQ and PostgreSQL (or --embedded, in memory). JSON on stdout, tables on stderr.",
    )
    p.add_argument(
        "--mode",
        choices=["throughput", "latency", "soak", "all"],
        default="all",
        help="all = throughput then latency (default)",
    )
    p.add_argument(
        "--system",
        type=_systems,
        default=list(SYSTEMS),
        help="the systems to run, interleaved: all (default: raw, sagaflow, celery), "
        "both (raw and sagaflow), or a list such as sagaflow,celery",
    )
    p.add_argument(
        "--embedded",
        action="store_true",
        help="sagaflow in one process with the in-memory broker and stores (no servers)",
    )
    p.add_argument("--sagas", type=int, help="sagas per run (throughput 2000, latency 200)")
    p.add_argument(
        "--inflight", type=int, help="unfinished sagas at most (throughput 200, latency 1)"
    )
    p.add_argument("--steps", type=_ints, default=[3], help="steps per saga, e.g. 3,6,12")
    p.add_argument(
        "--coordinators", type=_ints, default=[1], help="sagaflow coordinator processes, e.g. 1,2,3"
    )
    p.add_argument("--fail-rate", type=float, default=0.1, help="share of sagas failing at payment")
    p.add_argument(
        "--repeat", type=int, help="runs per system and workload (throughput 2 with both)"
    )
    p.add_argument("--duration", type=float, help="soak: seconds of load (default 60, quick 15)")
    p.add_argument("--quick", action="store_true", help="small runs (throughput 300, latency 50)")
    p.add_argument(
        "--queue-type",
        choices=["quorum", "classic"],
        default="quorum",
        help="the raw ceiling's queues (sagaflow and the Celery chain declare quorum queues)",
    )
    p.add_argument(
        "--starter",
        choices=["auto", "coordinator", "client"],
        default="auto",
        help="who starts sagaflow's sagas: the coordinator process, like the raw driver, or "
        "this process through SagaClient and the outbox relay (auto: coordinator when there "
        "is one coordinator)",
    )
    p.add_argument(
        "--tracing",
        type=_tracing,
        default=[],
        help="sagaflow only: run each sagaflow workload once per value, interleaved: none = no "
        "telemetry set up (as the plain runs), off = telemetry set up as the CLI does with no "
        "OTEL_* variables, on = the same exporting to an OTLP/HTTP sink this harness starts "
        "(e.g. none,off,on); prints the on/off and off/none ratios",
    )
    p.add_argument(
        "--trace-sample",
        type=float,
        default=1.0,
        help="with --tracing on: trace this share of sagas (OTEL_TRACES_SAMPLER="
        "parentbased_traceidratio; default 1.0, every saga)",
    )
    p.add_argument(
        "--no-otel-metrics",
        dest="otel_metrics",
        action="store_false",
        help="with --tracing on: traces only (OTEL_METRICS_EXPORTER=none: no metrics "
        "recorded or exported), to tell the cost of tracing from that of metrics",
    )
    p.add_argument(
        "--signing",
        type=_signing,
        default=[],
        help="sagaflow only: run each sagaflow workload once per value, interleaved: off = "
        "unsigned messages (as the plain runs), on = every message signed with a key per "
        "service (e.g. off,on); prints the on/off ratio",
    )
    p.add_argument(
        "--broker",
        type=_brokers,
        default=["single"],
        help="sagaflow only: single = this machine's RabbitMQ node; cluster = three local nodes "
        "joined into one cluster, started for this invocation and removed after "
        "(scripts/local_cluster.py); e.g. single,cluster, interleaved; prints the "
        "cluster/single ratio (docs/scaling.md)",
    )
    p.add_argument("--profile", type=Path, help="record py-spy profiles of the coordinators here")
    p.add_argument(
        "--out",
        type=Path,
        help="also append the JSON lines to this file (default: a new file in bench/results/, "
        "which git ignores)",
    )
    p.add_argument(
        "--check-targets", action="store_true", help="exit 3 when a performance target is missed"
    )
    return p


def _starter(choice: str, coordinators: int) -> str:
    if choice == "auto":
        return "coordinator" if coordinators == 1 else "client"
    return choice


def plan(args: argparse.Namespace) -> list[Params]:
    modes = ["throughput", "latency"] if args.mode == "all" else [args.mode]
    systems = ["embedded"] if args.embedded else list(args.system)
    if not 0 <= args.fail_rate <= 1:
        raise SystemExit("--fail-rate must be between 0 and 1")
    runs: list[Params] = []
    for mode in modes:
        defaults = EMBEDDED_SAGAS if args.embedded else QUICK_SAGAS if args.quick else DEFAULT_SAGAS
        sagas = args.sagas if args.sagas is not None else defaults[mode]
        inflight = args.inflight if args.inflight is not None else DEFAULT_INFLIGHT[mode]
        duration = 0.0
        if mode == "soak":
            duration = args.duration if args.duration is not None else 15.0 if args.quick else 60.0
        repeat = args.repeat
        if repeat is None:
            several = (
                len(systems) > 1
                or len(args.tracing) > 1
                or len(args.signing) > 1
                or len(args.broker) > 1
            )
            repeat = 2 if mode == "throughput" and several else 1
        for steps in args.steps:
            for _ in range(repeat):
                for system in systems:
                    coordinators = args.coordinators if system == "sagaflow" else [1]
                    tracing = args.tracing if system == "sagaflow" and args.tracing else [""]
                    signing = args.signing if system == "sagaflow" and args.signing else [""]
                    brokers = args.broker if system == "sagaflow" else ["single"]
                    combos = (
                        (c, t, s, b)
                        for b in brokers
                        for c in coordinators
                        for t in tracing
                        for s in signing
                    )
                    for count, trace, sign, broker in combos:
                        runs.append(
                            Params(
                                system=system,
                                mode=mode,
                                sagas=sagas,
                                inflight=inflight,
                                steps=steps,
                                fail_rate=args.fail_rate,
                                coordinators=count,
                                duration=duration,
                                queue_type=args.queue_type,
                                starter=_starter(args.starter, count),
                                tracing=trace,
                                trace_sample=args.trace_sample,
                                otel_metrics=args.otel_metrics,
                                signing=sign,
                                broker=broker,
                            )
                        )
    return runs


def _emit(obj: dict[str, Any], out: Path | None) -> None:
    line = orjson.dumps(obj).decode()
    sys.stdout.write(line + "\n")
    sys.stdout.flush()
    if out is not None:
        with out.open("a") as f:
            f.write(line + "\n")


async def _run_all(
    runs: list[Params], args: argparse.Namespace, cluster: Any = None
) -> list[dict[str, Any]]:
    con = console()
    results: list[dict[str, Any]] = []
    for i, params in enumerate(runs, 1):
        con.print(
            f"[bold]run {i}/{len(runs)}[/]: {params.system} {params.mode} steps={params.steps}"
            f" sagas={params.sagas or f'{params.duration:.0f}s'} inflight={params.inflight}"
            + (f" coordinators={params.coordinators}" if params.system == "sagaflow" else "")
            + (" broker=cluster" if params.broker == "cluster" else "")
        )
        if params.tracing and params.system != "embedded":
            con.print(f"  tracing {params.tracing}")
        if params.signing and params.system != "embedded":
            con.print(f"  signing {params.signing}")
        if params.system == "embedded":
            result = await run_in_memory(params)
        else:
            result = await run_servers(params, profile_dir=args.profile, cluster=cluster)
        results.append(result)
        _emit({"kind": "run", **result}, args.out)
        if result.get("postgres_settings", {}).get("autovacuum") == "off":
            con.print(
                "  [yellow]PostgreSQL runs with autovacuum = off[/]: churning tables are"
                " never vacuumed, so long runs slow down as they bloat (docs/operations.md)"
            )
        con.print(
            f"  {result['sagas_per_s']:,.1f} sagas/s, p50 {result['latency_ms']['p50']:.1f} ms,"
            f" p99 {result['latency_ms']['p99']:.1f} ms, verified"
        )
    return results


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    runs = plan(args)
    con = console()
    if args.out is None:
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        args.out = RESULTS / f"{stamp}-{'embedded' if args.embedded else 'servers'}.jsonl"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if any(run.system == "celery" for run in runs):
        try:
            import bench.celery_chain  # noqa: F401  (Celery and psycopg: the bench extra)
        except ImportError as exc:
            con.print(f"[bold red]BENCHMARK FAILED[/]: {exc}; or leave it out: --system both")
            return 1
    con.print(f"JSON lines also in {args.out}")
    try:
        with contextlib.ExitStack() as stack:
            cluster = None
            if any(run.broker == "cluster" for run in runs):
                from scripts.local_cluster import RabbitCluster

                con.print("starting a local three-node RabbitMQ cluster")
                cluster = stack.enter_context(RabbitCluster.started())
            results = asyncio.run(_run_all(runs, args, cluster))
    except (BenchFailure, InfraError) as exc:
        con.print(f"[bold red]BENCHMARK FAILED[/]: {exc}")
        return 1
    except Exception:
        con.print_exception()
        con.print("[bold red]BENCHMARK FAILED[/]: unexpected error (above)")
        return 1
    except KeyboardInterrupt:
        con.print("[bold red]interrupted[/]")
        return 130
    con.print(runs_table(results))
    rows = compare(results)
    missed = False
    for row in rows:
        _emit(row, args.out)
        missed = missed or not all(row["targets_met"].values())
    if rows:
        con.print(comparison_table(rows))
    for row in signing_compare(results):
        _emit(row, args.out)
        con.print(
            f"signing on/off ({row['mode']}): throughput x{row['throughput_ratio']}, "
            f"coordinator CPU per saga x{row['coordinator_cpu_ratio']}"
        )
    for row in scaling_compare(results):
        _emit(row, args.out)
        con.print(
            f"{row['compare']} ({row['mode']}): throughput x{row['throughput_ratio']}"
            f" (sagas/s {row['sagas_per_s']['numerator']} over"
            f" {row['sagas_per_s']['denominator']}), p50 x{row['p50_ratio']},"
            f" RabbitMQ CPU per saga x{row['rabbitmq_cpu_ratio']}"
        )
    traced = tracing_compare(results)
    for row in traced:
        _emit(row, args.out)
        missed = missed or not all(row["targets_met"].values())
    if traced:
        con.print(tracing_table(traced))
    verdict = embedded_verdict(results)
    if verdict:
        con.print(verdict)
        missed = missed or "MISSED" in verdict
    if missed and args.check_targets:
        return 3
    return 0
