"""`sumstream replay`: one request's history, re-running past requests, and the audit export.

Replay only ever reads the topics and produces new records under new ids; the original
records are never touched (DESIGN.md section 8).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import re
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from pipeline.core.codec import codec
from pipeline.core.errors import CodecError, SumstreamError
from pipeline.core.settings import KafkaSettings
from pipeline.core.topics import TopicNames
from pipeline.kafka.connection import ConnectionConfig
from pipeline.ops.audit import export, output_file
from pipeline.ops.history import (
    LoggedRecord,
    Progress,
    format_time,
    parse_time,
    request_history,
    scan,
)
from pipeline.ops.submit import build_request, request_producer

# Request fields a replay takes from its original; the rest are minted afresh.
_CARRIED = ("instructions", "max_output_tokens", "model", "degraded")


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


# -- replay request -----------------------------------------------------------------------


def _short(topic: str, settings: KafkaSettings) -> str:
    prefix = settings.topic_prefix
    return topic[len(prefix) :] if topic.startswith(prefix) else topic


def _clip(text: str, width: int = 60) -> str:
    return json.dumps(text if len(text) <= width else text[: width - 1] + "…", ensure_ascii=False)


def _usage(usage: dict[str, Any] | None) -> str:
    if not usage:
        return ""
    return (
        f"in={usage['input_tokens']} out={usage['output_tokens']} "
        f"attempts={usage['attempts']} cost={usage['cost_micro_usd']}µ$"
    )


def essentials(kind: str, rec: dict[str, Any]) -> str:
    """The few fields of a record an operator reads first, on one line."""
    if kind == "SummarizeRequest":
        parts = [f"user={rec['user_id']} tier={rec['tier']} source={rec['source']}"]
        parts.append(f"model={rec['model'] or '-'} doc={len(rec['document'])} chars")
        if rec.get("replay_of"):
            parts.append(f"replay_of={rec['replay_of']}")
        return " ".join(parts)
    if kind == "InferenceJob":
        return (
            f"model={rec['model']} max_output={rec['max_output_tokens']} "
            f"input_est={rec['input_tokens_estimate']} chunks={len(rec['chunks'])}"
            + (" truncated" if rec["truncated"] else "")
        )
    if kind == "TokenEvent":
        line = f"{rec['kind']} seq={rec['seq']} attempt={rec['attempt']}"
        if rec["text"]:
            line += f" {_clip(rec['text'])}"
        if rec.get("stop_reason"):
            line += f" stop={rec['stop_reason']}"
        if rec.get("usage"):
            line += f" {_usage(rec['usage'])}"
        if rec.get("error"):
            line += f" error={rec['error']['code']}"
        return line
    if kind == "SummaryResult":
        line = f"{rec['status']} model={rec['model']} {_usage(rec['usage'])}"
        if rec.get("error"):
            line += f" error={rec['error']['code']}"
        if "total" in rec["latency_ms"]:
            line += f" total={rec['latency_ms']['total']}ms"
        return line
    if kind == "ControlEvent":
        return f"{rec['action']} reason={rec['reason']}"
    if kind == "DeadLetter":
        return (
            f"stage={rec['stage']} error={rec['error_type']}: {_clip(rec['error'])} "
            f"origin={rec['origin_topic']}[{rec['origin_partition']}]@{rec['origin_offset']}"
        )
    return ""


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    return value


def history_lines(
    records: list[LoggedRecord], settings: KafkaSettings, *, as_json: bool = False
) -> Iterator[str]:
    """One line per record: time, +ms from the first, topic, partition@offset, type, essentials."""
    if not records:
        return
    first = records[0].timestamp_ms
    for logged in records:
        topic = _short(logged.topic, settings)
        rec: dict[str, Any] | None = None
        try:
            kind, rec = logged.decode()
            summary = essentials(kind, rec)
        except CodecError as exc:
            kind, summary = "undecodable", str(exc)
        if as_json:
            yield json.dumps(
                {
                    "timestamp": format_time(logged.timestamp_ms),
                    "offset_ms": logged.timestamp_ms - first,
                    "topic": topic,
                    "partition": logged.partition,
                    "offset": logged.offset,
                    "type": kind,
                    "record": _jsonable(rec) if rec is not None else None,
                    **({"error": summary} if rec is None else {}),
                },
                ensure_ascii=False,
            )
        else:
            where = f"p{logged.partition}@{logged.offset}"
            yield (
                f"{format_time(logged.timestamp_ms)} {f'+{logged.timestamp_ms - first}ms':>9} "
                f"{topic:<12} {where:<10} {kind:<16} {summary}"
            )


def _print_history(settings: KafkaSettings, request_id: str, as_json: bool) -> int:
    records = asyncio.run(request_history(settings, request_id))
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


# -- replay rerun -------------------------------------------------------------------------


@dataclass
class RerunReport:
    """What a rerun did: old id -> new id for every request it re-injected (or would have)."""

    mapping: dict[str, str] = field(default_factory=dict)
    skipped_replays: int = 0
    skipped_users: int = 0
    undecodable: int = 0
    failed: dict[str, str] = field(default_factory=dict)


def replay_request(original: dict[str, Any], *, model: str | None = None) -> dict[str, Any]:
    """A new SummarizeRequest for the same document: new id and times, ``replay_of`` the original.

    A relative deadline is kept (the original's absolute one has passed); an idempotency key
    is not, so the replay is never folded into its original.
    """
    fields = {name: original.get(name) for name in _CARRIED}
    if model is not None:
        fields["model"] = model
        fields["degraded"] = None
    request = build_request(
        original["document"],
        user=original["user_id"],
        tier=original["tier"],
        source="replay",
        replay_of=original["request_id"],
        idempotency_key=None,
        **fields,
    )
    deadline = original.get("deadline_ms")
    request["deadline_ms"] = (
        None
        if deadline is None
        else request["created_at"] + max(0, deadline - original["created_at"])
    )
    return request


async def rerun(
    settings: KafkaSettings,
    since_ms: int,
    until_ms: int,
    *,
    model: str | None = None,
    user: str | None = None,
    include_replays: bool = False,
    dry_run: bool = False,
    rate: float = 0.0,
    on_mapped: Callable[[str, str, dict[str, Any]], None] | None = None,
    progress: Progress | None = None,
) -> RerunReport:
    """Re-inject the SummarizeRequests stamped within the window under new ids.

    ``on_mapped(old, new, replay)`` is called once the replay is delivered (at once when
    ``dry_run``, in which case nothing is produced).
    """
    topics = TopicNames.from_settings(settings)
    report = RerunReport()
    producer = None if dry_run else request_producer(settings)
    pace = 1.0 / rate if rate > 0 else 0.0
    next_at = time.monotonic()

    def delivered(old: str, new: str, replay: dict[str, Any]) -> Callable[[Any, Any], None]:
        def on_delivery(err: Any, _msg: Any) -> None:
            if err is not None:
                report.failed[old] = str(err)
                return
            report.mapping[old] = new
            if on_mapped is not None:
                on_mapped(old, new, replay)

        return on_delivery

    try:
        async for logged in scan(
            ConnectionConfig.from_settings(settings),
            [topics.requests],
            since_ms=since_ms,
            until_ms=until_ms,
            on_progress=progress.update if progress else None,
        ):
            try:
                original = codec().decode_as(logged.value, "SummarizeRequest")
            except CodecError:
                report.undecodable += 1  # preprocess sent it to the dlq already
                continue
            if not include_replays and (original["source"] == "replay" or original["replay_of"]):
                report.skipped_replays += 1
                continue
            if user is not None and original["user_id"] != user:
                report.skipped_users += 1
                continue
            replay = replay_request(original, model=model)
            old, new = original["request_id"], replay["request_id"]
            if producer is None:
                report.mapping[old] = new
                if on_mapped is not None:
                    on_mapped(old, new, replay)
                continue
            if pace:
                await asyncio.sleep(max(0.0, next_at - time.monotonic()))
                next_at = max(next_at, time.monotonic()) + pace
            value = codec().encode("SummarizeRequest", replay)
            while True:
                try:
                    producer.produce(
                        topics.requests,
                        key=new.encode(),
                        value=value,
                        on_delivery=delivered(old, new, replay),
                    )
                    break
                except BufferError:  # local queue full: let deliveries drain
                    await asyncio.to_thread(producer.poll, 0.5)
            producer.poll(0)
    finally:
        if producer is not None:
            remaining = await asyncio.to_thread(producer.flush, 30)
            if remaining:
                report.failed["*"] = f"{remaining} replays not confirmed by the broker"
    return report


def _run_rerun(settings: KafkaSettings, args: argparse.Namespace) -> int:
    def show(old: str, new: str, replay: dict[str, Any]) -> None:
        target = "(dry run)" if args.dry_run else new
        print(f"{old} -> {target}  user={replay['user_id']} model={replay['model'] or '-'}")

    progress = Progress("reading requests", enabled=not args.no_progress)
    try:
        report = asyncio.run(
            rerun(
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
            )
        )
    finally:
        progress.close()
    verb = "would re-inject" if args.dry_run else "re-injected"
    print(
        f"{verb} {len(report.mapping)} requests from {format_time(args.since)} to "
        f"{format_time(args.until)}; skipped {report.skipped_replays} replays, "
        f"{report.skipped_users} of other users, {report.undecodable} undecodable",
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
