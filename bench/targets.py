"""The cost-and-scale targets (docs/architecture.md, "Performance targets"): sumstream against
the baseline in the same run, plus the scaling table and the longer summaries of scenario 6."""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

from bench import analysis, stats

# sumstream's TTFT overhead over the baseline at 50 streams (the long-run goal stays 15 / 50).
TTFT_P50_OVER_BASELINE_MS = 50.0
TTFT_P99_OVER_BASELINE_MS = 150.0
# A single stream: no worse than before the work on cost.
SINGLE_TTFT_P50_OVER_MS = 20.0
SINGLE_GAP_P99_OVER_MS = 3.0
CPU_RATIO = 1.5
TOKENS_RATIO = 2.0
SUMSTREAM_PROCESSES = ("gateway", "worker", "broker")


def cpu_per_request(results: dict[str, Any], name: str, system: str) -> dict[str, float]:
    """CPU ms per request of each process group in the phases called ``name``."""
    used: dict[str, float] = defaultdict(float)
    n = 0
    for p in results["phases"]:
        if p["name"] != name or p["system"] != system:
            continue
        n += int(p["n"])
        for proc, v in p["cpu"]["processes"].items():
            used[proc] += float(v["cpu_s"])
    if not n:
        return {}
    out = {proc: round(1000 * s / n, 1) for proc, s in used.items()}
    procs = ("baseline",) if system == "baseline" else SUMSTREAM_PROCESSES
    out["total"] = round(sum(out.get(proc, 0.0) for proc in procs), 1)
    return out


def evaluate(results: dict[str, Any], a: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per target: what it asks, what was measured, whether it holds (None: unknown)."""
    rows: list[dict[str, Any]] = []
    o50 = (a.get("overhead", {}).get("50") or {}).get("overhead") or {}
    for key, limit in (
        ("ttft_p50", TTFT_P50_OVER_BASELINE_MS),
        ("ttft_p99", TTFT_P99_OVER_BASELINE_MS),
    ):
        diff = (o50.get(key) or {}).get("diff")
        rows.append(
            _row(
                f"TTFT overhead {key[5:]} at 50 streams",
                f"≤ {limit:.0f} ms over the baseline",
                diff,
                limit,
                "ms",
            )
        )
    burst = (a.get("burst") or {}).get("100") or {}
    s_ratio = (burst.get("sumstream") or {}).get("ttft_p99_vs_single")
    b_ratio = (burst.get("baseline") or {}).get("ttft_p99_vs_single")
    rows.append(
        {
            "target": "100 users at once: p99 TTFT / single-user p99",
            "goal": f"≤ the baseline's (x{_n(b_ratio)})",
            "measured": f"x{_n(s_ratio)}",
            "ok": None if s_ratio is None or b_ratio is None else s_ratio <= b_ratio,
        }
    )
    s_cpu = cpu_per_request(results, "overhead/c50", "sumstream").get("total")
    b_cpu = cpu_per_request(results, "overhead/c50", "baseline").get("total")
    cpu_x = stats.ratio(s_cpu, b_cpu) if s_cpu and b_cpu else None
    rows.append(
        {
            "target": "CPU ms per request at 50 streams, every sumstream process incl. the broker",
            "goal": f"≤ {CPU_RATIO}x the baseline's ({_n(b_cpu)} ms)",
            "measured": f"{_n(s_cpu)} ms (x{_n(cpu_x)})",
            "ok": None if not s_cpu or not b_cpu else s_cpu <= CPU_RATIO * b_cpu,
        }
    )
    best = (a.get("throughput") or {}).get("best") or {}
    s_tok = (best.get("sumstream") or {}).get("tokens_per_s")
    b_tok = (best.get("baseline") or {}).get("tokens_per_s")
    rows.append(
        {
            "target": "tokens/s at the highest level with p99 gap within 50 ms of pacing",
            "goal": f"≥ {TOKENS_RATIO}x the baseline's ({_n(b_tok)})",
            "measured": f"{_n(s_tok)}",
            "ok": None if s_tok is None or b_tok is None else s_tok >= TOKENS_RATIO * b_tok,
        }
    )
    accepted = (a.get("ttfb_verdict") or {}).get("accepted_p99_ms")
    rows.append(_row("`accepted` p99 in the bursts", "≤ 50 ms", accepted, 50.0, "ms"))
    o1 = (a.get("overhead", {}).get("1") or {}).get("overhead") or {}
    rows.append(
        _row(
            "a single stream: TTFT overhead p50",
            f"≤ {SINGLE_TTFT_P50_OVER_MS:.0f} ms",
            (o1.get("ttft_p50") or {}).get("diff"),
            SINGLE_TTFT_P50_OVER_MS,
            "ms",
        )
    )
    rows.append(
        _row(
            "a single stream: inter-token p99 overhead",
            f"≤ +{SINGLE_GAP_P99_OVER_MS:.0f} ms",
            (o1.get("gap_p99") or {}).get("diff"),
            SINGLE_GAP_P99_OVER_MS,
            "ms",
        )
    )
    return rows


def _row(target: str, goal: str, value: float | None, limit: float, unit: str) -> dict[str, Any]:
    ok = None if value is None or math.isnan(value) else value <= limit
    return {"target": target, "goal": goal, "measured": f"{_n(value)} {unit}", "ok": ok}


def _n(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:,.1f}"


def scaling(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Scenario 6's rows: per (workers, gateways), latency, tokens/s and CPU per request."""
    group = analysis.group(results["streams"])
    rows = []
    for p in results["phases"]:
        if p.get("scenario") != "scaling":
            continue
        s = analysis.summarize(group[(p["name"], "sumstream")])
        rows.append(
            {
                "workers": p["workers"],
                "gateways": p["gateways"],
                "n": s["n"],
                "correct": s["correct"],
                "ttft": s["ttft"],
                "gap": s["gap"],
                "tokens_per_s": s["tokens_per_s"],
                "cpu_ms": cpu_per_request(results, p["name"], "sumstream"),
            }
        )
    return rows
