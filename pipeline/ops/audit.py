"""The audit trail: one line per request outcome (who, when, model, tokens, cost), from `results`.

Written by `sumstream replay export`; the figures are the ones the results topic holds, so an
export of a window always agrees with that window's results (count and total cost).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from pipeline.core.codec import codec
from pipeline.core.errors import CodecError
from pipeline.core.settings import KafkaSettings
from pipeline.core.topics import TopicNames
from pipeline.kafka.connection import ConnectionConfig
from pipeline.ops.history import Progress, format_time, scan


def audit_row(result: dict[str, Any]) -> dict[str, Any]:
    """One audit line for a SummaryResult: who, when, what model, tokens, cost, outcome."""
    usage = result["usage"]
    return {
        "request_id": result["request_id"],
        "user_id": result["user_id"],
        "tier": result["tier"],
        "created_at": format_time(result["created_at"]),
        "completed_at": format_time(result["completed_at"]),
        "model": result["model"],
        "status": result["status"],
        "input_tokens": usage["input_tokens"],
        "output_tokens": usage["output_tokens"],
        "attempts": usage["attempts"],
        "cost_micro_usd": usage["cost_micro_usd"],
        "error": result["error"]["code"] if result.get("error") else None,
        "source": result["source"],
        "replay_of": result["replay_of"],
    }


@dataclass
class ExportReport:
    rows: int = 0
    cost_micro_usd: int = 0
    undecodable: int = 0


async def audit_rows(
    settings: KafkaSettings,
    since_ms: int,
    until_ms: int,
    *,
    progress: Progress | None = None,
    report: ExportReport | None = None,
) -> list[dict[str, Any]]:
    """The audit rows of the results stamped within the window, the last record per request.

    ``results`` is compacted, so a request may have several records (or fewer than were
    written); the last one in the window is its outcome. A tombstone removes the request.
    """
    topics = TopicNames.from_settings(settings)
    latest: dict[bytes | None, dict[str, Any] | None] = {}
    async for logged in scan(
        ConnectionConfig.from_settings(settings),
        [topics.results],
        since_ms=since_ms,
        until_ms=until_ms,
        on_progress=progress.update if progress else None,
    ):
        if logged.value is None:
            latest[logged.key] = None
            continue
        try:
            # Billing figures only: no key needed, so a forgotten user's rows stay.
            result = codec().decode_as(logged.value, "SummaryResult", opened=False)
        except CodecError:
            if report is not None:
                report.undecodable += 1
            continue
        latest[logged.key] = audit_row(result)
    rows = [row for row in latest.values() if row is not None]
    rows.sort(key=lambda row: (row["completed_at"], row["request_id"]))
    return rows


@contextlib.contextmanager
def output_file(path: str) -> Iterator[TextIO]:
    """stdout, or a file written beside its target and renamed when complete."""
    if path == "-":
        yield sys.stdout
        return
    target = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            yield out
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


async def export(
    settings: KafkaSettings,
    since_ms: int,
    until_ms: int,
    out: TextIO,
    *,
    progress: Progress | None = None,
) -> ExportReport:
    """Write the audit trail of the window to ``out`` as JSONL; return count and total cost."""
    report = ExportReport()
    for row in await audit_rows(settings, since_ms, until_ms, progress=progress, report=report):
        out.write(json.dumps(row, ensure_ascii=False) + "\n")
        report.rows += 1
        report.cost_micro_usd += row["cost_micro_usd"]
    return report
