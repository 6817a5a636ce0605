"""The NQM problem: Hessian spectrum, gradient-noise spectrum, initial second moments.

H is diagonal without loss of generality (see docs/nqm.md section 1), so a problem is a
list of *bins*: each bin b holds ``count[b]`` identical coordinates with curvature
``h[b]``, per-example noise variance ``c[b]`` and initial second moment ``m0[b]``. The
unbinned problem has one coordinate per bin; the reference notebook's binned problem has
100 log-spaced bins (84 non-empty for d = 10^4).

The expected risk is E[L] = 1/2 sum_b count[b] h[b] E[theta_b^2].
"""

from __future__ import annotations

import dataclasses

import numpy as np

__all__ = ["NQMProblem", "harmonic_problem", "power_law_problem", "custom_problem", "bin_problem"]


@dataclasses.dataclass(frozen=True)
class NQMProblem:
    """A diagonal noisy quadratic, one entry per bin of identical coordinates.

    Attributes:
        h: curvature of each bin, shape (nb,), float64, > 0.
        c: per-example gradient-noise variance of each bin (C = H by default), shape (nb,).
        m0: initial second moment E[theta(0)^2] of each bin, shape (nb,).
        count: how many coordinates each bin holds, shape (nb,); sum = dimension d.
    """

    h: np.ndarray
    c: np.ndarray
    m0: np.ndarray
    count: np.ndarray

    def __post_init__(self):
        for name in ("h", "c", "m0", "count"):
            object.__setattr__(self, name, np.asarray(getattr(self, name), dtype=np.float64))
        n = self.h.shape
        if not (self.c.shape == self.m0.shape == self.count.shape == n) or len(n) != 1:
            raise ValueError("h, c, m0 and count must be 1-D arrays of one length")
        if (
            np.any(self.h <= 0)
            or np.any(self.c < 0)
            or np.any(self.m0 < 0)
            or np.any(self.count < 0)
        ):
            raise ValueError("need h > 0, c >= 0, m0 >= 0, count >= 0")

    @property
    def dim(self) -> float:
        """The number of coordinates d (sum of bin counts)."""
        return float(self.count.sum())

    @property
    def loss_weights(self) -> np.ndarray:
        """w_b = 1/2 count_b h_b, so that E[L] = sum_b w_b E[theta_b^2]."""
        return 0.5 * self.count * self.h

    @property
    def initial_risk(self) -> float:
        return float(np.sum(self.loss_weights * self.m0))

    def lower_bound_steps(self, target: float, batch_sizes) -> np.ndarray:
        """Information-theoretic lower bound d / (2 L* B) (docs/nqm.md section 1).

        Exact for C = H (sample-mean estimation); for other noise spectra it is the
        same sample-count argument with d replaced by sum_i c_i / h_i.
        """
        eff_dim = float(np.sum(self.count * self.c / self.h))
        return eff_dim / (2.0 * target * np.asarray(batch_sizes, dtype=np.float64))


def _noise(h: np.ndarray, noise: str | np.ndarray, scale: float) -> np.ndarray:
    if isinstance(noise, str):
        if noise == "hessian":
            return scale * h
        if noise == "identity":
            return scale * np.ones_like(h)
        raise ValueError(f"unknown noise kind {noise!r}")
    return scale * np.asarray(noise, dtype=np.float64)


def custom_problem(h, c=None, m0=1.0, count=None) -> NQMProblem:
    """A problem from user arrays: c defaults to h (C = H), m0 to 1, count to 1."""
    h = np.asarray(h, dtype=np.float64)
    c = h.copy() if c is None else np.broadcast_to(np.asarray(c, np.float64), h.shape)
    m0 = np.broadcast_to(np.asarray(m0, np.float64), h.shape)
    count = np.ones_like(h) if count is None else np.asarray(count, np.float64)
    return NQMProblem(h=h, c=c, m0=m0, count=count)


def power_law_problem(
    dim: int = 10_000,
    power: float = 1.0,
    noise: str | np.ndarray = "hessian",
    noise_scale: float = 1.0,
    m0: float = 1.0,
) -> NQMProblem:
    """h_i = i^-power, i = 1..dim; noise c = noise_scale * h ("hessian") or * 1 ("identity")."""
    h = np.arange(1, dim + 1, dtype=np.float64) ** (-power)
    return custom_problem(h, _noise(h, noise, noise_scale), m0)


def harmonic_problem(dim: int = 10_000, **kw) -> NQMProblem:
    """The paper's default h_i = 1/i (condition number d)."""
    return power_law_problem(dim, 1.0, **kw)


def bin_problem(problem: NQMProblem, num_bins: int = 100, drop_empty: bool = True) -> NQMProblem:
    """The reference notebook's binning (docs/nqm.md section 1).

    Bin values are ``geomspace(h_max, h_max / cond, num_bins)``; each coordinate goes to the
    first bin value <= its curvature (rounded DOWN by up to one bin ratio) and takes that
    value; c and m0 are averaged over the bin's members (c scaled by the same rounding
    ratio, so C = H stays C = H). For the default problem this reproduces the notebook's
    84 non-empty bins and initial loss 4.702.
    """
    h = problem.h
    values = np.geomspace(h.max(), h.min(), num_bins)
    # first bin value <= h_i: bins descend, so count how many values are > h_i.
    idx = np.minimum(np.sum(values[None, :] > h[:, None] * (1 + 1e-12), axis=1), num_bins - 1)
    count = np.bincount(idx, weights=problem.count, minlength=num_bins)
    safe = np.where(count > 0, count, 1.0)
    ratio = values[idx] / h
    c = np.bincount(idx, weights=problem.count * problem.c * ratio, minlength=num_bins) / safe
    m0 = np.bincount(idx, weights=problem.count * problem.m0, minlength=num_bins) / safe
    keep = count > 0 if drop_empty else np.ones(num_bins, bool)
    return NQMProblem(h=values[keep], c=c[keep], m0=m0[keep], count=count[keep])
