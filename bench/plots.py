"""The report's PNG plots: TTFT distribution, tokens/s and overhead against concurrency."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench import analysis


def plot(results: dict[str, Any], out_dir: Path, stamp: str) -> list[Path]:
    """TTFT distribution, tokens/s against concurrency, overhead against concurrency."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    a = results.get("analysis") or analysis.analyze(results)
    plan = results["plan"]
    systems: list[str] = list(plan["systems"])
    by = analysis.group(results["streams"])
    colors = {"baseline": "tab:blue", "sumstream": "tab:orange"}
    paths = []

    levels = list(plan["levels"])
    fig, axes = plt.subplots(1, len(levels), figsize=(4 * len(levels), 3.4), squeeze=False)
    for ax, c in zip(axes[0], levels, strict=True):
        for sys_ in systems:
            v = sorted(
                s["ttft_ms"]
                for s in by.get((f"overhead/c{c}", sys_), [])
                if s["ttft_ms"] is not None
            )
            if v:
                ax.step(
                    v,
                    [(i + 1) / len(v) for i in range(len(v))],
                    where="post",
                    label=sys_,
                    color=colors.get(sys_),
                )
        ax.set_title(f"{c} concurrent streams")
        ax.set_xlabel("TTFT (ms)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("fraction of streams")
    axes[0][0].legend()
    fig.suptitle("Time to first token (ECDF)")
    fig.tight_layout()
    paths.append(_save(fig, out_dir / f"{stamp}-ttft.png"))

    rows = (a.get("throughput") or {}).get("levels", [])
    fig, ax = plt.subplots(figsize=(6, 4))
    for sys_ in systems:
        pts = [(r["concurrency"], r[sys_]["tokens_per_s"]) for r in rows if sys_ in r]
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", label=sys_, color=colors.get(sys_))
    if rows:
        cs = [r["concurrency"] for r in rows]
        per_stream = plan["max_tokens"] / (
            (plan["ttft_ms"] + plan["max_tokens"] * plan["token_delay_ms"]) / 1000
        )
        ax.plot(cs, [c * per_stream for c in cs], "k--", lw=1, label="simulator's pace")
    ax.axhline(analysis.THROUGHPUT_TOKENS_PER_S, color="grey", lw=0.8, ls=":")
    ax.set_xscale("log")
    ax.set_xlabel("concurrent streams")
    ax.set_ylabel("tokens/s delivered to clients")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    paths.append(_save(fig, out_dir / f"{stamp}-throughput.png"))

    ov = a.get("overhead") or {}
    pts = [(int(c), e) for c, e in ov.items() if "overhead" in e]
    ttft, delay = float(plan["ttft_ms"]), float(plan["token_delay_ms"])
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    if pts:
        cs = [c for c, _ in pts]
        for q, color in (("p50", "tab:blue"), ("p99", "tab:orange")):
            ax1.plot(
                cs,
                [e["overhead"][f"ttft_{q}"]["diff"] for _, e in pts],
                "o-",
                color=color,
                label=f"{q} over the baseline",
            )
            ax1.plot(
                cs,
                [e["sumstream"]["ttft"][q] - ttft for _, e in pts],
                "s--",
                color=color,
                label=f"{q} over the model's TTFT",
            )
        ax2.plot(
            cs,
            [e["overhead"]["gap_p99"]["diff"] for _, e in pts],
            "o-",
            color="tab:orange",
            label="p99 over the baseline",
        )
        ax2.plot(
            cs,
            [e["sumstream"]["gap"]["p99"] - delay for _, e in pts],
            "s--",
            color="tab:orange",
            label="p99 over the pacing",
        )
    ax1.axhline(analysis.TTFT_OVERHEAD_P50_MS, color="tab:blue", ls=":", lw=1, label="p50 target")
    ax1.axhline(analysis.TTFT_OVERHEAD_P99_MS, color="tab:orange", ls=":", lw=1, label="p99 target")
    ax2.axhline(
        analysis.TOKEN_OVERHEAD_P99_MS, color="tab:orange", ls=":", lw=1, label="p99 target"
    )
    for ax, title in (
        (ax1, "sumstream's TTFT overhead"),
        (ax2, "sumstream's inter-token overhead"),
    ):
        ax.set_xscale("log")
        ax.set_yscale("symlog", linthresh=10)
        ax.set_xlabel("concurrent streams")
        ax.set_ylabel("ms")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(_save(fig, out_dir / f"{stamp}-overhead.png"))
    return paths


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
