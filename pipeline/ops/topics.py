"""`sumstream topics`: create the declared topics, or describe what the broker holds."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from pipeline.core.errors import SumstreamError
from pipeline.core.settings import KafkaSettings
from pipeline.core.topics import declared_topics
from pipeline.kafka.admin import TIMEOUT_S, create_topics, describe_topics


def _human_ms(value: str | None) -> str:
    if value is None or not value.lstrip("-").isdigit():
        return str(value)
    ms = int(value)
    if ms > 0 and ms % 86_400_000 == 0:
        return f"{value} ({ms // 86_400_000}d)"
    return value


def format_table(rows: list[dict[str, Any]]) -> str:
    """The `topics describe` table: one line per topic, mismatches marked."""
    lines = [f"{'topic':<32} {'partitions':>10}  config"]
    for row in rows:
        if not row["exists"]:
            lines.append(f"{row['name']:<32} {'-':>10}  MISSING (run `sumstream topics create`)")
            continue
        parts = [
            f"{k}={_human_ms(v) if k.endswith('.ms') else v}" for k, v in row["config"].items()
        ]
        mark = (
            ""
            if row["matches"]
            else "  MISMATCH (declared: "
            + (f"{row['declared_partitions']} partitions, {row['declared_config']})")
        )
        lines.append(f"{row['name']:<32} {row['partitions']:>10}  {' '.join(parts)}{mark}")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=["create", "describe"])
    parser.add_argument("--json", action="store_true", help="describe: print JSON")
    parser.add_argument("--timeout", type=float, default=TIMEOUT_S)


def run(args: argparse.Namespace) -> int:
    settings = KafkaSettings()
    try:
        if args.action == "create":
            created = create_topics(settings, args.timeout)
            total = len(declared_topics(settings))
            print(f"{len(created)} created, {total - len(created)} already present")
            for name in created:
                print(f"  + {name}")
            return 0
        rows = describe_topics(settings, args.timeout)
    except SumstreamError as exc:
        print(f"sumstream topics {args.action}: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(rows, indent=2) if args.json else format_table(rows))
    return 0 if all(row["matches"] for row in rows) else 1
