"""The benchmark report: markdown tables and PNG plots from a results document.

``python -m bench.report bench/results/<stamp>.json`` re-renders a report from its JSON.
"""

from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

from bench import analysis, plots, stats, targets

NA = "-"


def _f(value: Any, digits: int = 1, signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return NA
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int | float):
        return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"
    return str(value)


def _verdict(ok: bool | None) -> str:
    return {True: "**met**", False: "**missed**", None: "not measured"}[ok]


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return [*out, ""]


def render(results: dict[str, Any], image_dir: str = ".") -> str:
    """The markdown report; images are linked as ``<image_dir>/<stamp>-*.png``."""
    meta, plan = results["meta"], results["plan"]
    a = results.get("analysis") or analysis.analyze(results)
    systems: list[str] = list(plan["systems"])
    stamp = meta["stamp"]
    img = f"{image_dir}/{stamp}" if image_dir not in ("", ".") else stamp
    m = meta["machine"]
    lines = [f"# sumstream benchmark {stamp}", ""]
    if plan.get("quick"):
        lines += ["> **Quick smoke run** (`--quick`): too few samples for the targets.", ""]
    for err in meta.get("errors") or []:
        lines.append(f"> **Failed:** {err} (logs: `{meta.get('logs')}`)")
    if meta.get("skipped"):
        lines.append(f"> Skipped to stay within the time budget: {', '.join(meta['skipped'])}.")
    if meta.get("errors") or meta.get("skipped"):
        lines.append("")
    others = _others_cores(results)
    if others is not None and others > 0.25:
        lines += [
            f"> **The machine was shared**: other processes used a median {others:.2f} of its "
            f"{m.get('cores')} cores during the measured phases. Absolute latencies are "
            "inflated by that; the differences and ratios between the two systems, measured "
            "in alternating phases of the same run, are the robust figures.",
            "",
        ]
    lines += _targets(a, systems, plan)
    lines += _cost_targets(results, a, systems)
    busy = [p["cpu"]["machine_busy"] for p in results["phases"]]
    lines += [
        "## Machine and setup",
        "",
        f"- {m.get('cores')} cores ({m.get('cpu', '?')}), {m.get('ram_gib', '?')} GiB RAM, "
        f"{m.get('platform')}; Python {m.get('python')}; Apache Kafka {m.get('kafka')} "
        f"({'started by the bench' if meta.get('broker_started_by_bench') else 'running already'}"
        f", {meta.get('broker_jit', 'JIT unknown')}).",
        "- Libraries: "
        + ", ".join(f"{k} {v}" for k, v in sorted((m.get("versions") or {}).items())),
        f"- Load average at start {meta.get('loadavg_start')}, at end {meta.get('loadavg_end')}; "
        f"the whole machine was busy {_f(100 * stats.percentile(busy, 50), 0)} % of the time "
        "during the median phase (the benchmark's processes plus anything else running). "
        "The machine is shared: other processes' load shows as noise in both systems alike.",
        f"- Run took {meta.get('duration_s')} s; processes ready after "
        + ", ".join(f"{k} {_f(v, 1)} s" for k, v in (meta.get("ready_s") or {}).items())
        + f"; warm-up {meta.get('warmup_s')} s.",
        f"- Simulator: TTFT {plan['ttft_ms']:.0f} ms, {plan['token_delay_ms']:.0f} ms per token, "
        f"max_output_tokens {plan['max_tokens']}, every summary exactly {plan['max_tokens']} "
        "tokens. One simulator serves both systems, one system at a time (never both at once), "
        "so neither steals the other's CPU; phases alternate the order (ABBA) against drift.",
        "- Baseline: `bench/baseline.py`, one Starlette endpoint streaming the anthropic SDK's "
        "deltas as SSE (SDK defaults: 2 retries honouring retry-after; no error event).",
        f"- sumstream: {plan.get('gateways', 1)} gateway(s), {plan.get('workers', 1)} worker "
        f"process(es) (all stages, max_streams {plan['max_streams']}), "
        f"{plan['users']} users of tier `{plan['tier']}` (each concurrent client is its own user), "
        "random topic prefix and app id for the run.",
        "- Times: TTFT = POST written to first `token` event read; inter-token = gap between "
        "consecutive token reads of one stream (all streams pooled); TTFB = POST to the status "
        "line; overhead = sumstream minus baseline at the same percentile, with a bootstrap 95 % "
        "interval (500 resamples) for TTFT.",
        "",
    ]
    lines += _overhead(a, systems, img)
    lines += _bursts(a, systems)
    lines += _throughput(a, systems, img)
    lines += _rate_limited(a, systems)
    lines += _scale(results, a, systems)
    lines += _where(results, a, systems)
    return "\n".join(lines) + "\n"


def _targets(a: dict[str, Any], systems: list[str], plan: dict[str, Any]) -> list[str]:
    rows: list[list[str]] = []
    v = a.get("overhead_verdict") or {}
    titles = {
        "ttft_p50": "TTFT overhead p50",
        "ttft_p99": "TTFT overhead p99",
        "gap_p99": "added per token, p99",
    }
    for key, title in titles.items():
        if key not in v:
            continue
        t = v[key]
        rows.append(
            [
                f"{title} at {v['level']} streams",
                f"≤ {t['limit']:.0f} ms",
                f"{_f(t['over_baseline'], signed=True)} ms over the baseline, "
                f"{_f(t['over_model'], signed=True)} ms over the model's own time",
                _verdict(t["ok"]),
            ]
        )
    best = (a.get("throughput") or {}).get("best", {}).get("sumstream")
    if "sumstream" in systems:
        rows.append(
            [
                "tokens/s where p99 inter-token stays within 50 ms of pacing",
                f"≥ {analysis.THROUGHPUT_TOKENS_PER_S:,.0f}",
                NA if not best else f"{best['tokens_per_s']:,.0f} at {best['concurrency']} streams",
                _verdict(None if not best else best["ok"]),
            ]
        )
        tv = a.get("ttfb_verdict") or {}
        rows.append(
            [
                "`accepted` p99 under the bursts",
                f"≤ {analysis.ACCEPTED_P99_MS:.0f} ms",
                f"{_f(tv.get('accepted_p99_ms'))} ms",
                _verdict(tv.get("ok")),
            ]
        )
    if not rows:
        return []
    return [
        "## Targets",
        "",
        *_table(["target", "goal", "measured", "verdict"], rows),
        "An overhead target is met only when sumstream is within it both over the baseline "
        "(issue 7's definition) and over the model's own time (docs/architecture.md's: the "
        "simulator's "
        f"{_f(plan['ttft_ms'], 0)} ms TTFT, or its pacing per token), so a saturated baseline "
        "cannot flatter sumstream.",
        "",
    ]


def _cost_targets(results: dict[str, Any], a: dict[str, Any], systems: list[str]) -> list[str]:
    if sorted(systems) != ["baseline", "sumstream"]:
        return []
    rows = [
        [r["target"], r["goal"], r["measured"], _verdict(r["ok"])]
        for r in targets.evaluate(results, a)
    ]
    return [
        "## Cost and scale targets (sumstream against the baseline, same run)",
        "",
        *_table(["target", "goal", "measured", "verdict"], rows),
    ]


def _scale(results: dict[str, Any], a: dict[str, Any], systems: list[str]) -> list[str]:
    lines: list[str] = []
    rows = []
    for r in targets.scaling(results):
        cpu = r["cpu_ms"]
        rows.append(
            [
                str(r["workers"]),
                str(r["gateways"]),
                f"{r['correct']}/{r['n']}",
                _p50_p99(r["ttft"]),
                _f(r["gap"].get("p99")),
                _f(r["tokens_per_s"], 0),
                *(_f(cpu.get(k), 0) for k in ("gateway", "worker", "broker", "total")),
            ]
        )
    if rows:
        lines += [
            "## 6. Scaling: worker processes and gateways",
            "",
            "A fresh sumstream per row (the run's main one idles meanwhile), the same closed loop:",
            "",
            *_table(
                [
                    "workers",
                    "gateways",
                    "correct",
                    "TTFT p50 / p99 ms",
                    "gap p99 ms",
                    "tokens/s",
                    "CPU ms/request: gateway",
                    "worker",
                    "broker",
                    "total",
                ],
                rows,
            ),
        ]
    by = analysis.group(results["streams"])
    long_rows = []
    for name in sorted({p["name"] for p in results["phases"] if p.get("scenario") == "long"}):
        for sys_ in systems:
            if (name, sys_) not in by:
                continue
            s = analysis.summarize(by[(name, sys_)])
            cpu = targets.cpu_per_request(results, name, sys_)
            long_rows.append(
                [
                    name,
                    sys_,
                    f"{s['correct']}/{s['n']}",
                    _p50_p99(s["ttft"]),
                    _f(s["gap"].get("p99")),
                    _f(s["tokens_per_s"], 0),
                    _f(cpu.get("total"), 0),
                ]
            )
    if long_rows:
        lines += [
            "## 6. The same corpus at longer summaries",
            "",
            *_table(
                [
                    "phase",
                    "system",
                    "correct",
                    "TTFT p50 / p99 ms",
                    "gap p99 ms",
                    "tokens/s",
                    "CPU ms/request (all its processes)",
                ],
                long_rows,
            ),
        ]
    return lines


def _overhead(a: dict[str, Any], systems: list[str], img: str) -> list[str]:
    lines = ["## 1. Overhead by concurrency", ""]
    rows = []
    for c, entry in (a.get("overhead") or {}).items():
        for sys_ in systems:
            if sys_ not in entry:
                continue
            e = entry[sys_]
            rows.append(
                [
                    c,
                    sys_,
                    f"{e['correct']}/{e['n']}",
                    _f(e["ttft"]["p50"]),
                    _f(e["ttft"]["p99"]),
                    _f(e["gap"]["p50"]),
                    _f(e["gap"]["p99"]),
                    _f(e["ttfb"]["p99"]),
                    _f(e["tokens_per_s"], 0),
                ]
            )
        if "overhead" in entry:
            o = entry["overhead"]
            rows.append(
                [
                    c,
                    "**overhead**",
                    "",
                    _with_ci(o["ttft_p50"]),
                    _with_ci(o["ttft_p99"]),
                    _f(o["gap_p50"]["diff"], signed=True),
                    _f(o["gap_p99"]["diff"], signed=True),
                    "",
                    "",
                ]
            )
    header = [
        "streams",
        "system",
        "correct",
        "TTFT p50 ms",
        "TTFT p99 ms",
        "gap p50 ms",
        "gap p99 ms",
        "TTFB p99 ms",
        "tokens/s",
    ]
    lines += _table(header, rows)
    lines += [f"![TTFT distribution]({img}-ttft.png)", "", f"![overhead]({img}-overhead.png)", ""]
    return lines


def _with_ci(o: dict[str, Any]) -> str:
    lo, hi = o["ci95"]
    return (
        f"{_f(o['diff'], signed=True)} [{_f(lo, signed=True)}, {_f(hi, signed=True)}] "
        f"x{_f(o['ratio'], 2)}"
    )


def _bursts(a: dict[str, Any], systems: list[str]) -> list[str]:
    lines = [
        "## 2. The notebook failure: users arriving at once (and 5. time to first byte)",
        "",
    ]
    rows = []
    for users, entry in (a.get("burst") or {}).items():
        for sys_ in systems:
            if sys_ not in entry:
                continue
            e = entry[sys_]
            rows.append(
                [
                    users,
                    sys_,
                    f"{e['correct']}/{e['n']}",
                    str(e["no_final"]),
                    _f(e["ttft"]["p50"]),
                    _f(e["ttft"]["p99"]),
                    f"x{_f(e.get('ttft_p99_vs_single'), 2)}",
                    _f(e["ttfb"]["p99"]),
                    _f(e["accepted"]["p99"]),
                    _f(e["total"]["p99"]),
                ]
            )
    header = [
        "users",
        "system",
        "correct (complete, in order, own)",
        "no final event",
        "TTFT p50 ms",
        "TTFT p99 ms",
        "p99 vs single user",
        "TTFB p99 ms",
        "`accepted` p99 ms",
        "total p99 ms",
    ]
    return lines + _table(header, rows)


def _throughput(a: dict[str, Any], systems: list[str], img: str) -> list[str]:
    t = a.get("throughput") or {}
    lines = ["## 3. Throughput", ""]
    rows = []
    for row in t.get("levels", []):
        cells = [str(row["concurrency"])]
        for sys_ in systems:
            cell = row.get(sys_) or {}
            cells += [
                _f(cell.get("tokens_per_s"), 0),
                _f(cell.get("gap_p99")),
                f"{cell.get('correct', 0)}/{cell.get('n', 0)}",
            ]
        cells.append(_f(row.get("gap_p99_overhead"), signed=True))
        rows.append(cells)
    header = ["streams"]
    for sys_ in systems:
        header += [f"{sys_} tokens/s", f"{sys_} gap p99 ms", f"{sys_} correct"]
    header.append("gap p99 overhead ms")
    lines += _table(header, rows)
    for sys_, best in (t.get("best") or {}).items():
        if best:
            lines.append(
                f"- {sys_}: highest level with p99 inter-token within "
                f"{analysis.THROUGHPUT_GAP_OVERHEAD_MS:.0f} ms of the simulator's pacing: "
                f"**{best['concurrency']} streams, {best['tokens_per_s']:,.0f} tokens/s**."
            )
        else:
            lines.append(f"- {sys_}: no level kept p99 inter-token within 50 ms of the pacing.")
    return [*lines, "", f"![tokens per second]({img}-throughput.png)", ""]


RATE_LIMIT_SECTIONS = (
    ("rate_limited", "## 4. Rate-limited upstream (slots)", "clients"),
    ("random_429", "## 6. Random 429s (retry-after 1 s)", "requests"),
    ("token_bucket", "## 7. Token bucket of half the offered load", "requests"),
)


def _rate_limited(a: dict[str, Any], systems: list[str]) -> list[str]:
    """Scenarios 4, 6 and 7: what completed, what was refused at the door, attempts."""
    lines: list[str] = []
    for key, title, unit in RATE_LIMIT_SECTIONS:
        rl = a.get(key) or {}
        rows = []
        for sys_ in systems:
            e = rl.get(sys_)
            if not e:
                continue
            sim = e.get("sim") or {}
            rows.append(
                [
                    sys_,
                    str(e["n"]),
                    str(e["completed"]),
                    str(e.get("refused", 0)),
                    _f(e.get("success_ratio"), 2),
                    str(e.get("upstream_attempts")),
                    _f(e.get("attempts_per_completed"), 2),
                    str(e["no_final"]),
                    ", ".join(f"{k} {v}" for k, v in sorted(e["outcomes"].items())),
                    ", ".join(f"{k}: {v}" for k, v in (sim.get("by_status") or {}).items()),
                    _f(e["total"]["p99"], 0),
                ]
            )
        if not rows:
            continue
        header = [
            "system",
            unit,
            "completed",
            "refused at the door (503)",
            "success ratio",
            "upstream attempts",
            "attempts per completed",
            "ended without a final event",
            "outcomes",
            "upstream statuses",
            "total p99 ms",
        ]
        lines += [title, "", *_table(header, rows)]
    return lines


# latency_ms keys of the result (pipeline/worker/postprocess.py) in the order a request meets them.
STAGES = (
    ("admission", "gateway: admit + produce"),
    ("queue_wait", "`requests` wait"),
    ("preprocess", "preprocess"),
    ("inference_queue", "`preprocessed` + scheduler"),
    ("ttft", "upstream TTFT"),
    ("delivery", "delivery to client"),
    ("time_to_first_token", "trace TTFT"),
)


def _p50_p99(d: dict[str, Any] | None) -> str:
    return NA if not d else f"{_f(d['p50'], 0)} / {_f(d['p99'], 0)}"


def _where(results: dict[str, Any], a: dict[str, Any], systems: list[str]) -> list[str]:
    lines = ["## Where the time goes", ""]
    rows = []
    phases = [(f"{c} streams", e) for c, e in (a.get("overhead") or {}).items()]
    phases += [(f"burst of {u}", e) for u, e in (a.get("burst") or {}).items()]
    for label, entry in phases:
        latency = (entry.get("sumstream") or {}).get("latency_ms") or {}
        if latency:
            rows.append([label] + [_p50_p99(latency.get(k)) for k, _ in STAGES])
    if rows:
        lines += [
            "sumstream's time to first token by stage, p50 / p99 ms (from the trace stamps its "
            "`done` event carries; `delivery` is the client's TTFT minus the trace's):",
            "",
            *_table(["load", *(title for _, title in STAGES)], rows),
        ]
    lines += _cpu(results)
    prof = results.get("profile") or {}
    for proc, summary in prof.items():
        if "error" in summary:
            lines += [f"py-spy on the {proc} failed: {summary['error']}", ""]
            continue
        lines += [
            f"py-spy, {proc} ({summary['samples']} samples holding the GIL at "
            f"{results['plan']['profile_level']} streams): share of CPU by area of the leaf frame",
            "",
        ]
        rows = [[k, f"{v * 100:.1f} %"] for k, v in summary["areas"].items()]
        lines += _table(["area", "share"], rows)
        rows = [[f"`{k}`", f"{v * 100:.1f} %"] for k, v in summary["self"][:10]]
        lines += _table([f"{proc}: hottest functions (self)", "share"], rows)
        rows = [[f"`{k}`", f"{v * 100:.1f} %"] for k, v in summary.get("own_total", [])[:10]]
        if rows:
            lines += _table([f"{proc}: sumstream functions (inclusive)", "share"], rows)
    return lines


def _others_cores(results: dict[str, Any]) -> float | None:
    """Median cores used by processes outside the benchmark during its phases."""
    cores = float(results["meta"]["machine"].get("cores") or 1)
    values = []
    for p in results["phases"]:
        ours = sum(float(v["core_share"]) for v in p["cpu"]["processes"].values())
        values.append(max(float(p["cpu"]["machine_busy"]) * cores - ours, 0.0))
    return stats.percentile(values, 50) if values else None


ACTIVE = {"baseline": ("baseline",), "sumstream": ("gateway", "worker", "broker")}
SHARED = ("llm-sim", "client")


def _cpu(results: dict[str, Any]) -> list[str]:
    """CPU per request by process, per phase, and what sumstream costs while idle."""
    cores = float(results["meta"]["machine"].get("cores") or 1)
    agg: dict[tuple[str, str], dict[str, float]] = defaultdict(lambda: defaultdict(float))
    idle: dict[str, list[float]] = defaultdict(list)
    for p in results["phases"]:
        a = agg[(p["name"], p["system"])]
        wall = float(p["cpu"]["wall_s"])
        a["n"] += p["n"]
        a["wall"] += wall
        a["busy"] += float(p["cpu"]["machine_busy"]) * wall * cores
        for proc, v in p["cpu"]["processes"].items():
            a[proc] += float(v["cpu_s"])
            a["ours"] += float(v["cpu_s"])
            if p["system"] == "baseline" and proc in ACTIVE["sumstream"]:
                idle[proc].append(float(v["core_share"]))
    if not agg:
        return []
    procs = [*ACTIVE["baseline"], *ACTIVE["sumstream"], *SHARED]
    rows = []
    for (name, sys_), a in agg.items():
        if name.startswith("throughput/") or name.startswith("burst/u10"):
            continue
        cells = [
            _f(1000 * a[proc] / max(a["n"], 1), 0) if proc in ACTIVE[sys_] or proc in SHARED else ""
            for proc in procs
        ]
        others = max(a["busy"] - a["ours"], 0.0) / max(a["wall"], 1e-9)
        rows.append([name, sys_, str(int(a["n"])), *cells, _f(others, 2)])
    lines = [
        "CPU milliseconds per request by process (the broker is shared with anything else "
        "using it), and the cores other processes on the machine used meanwhile:",
        "",
        *_table(["phase", "system", "requests", *procs, "other processes (cores)"], rows),
    ]
    if idle:
        lines += [
            "While idle (during the baseline's phases) sumstream's processes used "
            + ", ".join(f"{p} {100 * stats.percentile(v, 50):.0f} %" for p, v in idle.items())
            + " of a core (median over phases).",
            "",
        ]
    return lines


def write(results: dict[str, Any], out_dir: Path, stamp: str) -> Path:
    """Write ``<stamp>.md`` and its PNGs into ``out_dir``; return the markdown path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        plots.plot(results, out_dir, stamp)
    except ImportError:
        # The report is still worth having without its pictures.
        results["meta"].setdefault("errors", []).append(
            "plots: matplotlib is not installed (pip install -e '.[bench]')"
        )
    path = out_dir / f"{stamp}.md"
    path.write_text(render(results))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__)
    parser.add_argument("results", type=Path, help="a bench/results/<stamp>.json file")
    args = parser.parse_args()
    results = json.loads(args.results.read_text())
    results["analysis"] = analysis.analyze(results)
    print(write(results, args.results.parent, results["meta"]["stamp"]))


if __name__ == "__main__":
    main()
