"""`sumstream replay`: one request's history, re-running past requests, and the audit export.

Replay only ever reads the topics and produces new records under new ids; the original
records are never touched (docs/architecture.md, "Replay and audit").
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import re
import sys
from collections.abc import Awaitable
from typing import Any, TypeVar

from pipeline.core.errors import SumstreamError, TopicMissingError
from pipeline.core.settings import KafkaSettings
from pipeline.memory.keystore import DataKeyTable
from pipeline.ops import reinject
from pipeline.ops.audit import export, output_file
from pipeline.ops.history import Progress, format_time, parse_time, request_history
from pipeline.ops.timeline import history_lines

T = TypeVar("T")


def _time_arg(text: str) -> int:
    try:
        return parse_time(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _relative_times_are_values(parser: argparse.ArgumentParser) -> None:
    # argparse takes "-15m" for an option unless it looks like a negative number; widen what
    # it counts as one so `--since -15m` works as the brief and operators expect.
    parser._negative_number_matcher = re.compile(r"^-\d+(\.\d+)?\s*(ms|s|m|h|d|w)?$")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    req = sub.add_parser("request", help="every record of one request across all topics, in order")
    req.add_argument("request_id")
    req.add_argument("--json", action="store_true", help="print one JSON object per record")

    times = "ISO 8601 (UTC unless it says otherwise), epoch ms, 'now' or relative: -15m, -2h, -1d"
    rerun = sub.add_parser("rerun", help="re-inject past requests under new ids (shadow runs)")
    _relative_times_are_values(rerun)
    rerun.add_argument("--since", type=_time_arg, required=True, help=times)
    rerun.add_argument("--until", type=_time_arg, default="now", help=times)
    rerun.add_argument("--model", default=None, help="run the replays on this model instead")
    rerun.add_argument("--user", default=None, help="only requests of this user")
    rerun.add_argument("--include-replays", action="store_true", help="replay replays too")
    rerun.add_argument("--dry-run", action="store_true", help="print the plan, produce nothing")
    rerun.add_argument(
        "--rate", type=float, default=0.0, help="requests per second (default: no pacing)"
    )
    rerun.add_argument("--no-progress", action="store_true")

    export = sub.add_parser("export", help="the audit trail of the results in a window, as JSONL")
    _relative_times_are_values(export)
    export.add_argument("--since", type=_time_arg, required=True, help=times)
    export.add_argument("--until", type=_time_arg, default="now", help=times)
    export.add_argument("--out", required=True, help="JSONL file to write ('-' for stdout)")
    export.add_argument("--no-progress", action="store_true")


async def with_keys(settings: KafkaSettings, work: Awaitable[T]) -> T:
    """Await ``work`` with every data key of ``keys`` read: sealed text opens, and text whose
    key was shredded reads as ``[forgotten]`` (docs/architecture.md, "Forgetting")."""
    table = DataKeyTable(settings)
    # A deployment from before sealed text has no `keys` topic: nothing is sealed there.
    with contextlib.suppress(TopicMissingError):
        await table.start()
    table.ring.settled = True
    try:
        return await work
    finally:
        await table.stop()


def _print_history(settings: KafkaSettings, request_id: str, as_json: bool) -> int:
    records = asyncio.run(with_keys(settings, request_history(settings, request_id)))
    if not records:
        print(f"no records of request {request_id} in {settings.topic_prefix}*", file=sys.stderr)
        return 1
    for line in history_lines(records, settings, as_json=as_json):
        print(line)
    if not as_json:
        span = records[-1].timestamp_ms - records[0].timestamp_ms
        topics = len({r.topic for r in records})
        print(f"{len(records)} records in {topics} topics over {span} ms", file=sys.stderr)
    return 0


def _run_rerun(settings: KafkaSettings, args: argparse.Namespace) -> int:
    def show(old: str, new: str, replay: dict[str, Any]) -> None:
        target = "(dry run)" if args.dry_run else new
        print(f"{old} -> {target}  user={replay['user_id']} model={replay['model'] or '-'}")

    progress = Progress("reading requests", enabled=not args.no_progress)
    try:
        report = asyncio.run(
            with_keys(
                settings,
                reinject.rerun(
                    settings,
                    args.since,
                    args.until,
                    model=args.model,
                    user=args.user,
                    include_replays=args.include_replays,
                    dry_run=args.dry_run,
                    rate=args.rate,
                    on_mapped=show,
                    progress=progress,
                ),
            )
        )
    finally:
        progress.close()
    verb = "would re-inject" if args.dry_run else "re-injected"
    print(
        f"{verb} {len(report.mapping)} requests from {format_time(args.since)} to "
        f"{format_time(args.until)}; skipped {report.skipped_replays} replays, "
        f"{report.skipped_users} of other users, {report.forgotten} forgotten, "
        f"{report.undecodable} undecodable",
        file=sys.stderr,
    )
    for old, err in report.failed.items():
        print(f"not delivered: {old}: {err}", file=sys.stderr)
    return 1 if report.failed else 0


# -- replay export ------------------------------------------------------------------------


def _run_export(settings: KafkaSettings, args: argparse.Namespace) -> int:
    progress = Progress("reading results", enabled=not args.no_progress)
    try:
        with output_file(args.out) as out:
            report = asyncio.run(export(settings, args.since, args.until, out, progress=progress))
    finally:
        progress.close()
    where = "stdout" if args.out == "-" else args.out
    print(
        f"exported {report.rows} results ({report.cost_micro_usd / 1e6:.6f} USD) from "
        f"{format_time(args.since)} to {format_time(args.until)} to {where}"
        + (f"; {report.undecodable} undecodable records skipped" if report.undecodable else ""),
        file=sys.stderr,
    )
    return 0


def run(args: argparse.Namespace) -> int:
    settings = KafkaSettings()
    try:
        if args.action == "request":
            return _print_history(settings, args.request_id, args.json)
        if args.since > args.until:
            print("--since is after --until", file=sys.stderr)
            return 2
        if args.action == "rerun":
            return _run_rerun(settings, args)
        return _run_export(settings, args)
    except (SumstreamError, OSError) as exc:
        print(f"replay {args.action}: {exc}", file=sys.stderr)
        return 1
