"""The chaos run's short version (`python -m bench.chaos --short`, docs/operations.md,
"Chaos"): a 3-node cluster of its own, 2 workers and 2 gateways under mixed load while a seeded
schedule SIGKILLs the partition leader broker, a worker and a gateway, SIGSTOPs a worker past
its session timeout and poisons `requests`.

It asserts what the pipeline promises under those faults: no accepted request lost, no token
missing or duplicated for a client, every finished client's text its result's, both gateways'
quota ledgers equal to the results, nothing billed for a refused request, and only the poison
in `dlq`. Billing against what the simulator served is reported, not asserted: a worker
SIGKILLed mid-stream leaves output the upstream sent it unbilled by anyone (docs/architecture.md,
"Billing a resumed stream").
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

REPO = Path(__file__).resolve().parents[2]


def test_the_short_chaos_run_loses_nothing_and_repeats_no_token(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.chaos",
            "--short",
            "--seed",
            "3",
            "--base-port",
            "19400",  # six ports for the cluster's three nodes, out of the ephemeral range
            "--out",
            str(tmp_path),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=840,
        check=False,
    )
    report = tmp_path / "latest.json"
    assert report.exists(), proc.stderr[-3000:]
    figures = json.loads(report.read_text())["figures"]
    print(
        f"\nFIGURES chaos short: accepted={figures['accepted']} lost={len(figures['lost'])} "
        f"billing_diff_micro_usd={figures['billing_diff']} unbilled={figures['billing_detail']}"
    )
    assert figures["accepted"] > 50
    assert figures["lost"] == []
    assert (figures["missing_tokens"], figures["duplicated_tokens"]) == (0, 0)
    assert figures["text_mismatches"] == []
    assert figures["ledger_disagreements"] == []
    assert figures["billed_unaccepted"] == []
    assert figures["unexpected_dlq"] == 0
    assert figures["poison_in_dlq"] == figures["poison_injected"] == 1
