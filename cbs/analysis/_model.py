"""The S(B) model and its least-squares fit in log space (vectorized over replicates).

The model is McCandlish et al. (2018), eq. 2.11::

    S(B) = S_min + E_min / B = S_min * (1 + B_crit / B),     B_crit = E_min / S_min

or, optionally, the general form ``S(B) = S_min * (1 + (B_crit / B) ** alpha)``.

The fit minimizes squared error in log S (what Zhang et al. 2024 do with
``curve_fit(lambda B, a, b: log(a + b / B), B, log S)``): steps-to-target spans orders of
magnitude across a batch-size sweep and its noise is multiplicative, so an unweighted fit
in S lets the few small-B points with large S decide the answer.

How the fit is computed: for a fixed B_crit (and alpha) the best log S_min is the mean of
``log S - log(1 + (B_crit/B)**alpha)``, so the fit is a one-dimensional search over
log B_crit (a grid, then golden-section refinement). The search includes the two limits
B_crit = 0 (S flat in B) and B_crit = inf (perfect scaling, S_min = 0), so S_min, E_min >= 0
always hold and a boundary answer is reported as such instead of as a failed fit. The
search is vectorized over bootstrap replicates. B*_delta(B0) from a fit: closed form for
the McCandlish form, a bisection root for the general one (docs/cbs.md sections 2.2 and 3).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

__all__ = ["FORMS", "steps_model", "b_star_closed_form"]

FORMS = ("mcCandlish", "general")

_GRID_POINTS = 241  # log-B_crit grid; adjacent points differ by ~12%, then refined
_GRID_MARGIN = 9.0  # grid reaches e^9 (~8000x) beyond the swept batch sizes
_GOLDEN_ITERS = 48  # shrinks the bracket by 0.618^48 ~ 1e-10
_ALPHAS = np.round(np.arange(0.1, 4.0001, 0.02), 4)  # general form's alpha grid


def _canonical_form(form: str) -> str:
    for name in FORMS:
        if form.lower() == name.lower():
            return name
    raise ValueError(f"form must be one of {FORMS}, got {form!r}")


# ----------------------------------------------------------------------------------------
# The vectorized profile fit.


def _log1p_ratio(log_c: np.ndarray, log_b: np.ndarray, alpha) -> np.ndarray:
    """log(1 + (c / B) ** alpha), stable for very large and very small c / B."""
    return np.logaddexp(0.0, alpha * (log_c - log_b))


def _profile_sse(y: np.ndarray, w: np.ndarray, shapes: np.ndarray):
    """SSE and best offset of ``y ~ m + shape`` for every replicate and candidate shape.

    Args:
        y: (R, n) log steps; entries with weight 0 are ignored (may be anything finite).
        w: (R, n) 0/1 weights.
        shapes: (K, n) candidate shapes ``log(1 + (c/B)**alpha)``.

    Returns:
        (sse, offset), each (R, K).
    """
    sw = w.sum(axis=1, keepdims=True)
    wy = w * y
    swy = wy.sum(axis=1, keepdims=True)
    swyy = (wy * y).sum(axis=1, keepdims=True)
    swl = w @ shapes.T
    swll = w @ (shapes * shapes).T
    swyl = wy @ shapes.T
    diff = swy - swl
    with np.errstate(invalid="ignore", divide="ignore"):
        offset = diff / sw
        sse = swyy - 2.0 * swyl + swll - diff * offset
    return np.maximum(sse, 0.0), offset


def _sse_at(y, w, log_b, log_c, alpha):
    """SSE and offset for one log_c (and alpha) per replicate: y, w (R, n); log_c, alpha (R,)."""
    shape = _log1p_ratio(log_c[:, None], log_b[None, :], alpha[:, None])
    resid = y - shape
    sw = w.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        offset = (w * resid).sum(axis=1) / sw
    sse = (w * (resid - offset[:, None]) ** 2).sum(axis=1)
    return sse, offset


@dataclasses.dataclass
class _Fits:
    """Vectorized fit results, one entry per replicate (arrays of shape (R,))."""

    s_min: np.ndarray
    b_crit: np.ndarray
    alpha: np.ndarray
    sse: np.ndarray
    n_points: np.ndarray
    e_inf: np.ndarray  # E_min where B_crit = inf (S = E_min / B, S_min = 0); NaN elsewhere

    @property
    def e_min(self) -> np.ndarray:
        """E_min = S_min B_crit (for alpha = 1 the B -> 0 limit of B S)."""
        with np.errstate(invalid="ignore"):
            e = self.s_min * self.b_crit
        return np.where(np.isinf(self.b_crit), self.e_inf, e)


def _fit_vectorized(batch_sizes: np.ndarray, y: np.ndarray, w: np.ndarray, form: str) -> _Fits:
    """Least squares in log S for R replicates at once.

    Args:
        batch_sizes: (n,) positive batch sizes.
        y: (R, n) log steps (any finite filler where w == 0).
        w: (R, n) 0/1 weights (0 = excluded: censored or missing).
        form: "mcCandlish" (alpha = 1) or "general" (alpha fitted on a grid in [0.1, 4]).
    """
    log_b = np.log(np.asarray(batch_sizes, dtype=np.float64))
    y = np.where(w > 0, y, 0.0)
    w = (w > 0).astype(np.float64)
    n_rep, _ = y.shape
    grid = np.linspace(log_b.min() - _GRID_MARGIN, log_b.max() + _GRID_MARGIN, _GRID_POINTS)
    alphas = np.array([1.0]) if form == "mcCandlish" else _ALPHAS

    best_sse = np.full(n_rep, np.inf)
    best_k = np.zeros(n_rep, dtype=np.int64)
    best_alpha = np.ones(n_rep)
    best_offset = np.zeros(n_rep)
    for alpha in alphas:
        # Rows: the limit B_crit = 0 (shape 0), the finite grid, and the limit B_crit = inf
        # (shape -alpha log B; its constant log B_crit is absorbed by the offset).
        shapes = np.vstack(
            [
                np.zeros_like(log_b)[None, :],
                _log1p_ratio(grid[:, None], log_b[None, :], alpha),
                -alpha * log_b[None, :],
            ]
        )
        sse, offset = _profile_sse(y, w, shapes)
        k = np.argmin(sse, axis=1)
        s = sse[np.arange(n_rep), k]
        better = s < best_sse - 1e-12
        best_sse = np.where(better, s, best_sse)
        best_k = np.where(better, k, best_k)
        best_alpha = np.where(better, alpha, best_alpha)
        best_offset = np.where(better, offset[np.arange(n_rep), k], best_offset)

    # Golden-section refinement of log B_crit between the grid neighbours of the best point.
    # Not shared with cbs.nqm._tuning.refine_lr's golden section on purpose: that one
    # minimizes an integer, tie-prone objective (exact step counts, one costly evaluation
    # per iteration, best point seen kept); this one a smooth, cheap SSE evaluated at both
    # interior points, and its exact arithmetic is part of the published fits.
    finite = (best_k >= 1) & (best_k <= _GRID_POINTS)
    log_c = np.full(n_rep, np.nan)
    if finite.any():
        idx = np.clip(best_k[finite] - 1, 0, _GRID_POINTS - 1)
        lo = grid[np.clip(idx - 1, 0, _GRID_POINTS - 1)]
        hi = grid[np.clip(idx + 1, 0, _GRID_POINTS - 1)]
        yf, wf, af = y[finite], w[finite], best_alpha[finite]
        ratio = (math.sqrt(5.0) - 1.0) / 2.0
        x1 = hi - ratio * (hi - lo)
        x2 = lo + ratio * (hi - lo)
        f1, _ = _sse_at(yf, wf, log_b, x1, af)
        f2, _ = _sse_at(yf, wf, log_b, x2, af)
        for _ in range(_GOLDEN_ITERS):
            left = f1 < f2  # the minimum lies in [lo, x2]
            hi = np.where(left, x2, hi)
            lo = np.where(left, lo, x1)
            x1, x2 = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
            f1, _ = _sse_at(yf, wf, log_b, x1, af)
            f2, _ = _sse_at(yf, wf, log_b, x2, af)
        xm = 0.5 * (lo + hi)
        fm, om = _sse_at(yf, wf, log_b, xm, af)
        keep_grid = fm > best_sse[finite] + 1e-12  # refinement never makes the fit worse
        log_c_f = np.where(keep_grid, grid[idx], xm)
        off_f = np.where(keep_grid, best_offset[finite], om)
        sse_f = np.where(keep_grid, best_sse[finite], fm)
        log_c[finite] = log_c_f
        best_offset[finite] = off_f
        best_sse[finite] = sse_f

    n_points = w.sum(axis=1)
    at_zero = best_k == 0
    at_inf = best_k == _GRID_POINTS + 1
    b_crit = np.where(at_zero, 0.0, np.where(at_inf, np.inf, np.exp(np.where(finite, log_c, 0.0))))
    s_min = np.where(at_inf, 0.0, np.exp(best_offset))
    e_inf = np.where(at_inf, np.exp(best_offset), np.nan)
    bad = n_points < 2
    for arr in (b_crit, s_min, best_sse, e_inf):
        arr[bad] = np.nan
    return _Fits(
        s_min=s_min,
        b_crit=b_crit,
        alpha=np.where(bad, np.nan, best_alpha),
        sse=best_sse,
        n_points=n_points,
        e_inf=e_inf,
    )


def steps_model(
    batch_sizes, s_min: float, b_crit: float, alpha: float = 1.0, e_min: float | None = None
) -> np.ndarray:
    """The fitted S(B) = S_min (1 + (B_crit / B) ** alpha); handles B_crit = inf (S = E_min / B)."""
    b = np.asarray(batch_sizes, dtype=np.float64)
    if math.isinf(b_crit):
        return (e_min if e_min is not None else np.nan) / b**alpha
    return s_min * (1.0 + (b_crit / b) ** alpha)


def b_star_closed_form(b_crit: float, b0: float, delta: float) -> float:
    """B*_delta(B0) = (1 + delta) B0 + delta B_crit (McCandlish form only).

    Derivation: the fitted curve over the linear-scaling line anchored at the fitted curve's
    B0 is ``S(B) / (S(B0) B0 / B) = (B + B_crit) / (B0 + B_crit)``; set it to 1 + delta.
    """
    return (1.0 + delta) * b0 + delta * b_crit


def _b_star_numeric(s_min, b_crit, alpha, b0, delta, b_max):
    """Root of B S(B) / (B0 S(B0)) = 1 + delta above B0, by bisection in log B (general form)."""
    if not np.isfinite(b_crit):
        return (1.0 + delta) * b0 if alpha == 1.0 else np.nan

    def ratio(b):
        return b * (1.0 + (b_crit / b) ** alpha) / (b0 * (1.0 + (b_crit / b0) ** alpha))

    hi = max(b_max, b0) * 1e6
    if ratio(hi) < 1.0 + delta:
        return np.inf
    lo = b0
    for _ in range(200):
        mid = math.sqrt(lo * hi)
        if ratio(mid) < 1.0 + delta:
            lo = mid
        else:
            hi = mid
        if hi / lo < 1 + 1e-12:
            break
    return math.sqrt(lo * hi)


def _b_star(fits: _Fits, b0: float, delta: float, form: str, b_max: float) -> np.ndarray:
    if form == "mcCandlish":
        return b_star_closed_form(fits.b_crit, b0, delta)
    return np.array(
        [
            _b_star_numeric(s, c, a, b0, delta, b_max) if np.isfinite(a) else np.nan
            for s, c, a in zip(fits.s_min, fits.b_crit, fits.alpha)
        ]
    )
