"""Hyperparameter tuning on the exact NQM: grid optimum, continuous refinement, optimal
piecewise-constant LR schedules, and the information-theoretic lower bound."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cbs.nqm._grid import _prob, evaluate_grid, num_levels
from cbs.nqm._moments import final_risk
from cbs.nqm._problem import NQMProblem

__all__ = ["best_on_grid", "refine_lr", "optimize_pwc", "pwc_lr_cap", "lower_bound_steps"]

_INV_PHI = (math.sqrt(5) - 1) / 2


def lower_bound_steps(problem: NQMProblem, target: float, batch_sizes) -> np.ndarray:
    """d / (2 L* B): no estimator reaches L* from fewer than d / (2 L*) examples (docs/nqm.md section 1)."""
    return problem.lower_bound_steps(target, batch_sizes)


def best_on_grid(steps: np.ndarray) -> np.ndarray:
    """Index of the smallest finite step count along axis 0 (first wins ties), -1 if none.

    steps: (C, ...) with NaN for censored cells.
    """
    filled = np.where(np.isnan(steps), np.inf, steps)
    idx = np.argmin(filled, axis=0)
    return np.where(np.isfinite(np.min(filled, axis=0)), idx, -1)


def refine_lr(problem: NQMProblem, kind: str, lr0, momentum, ema_decay, precond_power, batch_size, *,
              target: float, max_steps: int, phases=None, ratio: float = 2.0, iters: int = 30,
              window: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Golden-section search on log LR in [lr0 / ratio, lr0 * ratio], all configs at once.

    The objective is the exact integer step count (censored = +inf), which is unimodal in
    log LR around the optimum for the NQM: the noise floor rises and the rate falls
    monotonically with the LR. The bracket is one grid spacing either side of the grid
    optimum, so the refined optimum can only improve on (or tie with) the grid's.

    Args:
        lr0, momentum, ema_decay, precond_power, batch_size: arrays of one length R.

    Returns:
        (steps, lr): the best step count found (NaN if none) and its LR, each (R,).
    """
    lr0, momentum, ema_decay, precond_power, batch_size, ratio = np.broadcast_arrays(
        *(np.asarray(x, np.float64) for x in (lr0, momentum, ema_decay, precond_power, batch_size, ratio)))
    R = len(lr0)
    # Every evaluation is one evaluate_grid call over all R searches, padded (repeating the
    # last) to a power of two >= 64 rows, so that sweeps of similar size share one program.
    pad = max(64, 1 << max(R - 1, 0).bit_length()) - R
    fill = lambda x: np.concatenate([x, np.repeat(x[-1:], pad)])
    hp = [fill(x) for x in (momentum, ema_decay, precond_power)]
    batch_col = fill(batch_size)[:, None]

    def f(log_lr):
        out = evaluate_grid(problem, kind, np.exp(fill(log_lr)), *hp, batch_sizes=batch_col, target=target,
                            max_steps=max_steps, phases=phases, window=window)["steps"][:R, 0]
        return np.where(np.isnan(out), np.inf, out)

    # (A golden section of its own, not the S(B) fitter's in cbs.analysis._model: here each
    # evaluation is a full exact step count, so one new point per iteration is reused,
    # ties are common (integer objective) and the best point seen is what is returned.)
    a = np.log(lr0) - np.log(ratio)
    b = np.log(lr0) + np.log(ratio)
    x1 = b - _INV_PHI * (b - a)
    x2 = a + _INV_PHI * (b - a)
    f0, f1, f2 = f(np.log(lr0)), f(x1), f(x2)
    best_f, best_x = f0.copy(), np.log(lr0)
    for xs, fs in ((x1, f1), (x2, f2)):
        better = fs < best_f
        best_f, best_x = np.where(better, fs, best_f), np.where(better, xs, best_x)
    for _ in range(iters):
        left = f1 <= f2  # minimum in [a, x2]
        a, b = np.where(left, a, x1), np.where(left, x2, b)
        x1n = np.where(left, b - _INV_PHI * (b - a), x2)
        x2n = np.where(left, x1, a + _INV_PHI * (b - a))
        new_x = np.where(left, x1n, x2n)
        fn = f(new_x)
        f1, f2 = np.where(left, fn, f2), np.where(left, f1, fn)
        x1, x2 = x1n, x2n
        better = fn < best_f
        best_f, best_x = np.where(better, fn, best_f), np.where(better, new_x, best_x)
    return np.where(np.isfinite(best_f), best_f, np.nan), np.exp(best_x)


def pwc_lr_cap(problem: NQMProblem, precond_power: float) -> float:
    """The reference's PWC cap 2 / (lambda_max + lambda_min) of the preconditioned spectrum."""
    lam = problem.h ** (1 - precond_power)
    return float(2.0 / (lam.max() + lam.min()))


@functools.partial(jax.jit, static_argnames=("kind", "ema", "K", "num_pieces", "opt_steps"))
def _pwc_final(prob, cap, beta, gamma, power, batch, piece_steps, z_init, *, kind, ema, K, num_pieces, opt_steps):
    """Optimized final risk and log LR multipliers for each (batch, piece_steps) row."""
    opt = optax.adam(0.1)

    def loss(z, b, k):
        # z = log(lr / cap) <= 0 after projection; optimize the log risk (spans decades).
        return jnp.log(final_risk(prob, cap, beta, gamma, power, b, jnp.exp(z), k,
                                      kind=kind, ema=ema, K=K))

    def solve(b, k, z0):

        def step(carry, _):
            z, state, best_l, best_z = carry
            l, g = jax.value_and_grad(loss)(z, b, k)
            better = l < best_l
            best_l, best_z = jnp.where(better, l, best_l), jnp.where(better, z, best_z)
            g = jnp.where(jnp.isfinite(g), g, 0.0)
            upd, state = opt.update(g, state, z)
            return (jnp.minimum(optax.apply_updates(z, upd), 0.0), state, best_l, best_z), None

        (z, _, best_l, best_z), _ = jax.lax.scan(step, (z0, opt.init(z0), jnp.inf, z0), None, length=opt_steps)
        last = loss(z, b, k)
        return jnp.where(last < best_l, last, best_l), jnp.where(last < best_l, z, best_z)

    return jax.vmap(solve)(batch, piece_steps, z_init)


def optimize_pwc(problem: NQMProblem, kind: str, batch_sizes, *, target: float, max_steps: int,
                 num_pieces: int = 10, lr_cap=None, momentum: float = 0.0, ema_decay: float = 0.0,
                 precond_power: float = 0.0, opt_steps: int = 150,
                 rel_tol: float = 1e-3) -> dict[str, np.ndarray]:
    """Optimal piecewise-constant LR schedules (paper Fig. 3b), batched over batch sizes.

    For a piece length k, the num_pieces log-LRs (each <= log lr_cap) minimize the exact
    final log-risk after num_pieces * k steps, by projected Adam with jax.grad through the
    closed-form phases (the reference uses L-BFGS-B from log LR = -5; we start every piece at
    cap / e for the longest horizon, then warm-start each bisection step from the schedule of
    the shortest horizon found to reach the target so far). Then integer bisection on k finds the smallest k whose optimized final risk is
    below the target, assuming (like the reference) that the optimized risk falls with k.

    Args:
        batch_sizes: (nB,). lr_cap: scalar or (nB,); default :func:`pwc_lr_cap`.

    Returns:
        dict with (nB,) arrays ``steps`` (num_pieces * k, NaN if not reached within
        max_steps), ``reached``, ``piece_steps`` and (nB, num_pieces) ``lrs``. The
        bisection stops once hi - lo <= rel_tol * hi (the inner optimizer is not exact to
        better than that anyway), so ``steps`` may exceed the smallest horizon by rel_tol.
    """
    batch = np.asarray(batch_sizes, np.float64)
    nB = len(batch)
    cap = pwc_lr_cap(problem, precond_power) if lr_cap is None else lr_cap
    cap = np.broadcast_to(np.asarray(cap, np.float64), (nB,))
    kmax = max(1, max_steps // num_pieces)
    K = num_levels(kmax)
    ema = ema_decay > 0

    def run(k, z_init):
        with jax.enable_x64(True):
            prob = _prob(problem)
            fn = jax.vmap(lambda c, b, kk, z: _pwc_final(
                prob, c, momentum, ema_decay, precond_power, b[None], kk[None], z[None], kind=kind, ema=ema,
                K=K, num_pieces=num_pieces, opt_steps=opt_steps))
            l, z = fn(jnp.asarray(cap), jnp.asarray(batch), jnp.asarray(k, jnp.int64), jnp.asarray(z_init))
            return np.asarray(l)[:, 0], np.asarray(z)[:, 0]

    log_t = math.log(target)
    lo = np.zeros(nB, np.int64)            # invariant: k = lo does not reach (k = 0: initial risk)
    hi = np.full(nB, kmax, np.int64)       # candidate that reaches
    l_hi, z_hi = run(hi, np.full((nB, num_pieces), -1.0))
    reached = l_hi < log_t
    best_z = z_hi
    while True:
        open_ = reached & (hi - lo > np.maximum(1, rel_tol * hi))
        if not open_.any():
            break
        mid = np.where(open_, (lo + hi) // 2, hi)
        # warm start from the schedule of the nearest horizon known to reach the target
        l_mid, z_mid = run(mid, best_z)
        ok = l_mid < log_t
        hi = np.where(open_ & ok, mid, hi)
        lo = np.where(open_ & ~ok, mid, lo)
        best_z = np.where((open_ & ok)[:, None], z_mid, best_z)
    steps = np.where(reached, hi * num_pieces, np.nan).astype(np.float64)
    return dict(steps=steps, reached=reached, piece_steps=np.where(reached, hi, -1),
                lrs=cap[:, None] * np.exp(best_z))
