"""Anchor a calibrated NQM at one measured (batch size, steps) point and forecast S(B).

The NQM's target risk is its only free number: it is set (bisection on log target) so that
the NQM's LR-tuned steps at the anchor batch size equal the real network's measured steps
there. Everything else -- S(B) at every other batch size, B_crit, B*, the optimal LR's
scaling -- follows from the calibrated problem.

Finite training sets: epochs are permutations, so a minibatch of B out of n examples is
drawn without replacement and its mean gradient has covariance Sigma/B * (n - B)/(n - 1).
The NQM is therefore run at the effective batch size B (n - 1)/(n - B) (``num_train``);
at B = n the minibatch gradient is exact (effective batch infinite, capped here at 1e12).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from cbs.nqm import best_on_grid, evaluate_grid, refine_lr

__all__ = [
    "Forecast",
    "anchor_noise_scale",
    "anchor_target",
    "effective_batch",
    "forecast",
    "tuned_steps",
]


def effective_batch(batch_sizes, num_train: int | None):
    """B (n - 1) / (n - B): the with-replacement batch with the same gradient variance."""
    b = np.asarray(batch_sizes, np.float64)
    if not num_train:
        return b
    n = float(num_train)
    return np.where(b >= n, 1e12, b * (n - 1) / np.maximum(n - b, 1e-12))


# Every NQM evaluation of a forecast is one shape: ROWS (LR, batch size) rows, one batch column,
# uncertified, as refine_lr's calls are; so one compiled program per optimizer kind serves
# the anchor's bisection, the LR grid at every batch size and the refinement. (Shaped per
# call, the forecast compiled ~6 programs, ~40 s of a ~45 s forecast on 2 CPU cores.)
ROWS = 64


def _steps_rows(problem, kind, momentum, power, lrs, batches, target, max_steps):
    """Steps to target of each (lrs[i], batches[i]) row, NaN = never; uncertified."""
    lrs, batches = np.broadcast_arrays(np.asarray(lrs, np.float64), np.asarray(batches, np.float64))
    out = np.empty(len(lrs))
    for start in range(0, len(lrs), ROWS):
        lr, b = lrs[start : start + ROWS], batches[start : start + ROWS]
        pad = ROWS - len(lr)
        out[start : start + len(lr)] = evaluate_grid(
            problem,
            kind,
            np.concatenate([lr, np.repeat(lr[-1:], pad)]),
            momentum,
            0.0,
            power,
            batch_sizes=np.concatenate([b, np.repeat(b[-1:], pad)])[:, None],
            target=target,
            max_steps=max_steps,
            certify=False,
        )["steps"][: len(lr), 0]
    return out


def _lr_grid(problem, kind, momentum, power, num):
    lam_max = float(np.max(problem.h ** (1.0 - power)))
    hi = 2.0 * (1.0 + momentum) / lam_max * 1.2  # just past the deterministic stability edge
    return np.geomspace(hi * 1e-6, hi, num)


def tuned_steps(
    problem,
    kind,
    momentum,
    power,
    batch_sizes,
    target,
    *,
    max_steps=10**8,
    num_lrs=41,
    refine=True,
    lrs=None,
):
    """Steps to target with the LR tuned per batch size: (steps (nB,), lr (nB,)); NaN = never.

    ``lrs``: tune over exactly these LRs (no refinement) instead of a log grid up to the
    stability edge refined by golden-section search.
    """
    if lrs is not None:
        lrs, refine = np.sort(np.asarray(lrs, np.float64)), False
    else:
        lrs = _lr_grid(problem, kind, momentum, power, num_lrs)
    batch_sizes = np.asarray(batch_sizes, np.float64)
    grid = (
        _steps_rows(
            problem,
            kind,
            momentum,
            power,
            np.repeat(lrs[None, :], len(batch_sizes), 0).ravel(),
            np.repeat(batch_sizes, len(lrs)),
            target,
            max_steps,
        )
        .reshape(len(batch_sizes), len(lrs))
        .T
    )  # (LR, batch size), as evaluate_grid's
    idx = best_on_grid(grid)
    steps = np.where(idx >= 0, grid[np.maximum(idx, 0), np.arange(len(idx))], np.nan)
    lr = np.where(idx >= 0, lrs[np.maximum(idx, 0)], np.nan)
    if refine and np.any(idx >= 0) and len(lrs) > 1:
        ok = idx >= 0
        ratio = lrs[1] / lrs[0]
        s_ref, lr_ref = refine_lr(
            problem,
            kind,
            lr[ok],
            momentum,
            0.0,
            power,
            np.asarray(batch_sizes)[ok],
            target=target,
            max_steps=max_steps,
            ratio=ratio,
            iters=20,
            certify=False,
        )
        better = np.isfinite(s_ref) & (s_ref <= steps[ok])
        steps[ok] = np.where(better, s_ref, steps[ok])
        lr[ok] = np.where(better, lr_ref, lr[ok])
    return steps, lr


def anchor_target(
    problem,
    kind,
    momentum,
    power,
    anchor_batch,
    anchor_steps,
    *,
    iters=40,
    max_steps=10**8,
    lrs=None,
):
    """The NQM target risk whose tuned steps at anchor_batch equal anchor_steps.

    Steps to target fall as the target rises, so bisection on log target brackets the
    crossing between a target the NQM needs more steps for and one it needs fewer for.
    Returns (target, nqm steps at the anchor).
    """
    b = np.atleast_1d(float(anchor_batch))
    hi = problem.initial_risk  # risk < initial risk: a few steps suffice
    lo = hi * 1e-12
    f = lambda t: tuned_steps(
        problem, kind, momentum, power, b, t, max_steps=max_steps, refine=False, lrs=lrs
    )[0][0]
    s_hi = f(hi)
    for _ in range(iters):
        mid = np.sqrt(lo * hi)
        s = f(mid)
        if np.isfinite(s) and s <= anchor_steps:
            hi, s_hi = mid, s
            if s == anchor_steps:  # integer steps: any target in this band will do
                break
        else:
            lo = mid
        if hi / lo < 1.0 + 1e-6:
            break
    return hi, s_hi


def anchor_noise_scale(
    problem,
    kind,
    momentum,
    power,
    anchor_batch,
    anchor_steps,
    anchor_lr,
    *,
    span=100.0,
    iters=12,
    max_steps=10**8,
    lrs=None,
):
    """A second number from the anchor: the noise scale nu (c -> nu c) at which the NQM,
    re-anchored (:func:`anchor_target`), tunes the anchor's LR to the network's best one.

    Why: the anchor measures two things, the steps and the best LR. Matched on steps alone,
    the NQM at theta_T tunes MNIST-1D's anchor (B = 32) to LR 0.12 where the network's best is
    0.56: its noise, in loss terms, is stronger than the network feels (docs/predict.md).
    More noise -> a smaller tuned LR, so bisection on log nu in [1/span, span]; the LR is
    tuned on the log grid (no refinement), so nu is resolved to about that grid's ratio.
    Returns (nu, problem with c scaled, target, NQM steps at the anchor); a nu at 1/span or
    span means no noise level in that range matches the LR (e.g. a network that trains
    above the quadratic's stability edge 2/h_max).
    """
    b = np.atleast_1d(float(anchor_batch))

    def at(nu):
        p = dataclasses.replace(problem, c=np.asarray(problem.c) * nu)
        t, s = anchor_target(
            p, kind, momentum, power, anchor_batch, anchor_steps, max_steps=max_steps, lrs=lrs
        )
        lr = tuned_steps(
            p, kind, momentum, power, b, t, max_steps=max_steps, refine=False, lrs=lrs
        )[1][0]
        return p, t, s, lr

    lo, hi = -np.log(span), np.log(span)
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        lr = at(np.exp(mid))[3]
        if np.isfinite(lr) and lr > anchor_lr:  # the NQM affords a larger LR: more noise
            lo = mid
        else:
            hi = mid
    nu = float(np.exp(0.5 * (lo + hi)))
    p, t, s, _ = at(nu)
    return nu, p, t, s


@dataclasses.dataclass
class Forecast:
    """S(B) forecast for one optimizer."""

    batch_sizes: np.ndarray
    steps: np.ndarray
    nqm_lr: np.ndarray
    target: float
    anchor_batch: float
    anchor_steps: float
    anchor_nqm_steps: float
    noise_scale: float = 1.0  # nu of anchor_noise_scale (1: noise as measured)


def forecast(
    problem,
    kind,
    momentum,
    power,
    batch_sizes,
    anchor_batch,
    anchor_steps,
    *,
    num_train=None,
    max_steps=10**8,
    lrs=None,
    anchor_lr=None,
) -> Forecast:
    """Anchor at (anchor_batch, anchor_steps), then tuned NQM steps at every batch size.

    ``lrs``: the sweep's own LR grid, for optimizers whose NQM LR is in the network's units
    (SGD and heavy-ball on the measured curvature, P = I); None tunes continuously.
    ``anchor_lr``: the network's best LR at the anchor (same units: P = I only); given, the
    noise is scaled so the NQM's tuned LR there matches it (:func:`anchor_noise_scale`).
    """
    b_eff = effective_batch(batch_sizes, num_train)
    a_eff = float(effective_batch([anchor_batch], num_train)[0])
    nu = 1.0
    if anchor_lr is not None:
        nu, problem, target, a_steps = anchor_noise_scale(
            problem,
            kind,
            momentum,
            power,
            a_eff,
            anchor_steps,
            anchor_lr,
            max_steps=max_steps,
            lrs=lrs,
        )
    else:
        target, a_steps = anchor_target(
            problem, kind, momentum, power, a_eff, anchor_steps, max_steps=max_steps, lrs=lrs
        )
    steps, lr = tuned_steps(
        problem, kind, momentum, power, b_eff, target, max_steps=max_steps, lrs=lrs
    )
    return Forecast(
        np.asarray(batch_sizes, np.float64),
        steps,
        lr,
        target,
        float(anchor_batch),
        float(anchor_steps),
        float(a_steps),
        nu,
    )
