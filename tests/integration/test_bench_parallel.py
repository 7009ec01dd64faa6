"""``python -m bench.parallel`` runs on the real servers and prints its comparison.

No timing is asserted (numbers belong in docs/performance.md): the run must
complete every saga of both shapes and report a ratio.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import orjson
import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

ROOT = Path(__file__).resolve().parents[2]


async def test_the_parallel_group_workload_runs_and_compares() -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bench.parallel",
        "--sagas",
        "5",
        "--repeat",
        "1",
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 170)
    assert process.returncode == 0, err.decode()[-3000:]
    rows = [orjson.loads(line) for line in out.decode().splitlines() if line.startswith("{")]
    runs = [r for r in rows if r["kind"] == "run"]
    assert sorted(r["saga"] for r in runs) == ["parallel", "sequential"]
    assert all(r["sagas"] == 5 and r["p50_ms"] > 0 for r in runs)
    (comparison,) = [r for r in rows if r["kind"] == "comparison"]
    assert comparison["p50_ratio"] > 0 and comparison["target"] == "<= 0.7"
