"""One request's history as lines: time, topic, offset, type and what an operator reads first.

`sumstream replay request` prints these; ``--json`` gives one JSON object per record instead.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from typing import Any

from pipeline.core import events as token_events
from pipeline.core.errors import CodecError
from pipeline.core.settings import KafkaSettings
from pipeline.ops.history import LoggedRecord, format_time


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
            + (
                f" preferences=v{rec['preferences_version']}"
                if rec.get("preferences_version")
                else ""
            )
        )
    if kind == "TokenEvent":
        first = token_events.first_seq(rec)
        seqs = f"{first}..{rec['seq']}" if first < rec["seq"] else str(rec["seq"])
        line = f"{rec['kind']} seq={seqs} attempt={rec['attempt']}"
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
    if kind == "ChunkSummary":
        if rec["kind"] == "PLAN":
            return f"PLAN levels={rec['levels']}"
        line = f"{rec['kind']} level={rec['level']} index={rec['index']}"
        return line + (f" {_usage(rec['usage'])}" if rec.get("usage") else "")
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
