"""Readable tables (stderr) and the sagaflow/raw and sagaflow/celery comparisons of an invocation."""

from __future__ import annotations

import statistics
from functools import partial
from typing import Any

from rich.console import Console
from rich.table import Table

# sagaflow / raw, measured within one invocation (see docs/performance.md)
TARGETS = {
    "throughput": (">=", 1.5),
    "latency_p50": ("<=", 1.0),
    "coordinator_cpu": ("<=", 0.7),
}
# sagaflow / celery: the throughput only (Celery has no coordinator to compare)
CELERY_TARGETS = {"throughput": (">=", 1.3)}
BASELINES = ("raw", "celery")
EMBEDDED_TARGET = 2000.0  # sagas/s on one core
# tracing exporting on / off (the issue: "costs at most 15% throughput")
TRACING_THROUGHPUT_TARGET = 0.85


def _fmt(value: float, digits: int = 1) -> str:
    return f"{value:,.{digits}f}"


def runs_table(results: list[dict[str, Any]]) -> Table:
    table = Table(title="benchmark runs", title_justify="left")
    for name in (
        "system",
        "mode",
        "steps",
        "coord",
        "sagas",
        "sagas/s",
        "p50 ms",
        "p90 ms",
        "p99 ms",
        "CPU ms/saga coord",
        "part",
        "client",
        "rabbit",
        "pg (bench+bg)",
        "pg (all)",
        "total",
        "msgs/saga",
        "xacts/saga",
        "ok",
    ):
        table.add_column(name, justify="left" if name in ("system", "mode") else "right")
    for r in results:
        cpu = r.get("cpu_ms_per_saga", {})
        lat = r["latency_ms"]
        pg_own = cpu.get("postgres_bench", 0.0) + cpu.get("postgres_background", 0.0)
        coord = cpu.get("coordinator", cpu.get("process", 0.0))
        tracing = r["params"].get("tracing")
        table.add_row(
            r["system"] + (f" (tracing {tracing})" if tracing else ""),
            r["mode"],
            str(r["params"]["steps"]),
            f"{r['params']['coordinators']} ({r['params']['starter'][:6]})"
            if r["system"] == "sagaflow"
            else "-",
            str(r["sagas"]),
            _fmt(r["sagas_per_s"]),
            _fmt(lat["p50"]),
            _fmt(lat["p90"]),
            _fmt(lat["p99"]),
            _fmt(coord, 2),
            _fmt(cpu.get("participants", 0.0), 2),
            _fmt(cpu.get("client", 0.0), 2),
            _fmt(cpu.get("rabbitmq", 0.0), 2),
            _fmt(pg_own, 2),
            _fmt(cpu.get("postgres", 0.0), 2),
            _fmt(cpu.get("total", 0.0), 2),
            _fmt(r.get("messages_per_saga", 0.0), 2),
            _fmt(r.get("db_transactions_per_saga", 0.0), 2),
            "yes" if r.get("verified") else "NO",
        )
    return table


def _key(r: dict[str, Any]) -> tuple[Any, ...]:
    p = r["params"]
    return (r["mode"], p["steps"], p["fail_rate"], p["inflight"], p["sagas"], p["duration"])


def compare(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """sagaflow/raw and sagaflow/celery ratios for every workload both ran (medians
    over repeats), one row per baseline.

    sagaflow runs with several coordinators are compared with the one-process
    driver of the same workload, each as its own row. Celery's "coordinator" is
    its driver (it starts the chains and polls for their ends): only the
    throughput ratio has a target there.
    """
    rows: list[dict[str, Any]] = []
    bases: dict[str, dict[tuple[Any, ...], list[dict[str, Any]]]] = {b: {} for b in BASELINES}
    ours: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for r in results:
        if r["system"] in bases:
            bases[r["system"]].setdefault(_key(r), []).append(r)
        elif r["system"] == "sagaflow" and r["params"].get("broker", "single") == "single":
            p = r["params"]
            key = (*_key(r), p["coordinators"], p["starter"], p.get("tracing", ""))
            ours.setdefault(key, []).append(r)
    for key, mine, baseline in ((k, m, b) for k, m in ours.items() for b in BASELINES):
        base = bases[baseline].get(key[:-3])
        if not base:
            continue

        def med(rs: list[dict[str, Any]], pick: Any) -> float:
            return float(statistics.median(pick(r) for r in rs))

        def coord_cpu(r: dict[str, Any]) -> float:
            return float(r["cpu_ms_per_saga"].get("coordinator", 0.0))

        def front_cpu(r: dict[str, Any]) -> float:
            cpu = r["cpu_ms_per_saga"]
            return float(cpu.get("coordinator", 0.0) + cpu.get("client", 0.0))

        def total_cpu(r: dict[str, Any]) -> float:
            return float(r["cpu_ms_per_saga"].get("total", 0.0))

        def ratio(a: float, b: float) -> float:
            return round(a / b, 3) if b else 0.0

        mode = key[0]
        row: dict[str, Any] = {
            "kind": "comparison",
            "baseline": baseline,
            "mode": mode,
            "steps": key[1],
            "inflight": key[3],
            "coordinators": key[-3],
            "starter": key[-2],
            "tracing": key[-1],
            "runs": {baseline: len(base), "sagaflow": len(mine)},
            "sagas_per_s": {
                baseline: [r["sagas_per_s"] for r in base],
                "sagaflow": [r["sagas_per_s"] for r in mine],
            },
            "throughput_ratio": ratio(
                med(mine, lambda r: r["sagas_per_s"]), med(base, lambda r: r["sagas_per_s"])
            ),
            "latency_p50_ratio": ratio(
                med(mine, lambda r: r["latency_ms"]["p50"]),
                med(base, lambda r: r["latency_ms"]["p50"]),
            ),
            "latency_p99_ratio": ratio(
                med(mine, lambda r: r["latency_ms"]["p99"]),
                med(base, lambda r: r["latency_ms"]["p99"]),
            ),
            "coordinator_cpu_ratio": ratio(med(mine, coord_cpu), med(base, coord_cpu)),
            "coordinator_plus_client_cpu_ratio": ratio(med(mine, front_cpu), med(base, front_cpu)),
            "total_cpu_ratio": ratio(med(mine, total_cpu), med(base, total_cpu)),
        }
        checks: dict[str, bool] = {}
        if mode == "throughput" and baseline == "celery":
            checks["throughput"] = row["throughput_ratio"] >= CELERY_TARGETS["throughput"][1]
        elif mode == "throughput":
            checks["throughput"] = row["throughput_ratio"] >= TARGETS["throughput"][1]
            checks["coordinator_cpu"] = (
                row["coordinator_cpu_ratio"] <= TARGETS["coordinator_cpu"][1]
            )
        if mode == "latency" and baseline == "raw":
            checks["latency_p50"] = row["latency_p50_ratio"] <= TARGETS["latency_p50"][1]
        row["targets_met"] = checks
        rows.append(row)
    return rows


def _median(rs: list[dict[str, Any]], pick: Any) -> float:
    return float(statistics.median(pick(r) for r in rs))


def _cpu(group: str) -> Any:
    return lambda run: float(run["cpu_ms_per_saga"].get(group, 0.0))


def _ratio(runs: list[dict[str, Any]], base: list[dict[str, Any]], pick: Any) -> float:
    """The median of ``pick`` over ``runs`` divided by its median over ``base``."""
    b = _median(base, pick)
    return round(_median(runs, pick) / b, 3) if b else 0.0


def signing_compare(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Signing on over off for sagaflow runs of the same workload (medians over repeats)."""
    groups: dict[tuple[Any, ...], dict[str, list[dict[str, Any]]]] = {}
    for r in results:
        p = r["params"]
        if r["system"] != "sagaflow" or not p.get("signing"):
            continue
        key = (*_key(r), p["coordinators"], p["starter"], p.get("tracing", ""))
        groups.setdefault(key, {}).setdefault(p["signing"], []).append(r)
    rows: list[dict[str, Any]] = []
    for key, by in groups.items():
        off, on = by.get("off"), by.get("on")
        if not off or not on:
            continue
        ratio = partial(_ratio, on, off)
        rows.append(
            {
                "kind": "signing_comparison",
                "compare": "on/off",
                "mode": key[0],
                "steps": key[1],
                "runs": {"off": len(off), "on": len(on)},
                "sagas_per_s": {
                    "off": [r["sagas_per_s"] for r in off],
                    "on": [r["sagas_per_s"] for r in on],
                },
                "throughput_ratio": ratio(lambda r: r["sagas_per_s"]),
                "coordinator_cpu_ratio": ratio(lambda r: r["cpu_ms_per_saga"]["coordinator"]),
                "p50_ratio": ratio(lambda r: r["latency_ms"]["p50"]),
            }
        )
    return rows


def scaling_compare(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Throughput of sagaflow runs of the same workload on the RabbitMQ cluster over
    the single node (same coordinators), and with N coordinators over one (same
    broker); medians over repeats. Only pairs that ran in this invocation."""
    runs: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for r in results:
        p = r["params"]
        if r["system"] != "sagaflow" or p.get("tracing") or p.get("signing"):
            continue
        runs.setdefault((*_key(r), p.get("broker", "single"), p["coordinators"]), []).append(r)
    rows: list[dict[str, Any]] = []

    def row(compare: str, key: tuple[Any, ...], a: list[Any], b: list[Any]) -> dict[str, Any]:
        pick = partial(_ratio, a, b)
        return {
            "kind": "scaling_comparison",
            "compare": compare,
            "mode": key[0],
            "steps": key[1],
            "sagas_per_s": {
                "numerator": [r["sagas_per_s"] for r in a],
                "denominator": [r["sagas_per_s"] for r in b],
            },
            "throughput_ratio": pick(lambda r: r["sagas_per_s"]),
            "p50_ratio": pick(lambda r: r["latency_ms"]["p50"]),
            "rabbitmq_cpu_ratio": pick(lambda r: r["cpu_ms_per_saga"].get("rabbitmq", 0.0)),
        }

    for key, mine in runs.items():
        *workload, broker, coordinators = key
        if broker == "cluster":
            single = runs.get((*workload, "single", coordinators))
            if single:
                rows.append(row(f"cluster/single, {coordinators} coordinators", key, mine, single))
        if coordinators > 1:
            one = runs.get((*workload, broker, 1))
            if one:
                rows.append(row(f"{coordinators}/1 coordinators, {broker} broker", key, mine, one))
    return rows


def tracing_compare(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Tracing ratios of sagaflow runs of the same workload (medians over repeats).

    ``on`` over ``off`` (the cost of exporting) and ``off`` over ``none`` (the
    cost of telemetry set up with no exporter), for the pairs that ran.
    """
    groups: dict[tuple[Any, ...], dict[str, list[dict[str, Any]]]] = {}
    for r in results:
        p = r["params"]
        if r["system"] != "sagaflow" or not p.get("tracing"):
            continue
        key = (*_key(r), p["coordinators"], p["starter"])
        groups.setdefault(key, {}).setdefault(p["tracing"], []).append(r)
    rows: list[dict[str, Any]] = []
    for key, by in groups.items():
        for base_name, name in (("off", "on"), ("none", "off")):
            base, runs = by.get(base_name), by.get(name)
            if not base or not runs:
                continue

            ratio = partial(_ratio, runs, base)
            row: dict[str, Any] = {
                "kind": "tracing_comparison",
                "compare": f"{name}/{base_name}",
                "mode": key[0],
                "steps": key[1],
                "inflight": key[3],
                "coordinators": key[-2],
                "runs": {base_name: len(base), name: len(runs)},
                "trace_sample": runs[0]["params"].get("trace_sample", 1.0),
                "otel_metrics": runs[0]["params"].get("otel_metrics", True),
                "sagas_per_s": {
                    base_name: [r["sagas_per_s"] for r in base],
                    name: [r["sagas_per_s"] for r in runs],
                },
                "throughput_ratio": ratio(lambda r: r["sagas_per_s"]),
                "latency_p50_ratio": ratio(lambda r: r["latency_ms"]["p50"]),
                "latency_p99_ratio": ratio(lambda r: r["latency_ms"]["p99"]),
                "coordinator_cpu_ratio": ratio(_cpu("coordinator")),
                "participants_cpu_ratio": ratio(_cpu("participants")),
                "total_cpu_ratio": ratio(_cpu("total")),
                "otlp_trace_bytes_per_saga": round(
                    _median(
                        runs,
                        lambda r: (
                            r["tracing"]["otlp_received"].get("/v1/traces", {}).get("bytes", 0)
                            / max(r["sagas"], 1)
                        ),
                    ),
                    1,
                ),
            }
            checks: dict[str, bool] = {}
            if key[0] == "throughput" and name == "on":
                checks["tracing_throughput"] = row["throughput_ratio"] >= TRACING_THROUGHPUT_TARGET
            row["targets_met"] = checks
            rows.append(row)
    return rows


def tracing_table(rows: list[dict[str, Any]]) -> Table:
    table = Table(title="sagaflow tracing (same invocation)", title_justify="left")
    for name in (
        "compare",
        "mode",
        "steps",
        "throughput",
        "p50",
        "p99",
        "coord CPU",
        "workers CPU",
        "total CPU",
        "OTLP B/saga",
        "targets",
    ):
        table.add_column(
            name, justify="left" if name in ("compare", "mode", "targets") else "right"
        )
    for row in rows:
        met = row["targets_met"]
        targets = ", ".join(f"{k} {'met' if v else 'MISSED'}" for k, v in met.items()) or "-"
        table.add_row(
            row["compare"],
            row["mode"],
            str(row["steps"]),
            f"{row['throughput_ratio']:.2f}x",
            f"{row['latency_p50_ratio']:.2f}x",
            f"{row['latency_p99_ratio']:.2f}x",
            f"{row['coordinator_cpu_ratio']:.2f}x",
            f"{row['participants_cpu_ratio']:.2f}x",
            f"{row['total_cpu_ratio']:.2f}x",
            f"{row['otlp_trace_bytes_per_saga']:,.0f}",
            targets,
        )
    return table


def comparison_table(rows: list[dict[str, Any]]) -> Table:
    table = Table(
        title="sagaflow / raw and sagaflow / celery (same invocation)", title_justify="left"
    )
    for name in (
        "sagaflow /",
        "mode",
        "steps",
        "coord",
        "throughput",
        "p50",
        "p99",
        "coord CPU",
        "coord+client CPU",
        "total CPU",
        "targets",
    ):
        table.add_column(
            name, justify="left" if name in ("sagaflow /", "mode", "targets") else "right"
        )
    for row in sorted(rows, key=lambda r: (r["mode"] != "throughput", r["mode"])):
        met = row["targets_met"]
        targets = ", ".join(f"{k} {'met' if v else 'MISSED'}" for k, v in met.items()) or "-"
        table.add_row(
            row.get("baseline", "raw"),
            row["mode"],
            str(row["steps"]),
            f"{row['coordinators']} ({row['starter']})",
            f"{row['throughput_ratio']:.2f}x",
            f"{row['latency_p50_ratio']:.2f}x",
            f"{row['latency_p99_ratio']:.2f}x",
            f"{row['coordinator_cpu_ratio']:.2f}x",
            f"{row['coordinator_plus_client_cpu_ratio']:.2f}x",
            f"{row['total_cpu_ratio']:.2f}x",
            targets,
        )
    return table


def embedded_verdict(results: list[dict[str, Any]]) -> str | None:
    rates = [
        r["sagas_per_s"] for r in results if r["system"] == "embedded" and r["mode"] == "throughput"
    ]
    if not rates:
        return None
    best = max(rates)
    verdict = "met" if best >= EMBEDDED_TARGET else "MISSED"
    return f"embedded throughput {best:,.0f} sagas/s (target >= {EMBEDDED_TARGET:,.0f}): {verdict}"


def console() -> Console:
    return Console(stderr=True, width=200)
