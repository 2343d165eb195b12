"""`sumstream top`: a live terminal view of the pipeline, read from the topics themselves.

Throughput, latency percentiles and cost come from the `results` records of the last
window; in flight counts requests with `tokens` records but no result yet; lag comes from
the stages' consumer groups (pipeline/kafka/lag.py); the upstream limiter's figures from the
workers' /metrics when ``--worker-metrics`` names them (pipeline/ops/upstream_figures.py).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import sys
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TextIO

from pipeline.core.codec import codec
from pipeline.core.errors import CodecError, SumstreamError
from pipeline.core.settings import KafkaSettings, WorkerSettings
from pipeline.core.topics import TopicNames
from pipeline.kafka.connection import ConnectionConfig
from pipeline.kafka.lag import LagReader
from pipeline.ops.history import LoggedRecord, format_time, now_ms, scan
from pipeline.ops.upstream_figures import UpstreamFigures, render_lines, scrape

STAGES = ("preprocess", "inference", "postprocess")
# A stream silent this long without a result is no longer counted as in flight.
STALE_MS = 300_000
CLEAR = "\x1b[H\x1b[2J"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--once", action="store_true", help="print one frame and exit")
    parser.add_argument("--window", type=float, default=60.0, help="seconds of history shown")
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between frames")
    parser.add_argument(
        "--group", default=None, help="consumer group of the stages (default: the worker app id)"
    )
    parser.add_argument(
        "--worker-metrics",
        action="append",
        default=[],
        metavar="URL",
        help="a worker's /metrics URL, for the upstream's learned limit (repeatable)",
    )


@dataclass(frozen=True, slots=True)
class ResultSample:
    at_ms: int
    tier: str
    status: str
    input_tokens: int
    output_tokens: int
    cost_micro_usd: int
    latency_ms: Mapping[str, int]


@dataclass
class TierFigures:
    results: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cost_micro_usd: int = 0


@dataclass
class Frame:
    """The figures of one refresh."""

    at_ms: int
    window_s: float
    results: int
    in_flight: int
    statuses: dict[str, int] = field(default_factory=dict)
    tiers: dict[str, TierFigures] = field(default_factory=dict)
    # latency_ms key -> (p50, p99)
    latency: dict[str, tuple[float, float]] = field(default_factory=dict)
    lag: dict[str, int] | None = None
    upstream: UpstreamFigures | None = None

    @property
    def throughput(self) -> float:
        return self.results / self.window_s


def percentile(values: list[int], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return float(ordered[rank - 1])


class PipelineView:
    """The state behind `top`, fed with the records of `results` and `tokens` as they are read."""

    def __init__(self, window_s: float = 60.0) -> None:
        self.window_ms = int(window_s * 1000)
        self._samples: deque[ResultSample] = deque()
        self._open: dict[bytes | None, int] = {}
        # Results seen recently: catching up, a request's last tokens may be read after its result.
        self._finished: dict[bytes | None, int] = {}

    def add_token(self, key: bytes | None, at_ms: int) -> None:
        if key not in self._finished:
            self._open[key] = max(at_ms, self._open.get(key, 0))

    def add_result(self, key: bytes | None, at_ms: int, result: Mapping[str, Any]) -> None:
        self._open.pop(key, None)
        self._finished[key] = at_ms
        usage = result["usage"]
        self._samples.append(
            ResultSample(
                at_ms,
                result["tier"],
                result["status"],
                usage["input_tokens"],
                usage["output_tokens"],
                usage["cost_micro_usd"],
                result["latency_ms"],
            )
        )

    def feed(self, logged: LoggedRecord, results_topic: str) -> None:
        """Take one record of either topic; undecodable results are left to the dlq."""
        if logged.topic != results_topic:
            self.add_token(logged.key, logged.timestamp_ms)
            return
        if logged.value is None:
            return
        try:
            result = codec().decode_as(logged.value, "SummaryResult", opened=False)
        except CodecError:
            return
        self.add_result(logged.key, logged.timestamp_ms, result)

    def frame(self, at_ms: int, lag: dict[str, int] | None = None) -> Frame:
        """The figures as of ``at_ms``; older samples and stale streams are dropped."""
        horizon = at_ms - self.window_ms
        samples = [s for s in self._samples if horizon <= s.at_ms <= at_ms]
        # Samples arrive about in time order; dropping from the left keeps memory bounded.
        while self._samples and self._samples[0].at_ms < horizon:
            self._samples.popleft()
        stale = at_ms - STALE_MS
        self._open = {k: t for k, t in self._open.items() if t >= stale}
        self._finished = {k: t for k, t in self._finished.items() if t >= stale}
        frame = Frame(at_ms, self.window_ms / 1000, len(samples), len(self._open), lag=lag)
        for sample in samples:
            frame.statuses[sample.status] = frame.statuses.get(sample.status, 0) + 1
            tier = frame.tiers.setdefault(sample.tier, TierFigures())
            tier.results += 1
            tier.input_tokens += sample.input_tokens
            tier.output_tokens += sample.output_tokens
            tier.cost_micro_usd += sample.cost_micro_usd
        for name in ("time_to_first_token", "ttft", "total"):
            values = [s.latency_ms[name] for s in samples if name in s.latency_ms]
            if values:
                frame.latency[name] = (percentile(values, 50), percentile(values, 99))
        return frame


def _ms(value: float) -> str:
    return f"{value / 1000:.2f} s" if value >= 10_000 else f"{value:.0f} ms"


def render(frame: Frame, prefix: str) -> str:
    """The frame as plain text, one figure per line."""
    lines = [
        f"sumstream top  {format_time(frame.at_ms)}  topics {prefix}*  window {frame.window_s:g} s",
        "",
        f"throughput   {frame.throughput:.2f} results/s ({frame.results} in the window)",
        f"in flight    {frame.in_flight} (tokens streaming, no result yet)",
    ]
    if frame.lag is None:
        lines.append("lag          n/a")
    else:
        lag = "  ".join(f"{stage} {frame.lag.get(stage, 0)}" for stage in STAGES)
        lines.append(f"lag          {lag}")
    labels = {
        "time_to_first_token": "ttft client",
        "ttft": "ttft model",
        "total": "total",
    }
    for key, label in labels.items():
        if key in frame.latency:
            p50, p99 = frame.latency[key]
            lines.append(f"{label:<12} p50 {_ms(p50)}  p99 {_ms(p99)}")
        else:
            lines.append(f"{label:<12} -")
    lines += render_lines(frame.upstream)
    statuses = "  ".join(f"{status} {n}" for status, n in sorted(frame.statuses.items()))
    lines.append(f"outcomes     {statuses or '-'}")
    lines += ["", f"{'tier':<12}{'results':>9}{'in tok':>10}{'out tok':>10}{'cost USD':>12}"]
    total = TierFigures()
    for name, tier in sorted(frame.tiers.items()):
        lines.append(
            f"{name:<12}{tier.results:>9}{tier.input_tokens:>10}{tier.output_tokens:>10}"
            f"{tier.cost_micro_usd / 1e6:>12.6f}"
        )
        total.results += tier.results
        total.input_tokens += tier.input_tokens
        total.output_tokens += tier.output_tokens
        total.cost_micro_usd += tier.cost_micro_usd
    lines.append(
        f"{'all':<12}{total.results:>9}{total.input_tokens:>10}{total.output_tokens:>10}"
        f"{total.cost_micro_usd / 1e6:>12.6f}"
    )
    return "\n".join(lines) + "\n"


async def stage_lag(reader: LagReader) -> dict[str, int] | None:
    """Lag per stage, or None while it cannot be read (top keeps drawing the rest)."""
    try:
        return await reader.read_async()
    except SumstreamError:
        return None


def lag_reader(settings: KafkaSettings, group: str) -> LagReader:
    """A lag reader for the three stages, all in ``group`` (the Faust app id)."""
    return LagReader(settings, dict.fromkeys(STAGES, group))


async def snapshot(
    settings: KafkaSettings,
    *,
    window_s: float = 60.0,
    group: str,
    worker_metrics: list[str] | None = None,
) -> Frame:
    """One frame from the records of the last window (what `top --once` prints)."""
    topics = TopicNames.from_settings(settings)
    view = PipelineView(window_s)
    since = now_ms() - int(window_s * 1000)
    async for logged in scan(
        ConnectionConfig.from_settings(settings),
        [topics.results, topics.tokens],
        since_ms=since,
        missing_ok=True,
    ):
        view.feed(logged, topics.results)
    frame = view.frame(now_ms(), await stage_lag(lag_reader(settings, group)))
    frame.upstream = await scrape(worker_metrics or [])
    return frame


async def watch(
    settings: KafkaSettings,
    *,
    window_s: float,
    interval_s: float,
    group: str,
    out: TextIO,
    worker_metrics: list[str] | None = None,
) -> None:
    """Redraw a frame every ``interval_s`` until cancelled, following both topics live."""
    topics = TopicNames.from_settings(settings)
    view = PipelineView(window_s)
    lag = lag_reader(settings, group)

    async def follow() -> None:
        async for logged in scan(
            ConnectionConfig.from_settings(settings),
            [topics.results, topics.tokens],
            since_ms=now_ms() - int(window_s * 1000),
            follow=True,
        ):
            view.feed(logged, topics.results)

    reader = asyncio.create_task(follow())
    try:
        while True:
            await asyncio.sleep(interval_s)
            if reader.done():
                reader.result()  # surfaces the reader's error
            frame = view.frame(now_ms(), await stage_lag(lag))
            frame.upstream = await scrape(worker_metrics or [])
            # Redraw in place on a terminal; elsewhere (a pipe, a log) append frames.
            out.write((CLEAR if out.isatty() else "\n") + render(frame, settings.topic_prefix))
            out.flush()
    finally:
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader


def run(args: argparse.Namespace) -> int:
    settings = WorkerSettings()
    group = args.group or settings.app_id
    try:
        if args.once:
            frame = asyncio.run(
                snapshot(
                    settings,
                    window_s=args.window,
                    group=group,
                    worker_metrics=args.worker_metrics,
                )
            )
            sys.stdout.write(render(frame, settings.topic_prefix))
            return 0
        asyncio.run(
            watch(
                settings,
                window_s=args.window,
                interval_s=args.interval,
                group=group,
                out=sys.stdout,
                worker_metrics=args.worker_metrics,
            )
        )
    except KeyboardInterrupt:
        return 0
    except SumstreamError as exc:
        print(f"top: {exc}", file=sys.stderr)
        return 1
    return 0
