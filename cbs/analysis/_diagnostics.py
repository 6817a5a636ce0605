"""Model-free diagnostics on the raw (seed-aggregated) steps table (docs/cbs.md 2.3).

* ``knee``: the first B whose cumulative data efficiency B S(B) / (B0 S(B0)) exceeds
  1 + delta, interpolated linearly in log B.
* ``efficiencies``: local efficiency per doubling between neighbouring batch sizes,
  ``(S_{i-1} / S_i) / (B_i / B_{i-1})`` for a doubling: 1 = perfect scaling, 1/2 = no gain.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["local_efficiencies", "raw_knee"]


def local_efficiencies(batch_sizes, steps) -> np.ndarray:
    """Efficiency per doubling between neighbouring batch sizes of the sweep.

    For a doubling this is ``(S_{i-1} / S_i) / (B_i / B_{i-1})`` (docs/cbs.md 2.3); for other
    ratios the speed-up is normalized per doubling, ``(S_{i-1} / S_i) ** (1 / k) / 2`` with
    ``k = log2(B_i / B_{i-1})``, so sweeps with different spacings compare. 1 means perfect
    scaling, 1/2 no gain in steps; under the McCandlish model a doubling from B has
    efficiency (B + B_crit) / (2 B + B_crit), 2/3 at B = B_crit.

    Returns:
        One value per batch size (NaN for the first, and wherever a neighbour is censored).
    """
    b = np.asarray(batch_sizes, dtype=np.float64)
    s = np.asarray(steps, dtype=np.float64)
    out = np.full(b.shape, np.nan)
    with np.errstate(invalid="ignore", divide="ignore"):
        doublings = np.log2(b[1:] / b[:-1])
        out[1:] = (s[:-1] / s[1:]) ** (1.0 / doublings) / 2.0
    return out


def raw_knee(batch_sizes, steps, b0: float, delta: float) -> tuple[float, np.ndarray]:
    """First B with cumulative data efficiency r(B) = B S(B) / (B0 S(B0)) above 1 + delta.

    S(B0) is interpolated linearly in (log B, log S) between measured points when B0 is not
    itself measured (the nearest measured end when B0 is outside the measured range). The
    crossing is interpolated linearly in log B between the last point at or below 1 + delta
    and the first above it.

    Returns:
        (knee, r): knee is NaN when r never exceeds 1 + delta within the measured range;
        r holds r(B) for every batch size (NaN where censored).
    """
    b = np.asarray(batch_sizes, dtype=np.float64)
    s = np.asarray(steps, dtype=np.float64)
    ok = np.isfinite(s) & (s > 0)
    r = np.full(b.shape, np.nan)
    if ok.sum() < 2:
        return np.nan, r
    lb, ls = np.log(b[ok]), np.log(s[ok])
    s0 = math.exp(np.interp(math.log(b0), lb, ls))
    r[ok] = b[ok] * s[ok] / (b0 * s0)
    prev_lb, prev_r = math.log(b0), 1.0
    for bi, ri in zip(b[ok], r[ok]):
        if bi <= b0:
            continue
        if ri > 1.0 + delta:
            if ri == prev_r:
                return float(bi), r
            frac = (1.0 + delta - prev_r) / (ri - prev_r)
            frac = min(max(frac, 0.0), 1.0)
            return float(math.exp(prev_lb + frac * (math.log(bi) - prev_lb))), r
        prev_lb, prev_r = math.log(bi), ri
    return np.nan, r
