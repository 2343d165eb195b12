"""The floor's figures: the census of what one sumstream request costs on the wire, and the
summary and tables of a floor run (bench/floor.py; docs/architecture.md, "The floor")."""

from __future__ import annotations

import statistics
import uuid
from typing import Any

ROWS = ("baseline", "sumstream", "bare", "faust", "gateway", "lean")
KIND_OF = {"STARTED": "S", "DELTA": "D"}  # every other TokenEvent kind is a terminal event


def census(bootstrap: str, prefix: str) -> dict[str, Any]:
    """Records per request on every topic of ``prefix`` (Faust's own included) and the mean
    value size of each kind of record, read back from the broker."""
    from confluent_kafka import Consumer, TopicPartition

    from pipeline.core.codec import codec

    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"census-{uuid.uuid4()}"})
    counts: dict[str, int] = {}
    sizes: dict[str, list[int]] = {}
    try:
        meta = consumer.list_topics(timeout=10)
        for name, topic in sorted(meta.topics.items()):
            if not name.startswith(prefix.rstrip(".")):
                continue
            total = 0
            for p in topic.partitions:
                low, high = consumer.get_watermark_offsets(TopicPartition(name, p), timeout=10)
                total += high - low
            counts[name.removeprefix(prefix)] = total
            if name.removeprefix(prefix) not in ("requests", "preprocessed", "tokens", "results"):
                continue
            consumer.assign([TopicPartition(name, p, 0) for p in topic.partitions])
            seen = 0
            while seen < total:
                batch = consumer.consume(num_messages=1000, timeout=2.0)
                if not batch:
                    break
                for msg in batch:
                    if msg.error():
                        continue
                    seen += 1
                    data = msg.value() or b""
                    short = name.removeprefix(prefix)
                    kind = {"requests": "R", "preprocessed": "J", "results": "X"}.get(short)
                    if kind is None:
                        record = codec().decode(data)[1]
                        kind = KIND_OF.get(str(record["kind"]), "T")
                    sizes.setdefault(kind, []).append(len(data))
    finally:
        consumer.close()
    requests = max(counts.get("requests", 0), 1)
    started = max(len(sizes.get("S", [])), 1)
    return {
        "records_per_request": {k: round(v / requests, 2) for k, v in counts.items()},
        "deltas_per_request": round(len(sizes.get("D", [])) / started, 1),
        "mean_bytes": {k: round(statistics.fmean(v)) for k, v in sizes.items()},
    }


def summarize(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per row: the median and the range over rounds of every figure."""
    rows: dict[str, list[dict[str, Any]]] = {}
    for r in results:
        rows.setdefault(r["row"], []).append(r)

    def spread(values: list[float]) -> dict[str, float]:
        return {
            "median": round(statistics.median(values), 1),
            "min": round(min(values), 1),
            "max": round(max(values), 1),
        }

    base = {r["round"]: r for r in rows.get("baseline", [])}

    def over(runs: list[dict[str, Any]], q: str) -> dict[str, float] | None:
        # TTFT over the baseline's in the same round: the machine's load hits both alike.
        diffs = [r[q] - base[r["round"]][q] for r in runs if r["round"] in base]
        return spread(diffs) if diffs else None

    out = []
    for row in ROWS:
        runs = rows.get(row)
        if not runs:
            continue
        procs = sorted({p for r in runs for p in r["cpu_ms"]})
        out.append(
            {
                "row": row,
                "rounds": len(runs),
                "cpu_ms": {p: spread([r["cpu_ms"].get(p, 0.0) for r in runs]) for p in procs},
                "total_ms": spread([r["total_ms"] for r in runs]),
                "ttft_p50": spread([r["ttft_p50"] for r in runs]),
                "ttft_p99": spread([r["ttft_p99"] for r in runs]),
                "over_p50": over(runs, "ttft_p50"),
                "over_p99": over(runs, "ttft_p99"),
                "load_1m": [r["load"][0][0] for r in runs if r["load"][0]],
            }
        )
    return out


def markdown(report: dict[str, Any]) -> str:
    """The floor table: medians with [min, max] over rounds."""
    lines = [
        "| row | what runs | CPU ms/request by process | total | TTFT p50 / p99 ms"
        " | TTFT over the baseline p50 / p99 ms | load (1 min) at start |",
        "|---|---|---|---|---|---|---|",
    ]
    what = {
        "baseline": "direct SDK -> SSE",
        "sumstream": "sumstream (its workers, 1 gateway, broker)",
        "bare": "broker + bare aiokafka, both sides in one process",
        "faust": "broker + forwarding Faust worker (model calls) + bare gateway side",
        "gateway": "broker + forwarding Faust worker + Starlette SSE gateway",
        "lean": "broker + bare aiokafka worker (model calls) + Starlette SSE gateway",
    }

    def fmt(s: dict[str, float]) -> str:
        return f"{s['median']:g} [{s['min']:g}-{s['max']:g}]"

    for row in report["summary"]:
        cpu = ", ".join(f"{p} {fmt(s)}" for p, s in row["cpu_ms"].items())
        ttft = f"{row['ttft_p50']['median']:g} / {row['ttft_p99']['median']:g}"
        load = ", ".join(f"{x:.2f}" for x in row["load_1m"])
        over = "-"
        if row["over_p50"] is not None and row["row"] != "baseline":
            over = f"{fmt(row['over_p50'])} / {fmt(row['over_p99'])}"
        cells = [row["row"], what[row["row"]], cpu, fmt(row["total_ms"]), ttft, over, load]
        lines.append("| " + " | ".join(cells) + " |")
    bursts: dict[str, list[dict[str, Any]]] = {}
    for b in report.get("bursts") or []:
        bursts.setdefault(b["row"], []).append(b)
    if bursts:
        lines += [
            "",
            "| row | users at once | p99 TTFT / single-user p99 | `accepted` p99 ms | rounds |",
            "|---|---|---|---|---|",
        ]
        for row in ROWS:
            runs = bursts.get(row)
            if not runs:
                continue
            ratio = statistics.median(r["ratio"] for r in runs)
            acc = statistics.median(r["accepted_p99"] for r in runs)
            spread = f"x{min(r['ratio'] for r in runs):g}-{max(r['ratio'] for r in runs):g}"
            cells = [row, str(runs[0]["users"]), f"x{ratio:g} ({spread})", f"{acc:g}"]
            lines.append("| " + " | ".join([*cells, str(len(runs))]) + " |")
    return "\n".join(lines)
