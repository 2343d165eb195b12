"""The chaos run's JSON and markdown report (faults, timeline, figures)."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bench.chaos.checks import Verdict
    from bench.chaos.run import Run


def write_report(run: Run, verdict: Verdict) -> None:
    """``report.json`` and ``report.md`` in the run's directory, and both copied beside it as
    ``latest.*``; the markdown's last line is the verdict's."""
    data: dict[str, Any] = {
        "seed": run.seed,
        "duration_s": run.duration_s,
        "timeline": run.timeline,
        "faults": [e for e in run.timeline if e["event"].startswith(("SIG", "poison"))],
        "figures": verdict.as_json(),
        "clients": {
            "streams": len(run.streams),
            "refused": sum(1 for s in run.streams if s.request_id is None and not s.in_doubt),
            "in_doubt": sum(1 for s in run.streams if s.in_doubt),
            "produced_straight": len(run.produced),
        },
    }
    text = json.dumps(data, indent=1, default=str)
    md = markdown(data, verdict)
    for directory, name in ((run.run_dir, "report"), (run.run_dir.parent, "latest")):
        (directory / f"{name}.json").write_text(text)
        (directory / f"{name}.md").write_text(md)


def markdown(data: dict[str, Any], verdict: Verdict) -> str:
    f = data["figures"]
    lines = [
        f"# Chaos run, seed {data['seed']}, {data['duration_s']:.0f} s of load",
        "",
        "## Faults",
        "",
        *(f"- {e['t_s']:.1f} s: {e['event']} {_detail(e)}" for e in data["faults"]),
        "",
        "## Figures",
        "",
        "| figure | value |",
        "|---|---|",
        f"| accepted | {f['accepted']} |",
        f"| terminal by status | {f['terminal_by_status']} |",
        f"| lost | {len(f['lost'])} |",
        f"| missing / duplicated tokens | {f['missing_tokens']} / {f['duplicated_tokens']} |",
        f"| texts differing from the result | {len(f['text_mismatches'])} |",
        f"| billed (results) micro-USD | {f['billed_micro_usd']} |",
        f"| served (simulator) micro-USD | {f['served_micro_usd']} |",
        f"| requests billed differently from served | {len(f['billing_mismatches'])} "
        f"{f['billing_mismatches'][:5]} |",
        "| unbilled tokens of those (input, output) | "
        f"{sum(d['unbilled_input_tokens'] for d in f['billing_detail'])}, "
        f"{sum(d['unbilled_output_tokens'] for d in f['billing_detail'])} |",
        f"| billed for unaccepted requests | {len(f['billed_unaccepted'])} |",
        f"| quota ledger disagreements | {len(f['ledger_disagreements'])} |",
        f"| dlq: poison injected / found / other | {f['poison_injected']} / "
        f"{f['poison_in_dlq']} / {f['unexpected_dlq']} |",
        f"| streams resumed with Last-Event-ID | {f['resumed_streams']} |",
        f"| longest client stall | {f['longest_stall_s']} s |",
        f"| refused / in doubt / produced straight | {data['clients']['refused']} / "
        f"{data['clients']['in_doubt']} / {data['clients']['produced_straight']} |",
        "",
        "## Timeline",
        "",
        *(f"- {e['t_s']:.1f} s: {e['event']} {_detail(e)}" for e in data["timeline"]),
        "",
        verdict.last_line(),
        "",
    ]
    return "\n".join(lines)


def _detail(entry: dict[str, Any]) -> str:
    rest = {k: v for k, v in entry.items() if k not in ("t_s", "event", "faults")}
    return json.dumps(rest) if rest else ""
