"""Small-sample statistics for comparing runs over seeds: means with Student-t intervals.

With 3 seeds the normal approximation's 1.96 would understate the interval by more than 2x
(t = 4.30 at 2 degrees of freedom), so the exact t quantile is used. No SciPy: for an integer
number of degrees of freedom the t distribution's CDF has a closed form.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


def _t_central(t: float, df: int) -> float:
    """P(|T| <= t) for Student's t with ``df`` degrees of freedom (Abramowitz & Stegun 26.7.3/4)."""
    theta = math.atan(t / math.sqrt(df))
    c2 = math.cos(theta) ** 2
    if df % 2:  # odd: 2/pi * (theta + sin cos (1 + 2/3 cos^2 + 2*4/(3*5) cos^4 + ...))
        term, total = 1.0, 1.0 if df > 1 else 0.0
        for k in range(1, (df - 1) // 2):
            term *= c2 * (2 * k) / (2 * k + 1)
            total += term
        return 2 / math.pi * (theta + math.sin(theta) * math.cos(theta) * total)
    term, total = 1.0, 1.0  # even: sin (1 + 1/2 cos^2 + 1*3/(2*4) cos^4 + ...)
    for k in range(1, df // 2):
        term *= c2 * (2 * k - 1) / (2 * k)
        total += term
    return math.sin(theta) * total


def t_quantile(confidence: float, df: int) -> float:
    """The two-sided critical value: P(|T| <= t) = ``confidence`` (4.303 for 95 %, df=2)."""
    if df < 1 or not 0 < confidence < 1:
        raise ValueError(f"need df >= 1 and 0 < confidence < 1, got df={df}, {confidence}")
    lo, hi = 0.0, 1.0
    while _t_central(hi, df) < confidence:
        hi *= 2
    for _ in range(100):  # bisection: the CDF is monotone
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _t_central(mid, df) < confidence else (lo, mid)
    return (lo + hi) / 2


@dataclass(frozen=True)
class Estimate:
    """A mean over ``n`` values and the half-width of its confidence interval (None: n < 2)."""

    mean: float
    half_width: float | None
    n: int

    def format(self, scale: float = 100.0, digits: int = 2) -> str:
        """e.g. ``91.23 ± 0.41`` (percent by default)."""
        if self.half_width is None:
            return f"{self.mean * scale:.{digits}f}"
        return f"{self.mean * scale:.{digits}f} ± {self.half_width * scale:.{digits}f}"


def mean_ci(values: list[float], confidence: float = 0.95) -> Estimate:
    """Mean and Student-t confidence interval half-width (sample standard deviation, n-1)."""
    n = len(values)
    if n == 0:
        raise ValueError("no values")
    mean = sum(values) / n
    if n < 2:
        return Estimate(mean, None, n)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return Estimate(mean, t_quantile(confidence, n - 1) * sd / math.sqrt(n), n)


def paired_difference(a: dict[int, float], b: dict[int, float], confidence: float = 0.95
                      ) -> Estimate | None:
    """Mean of ``b[seed] - a[seed]`` over the seeds both have, with its interval: pairing by
    seed removes the variation the two runs of a seed share (data order, augmentation)."""
    seeds = sorted(a.keys() & b.keys())
    return mean_ci([b[s] - a[s] for s in seeds], confidence) if seeds else None
