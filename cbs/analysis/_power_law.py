"""Scaling laws across sweeps: y = coef * x ** exponent, fitted in log space with bootstrap."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

from cbs.analysis._fit import _interval
from cbs.analysis._format import format_value, jsonable

__all__ = ["PowerLawFit", "fit_power_law"]


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
    bootstrap: str  # "samples" (per-point draws), "residuals" or "none"
    warnings: list[str] = dataclasses.field(default_factory=list)

    def predict(self, x) -> np.ndarray:
        return self.coef * np.asarray(x, dtype=np.float64) ** self.exponent

    def to_dict(self) -> dict:
        return {f.name: jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def __str__(self) -> str:
        def ci(p):
            return (
                ""
                if any(math.isnan(v) for v in p)
                else f" [{format_value(p[0])}, {format_value(p[1])}]"
            )

        text = (
            f"y = {format_value(self.coef)}{ci(self.coef_ci)} * x^{self.exponent:.3f}{ci(self.exponent_ci)}"
            f"  ({self.n_points} points, {self.ci_level:.0%} CI, bootstrap: {self.bootstrap})"
        )
        return "\n".join([text] + [f"  warning: {w}" for w in self.warnings])


def fit_power_law(
    x,
    y,
    *,
    y_samples: Sequence[np.ndarray] | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    ci_level: float = 0.95,
) -> PowerLawFit:
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
        warnings.append(
            f"dropped {int((~ok).sum())} point(s) with a non-positive or non-finite value"
        )
    lx, ly = np.log(x[ok]), np.log(y[ok])
    n = int(ok.sum())
    nan2 = (np.nan, np.nan)
    if n < 2 or np.ptp(lx) == 0:
        return PowerLawFit(
            np.nan,
            np.nan,
            nan2,
            nan2,
            ci_level,
            n,
            np.nan,
            "none",
            warnings + ["too few points with distinct x for a power law"],
        )

    def ols(lxs, lys):  # lys: (R, n)
        xm = lxs.mean()
        slope = ((lys - lys.mean(axis=1, keepdims=True)) * (lxs - xm)).sum(axis=1) / (
            (lxs - xm) ** 2
        ).sum()
        return lys.mean(axis=1) - slope * xm, slope

    icpt, slope = ols(lx, ly[None, :])
    icpt, slope = float(icpt[0]), float(slope[0])
    resid = ly - (icpt + slope * lx)
    rms = float(np.sqrt(np.mean(resid**2)))
    rng = np.random.default_rng(seed)
    method, coef_ci, exp_ci = "none", nan2, nan2
    if n_boot > 0:
        if y_samples is not None:
            samples = [np.asarray(s, dtype=np.float64) for s, keep in zip(y_samples, ok) if keep]
            samples = [s[np.isfinite(s) & (s > 0)] for s in samples]
            if all(s.size > 0 for s in samples):
                method = "samples"
                lys = np.stack(
                    [np.log(s[rng.integers(0, s.size, n_boot)]) for s in samples], axis=1
                )
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
    return PowerLawFit(
        coef=math.exp(icpt),
        exponent=slope,
        coef_ci=coef_ci,
        exponent_ci=exp_ci,
        ci_level=ci_level,
        n_points=n,
        rms_log_residual=rms,
        bootstrap=method,
        warnings=warnings,
    )
