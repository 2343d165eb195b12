"""The short chaos run (`python -m bench.chaos --short`): 75 s of mixed load on a 3-node cluster
of its own, 2 workers and 2 gateways, with every kind of fault once; the accounting must hold."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.harness import REPO, free_port_block

pytestmark = pytest.mark.e2e


@pytest.mark.xfail(
    reason="open findings of the chaos run (docs/operations.md, 'Chaos'): a request skipped on "
    "a stopped worker's partition, abandoned attempts' usage not billed; remove when fixed",
    strict=False,
)
def test_a_short_chaos_run_loses_nothing_duplicates_nothing_and_bills_exactly(
    tmp_path: Path,
) -> None:
    args = ["--short", "--seed", "3", "--out", str(tmp_path)]
    out = subprocess.run(
        [sys.executable, "-m", "bench.chaos", *args, "--base-port", str(free_port_block(6))],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    last = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else ""
    report = json.loads((tmp_path / "latest.json").read_text())
    figures = report["figures"]
    detail = f"{last}\n{json.dumps(figures, indent=1)[:4000]}\n{out.stderr[-3000:]}"
    assert {e["event"] for e in report["faults"]} >= {
        "SIGKILL broker",
        "SIGKILL worker",
        "SIGKILL gateway",
        "SIGSTOP worker",
        "poison record",
    }, detail
    assert figures["accepted"] > 0 and figures["resumed_streams"] > 0, detail
    assert figures["lost"] == [], detail
    assert (figures["missing_tokens"], figures["duplicated_tokens"]) == (0, 0), detail
    assert figures["billing_diff"] == 0, detail
    assert figures["ledger_disagreements"] == [] and figures["billed_unaccepted"] == [], detail
    assert figures["poison_in_dlq"] == figures["poison_injected"] == 1, detail
    assert figures["unexpected_dlq"] == 0, detail
    assert out.returncode == 0 and last.endswith("0 lost, 0 duplicated tokens, billing exact"), (
        detail
    )
