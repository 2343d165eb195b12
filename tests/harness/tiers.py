"""A tiers file (config/tiers.toml's shape) with the limits a test needs."""

from __future__ import annotations

import json
from pathlib import Path

# name -> (rpm, tpm, max_input_tokens, max_output_tokens, weight, monthly_budget_usd,
#          max_queue_wait_s); the order of config/tiers.toml's fields.
TierRow = tuple[int, int, int, int, int, float, float]
# Every tier of a test tiers file allows every priced model (the default first).
TEST_TIER_MODELS = [
    "claude-haiku-4-5",
    "claude-3-5-haiku-latest",
    "claude-sonnet-4-5",
    "claude-opus-4-5",
    "claude-opus-4-1",
]


def write_tiers(
    path: Path, tiers: dict[str, TierRow], *, reject: frozenset[str] = frozenset()
) -> Path:
    """A tiers file for a test stack: ``reject`` tiers refuse oversized input, others truncate."""
    lines: list[str] = []
    for name, (rpm, tpm, max_in, max_out, weight, budget, wait) in tiers.items():
        policy = "reject" if name in reject else "truncate"
        lines += [
            f"[{name}]",
            f"rpm = {rpm}",
            f"tpm = {tpm}",
            f"max_input_tokens = {max_in}",
            f"max_output_tokens = {max_out}",
            f"weight = {weight}",
            f"monthly_budget_usd = {budget}",
            f"max_queue_wait_s = {wait}",
            f'on_input_too_large = "{policy}"',
            f"models = {json.dumps(TEST_TIER_MODELS)}",
            "",
        ]
    path.write_text("\n".join(lines))
    return path
