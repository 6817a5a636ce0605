"""Combining seeds per batch size: the median of log S, censored seeds counted as +inf."""

from __future__ import annotations

import numpy as np

__all__ = ["aggregate_seeds"]


def aggregate_seeds(
    log_steps: np.ndarray, censored: np.ndarray, present: np.ndarray | None = None, axis: int = -2
) -> tuple[np.ndarray, np.ndarray]:
    """Per batch size: the median over seeds of log S, a censored seed counting as +inf.

    With two seeds this is the geometric mean; a batch size is censored when at least half
    of its seeds are (its median is then infinite), which is the honest answer: the
    typical seed did not reach the target within the budget.

    Args:
        log_steps: (..., seeds, batch sizes) log steps (ignored where censored or absent).
        censored: same shape, True where the target was not reached.
        present: same shape, False where no measurement exists (default: all present).
        axis: the seed axis.

    Returns:
        (log_s, is_censored): per batch size; log_s is NaN where censored or no seed present.
    """
    if present is None:
        present = np.ones_like(censored, dtype=bool)
    vals = np.where(censored, np.inf, log_steps)
    vals = np.where(present, vals, np.nan)
    n = present.sum(axis=axis)
    with np.errstate(invalid="ignore"):
        srt = np.sort(vals, axis=axis)  # NaN (absent) sort last
    lo_i = np.maximum((n - 1) // 2, 0)
    hi_i = np.maximum(n // 2, 0)
    lo = np.take_along_axis(srt, np.expand_dims(lo_i, axis), axis=axis).squeeze(axis)
    hi = np.take_along_axis(srt, np.expand_dims(hi_i, axis), axis=axis).squeeze(axis)
    with np.errstate(invalid="ignore"):
        med = np.where(np.isinf(hi), np.inf, 0.5 * (lo + hi))
    med = np.where(n > 0, med, np.nan)
    is_censored = np.isinf(med)
    return np.where(is_censored, np.nan, med), is_censored
