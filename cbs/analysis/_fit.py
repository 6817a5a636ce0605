"""Fitting S(B), the critical batch size and its definitions, with bootstrap intervals.

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
search is vectorized over bootstrap replicates.

Definitions derived from one fit (see docs/cbs.md sections 2 and 7):
  * ``b_crit`` = E_min / S_min (primary): S = 2 S_min and E = 2 E_min there.
  * ``b_star`` = B*_delta(B0) = (1 + delta) B0 + delta B_crit: the batch size where the fitted
    curve needs (1 + delta) times the steps of perfect linear scaling from the fitted curve
    at B0 (Zhang et al. 2024 use delta = 0.2, B0 = 256).
  * ``knee`` (diagnostic, raw table, no model): the first B whose cumulative data efficiency
    B S(B) / (B0 S(B0)) exceeds 1 + delta, interpolated linearly in log B.
  * ``efficiencies`` (diagnostic): local efficiency per doubling between neighbouring batch
    sizes, ``(S_{i-1} / S_i) / (B_i / B_{i-1})`` for a doubling: 1 = perfect scaling, 1/2 = no gain.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np

__all__ = ["FORMS", "CriticalBatchSizeFit", "PowerLawFit", "fit_critical_batch_size",
           "fit_steps_curve", "b_star_closed_form", "steps_model", "raw_knee",
           "local_efficiencies", "aggregate_seeds", "fit_power_law"]

FORMS = ("mcCandlish", "general")

_GRID_POINTS = 241          # log-B_crit grid; adjacent points differ by ~12%, then refined
_GRID_MARGIN = 9.0          # grid reaches e^9 (~8000x) beyond the swept batch sizes
_GOLDEN_ITERS = 48          # shrinks the bracket by 0.618^48 ~ 1e-10
_ALPHAS = np.round(np.arange(0.1, 4.0001, 0.02), 4)   # general form's alpha grid
_MIN_POINTS = {"mcCandlish": 4, "general": 5}          # fewer: warn "too few points"
_MISFIT_RMS = 0.1           # rms log residual above which the form is suspect (10% typical miss)


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
    e_inf: np.ndarray       # E_min where B_crit = inf (S = E_min / B, S_min = 0); NaN elsewhere

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
        shapes = np.vstack([np.zeros_like(log_b)[None, :],
                            _log1p_ratio(grid[:, None], log_b[None, :], alpha),
                            -alpha * log_b[None, :]])
        sse, offset = _profile_sse(y, w, shapes)
        k = np.argmin(sse, axis=1)
        s = sse[np.arange(n_rep), k]
        better = s < best_sse - 1e-12
        best_sse = np.where(better, s, best_sse)
        best_k = np.where(better, k, best_k)
        best_alpha = np.where(better, alpha, best_alpha)
        best_offset = np.where(better, offset[np.arange(n_rep), k], best_offset)

    # Golden-section refinement of log B_crit between the grid neighbours of the best point.
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
            left = f1 < f2                      # the minimum lies in [lo, x2]
            hi = np.where(left, x2, hi)
            lo = np.where(left, lo, x1)
            x1, x2 = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
            f1, _ = _sse_at(yf, wf, log_b, x1, af)
            f2, _ = _sse_at(yf, wf, log_b, x2, af)
        xm = 0.5 * (lo + hi)
        fm, om = _sse_at(yf, wf, log_b, xm, af)
        keep_grid = fm > best_sse[finite] + 1e-12   # refinement never makes the fit worse
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
    return _Fits(s_min=s_min, b_crit=b_crit, alpha=np.where(bad, np.nan, best_alpha), sse=best_sse,
                 n_points=n_points, e_inf=e_inf)


def steps_model(batch_sizes, s_min: float, b_crit: float, alpha: float = 1.0,
                e_min: float | None = None) -> np.ndarray:
    """The fitted S(B) = S_min (1 + (B_crit / B) ** alpha); handles B_crit = inf (S = E_min / B)."""
    b = np.asarray(batch_sizes, dtype=np.float64)
    if math.isinf(b_crit):
        return (e_min if e_min is not None else np.nan) / b ** alpha
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
    return np.array([_b_star_numeric(s, c, a, b0, delta, b_max) if np.isfinite(a) else np.nan
                     for s, c, a in zip(fits.s_min, fits.b_crit, fits.alpha)])


# ----------------------------------------------------------------------------------------
# Model-free diagnostics on the raw (aggregated) table.


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


def aggregate_seeds(log_steps: np.ndarray, censored: np.ndarray, present: np.ndarray | None = None,
                    axis: int = -2) -> tuple[np.ndarray, np.ndarray]:
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
        srt = np.sort(vals, axis=axis)               # NaN (absent) sort last
    lo_i = np.maximum((n - 1) // 2, 0)
    hi_i = np.maximum(n // 2, 0)
    lo = np.take_along_axis(srt, np.expand_dims(lo_i, axis), axis=axis).squeeze(axis)
    hi = np.take_along_axis(srt, np.expand_dims(hi_i, axis), axis=axis).squeeze(axis)
    with np.errstate(invalid="ignore"):
        med = np.where(np.isinf(hi), np.inf, 0.5 * (lo + hi))
    med = np.where(n > 0, med, np.nan)
    is_censored = np.isinf(med)
    return np.where(is_censored, np.nan, med), is_censored


# ----------------------------------------------------------------------------------------
# The public fitter.


def _interval(samples: np.ndarray, level: float) -> tuple[float, float]:
    x = np.asarray(samples, dtype=np.float64)
    x = x[~np.isnan(x)]
    if x.size < 2:
        return (np.nan, np.nan)
    a = (1.0 - level) / 2.0
    # "lower"/"higher" pick actual samples, so an infinite B_crit in the tail stays inf
    # instead of turning into NaN through interpolation.
    return (float(np.quantile(x, a, method="lower")), float(np.quantile(x, 1.0 - a, method="higher")))


def _fmt(x: float, unit: str = "") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    if math.isinf(x):
        return "inf"
    text = f"{x:.4g}" if abs(x) < 1e5 else f"{x:.3e}"
    return f"{text} {unit}".rstrip()


@dataclasses.dataclass(repr=False)
class CriticalBatchSizeFit:
    """Everything :func:`fit_critical_batch_size` learned from one (B, S) table.

    Batch sizes, E_min, B_crit, B* and the knee are in ``unit`` (what was passed in);
    S_min in steps; E_min in ``unit`` (examples or tokens consumed to reach the target as B -> 0).
    Intervals are percentile bootstrap intervals at level ``ci_level`` (NaN without bootstrap).
    """
    form: str
    unit: str
    batch_sizes: np.ndarray            # (n,) every batch size given, ascending
    steps: np.ndarray                  # (n,) per-B steps used (median over seeds); NaN = censored/missing
    censored: np.ndarray               # (n,) bool, B excluded because (most seeds) censored
    n_seeds: int
    s_min: float
    e_min: float
    b_crit: float
    alpha: float                       # 1 for the McCandlish form
    delta: float
    b0: float
    b_star: float                      # (1 + delta) B0 + delta B_crit for the McCandlish form
    knee: float                        # raw-table knee (diagnostic); NaN if beyond the range
    efficiencies: np.ndarray           # (n,) local efficiency per doubling from the previous B (diagnostic)
    cumulative_efficiency: np.ndarray  # (n,) B S(B) / (B0 S(B0)) (diagnostic)
    log_residuals: np.ndarray          # (n,) log S - log S_fit (NaN where not fitted)
    rms_log_residual: float
    n_points: int
    ci_level: float
    bootstrap: str                     # "seeds", "residuals" or "none"
    n_boot: int
    s_min_ci: tuple[float, float]
    e_min_ci: tuple[float, float]
    b_crit_ci: tuple[float, float]
    b_star_ci: tuple[float, float]
    alpha_ci: tuple[float, float]
    b_crit_loo: tuple[float, float]    # min / max of B_crit over leave-one-B-out refits
    b_crit_samples: np.ndarray = dataclasses.field(repr=False, default=None)
    b_star_samples: np.ndarray = dataclasses.field(repr=False, default=None)
    warnings: list[str] = dataclasses.field(default_factory=list)

    def predict(self, batch_sizes) -> np.ndarray:
        """The fitted S(B) at the given batch sizes."""
        return steps_model(batch_sizes, self.s_min, self.b_crit, self.alpha, self.e_min)

    def to_dict(self) -> dict:
        """Plain JSON-ready numbers (arrays as lists, inf/NaN as None or 'inf')."""
        out = {}
        for f in dataclasses.fields(self):
            if f.name in ("b_crit_samples", "b_star_samples"):
                continue
            out[f.name] = _jsonable(getattr(self, f.name))
        return out

    def __repr__(self) -> str:
        def r(x):
            return "(" + ", ".join(_fmt(v) for v in x) + ")" if isinstance(x, tuple) else _fmt(x)
        return (f"CriticalBatchSizeFit(form={self.form!r}, unit={self.unit!r}, b_crit={r(self.b_crit)}, "
                f"b_crit_ci={r(self.b_crit_ci)}, s_min={r(self.s_min)}, e_min={r(self.e_min)}, "
                f"b_star={r(self.b_star)}, b_star_ci={r(self.b_star_ci)}, delta={self.delta:g}, b0={r(self.b0)}, "
                f"knee={r(self.knee)}, n_points={self.n_points}, n_seeds={self.n_seeds}, "
                f"bootstrap={self.bootstrap!r}, warnings={len(self.warnings)})")

    def __str__(self) -> str:
        u = self.unit
        def ci(pair, unit=""):
            if pair is None or any(isinstance(p, float) and math.isnan(p) for p in pair):
                return ""
            return f"  [{_fmt(pair[0])}, {_fmt(pair[1])}]{' ' + unit if unit else ''} ({self.ci_level:.0%} CI)"
        lines = [
            f"Critical batch size fit ({self.form}, log-space least squares, {self.n_points} batch sizes,"
            f" {self.n_seeds} seed{'s' if self.n_seeds != 1 else ''}, bootstrap: {self.bootstrap})",
            f"  S_min  = {_fmt(self.s_min, 'steps')}{ci(self.s_min_ci)}",
            f"  E_min  = {_fmt(self.e_min, u)}{ci(self.e_min_ci)}  ({u} to reach the target as B -> 0)",
            f"  B_crit = {_fmt(self.b_crit, u)}{ci(self.b_crit_ci, u)}",
        ]
        if self.form == "general":
            lines.append(f"  alpha  = {_fmt(self.alpha)}{ci(self.alpha_ci)}")
        lines += [
            f"  B*     = {_fmt(self.b_star, u)}{ci(self.b_star_ci, u)}  (delta={self.delta:g}, B0={_fmt(self.b0)})",
            f"  knee   = {_fmt(self.knee, u)}  (raw table, first B with B*S/(B0*S0) > {1 + self.delta:g})",
            f"  leave-one-B-out B_crit range: [{_fmt(self.b_crit_loo[0])}, {_fmt(self.b_crit_loo[1])}]",
            f"  rms log residual: {_fmt(self.rms_log_residual)}",
        ]
        for w in self.warnings:
            lines.append(f"  warning: {w}")
        return "\n".join(lines)


def _jsonable(x):
    if isinstance(x, np.ndarray):
        return [_jsonable(v) for v in x.tolist()]
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (bool, np.bool_)):
        return bool(x)
    if isinstance(x, (int, np.integer)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        x = float(x)
        if math.isnan(x):
            return None
        if math.isinf(x):
            return "inf" if x > 0 else "-inf"
        return x
    return x


def _steps_matrix(batch_sizes, steps):
    b = np.asarray(batch_sizes, dtype=np.float64).ravel()
    s = np.asarray(steps, dtype=np.float64)
    if s.ndim == 1:
        s = s[None, :]
    if s.ndim != 2 or s.shape[1] != b.size:
        raise ValueError(f"steps must have one value per batch size or shape (seeds, {b.size}); "
                         f"got shape {np.shape(steps)}")
    if b.size == 0 or np.any(~np.isfinite(b)) or np.any(b <= 0):
        raise ValueError("batch sizes must be positive finite numbers")
    if len(np.unique(b)) != b.size:
        raise ValueError("batch sizes must be distinct")
    if np.any(s[np.isfinite(s)] <= 0):
        raise ValueError("steps must be positive (NaN or inf = censored)")
    order = np.argsort(b)
    return b[order], s[:, order]


def fit_critical_batch_size(batch_sizes: Sequence[float], steps, *, delta: float = 0.2,
                            b0: float | None = None, n_boot: int = 1000, seed: int = 0,
                            form: str = "mcCandlish", ci_level: float = 0.95,
                            present=None, unit: str = "examples",
                            extra_warnings: Sequence[str] = ()) -> CriticalBatchSizeFit:
    """Fits S(B) = S_min + E_min / B in log space and derives every CBS definition.

    Args:
        batch_sizes: (n,) distinct positive batch sizes, in any unit (``unit`` names it).
        steps: (n,) steps to target, or (seeds, n); NaN or inf = censored (target not reached
            within the budget). Several seeds are combined per batch size by the median of
            log S with censored seeds counted as +inf (see :func:`aggregate_seeds`); a batch
            size whose aggregate is censored is left out of the fit.
        delta: overhead over perfect linear scaling that defines B* and the knee.
        b0: anchor batch size of B* and of the knee; default the smallest batch size given.
        n_boot: bootstrap replicates (0 = no intervals). With >= 2 seeds, seeds are resampled
            per batch size and the per-B median is recomputed before each refit; with one
            seed, log-space residuals of the fit are resampled (scaled by sqrt(n / (n - p))).
        seed: seed of the bootstrap's random generator.
        form: "mcCandlish" (S_min (1 + B_crit/B)) or "general" (S_min (1 + (B_crit/B)**alpha),
            alpha in [0.1, 4]; B* is then a numerical root, and E_min is S_min B_crit).
        ci_level: level of the percentile intervals.
        present: optional bool array shaped like ``steps``; False = not measured (differs
            from censored: it says nothing about S).
        unit: name of the batch-size unit, carried into the result's text.
        extra_warnings: warnings from the caller's table building, carried into the result.

    Returns:
        A :class:`CriticalBatchSizeFit`.

    Example:
        >>> b = [16, 32, 64, 128, 256, 512]
        >>> fit = fit_critical_batch_size(b, [1000 + 64000 / x for x in b], n_boot=0)
        >>> round(fit.b_crit)
        64
    """
    form = _canonical_form(form)
    if not 0.0 < ci_level < 1.0:
        raise ValueError(f"ci_level must be in (0, 1), got {ci_level}")
    if not delta > 0:
        raise ValueError(f"delta must be positive, got {delta}")
    b, s = _steps_matrix(batch_sizes, steps)
    order = np.argsort(np.asarray(batch_sizes, dtype=np.float64).ravel())
    if present is None:
        present_m = np.ones_like(s, dtype=bool)
    else:
        present_m = np.asarray(present, dtype=bool)
        present_m = (present_m[None, :] if present_m.ndim == 1 else present_m)[:, order]
    censored_m = ~np.isfinite(s) & present_m
    with np.errstate(divide="ignore", invalid="ignore"):
        log_s = np.where(censored_m | ~present_m, 0.0, np.log(np.where(np.isfinite(s), s, 1.0)))
    n_seeds, n_b = s.shape
    b0 = float(b[0]) if b0 is None else float(b0)
    if not b0 > 0:
        raise ValueError(f"b0 must be positive, got {b0}")
    warnings = list(extra_warnings)

    y, cens = aggregate_seeds(log_s, censored_m, present_m, axis=0)
    w = np.isfinite(y)
    fit = _fit_vectorized(b, np.where(w, y, 0.0)[None, :], w[None, :].astype(float), form)
    s_min, b_crit, alpha = float(fit.s_min[0]), float(fit.b_crit[0]), float(fit.alpha[0])
    e_min = float(fit.e_min[0])
    n_points = int(w.sum())
    b_star = float(_b_star(fit, b0, delta, form, b.max())[0]) if n_points >= 2 else np.nan
    agg_steps = np.exp(y)

    resid = np.full(n_b, np.nan)
    if n_points >= 2:
        resid[w] = y[w] - np.log(steps_model(b[w], s_min, b_crit, alpha, e_min))
    rms = float(np.sqrt(np.nanmean(resid ** 2))) if n_points >= 2 else np.nan

    knee, cum_eff = raw_knee(b, agg_steps, b0, delta)
    eff = local_efficiencies(b, agg_steps)

    # Bootstrap.
    rng = np.random.default_rng(seed)
    method = "none"
    nan2 = (np.nan, np.nan)
    cis = dict(s_min=nan2, e_min=nan2, b_crit=nan2, b_star=nan2, alpha=nan2)
    b_crit_samples = b_star_samples = np.array([])
    n_params = 2 if form == "mcCandlish" else 3
    seeds_per_b = present_m.sum(axis=0)
    if n_boot > 0 and n_points >= 2:
        if n_seeds >= 2 and np.all(seeds_per_b[w] >= 2):
            method = "seeds"
            yb = np.empty((n_boot, n_b))
            cb = np.empty((n_boot, n_b), dtype=bool)
            for j in range(n_b):
                avail = np.flatnonzero(present_m[:, j])
                if avail.size == 0:
                    yb[:, j], cb[:, j] = np.nan, False
                    continue
                pick = avail[rng.integers(0, avail.size, size=(n_boot, avail.size))]
                yj, cj = aggregate_seeds(log_s[pick, j], censored_m[pick, j], axis=1)
                yb[:, j], cb[:, j] = yj, cj
            wb = np.isfinite(yb)
        elif n_points > n_params:
            method = "residuals"
            yhat = y[w] - resid[w]
            r = resid[w] * math.sqrt(n_points / (n_points - n_params))
            r = r - r.mean()
            yb = np.zeros((n_boot, n_b))
            yb[:, w] = yhat[None, :] + r[rng.integers(0, n_points, size=(n_boot, n_points))]
            wb = np.broadcast_to(w, yb.shape).copy()
        if method != "none":
            boot = _fit_vectorized(b, np.where(wb, yb, 0.0), wb.astype(float), form)
            b_crit_samples = boot.b_crit
            b_star_samples = _b_star(boot, b0, delta, form, b.max())
            cis = dict(s_min=_interval(boot.s_min, ci_level), e_min=_interval(boot.e_min, ci_level),
                       b_crit=_interval(boot.b_crit, ci_level), b_star=_interval(b_star_samples, ci_level),
                       alpha=_interval(boot.alpha, ci_level))
            if form == "mcCandlish":
                cis["alpha"] = (1.0, 1.0)

    # Leave one batch size out.
    loo = nan2
    if n_points >= 3:
        idx = np.flatnonzero(w)
        wl = np.tile(w, (idx.size, 1)).astype(float)
        wl[np.arange(idx.size), idx] = 0.0
        lfit = _fit_vectorized(b, np.tile(np.where(w, y, 0.0), (idx.size, 1)), wl, form)
        loo = (float(np.nanmin(lfit.b_crit)), float(np.nanmax(lfit.b_crit)))

    # Warnings.
    if n_points < 2:
        warnings.append(f"too few points: {n_points} uncensored batch size(s); no fit")
    elif n_points < _MIN_POINTS[form]:
        warnings.append(f"too few points: {n_points} uncensored batch sizes for a {n_params}-parameter fit "
                        f"(want >= {_MIN_POINTS[form]}); treat B_crit as rough")
    if n_points >= 2:
        if b_crit == 0.0:
            warnings.append("B_crit = 0: S does not fall with B over the fitted range (no perfect-scaling regime)")
        elif math.isinf(b_crit):
            warnings.append("B_crit = inf: S keeps halving with B over the fitted range (no saturation seen); "
                            "sweep larger batch sizes")
        else:
            fitted_b = b[w]
            below, above = int((fitted_b < b_crit).sum()), int((fitted_b > b_crit).sum())
            if below < 2 or above < 2:
                warnings.append(f"B_crit is extrapolated: {below} fitted batch size(s) below and {above} above "
                                f"B_crit={_fmt(b_crit)} (want >= 2 on each side)")
    if n_points > n_params and rms > _MISFIT_RMS:
        hint = "; compare form='general'" if form == "mcCandlish" else ""
        warnings.append(f"the fit misses the table by {rms:.0%} rms in log S: the {form} form may not describe "
                        f"this curve{hint}")
    if cens.any():
        warnings.append("censored (excluded from the fit) at B = "
                        + ", ".join(_fmt(x) for x in b[cens]))
    if n_seeds >= 2 and method == "residuals":
        warnings.append("some batch sizes have only one seed: used the residual bootstrap instead of seeds")
    if method != "none" and b_crit_samples.size:
        frac_edge = float(np.mean((b_crit_samples == 0) | np.isinf(b_crit_samples)))
        if frac_edge > 0.05:
            warnings.append(f"{frac_edge:.0%} of bootstrap fits put B_crit at 0 or inf: the interval is open-ended")
    return CriticalBatchSizeFit(
        form=form, unit=unit, batch_sizes=b, steps=agg_steps, censored=cens, n_seeds=n_seeds,
        s_min=s_min, e_min=e_min, b_crit=b_crit, alpha=alpha, delta=float(delta), b0=b0, b_star=b_star,
        knee=float(knee), efficiencies=eff, cumulative_efficiency=cum_eff, log_residuals=resid,
        rms_log_residual=rms, n_points=n_points, ci_level=ci_level, bootstrap=method,
        n_boot=int(n_boot) if method != "none" else 0,
        s_min_ci=cis["s_min"], e_min_ci=cis["e_min"], b_crit_ci=cis["b_crit"], b_star_ci=cis["b_star"],
        alpha_ci=cis["alpha"], b_crit_loo=loo, b_crit_samples=b_crit_samples,
        b_star_samples=b_star_samples, warnings=warnings)


def fit_steps_curve(batch_sizes, steps, form: str = "mcCandlish") -> dict:
    """One log-space fit of S(B) to finite points (no bootstrap, no diagnostics).

    Returns:
        dict with s_min, e_min, b_crit, alpha, sse (in log S).
    """
    form = _canonical_form(form)
    b = np.asarray(batch_sizes, dtype=np.float64)
    s = np.asarray(steps, dtype=np.float64)
    w = np.isfinite(s) & (s > 0)
    y = np.log(np.where(w, s, 1.0))
    fit = _fit_vectorized(b, y[None, :], w[None, :].astype(float), form)
    return dict(s_min=float(fit.s_min[0]), e_min=float(fit.e_min[0]), b_crit=float(fit.b_crit[0]),
                alpha=float(fit.alpha[0]), sse=float(fit.sse[0]))


# ----------------------------------------------------------------------------------------
# Scaling laws across sweeps.


@dataclasses.dataclass
class PowerLawFit:
    """y = coef * x ** exponent, fitted by least squares in log space."""
    coef: float
    exponent: float
    coef_ci: tuple[float, float]
    exponent_ci: tuple[float, float]
    ci_level: float
    n_points: int
    rms_log_residual: float
    bootstrap: str                     # "samples" (per-point draws), "residuals" or "none"
    warnings: list[str] = dataclasses.field(default_factory=list)

    def predict(self, x) -> np.ndarray:
        return self.coef * np.asarray(x, dtype=np.float64) ** self.exponent

    def to_dict(self) -> dict:
        return {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def __str__(self) -> str:
        def ci(p):
            return "" if any(math.isnan(v) for v in p) else f" [{_fmt(p[0])}, {_fmt(p[1])}]"
        text = (f"y = {_fmt(self.coef)}{ci(self.coef_ci)} * x^{self.exponent:.3f}{ci(self.exponent_ci)}"
                f"  ({self.n_points} points, {self.ci_level:.0%} CI, bootstrap: {self.bootstrap})")
        return "\n".join([text] + [f"  warning: {w}" for w in self.warnings])


def fit_power_law(x, y, *, y_samples: Sequence[np.ndarray] | None = None, n_boot: int = 1000,
                  seed: int = 0, ci_level: float = 0.95) -> PowerLawFit:
    """Fits y = coef * x ** exponent by least squares in log space, with bootstrap intervals.

    Used for CBS vs model size N or data size D across sweeps (Zhang et al. 2024 fit
    CBS = 93.2 N^0.468 this way).

    Args:
        x: (n,) positive scales (e.g. parameters or tokens).
        y: (n,) positive values (e.g. B_crit of each sweep); non-finite entries are dropped.
        y_samples: optional, one array of bootstrap draws of y per point (e.g. each sweep's
            ``b_crit_samples``). Then each replicate draws one value per point and refits, which
            carries each point's own uncertainty into the exponent. Otherwise log-space
            residuals are resampled (needs >= 3 points).
        n_boot: bootstrap replicates (0 = no intervals).
        seed: random seed.
        ci_level: level of the percentile intervals.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    ok = np.isfinite(x) & np.isfinite(y) & (x > 0) & (y > 0)
    warnings = []
    if (~ok).any():
        warnings.append(f"dropped {int((~ok).sum())} point(s) with a non-positive or non-finite value")
    lx, ly = np.log(x[ok]), np.log(y[ok])
    n = int(ok.sum())
    nan2 = (np.nan, np.nan)
    if n < 2 or np.ptp(lx) == 0:
        return PowerLawFit(np.nan, np.nan, nan2, nan2, ci_level, n, np.nan, "none",
                           warnings + ["too few points with distinct x for a power law"])

    def ols(lxs, lys):   # lys: (R, n)
        xm = lxs.mean()
        slope = ((lys - lys.mean(axis=1, keepdims=True)) * (lxs - xm)).sum(axis=1) / ((lxs - xm) ** 2).sum()
        return lys.mean(axis=1) - slope * xm, slope

    icpt, slope = ols(lx, ly[None, :])
    icpt, slope = float(icpt[0]), float(slope[0])
    resid = ly - (icpt + slope * lx)
    rms = float(np.sqrt(np.mean(resid ** 2)))
    rng = np.random.default_rng(seed)
    method, coef_ci, exp_ci = "none", nan2, nan2
    if n_boot > 0:
        if y_samples is not None:
            samples = [np.asarray(s, dtype=np.float64) for s, keep in zip(y_samples, ok) if keep]
            samples = [s[np.isfinite(s) & (s > 0)] for s in samples]
            if all(s.size > 0 for s in samples):
                method = "samples"
                lys = np.stack([np.log(s[rng.integers(0, s.size, n_boot)]) for s in samples], axis=1)
        if method == "none" and n >= 3:
            method = "residuals"
            r = resid * math.sqrt(n / (n - 2))
            lys = (icpt + slope * lx)[None, :] + r[rng.integers(0, n, size=(n_boot, n))]
        if method != "none":
            bi, bs = ols(lx, lys)
            coef_ci = tuple(math.exp(v) for v in _interval(bi, ci_level))
            exp_ci = _interval(bs, ci_level)
    if n < 3:
        warnings.append("only two points: the power law passes through both; no residual check")
    return PowerLawFit(coef=math.exp(icpt), exponent=slope, coef_ci=coef_ci, exponent_ci=exp_ci,
                       ci_level=ci_level, n_points=n, rms_log_residual=rms, bootstrap=method,
                       warnings=warnings)
