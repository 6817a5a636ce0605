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

__all__ = [
    "best_on_grid",
    "refine_lr",
    "optimize_pwc",
    "pwc_lr_cap",
    "pwc_piece_lengths",
    "best_constant_below_cap",
    "lower_bound_steps",
]

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


def refine_lr(
    problem: NQMProblem,
    kind: str,
    lr0,
    momentum,
    ema_decay,
    precond_power,
    batch_size,
    *,
    target: float,
    max_steps: int,
    phases=None,
    ratio: float = 2.0,
    iters: int = 30,
    window: int = 16,
    certify: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Golden-section search on log LR in [lr0 / ratio, lr0 * ratio], all configs at once.

    The objective is the exact integer step count (censored = +inf), which is unimodal in
    log LR around the optimum for the NQM: the noise floor rises and the rate falls
    monotonically with the LR. The bracket is one grid spacing either side of the grid
    optimum, so the refined optimum can only improve on (or tie with) the grid's.

    Args:
        lr0, momentum, ema_decay, precond_power, batch_size: arrays of one length R.

        certify: passed to evaluate_grid (False is cheaper; a count may then be a later
            crossing than the first, see evaluate_grid).

    Returns:
        (steps, lr): the best step count found (NaN if none) and its LR, each (R,).
    """
    lr0, momentum, ema_decay, precond_power, batch_size, ratio = np.broadcast_arrays(
        *(
            np.asarray(x, np.float64)
            for x in (lr0, momentum, ema_decay, precond_power, batch_size, ratio)
        )
    )
    R = len(lr0)
    # Every evaluation is one evaluate_grid call over all R searches, padded to a power of
    # two >= 64 rows, so that sweeps of similar size share one program. The padding rows are
    # inert (LR 0, no momentum: the risk stays at its initial value, and the certified scan
    # proves that in a few iterations); copies of a real row would cost as much as it does,
    # e.g. the full iteration budget of a slowly oscillating momentum row.
    pad = max(64, 1 << max(R - 1, 0).bit_length()) - R
    fill = lambda x, v: np.concatenate([x, np.full(pad, v)])
    hp = [fill(momentum, 0.0), fill(ema_decay, 0.0), fill(precond_power, 0.0)]
    batch_col = fill(batch_size, 1.0)[:, None]
    # Each search's certified scan costs about as many iterations at its next point as at
    # its last (the points converge): chunks of similar cost waste the fewest iterations.
    cost = [None]

    def f(log_lr):
        out = evaluate_grid(
            problem,
            kind,
            fill(np.exp(log_lr), 0.0),
            *hp,
            batch_sizes=batch_col,
            target=target,
            max_steps=max_steps,
            phases=phases,
            window=window,
            certify=certify,
            cost_hint=cost[0],
        )
        cost[0] = out["scan_iterations"] if certify else None
        steps = out["steps"][:R, 0]
        return np.where(np.isnan(steps), np.inf, steps)

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
def _pwc_final(
    prob,
    cap,
    beta,
    gamma,
    power,
    batch,
    piece_steps,
    z_init,
    *,
    kind,
    ema,
    K,
    num_pieces,
    opt_steps,
):
    """Optimized final risk and log LR multipliers for each (batch, piece_steps) row."""
    opt = optax.adam(0.1)

    def loss(z, b, k):
        # z = log(lr / cap) <= 0 after projection; optimize the log risk (spans decades).
        return jnp.log(
            final_risk(prob, cap, beta, gamma, power, b, jnp.exp(z), k, kind=kind, ema=ema, K=K)
        )

    def solve(b, k, z0):

        def step(carry, _):
            z, state, best_l, best_z = carry
            l, g = jax.value_and_grad(loss)(z, b, k)
            better = l < best_l
            best_l, best_z = jnp.where(better, l, best_l), jnp.where(better, z, best_z)
            g = jnp.where(jnp.isfinite(g), g, 0.0)
            upd, state = opt.update(g, state, z)
            return (jnp.minimum(optax.apply_updates(z, upd), 0.0), state, best_l, best_z), None

        (z, _, best_l, best_z), _ = jax.lax.scan(
            step, (z0, opt.init(z0), jnp.inf, z0), None, length=opt_steps
        )
        last = loss(z, b, k)
        return jnp.where(last < best_l, last, best_l), jnp.where(last < best_l, z, best_z)

    return jax.vmap(solve)(batch, piece_steps, z_init)


def pwc_piece_lengths(total_steps, num_pieces: int) -> np.ndarray:
    """Lengths of ``num_pieces`` pieces that sum to ``total_steps`` exactly: as equal as
    possible, the first ``total_steps % num_pieces`` pieces one step longer (with fewer steps
    than pieces, the last pieces are empty). ``total_steps``: int or (n,) ints -> (n, P)."""
    t = np.asarray(total_steps, np.int64)[..., None]
    i = np.arange(num_pieces)
    return t // num_pieces + (i < t % num_pieces)


def best_constant_below_cap(
    problem: NQMProblem,
    kind: str,
    batch_sizes,
    cap,
    *,
    target: float,
    max_steps: int,
    momentum: float = 0.0,
    ema_decay: float = 0.0,
    precond_power: float = 0.0,
    num: int = 64,
    decades: float = 8.0,
) -> tuple[np.ndarray, np.ndarray]:
    """The constant LR <= cap with the fewest exact steps to target, per batch size.

    A log grid of ``num`` LRs over ``decades`` below the cap, then golden-section refinement
    (:func:`refine_lr`) one grid spacing around the best point, kept only where it is below
    the cap and better. Returns (steps (NaN if none reaches), lr), each (nB,).
    """
    batch = np.asarray(batch_sizes, np.float64)
    cap = np.broadcast_to(np.asarray(cap, np.float64), batch.shape)
    frac = np.logspace(-decades, 0, num)
    lrs = (cap[:, None] * frac[None]).ravel()
    bs = np.repeat(batch, num)
    out = evaluate_grid(
        problem,
        kind,
        lrs,
        np.full_like(lrs, momentum),
        np.full_like(lrs, ema_decay),
        np.full_like(lrs, precond_power),
        batch_sizes=bs[:, None],
        target=target,
        max_steps=max_steps,
    )["steps"][:, 0].reshape(len(batch), num)
    j = best_on_grid(out.T)
    steps = np.where(j >= 0, out[np.arange(len(batch)), np.maximum(j, 0)], np.nan)
    lr = cap * frac[np.maximum(j, 0)]
    ratio = frac[1] / frac[0]
    # bracket [lr0 / ratio, lr0 * ratio] kept below the cap
    lr0 = np.minimum(lr, cap / ratio)
    r_steps, r_lr = refine_lr(
        problem,
        kind,
        lr0,
        momentum,
        ema_decay,
        precond_power,
        batch,
        target=target,
        max_steps=max_steps,
        ratio=ratio,
        iters=20,
    )
    better = (
        (j >= 0)
        & np.isfinite(r_steps)
        & (r_steps < np.where(np.isnan(steps), np.inf, steps))
        & (r_lr <= cap)
    )
    return np.where(better, r_steps, steps), np.where(better, r_lr, lr)


def optimize_pwc(
    problem: NQMProblem,
    kind: str,
    batch_sizes,
    *,
    target: float,
    max_steps: int,
    num_pieces: int = 10,
    lr_cap=None,
    momentum: float = 0.0,
    ema_decay: float = 0.0,
    precond_power: float = 0.0,
    opt_steps: int = 150,
    rel_tol: float = 0.0,
) -> dict[str, np.ndarray]:
    """Optimal piecewise-constant LR schedules (paper Fig. 3b), batched over batch sizes.

    For a horizon of T steps split into ``num_pieces`` pieces of as equal as possible
    lengths (:func:`pwc_piece_lengths`; so every T is reachable, not only multiples of
    num_pieces), the piece log-LRs (each <= log lr_cap) minimize the exact final log-risk
    after T steps, by projected Adam with jax.grad through the closed-form phases (the
    reference uses L-BFGS-B from log LR = -5; the optimizer here keeps the best point it
    visited, its start included). Integer bisection on T then finds the smallest T whose
    optimized final risk is below the target, assuming (like the reference) that the
    optimized risk falls with T.

    The best constant LR <= lr_cap (:func:`best_constant_below_cap`, exact step counts)
    is a feasible schedule of this family, so it seeds the search: the bisection starts
    from its step count (the upper end of the bracket) and from its schedule (the warm
    start). Hence the optimized schedule never needs more steps than the best constant LR.
    Each later bisection step warm-starts from the schedule of the shortest horizon found
    to reach the target so far.

    Args:
        batch_sizes: (nB,). lr_cap: scalar or (nB,); default :func:`pwc_lr_cap`.
        rel_tol: stop once hi - lo <= max(1, rel_tol * hi); 0 (default) = exact to one step.

    Returns:
        dict with (nB,) arrays ``steps`` (T, NaN if not reached within max_steps),
        ``reached``, ``piece_steps`` (T / num_pieces, the mean piece length),
        ``constant_steps`` and ``constant_lr`` (the best constant LR <= cap and its exact
        steps), and (nB, num_pieces) ``lrs``. The schedule's piece lengths are
        ``pwc_piece_lengths(steps, num_pieces)``.
    """
    batch = np.asarray(batch_sizes, np.float64)
    nB = len(batch)
    cap = pwc_lr_cap(problem, precond_power) if lr_cap is None else lr_cap
    cap = np.broadcast_to(np.asarray(cap, np.float64), (nB,))
    K = num_levels(-(-max_steps // num_pieces))
    ema = ema_decay > 0

    def run(total, z_init):
        lengths = pwc_piece_lengths(total, num_pieces)
        with jax.enable_x64(True):
            prob = _prob(problem)
            fn = jax.vmap(
                lambda c, b, kk, z: _pwc_final(
                    prob,
                    c,
                    momentum,
                    ema_decay,
                    precond_power,
                    b[None],
                    kk[None],
                    z[None],
                    kind=kind,
                    ema=ema,
                    K=K,
                    num_pieces=num_pieces,
                    opt_steps=opt_steps,
                )
            )
            l, z = fn(
                jnp.asarray(cap),
                jnp.asarray(batch),
                jnp.asarray(lengths, jnp.int64),
                jnp.asarray(z_init),
            )
            return np.asarray(l)[:, 0], np.asarray(z)[:, 0]

    log_t = math.log(target)
    c_steps, c_lr = best_constant_below_cap(
        problem,
        kind,
        batch,
        cap,
        target=target,
        max_steps=max_steps,
        momentum=momentum,
        ema_decay=ema_decay,
        precond_power=precond_power,
    )
    const_ok = np.isfinite(c_steps)
    lo = np.zeros(nB, np.int64)  # invariant: T = lo does not reach (T = 0: initial risk)
    hi = np.where(const_ok, np.nan_to_num(c_steps, nan=max_steps), max_steps).astype(np.int64)
    best_z = np.repeat(np.where(const_ok, np.log(c_lr / cap), -1.0)[:, None], num_pieces, axis=1)
    reached = const_ok.copy()
    if not const_ok.all():  # no constant LR reaches: try the longest horizon
        l_max, z_max = run(hi, best_z)
        new = ~const_ok & (l_max < log_t)
        reached |= new
        best_z = np.where(new[:, None], z_max, best_z)
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
    steps = np.where(reached, hi, np.nan).astype(np.float64)
    return dict(
        steps=steps,
        reached=reached,
        piece_steps=np.where(reached, hi / num_pieces, -1.0),
        lrs=cap[:, None] * np.exp(best_z),
        constant_steps=c_steps,
        constant_lr=c_lr,
    )
