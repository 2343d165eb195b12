"""The benchmark's orchestration end to end, on the baseline alone (no Kafka needed).

Starts the real simulator and the baseline as processes, drives every scenario with a tiny
plan, and checks the results file, the report, the plots, and that nothing is left running.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import pytest

from bench import run, scenarios

pytestmark = pytest.mark.e2e


async def test_a_tiny_baseline_run_measures_every_scenario_and_cleans_up(tmp_path: Path) -> None:
    plan = replace(
        scenarios.QUICK,
        systems=("baseline",),
        ttft_ms=20.0,
        token_delay_ms=1.0,
        levels=(1, 4),
        requests={1: 2, 4: 8},
        bursts={5: 1},
        rl_clients=6,
        rl_max_concurrent=2,
        deadline_s=20.0,
    )
    md_path = await run.run_bench(
        plan, tmp_path / "results", log=lambda _line: None, logs_root=tmp_path / "logs"
    )

    results = json.loads(md_path.with_suffix(".json").read_text())
    assert results["meta"]["errors"] == []
    streams = results["streams"]
    measured = [s for s in streams if s["phase"].startswith(("overhead/", "burst/"))]
    assert len(measured) == 2 + 8 + 5
    assert all(s["complete"] and s["in_order"] and s["own"] for s in measured)
    assert all(s["tokens"] == plan.max_tokens for s in measured)
    # The same corpus at longer summaries: every stream complete, each of long_tokens tokens.
    longer = [s for s in streams if s["phase"].startswith("long/")]
    assert len(longer) == plan.long_requests
    assert all(s["complete"] and s["tokens"] == plan.long_tokens for s in longer)
    a = results["analysis"]
    assert a["overhead"]["4"]["baseline"]["correct"] == 8
    assert a["burst"]["5"]["baseline"]["ttft_p99_vs_single"] is not None
    rl = a["rate_limited"]["baseline"]
    # Six clients against an upstream taking two at a time: the simulator counted every
    # attempt, the SDK's retries included, and some were refused.
    assert rl["n"] == 6 and rl["upstream_attempts"] >= rl["completed"]
    assert rl["sim"]["by_status"].get("429", 0) > 0

    report = md_path.read_text()
    for heading in (
        "## 1. Overhead",
        "## 2. The notebook failure",
        "## 3. Throughput",
        "## 4. Rate-limited upstream",
        "## Machine and setup",
    ):
        assert heading in report
    stamp = results["meta"]["stamp"]
    for name in ("ttft", "throughput", "overhead"):
        png = tmp_path / "results" / f"{stamp}-{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    for name, pid in results["meta"]["pids"].items():
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
        assert name in {"llm-sim", "baseline"}
