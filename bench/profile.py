"""Where the time goes: CPU seconds per process per phase, and py-spy profiles by area.

py-spy samples a running process from outside (no code change in the gateway or the worker);
only the thread holding the GIL is sampled, so the share of samples in an area is its share
of the process's Python CPU time.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_TICKS = os.sysconf("SC_CLK_TCK")

# Leaf-frame file path fragment -> area, first match wins (order matters: codec before pipeline).
AREAS: tuple[tuple[str, str], ...] = (
    ("aiokafka", "Kafka client (aiokafka)"),
    ("kafka/", "Kafka client (aiokafka)"),
    ("confluent_kafka", "Kafka client (confluent-kafka)"),
    ("fastavro", "Avro codec"),
    ("pipeline/codec", "Avro codec"),
    ("faust", "Faust / mode runtime"),
    ("mode/", "Faust / mode runtime"),
    ("sse_starlette", "SSE (sse-starlette)"),
    ("starlette", "ASGI framework (starlette/fastapi)"),
    ("fastapi", "ASGI framework (starlette/fastapi)"),
    ("uvicorn", "HTTP/1.1 (uvicorn, h11, httptools)"),
    ("h11", "HTTP/1.1 (uvicorn, h11, httptools)"),
    ("httptools", "HTTP/1.1 (uvicorn, h11, httptools)"),
    ("anthropic", "upstream client (anthropic SDK, httpx)"),
    ("httpx", "upstream client (anthropic SDK, httpx)"),
    ("httpcore", "upstream client (anthropic SDK, httpx)"),
    ("anyio", "anyio"),
    ("json", "JSON"),
    ("logging", "logging"),
    ("prometheus_client", "metrics (prometheus_client)"),
    ("pydantic", "pydantic"),
    ("asyncio", "asyncio event loop"),
    ("selectors", "asyncio event loop"),
    ("uvloop", "asyncio event loop"),
    ("gateway/", "sumstream gateway code"),
    ("pipeline/", "sumstream pipeline code"),
)


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds used so far by ``pid`` (None when it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    # After the command name: state is field 3; utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / _TICKS


def machine_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs since boot, from /proc/stat."""
    first = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    values = [int(v) for v in first]
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    return sum(values) - idle, sum(values)


@dataclass
class CpuMeter:
    """CPU used by each named group of processes (say every worker), and by the whole machine,
    between start and stop."""

    pids: dict[str, tuple[int, ...]]

    def start(self) -> None:
        self._t0 = {name: _group_cpu(pids) for name, pids in self.pids.items()}
        self._m0 = machine_ticks()
        self._w0 = _monotonic()

    def stop(self) -> dict[str, Any]:
        """CPU seconds per process group, its share of one core, and the machine's busy share."""
        wall = max(_monotonic() - self._w0, 1e-9)
        per: dict[str, dict[str, float]] = {}
        for name, pids in self.pids.items():
            before, after = self._t0.get(name), _group_cpu(pids)
            if before is None or after is None:
                continue
            used = after - before
            per[name] = {"cpu_s": round(used, 2), "core_share": round(used / wall, 3)}
        busy0, total0 = self._m0
        busy1, total1 = machine_ticks()
        machine_busy = (busy1 - busy0) / max(total1 - total0, 1)
        return {"wall_s": round(wall, 2), "processes": per, "machine_busy": round(machine_busy, 3)}


def _group_cpu(pids: tuple[int, ...]) -> float | None:
    """The CPU seconds of every process of a group; None when one of them is gone."""
    total = 0.0
    for pid in pids:
        used = cpu_seconds(pid)
        if used is None:
            return None
        total += used
    return total


def _monotonic() -> float:
    import time

    return time.monotonic()


def pyspy_path() -> str | None:
    """The py-spy executable of this environment, if installed (the ``bench`` extra)."""
    local = Path(sys.executable).with_name("py-spy")
    if local.exists():
        return str(local)
    return shutil.which("py-spy")


async def record(pid: int, duration_s: float, out: Path, rate_hz: int = 100) -> str | None:
    """Sample ``pid`` for ``duration_s`` into collapsed stacks at ``out``; an error or None."""
    exe = pyspy_path()
    if exe is None:
        return "py-spy is not installed (pip install -e '.[bench]')"
    proc = await asyncio.create_subprocess_exec(
        exe,
        "record",
        "--pid",
        str(pid),
        "--duration",
        str(max(1, round(duration_s))),
        "--rate",
        str(rate_hz),
        "--format",
        "raw",
        # Only threads holding the GIL: CPU spent in Python, not threads waiting in epoll
        # or on a condition (py-spy cannot always tell those are idle).
        "--gil",
        "--function",
        "--output",
        str(out),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        output, _ = await asyncio.wait_for(proc.communicate(), timeout=duration_s + 30)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        return "py-spy did not finish"
    if proc.returncode != 0 or not out.exists():
        return output.decode(errors="replace").strip()[-500:] or f"py-spy exit {proc.returncode}"
    return None


def area_of(frame: str) -> str:
    """The area of one ``function (path:line)`` frame, by its file path."""
    path = frame.rsplit("(", 1)[-1]
    for fragment, area in AREAS:
        if fragment in path:
            return area
    return "other"


def summarize_stacks(text: str, top: int = 12) -> dict[str, Any]:
    """Shares of samples by area (of the leaf frame) and the hottest functions.

    ``self`` counts samples whose leaf is the function; ``total`` counts samples with the
    function anywhere on the stack (once per sample).
    """
    areas: Counter[str] = Counter()
    self_fn: Counter[str] = Counter()
    total_fn: Counter[str] = Counter()
    samples = 0
    for line in text.splitlines():
        stack, _, count_s = line.rpartition(" ")
        if not stack or not count_s.isdigit():
            continue
        count = int(count_s)
        frames = stack.split(";")
        samples += count
        leaf = frames[-1]
        areas[area_of(leaf)] += count
        self_fn[leaf] += count
        for frame in set(frames):
            total_fn[frame] += count
    if samples == 0:
        return {"samples": 0, "areas": {}, "self": [], "total": []}

    def share(counter: Counter[str], n: int) -> list[tuple[str, float]]:
        return [(name, round(c / samples, 4)) for name, c in counter.most_common(n)]

    # Frames on every stack (the module, the event loop's run_forever) say nothing.
    informative = Counter({f: c for f, c in total_fn.items() if c < samples * 0.95})
    own = Counter({f: c for f, c in informative.items() if _is_own(f)})
    return {
        "samples": samples,
        "areas": dict(share(areas, len(areas))),
        "self": share(self_fn, top),
        "total": share(informative, top),
        "own_total": share(own, top),
    }


def _is_own(frame: str) -> bool:
    """A frame in sumstream's own code (pipeline/ or gateway/), not a library's."""
    path = frame.rsplit("(", 1)[-1]
    return path.startswith(("pipeline/", "gateway/")) and "site-packages" not in path
