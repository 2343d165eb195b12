"""Statistics for the benchmark: percentiles, distributions, paired differences and ratios.

Pure Python on purpose: the numbers in the report must be reproducible from the JSON alone,
and the unit tests pin the maths without numpy's version-dependent defaults.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass

QUANTILES = (50.0, 90.0, 99.0)


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between closest ranks.

    This is the "linear" method (numpy's default, Hyndman & Fan type 7); NaN for no values.
    """
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile must be within 0..100, got {q}")
    if not values:
        return math.nan
    ordered = sorted(values)
    return _sorted_percentile(ordered, q)


def _sorted_percentile(ordered: Sequence[float], q: float) -> float:
    pos = (len(ordered) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    frac = pos - lo
    return ordered[lo] + (ordered[hi] - ordered[lo]) * frac


@dataclass(frozen=True)
class Dist:
    """A distribution summary of one sample (milliseconds unless said otherwise)."""

    n: int
    mean: float
    p50: float
    p90: float
    p99: float
    max: float
    min: float

    def as_dict(self) -> dict[str, float]:
        return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in asdict(self).items()}

    def q(self, name: str) -> float:
        """One of the summary values by name (``p50``, ``p99``, ``mean``...)."""
        value: float = getattr(self, name)
        return value


def describe(values: Sequence[float]) -> Dist:
    """Summarize a sample: count, mean, p50, p90, p99, max, min (NaN when empty)."""
    if not values:
        nan = math.nan
        return Dist(0, nan, nan, nan, nan, nan, nan)
    ordered = sorted(values)
    return Dist(
        n=len(ordered),
        mean=math.fsum(ordered) / len(ordered),
        p50=_sorted_percentile(ordered, 50.0),
        p90=_sorted_percentile(ordered, 90.0),
        p99=_sorted_percentile(ordered, 99.0),
        max=ordered[-1],
        min=ordered[0],
    )


def difference(a: float, b: float) -> float:
    """a - b; NaN when either is unknown."""
    return a - b


def ratio(a: float, b: float) -> float:
    """a / b; NaN when b is zero or either is unknown."""
    if b == 0 or math.isnan(a) or math.isnan(b):
        return math.nan
    return a / b


def bootstrap_diff(
    a: Sequence[float],
    b: Sequence[float],
    q: float,
    *,
    resamples: int = 500,
    confidence: float = 0.95,
    seed: int = 7,
) -> tuple[float, float]:
    """Bootstrap confidence interval of ``percentile(a, q) - percentile(b, q)``.

    The two samples are independent (different requests), so each is resampled on its own.
    The interval says how much of a measured overhead could be noise of the sample size.
    """
    if not a or not b:
        return (math.nan, math.nan)
    rng = random.Random(seed)
    diffs: list[float] = []
    na, nb = len(a), len(b)
    for _ in range(resamples):
        ra = sorted(a[rng.randrange(na)] for _ in range(na))
        rb = sorted(b[rng.randrange(nb)] for _ in range(nb))
        diffs.append(_sorted_percentile(ra, q) - _sorted_percentile(rb, q))
    diffs.sort()
    tail = (1.0 - confidence) / 2.0 * 100.0
    return (_sorted_percentile(diffs, tail), _sorted_percentile(diffs, 100.0 - tail))


def gaps(times: Sequence[float]) -> list[float]:
    """Differences between consecutive arrival times (the inter-token gaps of one stream)."""
    return [t1 - t0 for t0, t1 in itertools.pairwise(times)]


def rate(count: int, start: float, end: float) -> float:
    """Events per second over [start, end] (seconds); 0 for an empty or reversed window."""
    span = end - start
    if count <= 0 or span <= 0:
        return 0.0
    return count / span


def fmt_ms(value: float, signed: bool = False) -> str:
    """A millisecond figure for the report: one decimal, '-' when unknown."""
    if math.isnan(value):
        return "-"
    return f"{value:+.1f}" if signed else f"{value:.1f}"
