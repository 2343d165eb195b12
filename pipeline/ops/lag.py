"""`sumstream lag`: consumer lag per stage (or per partition), once or refreshed every second."""

from __future__ import annotations

import argparse
import sys
import time

from pipeline.core.errors import SumstreamError
from pipeline.core.settings import KafkaSettings
from pipeline.kafka.lag import STAGE_TOPICS, LagReader, PartitionLag, default_groups


def format_table(parts: list[PartitionLag], *, per_partition: bool = False) -> str:
    """The `sumstream lag` table: one line per stage (or per partition)."""
    lines = [f"{'stage':<12} {'group':<20} {'topic':<32} {'part':>4} {'lag':>10}"]
    stages: dict[str, list[PartitionLag]] = {}
    for part in parts:
        stages.setdefault(part.stage, []).append(part)
    for stage, rows in stages.items():
        if per_partition:
            for r in rows:
                lines.append(
                    f"{stage:<12} {r.group:<20} {r.topic:<32} {r.partition:>4} {r.lag:>10}"
                )
        total = sum(r.lag for r in rows)
        lines.append(f"{stage:<12} {rows[0].group:<20} {rows[0].topic:<32} {'all':>4} {total:>10}")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--group", default=None, help="consumer group of every stage (app id)")
    parser.add_argument(
        "--stage-group",
        action="append",
        default=[],
        metavar="STAGE=GROUP",
        help="consumer group of one stage (repeatable)",
    )
    parser.add_argument("--partitions", action="store_true", help="one line per partition")
    parser.add_argument("--watch", action="store_true", help="refresh every second")


def run(args: argparse.Namespace) -> int:
    groups = default_groups(args.group)
    for item in args.stage_group:
        stage, sep, group = item.partition("=")
        if not sep or stage not in STAGE_TOPICS:
            print(f"--stage-group wants STAGE=GROUP with a stage of {sorted(STAGE_TOPICS)}")
            return 2
        groups[stage] = group
    try:
        reader = LagReader(KafkaSettings(), groups)
        while True:
            table = format_table(reader.read_partitions(), per_partition=args.partitions)
            if not args.watch:
                print(table)
                return 0
            # Clear the screen and redraw in place.
            print(f"\x1b[H\x1b[2J{time.strftime('%H:%M:%S')}  sumstream lag\n{table}", flush=True)
            time.sleep(1.0)
    except SumstreamError as exc:
        print(f"sumstream lag: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
