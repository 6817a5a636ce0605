"""An NQM built from a network's measured curvature and gradient noise (pure numpy).

Rules (each a stated modelling choice, none tuned to a workload):

* **Spectrum.** The top-k Ritz values h_1..h_k are kept one coordinate each. The bulk is
  the stochastic-Lanczos-quadrature density below h_k (nodes < h_k), with d * mean-weight
  eigenvalues per node, histogrammed into ``num_bins`` log-spaced bins between h_k and
  ``floor`` * h_1; each bin takes the count-weighted mean of its nodes (so sum count * h,
  the bulk trace, is what SLQ measured). The bulk count is capped at d - k. Directions
  flatter than ``floor`` * h_1 are left out: the NQM cannot move them within any budget
  that matters for the anchor, and a GGN has many exact zeros.
* **Noise.** Along the top directions c_i = v_i^T Sigma v_i (measured). In the bulk
  c = kappa * h (Fisher ~ curvature), with kappa set by ``bulk_noise``: "trace" matches the
  measured tr(Sigma) (kappa = (tr Sigma - sum_top c) / sum_bulk count h), "curvature"
  matches tr(C Sigma) (kappa = (tr C Sigma - sum_top h c) / sum_bulk count h^2).
* **Start.** Measured at a point theta_T reached by training from theta_0 (``measure_at
  target``): m_i(0) = (delta . v_i)^2 with delta = theta_0 - theta_T, the bulk from delta's
  spectral measure (Lanczos started at delta) the same way as below without the 1/phi^2.
  Measured at theta_0: m_i(0) = (G . v_i / h_i)^2 along the top directions. In the bulk the gradient's
  spectral measure (Lanczos started at G) gives Gauss nodes phi_l with |G|^2 weights; each
  bulk node's energy e_l (rescaled so the bulk holds |G|^2 - sum_top (G . v_i)^2) goes to the
  nearest bin in log h, where it adds e_l / phi_l^2 to the bin's total displacement
  sum_i m_i; m_b is that total over the bin's count.
* **Optimizers.** sgd -> NQM sgd; momentum / nesterov -> the NQM's heavy-ball / Nesterov with
  the optimizer's own beta. Adam-like (adam, adamw, adafactor, lion, signum, muon, soap) ->
  P = H^p with p *measured* from the optimizer's own diagonal preconditioner at the anchor
  batch size: sqrt(E[g_B^2]) = sqrt(G^2 + diag(Sigma) / B) restricted to each top
  eigenvector (Rayleigh quotient r_i), p = the least-squares slope of log r_i on log h_i,
  clipped to [0, 1]; with b1 (or momentum) > 0 the NQM runs heavy-ball with that beta.
  kfac -> P = H (p = 1): K-FAC approximates the Gauss-Newton matrix measured here.
* **Start energy** (``start_risk``, optional). The quadratic at theta_T holds only part of the
  loss the network descends from theta_0 (digits MLP: 1/2 delta^T H(theta_T) delta = 0.75 of a
  measured drop of 2.1, with the top curvature 1.5-3x larger along the way than at theta_T;
  docs/predict.md). Given the measured drop L(theta_0) - L(theta_T), every m_i(0) is scaled
  by one factor so the NQM's initial risk equals it: the directions' shares of the start
  stay measured, its total is the loss actually descended.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from cbs.nqm import custom_problem

__all__ = ["Calibration", "OptimizerMap", "adam_power", "map_optimizer", "nqm_from_measurement"]

ADAM_LIKE = ("adam", "adamw", "adafactor", "lion", "signum", "muon", "soap")


@dataclasses.dataclass(frozen=True)
class Calibration:
    """The calibrated NQM and how it was put together."""

    problem: object  # cbs.nqm Problem (bins of h, c, m0, count)
    num_top: int
    bulk_count: float
    kappa: float  # bulk noise c = kappa h
    dropped_flat_mass: float  # eigenvalue count below floor * h_1 (left out)
    notes: tuple[str, ...]


def _bulk_bins(nodes, weights, dim, h_top_min, h_floor, num_bins):
    """Histogram the SLQ measure below h_top_min into log bins: (h_b, count_b, dropped)."""
    nodes = np.asarray(nodes, np.float64).ravel()
    mass = dim * np.asarray(weights, np.float64).ravel() / np.asarray(weights).shape[0]
    bulk = (nodes < h_top_min) & (nodes > h_floor)
    dropped = float(mass[nodes <= h_floor].sum())
    edges = np.geomspace(h_top_min, h_floor, num_bins + 1)
    idx = np.clip(np.searchsorted(-edges, -nodes[bulk], side="right") - 1, 0, num_bins - 1)
    count = np.bincount(idx, weights=mass[bulk], minlength=num_bins)
    hsum = np.bincount(idx, weights=mass[bulk] * nodes[bulk], minlength=num_bins)
    keep = count > 0
    return hsum[keep] / count[keep], count[keep], dropped


def nqm_from_measurement(
    meas,
    *,
    num_bins: int = 40,
    floor: float = 1e-6,
    bulk_noise: str = "trace",
    start_risk: float | None = None,
) -> Calibration:
    """The NQM of a :class:`cbs.train.spectrum.Measurement` (rules in the module docstring)."""
    notes = []
    h1 = float(meas.top_h[0])
    if not h1 > 0:
        raise ValueError(
            f"the largest curvature eigenvalue is {h1:g}: no positive curvature to model"
        )
    h_floor = floor * h1
    keep = meas.top_h > h_floor
    top_h, top_c, top_g = meas.top_h[keep], meas.top_var[keep], meas.top_grad[keep]
    k = int(keep.sum())
    h_b, count_b, dropped = _bulk_bins(
        meas.slq_nodes, meas.slq_weights, meas.dim, float(top_h[-1]) * (1 - 1e-6), h_floor, num_bins
    )
    room = max(meas.dim - k, 0)
    if room == 0:  # every direction is a top one: no bulk
        h_b, count_b = h_b[:0], count_b[:0]
    elif count_b.sum() > room:
        count_b = count_b * room / count_b.sum()
    # Bulk noise c = kappa h.
    if bulk_noise == "trace":
        rest = meas.trace_sigma - top_c.sum()
        denom = float(np.sum(count_b * h_b))
    elif bulk_noise == "curvature":
        rest = meas.trace_c_sigma - float(np.sum(top_h * top_c))
        denom = float(np.sum(count_b * h_b**2))
    else:
        raise ValueError(f"bulk_noise must be 'trace' or 'curvature', not {bulk_noise!r}")
    if rest < 0:
        notes.append(
            f"top directions already hold more noise than the {bulk_noise} total: bulk noise 0"
        )
    kappa = max(rest, 0.0) / denom if denom > 0 else 0.0
    # Start: from the gradient (G . v = h m^(1/2) on a quadratic) or, when the measurement
    # carries one, from the displacement delta = theta_0 - theta (delta . v = m^(1/2)).
    use_disp = meas.disp_sq is not None
    if use_disp:
        total, top_e = meas.disp_sq, np.asarray(meas.disp_proj)[keep] ** 2
        nodes, weights, power = meas.disp_nodes, meas.disp_weights, 0
        top_m = top_e
    else:
        total, top_e = meas.grad_sq, top_g**2
        nodes, weights, power = meas.grad_nodes, meas.grad_weights, 2
        top_m = (top_g / top_h) ** 2
    gn, gw = np.asarray(nodes, np.float64), np.asarray(weights, np.float64)
    in_bulk = (gn < float(top_h[-1]) * (1 - 1e-6)) & (gn > h_floor)
    e_bulk = max(total - float(np.sum(top_e)), 0.0)
    m_b = np.zeros_like(h_b)
    if h_b.size and in_bulk.any() and gw[in_bulk].sum() > 0:
        e = gw[in_bulk] * e_bulk / gw[in_bulk].sum()
        nearest = np.argmin(np.abs(np.log(gn[in_bulk])[:, None] - np.log(h_b)[None, :]), axis=1)
        m_b = np.bincount(nearest, weights=e / gn[in_bulk] ** power, minlength=h_b.size) / count_b
    h = np.concatenate([top_h, h_b])
    c = np.concatenate([top_c, kappa * h_b])
    m0 = np.concatenate([top_m, m_b])
    count = np.concatenate([np.ones(k), count_b])
    if k < len(meas.top_h):
        notes.append(f"{len(meas.top_h) - k} top eigenvalues <= floor * h_1 left out")
    if start_risk is not None:
        quad_risk = 0.5 * float(np.sum(count * h * m0))
        if not (start_risk > 0 and quad_risk > 0):
            raise ValueError(
                f"start_risk must be > 0 with a nonzero quadratic start, got {start_risk!r} "
                f"(quadratic initial risk {quad_risk:g})"
            )
        m0 = m0 * (start_risk / quad_risk)
        notes.append(
            f"start scaled x{start_risk / quad_risk:.3g}: initial risk {quad_risk:.4g} -> "
            f"the measured loss drop {start_risk:.4g}"
        )
    problem = custom_problem(h, c, m0, count)
    return Calibration(problem, k, float(count_b.sum()), kappa, dropped, tuple(notes))


def adam_power(meas, batch_size: float, eps: float = 1e-8) -> float:
    """p of P = H^p for a diagonal second-moment preconditioner at batch size B (see module)."""
    diag_sigma = np.maximum(meas.second_moment - meas.grad**2, 0.0)
    precond = np.sqrt(meas.grad**2 + diag_sigma / batch_size) + eps
    r = (meas.top_vectors**2) @ precond
    ok = (meas.top_h > 0) & (r > 0)
    if ok.sum() < 2 or np.ptp(np.log(meas.top_h[ok])) == 0:
        return 0.5
    slope = np.polyfit(np.log(meas.top_h[ok]), np.log(r[ok]), 1)[0]
    return float(np.clip(slope, 0.0, 1.0))


@dataclasses.dataclass(frozen=True)
class OptimizerMap:
    """The NQM counterpart of one real optimizer."""

    kind: str  # NQM kind: sgd, momentum, nesterov
    momentum: float
    precond_power: float
    rule: str  # how it was chosen


def map_optimizer(kind: str, hparams: dict, meas, anchor_batch: float) -> OptimizerMap:
    """The NQM optimizer for a real one (see the module docstring)."""
    if kind == "sgd":
        return OptimizerMap("sgd", 0.0, 0.0, "exact: SGD")
    if kind in ("momentum", "nesterov"):
        beta = float(hparams.get("momentum", 0.9))
        return OptimizerMap(kind, beta, 0.0, f"exact: {kind} beta={beta:g}")
    if kind == "kfac":
        return OptimizerMap("sgd", 0.0, 1.0, "P = C (K-FAC ~ Gauss-Newton)")
    if kind in ADAM_LIKE:
        p = adam_power(meas, anchor_batch, float(hparams.get("eps", 1e-8)))
        beta = float(hparams.get("b1", hparams.get("momentum", 0.0)))
        nqm_kind = "momentum" if beta > 0 else "sgd"
        return OptimizerMap(
            nqm_kind,
            beta if beta > 0 else 0.0,
            p,
            f"P = C^p, p = {p:.2f} measured from sqrt(E g_B^2) on the top eigenvectors"
            + (f", heavy-ball beta={beta:g}" if beta > 0 else ""),
        )
    raise ValueError(f"no NQM counterpart for optimizer kind {kind!r}")
