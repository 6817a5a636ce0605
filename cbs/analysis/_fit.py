"""The public S(B) fitter: one (B, S) table to every CBS definition, with bootstrap intervals.

:func:`fit_critical_batch_size` aggregates seeds (``_seeds``), fits the S(B) model in log
space (``_model``), derives B*, computes the model-free diagnostics (``_diagnostics``),
bootstraps intervals, refits leaving one batch size out, and phrases warnings.

Definitions derived from one fit (see docs/cbs.md section 2):
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
from collections.abc import Sequence

import numpy as np

from cbs.analysis._diagnostics import local_efficiencies, raw_knee
from cbs.analysis._format import bound_text, format_value, jsonable, outside_range
from cbs.analysis._model import _b_star, _canonical_form, _fit_vectorized, steps_model
from cbs.analysis._seeds import aggregate_seeds

__all__ = ["CriticalBatchSizeFit", "fit_critical_batch_size", "fit_steps_curve"]

_MIN_POINTS = {"mcCandlish": 4, "general": 5}  # fewer: warn "too few points"
_MISFIT_RMS = 0.1  # rms log residual above which the form is suspect (10% typical miss)


def _interval(samples: np.ndarray, level: float) -> tuple[float, float]:
    x = np.asarray(samples, dtype=np.float64)
    x = x[~np.isnan(x)]
    if x.size < 2:
        return (np.nan, np.nan)
    a = (1.0 - level) / 2.0
    # "lower"/"higher" pick actual samples, so an infinite B_crit in the tail stays inf
    # instead of turning into NaN through interpolation.
    return (
        float(np.quantile(x, a, method="lower")),
        float(np.quantile(x, 1.0 - a, method="higher")),
    )


@dataclasses.dataclass(repr=False)
class CriticalBatchSizeFit:
    """Everything :func:`fit_critical_batch_size` learned from one (B, S) table.

    Batch sizes, E_min, B_crit, B* and the knee are in ``unit`` (what was passed in);
    S_min in steps; E_min in ``unit`` (examples or tokens consumed to reach the target as B -> 0).
    Intervals are percentile bootstrap intervals at level ``ci_level`` (NaN without bootstrap).
    """

    form: str
    unit: str
    batch_sizes: np.ndarray  # (n,) every batch size given, ascending
    steps: np.ndarray  # (n,) per-B steps used (median over seeds); NaN = censored/missing
    censored: np.ndarray  # (n,) bool, B excluded because (most seeds) censored
    n_seeds: int
    s_min: float
    e_min: float
    b_crit: float
    alpha: float  # 1 for the McCandlish form
    delta: float
    b0: float
    b_star: float  # (1 + delta) B0 + delta B_crit for the McCandlish form
    knee: float  # raw-table knee (diagnostic); NaN if beyond the range
    efficiencies: np.ndarray  # (n,) local efficiency per doubling from the previous B (diagnostic)
    cumulative_efficiency: np.ndarray  # (n,) B S(B) / (B0 S(B0)) (diagnostic)
    log_residuals: np.ndarray  # (n,) log S - log S_fit (NaN where not fitted)
    rms_log_residual: float
    n_points: int
    ci_level: float
    bootstrap: str  # "seeds", "residuals" or "none"
    n_boot: int
    s_min_ci: tuple[float, float]
    e_min_ci: tuple[float, float]
    b_crit_ci: tuple[float, float]
    b_star_ci: tuple[float, float]
    alpha_ci: tuple[float, float]
    b_crit_loo: tuple[float, float]  # min / max of B_crit over leave-one-B-out refits
    b_crit_samples: np.ndarray = dataclasses.field(repr=False, default=None)
    b_star_samples: np.ndarray = dataclasses.field(repr=False, default=None)
    warnings: list[str] = dataclasses.field(default_factory=list)

    @property
    def swept_range(self) -> tuple[float, float]:
        """(smallest, largest) batch size of the table (NaN, NaN) when empty."""
        b = np.asarray(self.batch_sizes, np.float64)
        return (float(b.min()), float(b.max())) if b.size else (np.nan, np.nan)

    def outside(self, name: str = "b_crit") -> str:
        """'above' or 'below' when the fitted ``name`` (b_crit, b_star) lies outside the swept
        batch sizes (an extrapolation, shown as a bound), else ''."""
        return outside_range(getattr(self, name), *self.swept_range)

    def bound_text(self, name: str = "b_crit") -> str:
        """``name`` as text: the number inside the swept range, else the bound ('> 16384')."""
        return bound_text(getattr(self, name), *self.swept_range)

    def predict(self, batch_sizes) -> np.ndarray:
        """The fitted S(B) at the given batch sizes."""
        return steps_model(batch_sizes, self.s_min, self.b_crit, self.alpha, self.e_min)

    def to_dict(self) -> dict:
        """Plain JSON-ready numbers (arrays as lists, inf/NaN as None or 'inf')."""
        out = {}
        for f in dataclasses.fields(self):
            if f.name in ("b_crit_samples", "b_star_samples"):
                continue
            out[f.name] = jsonable(getattr(self, f.name))
        return out

    def __repr__(self) -> str:
        def r(x):
            return (
                "(" + ", ".join(format_value(v) for v in x) + ")"
                if isinstance(x, tuple)
                else format_value(x)
            )

        return (
            f"CriticalBatchSizeFit(form={self.form!r}, unit={self.unit!r}, b_crit={r(self.b_crit)}, "
            f"b_crit_ci={r(self.b_crit_ci)}, s_min={r(self.s_min)}, e_min={r(self.e_min)}, "
            f"b_star={r(self.b_star)}, b_star_ci={r(self.b_star_ci)}, delta={self.delta:g}, b0={r(self.b0)}, "
            f"knee={r(self.knee)}, n_points={self.n_points}, n_seeds={self.n_seeds}, "
            f"bootstrap={self.bootstrap!r}, warnings={len(self.warnings)})"
        )

    def _extrapolated_note(self, name: str) -> str:
        side = self.outside(name)
        if not side:
            return ""
        lo, hi = self.swept_range
        return (
            f"\n           = {self.bound_text(name)}: extrapolated {side} the swept batch sizes "
            f"({format_value(lo)}..{format_value(hi)}); the fitted number is not a measurement"
        )

    def __str__(self) -> str:
        u = self.unit

        def ci(pair, unit=""):
            if pair is None or any(isinstance(p, float) and math.isnan(p) for p in pair):
                return ""
            return f"  [{format_value(pair[0])}, {format_value(pair[1])}]{' ' + unit if unit else ''} ({self.ci_level:.0%} CI)"

        lines = [
            f"Critical batch size fit ({self.form}, log-space least squares, {self.n_points} batch sizes,"
            f" {self.n_seeds} seed{'s' if self.n_seeds != 1 else ''}, bootstrap: {self.bootstrap})",
            f"  S_min  = {format_value(self.s_min, 'steps')}{ci(self.s_min_ci)}",
            f"  E_min  = {format_value(self.e_min, u)}{ci(self.e_min_ci)}  ({u} to reach the target as B -> 0)",
            f"  B_crit = {format_value(self.b_crit, u)}{ci(self.b_crit_ci, u)}  (headline)"
            + self._extrapolated_note("b_crit"),
        ]
        if self.form == "general":
            lines.append(f"  alpha  = {format_value(self.alpha)}{ci(self.alpha_ci)}")
        lines += [
            f"  B*     = {format_value(self.b_star, u)}{ci(self.b_star_ci, u)}  (secondary; delta={self.delta:g}, B0={format_value(self.b0)})"
            + self._extrapolated_note("b_star"),
            f"  knee   = {format_value(self.knee, u)}  (raw table, first B with B*S/(B0*S0) > {1 + self.delta:g})",
            f"  leave-one-B-out B_crit range: [{format_value(self.b_crit_loo[0])}, {format_value(self.b_crit_loo[1])}]",
            f"  rms log residual: {format_value(self.rms_log_residual)}",
        ]
        for w in self.warnings:
            lines.append(f"  warning: {w}")
        return "\n".join(lines)


def _steps_matrix(batch_sizes, steps):
    b = np.asarray(batch_sizes, dtype=np.float64).ravel()
    s = np.asarray(steps, dtype=np.float64)
    if s.ndim == 1:
        s = s[None, :]
    if s.ndim != 2 or s.shape[1] != b.size:
        raise ValueError(
            f"steps must have one value per batch size or shape (seeds, {b.size}); "
            f"got shape {np.shape(steps)}"
        )
    if b.size == 0 or np.any(~np.isfinite(b)) or np.any(b <= 0):
        raise ValueError("batch sizes must be positive finite numbers")
    if len(np.unique(b)) != b.size:
        raise ValueError("batch sizes must be distinct")
    if np.any(s[np.isfinite(s)] <= 0):
        raise ValueError("steps must be positive (NaN or inf = censored)")
    order = np.argsort(b)
    return b[order], s[:, order]


def fit_critical_batch_size(
    batch_sizes: Sequence[float],
    steps,
    *,
    delta: float = 0.2,
    b0: float | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    form: str = "mcCandlish",
    ci_level: float = 0.95,
    present=None,
    unit: str = "examples",
    extra_warnings: Sequence[str] = (),
) -> CriticalBatchSizeFit:
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
    rms = float(np.sqrt(np.nanmean(resid**2))) if n_points >= 2 else np.nan

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
            cis = dict(
                s_min=_interval(boot.s_min, ci_level),
                e_min=_interval(boot.e_min, ci_level),
                b_crit=_interval(boot.b_crit, ci_level),
                b_star=_interval(b_star_samples, ci_level),
                alpha=_interval(boot.alpha, ci_level),
            )
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
        warnings.append(
            f"too few points: {n_points} uncensored batch sizes for a {n_params}-parameter fit "
            f"(want >= {_MIN_POINTS[form]}); treat B_crit as rough"
        )
    if n_points >= 2:
        if b_crit == 0.0:
            warnings.append(
                "B_crit = 0: S does not fall with B over the fitted range (no perfect-scaling regime)"
            )
        elif math.isinf(b_crit):
            warnings.append(
                "B_crit = inf: S keeps halving with B over the fitted range (no saturation seen); "
                "sweep larger batch sizes"
            )
        else:
            fitted_b = b[w]
            below, above = int((fitted_b < b_crit).sum()), int((fitted_b > b_crit).sum())
            if below < 2 or above < 2:
                warnings.append(
                    f"B_crit is extrapolated: {below} fitted batch size(s) below and {above} above "
                    f"B_crit={format_value(b_crit)} (want >= 2 on each side)"
                )
    if n_points > n_params and rms > _MISFIT_RMS:
        hint = (
            "; compare the general form (python -m cbs.analyze RUN --form general, "
            "or analyze_run(..., form='general') / fit_critical_batch_size(..., form='general'))"
            if form == "mcCandlish"
            else ""
        )
        warnings.append(
            f"the fit misses the table by {rms:.0%} rms in log S: the {form} form may not describe "
            f"this curve{hint}"
        )
    if cens.any():
        warnings.append(
            "censored (excluded from the fit) at B = " + ", ".join(format_value(x) for x in b[cens])
        )
    if n_seeds >= 2 and method == "residuals":
        warnings.append(
            "some batch sizes have only one seed: used the residual bootstrap instead of seeds"
        )
    if method != "none" and b_crit_samples.size:
        frac_edge = float(np.mean((b_crit_samples == 0) | np.isinf(b_crit_samples)))
        if frac_edge > 0.05:
            warnings.append(
                f"{frac_edge:.0%} of bootstrap fits put B_crit at 0 or inf: the interval is open-ended"
            )
    return CriticalBatchSizeFit(
        form=form,
        unit=unit,
        batch_sizes=b,
        steps=agg_steps,
        censored=cens,
        n_seeds=n_seeds,
        s_min=s_min,
        e_min=e_min,
        b_crit=b_crit,
        alpha=alpha,
        delta=float(delta),
        b0=b0,
        b_star=b_star,
        knee=float(knee),
        efficiencies=eff,
        cumulative_efficiency=cum_eff,
        log_residuals=resid,
        rms_log_residual=rms,
        n_points=n_points,
        ci_level=ci_level,
        bootstrap=method,
        n_boot=int(n_boot) if method != "none" else 0,
        s_min_ci=cis["s_min"],
        e_min_ci=cis["e_min"],
        b_crit_ci=cis["b_crit"],
        b_star_ci=cis["b_star"],
        alpha_ci=cis["alpha"],
        b_crit_loo=loo,
        b_crit_samples=b_crit_samples,
        b_star_samples=b_star_samples,
        warnings=warnings,
    )


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
    return dict(
        s_min=float(fit.s_min[0]),
        e_min=float(fit.e_min[0]),
        b_crit=float(fit.b_crit[0]),
        alpha=float(fit.alpha[0]),
        sse=float(fit.sse[0]),
    )
