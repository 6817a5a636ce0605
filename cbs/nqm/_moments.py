"""Exact second-moment dynamics of SGD, heavy-ball and Nesterov momentum (+ EMA) on the NQM.

Every optimizer, per coordinate (bin) of the diagonal NQM, is a linear state-space system

    x_{t+1} = A x_t + b e_t,    theta_loss_t = c^T x_t,    x_0 = theta_0 d,

with e_t = alpha h^-p eps_t the (preconditioned, scaled) gradient noise, Var(e_t) = n / B,
n = alpha^2 h^-2p c_noise. With a = alpha h^(1-p) (docs/nqm.md section 2):

* ``sgd``:      x = (theta,),     A = [[1-a]],                 b = (-1,)
* ``momentum``: x = (theta, v),   A = [[1-a, beta], [-a, beta]],  b = (-1, -1)
  (heavy ball in the reference's code form v <- beta v - alpha P^-1 g, theta <- theta + v)
* ``nesterov``: x = (theta, u),   A = [[1-a(1+beta), -beta^2], [a, beta]],  b = (-(1+beta), 1)
  (optax / PyTorch form u <- beta u + alpha P^-1 g, theta <- theta - alpha P^-1 g - beta u,
  the loss measured at the iterate where gradients are taken)
* EMA of iterates (gamma > 0) appends theta~ <- gamma theta~ + (1-gamma) theta_{t+1}
  (theta~_0 = theta_0) and the loss is read at theta~.

The second moments S_t = E[x_t x_t^T] (k(k+1)/2 numbers, k <= 3) follow the affine map

    s_{t+1} = M s_t + r / B,   M = vech(A . A^T),  r = n vech(b b^T),   s_0 = m_0 vech(d d^T),

so s_t = M^t s_0 + (sum_{j<t} M^j) r / B = Det + Noise / B: one pair of B-independent
terms per configuration serves every batch size (docs/nqm.md section 3). We evaluate the
affine power (M^t, sum_{j<t} M^j r) by binary powering: the tables (M^(2^j), R_j) are built
by K squarings and any t < 2^K is a product of at most K of them. This is the closed form
of the phase (cost O(log t), no per-step loop) and, unlike an eigendecomposition of M, it
needs no special case at critical damping (r1 = r2, M not diagonalizable) or at
gamma = 1 - a, where eigenvector-based formulas cancel catastrophically. Rounding error
grows like log2(t) relative roundings per squaring level, i.e. as the recurrence itself.

The certified first-crossing search built on these tables is in ``_crossing.py``; the
step-by-step reference they are tested against is ``tests/nqm_reference.py``.

Float64 is required: 1 - beta goes down to 1e-5, t up to 1e9 and the risk spans 10 decades.
The public functions run under ``jax.enable_x64(True)`` locally; nothing global changes.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "KINDS",
    "Phases",
    "constant_phases",
    "state_dim",
    "linear_system",
    "moment_system",
    "expected_risk_curve",
    "final_risk",
]

KINDS = ("sgd", "momentum", "nesterov")


class Phases(NamedTuple):
    """A schedule as constant phases; the last phase lasts until the budget ends.

    Attributes:
        steps: length of each phase, shape (P,), int64 (the last entry is ignored).
        lr_mult: LR of each phase as a multiple of the cell's LR, shape (P,).
        batch_mult: batch size of each phase as a multiple of the cell's B, shape (P,).
    """

    steps: np.ndarray
    lr_mult: np.ndarray
    batch_mult: np.ndarray


def constant_phases() -> Phases:
    return Phases(np.array([1], np.int64), np.array([1.0]), np.array([1.0]))


def state_dim(kind: str, ema: bool) -> int:
    return (1 if kind == "sgd" else 2) + int(ema)


def _vech_pairs(k: int):
    pairs = [(i, j) for i in range(k) for j in range(i, k)]
    return np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs])


def linear_system(kind: str, ema: bool, a, beta, gamma):
    """(A, b, c, d) of one coordinate; a, beta, gamma broadcast to shape (...).

    Returns A (..., k, k), b (..., k) and numpy read / init vectors c, d of shape (k,).
    """
    one = jnp.ones_like(a)
    zero = jnp.zeros_like(a)
    if kind == "sgd":
        rows = [[1 - a]]
        b = [-one]
    elif kind == "momentum":
        rows = [[1 - a, beta * one], [-a, beta * one]]
        b = [-one, -one]
    elif kind == "nesterov":
        rows = [[1 - a * (1 + beta), -(beta**2) * one], [a, beta * one]]
        b = [-(1 + beta) * one, one]
    else:
        raise ValueError(f"unknown optimizer kind {kind!r}")
    k = len(rows)
    c = np.eye(k + int(ema))[0]
    d = np.zeros(k + int(ema))
    d[0] = 1.0
    if ema:
        # theta~' = gamma theta~ + (1 - gamma) theta' with theta' = row 0 of the base system.
        rows = [r + [zero] for r in rows] + [[(1 - gamma) * x for x in rows[0]] + [gamma * one]]
        b = b + [(1 - gamma) * b[0]]
        c = np.eye(k + 1)[k]
        d[k] = 1.0
    A = jnp.stack([jnp.stack(r, -1) for r in rows], -2)
    return A, jnp.stack(b, -1), c, d


def moment_system(kind: str, ema: bool, h, c_noise, m0, lr, beta, gamma, power):
    """The affine moment map of every bin for one configuration.

    Args:
        kind, ema: optimizer kind and whether an EMA of iterates is read (static).
        h, c_noise, m0: per-bin curvature, noise variance, initial second moment, (nb,).
        lr, beta, gamma, power: scalars (alpha, momentum, EMA decay, preconditioner power p).

    Returns:
        M (m, m, nb), r (m, nb) (noise at B = 1), s0 (m, nb), read (m,) numpy, such
        that E[theta_loss^2] = read . s.
    """
    lam = h ** (1.0 - power)
    a = lr * lam
    n = lr**2 * h ** (-2.0 * power) * c_noise
    A, b, c, d = linear_system(kind, ema, a, beta, gamma)
    k = A.shape[-1]
    I, J = _vech_pairs(k)
    offdiag = (I != J).astype(np.float64)
    # S'_ij = sum_{k<=l} (A_ik A_jl + [k != l] A_il A_jk) s_kl
    M = (
        A[:, I[:, None], I[None, :]] * A[:, J[:, None], J[None, :]]
        + offdiag[None, None, :] * A[:, I[:, None], J[None, :]] * A[:, J[:, None], I[None, :]]
    )
    r = n[:, None] * b[:, I] * b[:, J]
    s0 = m0[:, None] * jnp.asarray(d[I] * d[J])[None, :]
    read = (2.0 - (I == J)) * c[I] * c[J]
    # Small axes lead and bins trail: the products below unroll into fused elementwise
    # loops over bins (a batched 3x3 dot is far slower on CPU).
    return jnp.moveaxis(M, 0, -1), jnp.moveaxis(r, 0, -1), jnp.moveaxis(s0, 0, -1), read


def _matmul(X, Y):
    m = X.shape[0]
    return jnp.stack(
        [jnp.stack([sum(X[i, j] * Y[j, k] for j in range(m)) for k in range(m)]) for i in range(m)]
    )


def _matvec(X, v):
    m = X.shape[0]
    return jnp.stack([sum(X[i, j] * v[j] for j in range(m)) for i in range(m)])


def _tables(M, r, K: int):
    """(M^(2^j), sum_{i<2^j} M^i r) for j < K, shapes (K, m, m, nb), (K, m, nb)."""

    def square(carry, _):
        Mj, Rj = carry
        return (_matmul(Mj, Mj), _matvec(Mj, Rj) + Rj), carry

    _, (Ms, Rs) = jax.lax.scan(square, (M, r), None, length=K)
    return Ms, Rs


# The hot loops below keep the m moment components as separate arrays (a tuple) rather than
# one stacked array: under vmap a component slice of a stacked state is a strided copy.


def _as_tuple_tables(Ms, Rs):
    m = Rs.shape[1]
    return (
        tuple(tuple(Ms[:, i, j] for j in range(m)) for i in range(m)),
        tuple(Rs[:, i] for i in range(m)),
    )


def _apply_t(Mt, Rt, st, inv_b):
    """One affine power on a tuple state st[i] (nB, nb); Mt[i][j], Rt[i] of shape (nb,)."""
    m = len(st)
    return tuple(
        sum(Mt[i][j][None] * st[j] for j in range(m)) + Rt[i][None] * inv_b[:, None]
        for i in range(m)
    )


def _risk_t(st, read, w):
    return jnp.sum(sum(read[i] * st[i] for i in range(len(st)) if read[i] != 0) * w, axis=-1)


def _expand_t(Tt, st, x, inv_b):
    """Tuple state after x steps (x: (nB,) ints < 2^K), by the binary digits of x."""
    K = Tt[1][0].shape[0]

    def body(st, xs):
        Mt, Rt, j = xs
        take = (((x >> j) & 1) == 1)[:, None]
        new = _apply_t(Mt, Rt, st, inv_b)
        return tuple(jnp.where(take, a, b) for a, b in zip(new, st)), None

    st, _ = jax.lax.scan(body, st, (*Tt, jnp.arange(K)))
    return st


def _expand(Ms, Rs, s, x, inv_b):
    """State after x steps (x: (nB,) ints < 2^K) from s, by the binary digits of x."""
    return jnp.stack(_expand_t(_as_tuple_tables(Ms, Rs), tuple(s), x, inv_b))


def _risk(s, read, w):
    """sum_b w_b read . s_b for states s (m, nB, nb) -> (nB,)."""
    # an elementwise product + reduction fuses with the producer (a dot would not)
    return jnp.sum(sum(read[i] * s[i] for i in range(len(read)) if read[i] != 0) * w, axis=-1)


def _phase_budget(phases_steps, max_steps):
    """Start step and usable length of every phase within the budget (last one open)."""
    steps = jnp.asarray(phases_steps).at[-1].set(max_steps)
    start = jnp.concatenate([jnp.zeros(1, steps.dtype), jnp.cumsum(steps)[:-1]])
    length = jnp.clip(jnp.minimum(steps, max_steps - start), 0, None)
    return start, length


def _config_system(kind, ema, prob, lr, beta, gamma, power):
    h, c_noise, m0, _ = prob
    return moment_system(kind, ema, h, c_noise, m0, lr, beta, gamma, power)


@functools.partial(jax.jit, static_argnames=("kind", "ema", "K"))
def expected_risk_curve(
    prob, lr, beta, gamma, power, batch, phases: Phases, steps, *, kind: str, ema: bool, K: int
):
    """Exact expected risk at the given global steps (Q,) for each batch size (nB,).

    Returns shape (nB, Q). Steps must be < 2^K; the schedule's phases are composed exactly
    (the full moment state is carried from one phase to the next).
    """
    w = prob[3]
    steps = jnp.asarray(steps, jnp.int64)
    max_steps = jnp.max(steps)
    start, length = _phase_budget(phases.steps, max_steps + 1)
    _, _, s0, read = _config_system(kind, ema, prob, lr, beta, gamma, power)
    nB, Q = batch.shape[0], steps.shape[0]

    def phase(carry, xs):
        s, out = carry
        t0, ell, lr_m, b_m = xs
        inv_b = 1.0 / (batch * b_m)
        M, r, _, _ = _config_system(kind, ema, prob, lr * lr_m, beta, gamma, power)
        Ms, Rs = _tables(M, r, K)
        local = steps - t0
        inside = (local >= 0) & (local <= ell)
        x = jnp.clip(local, 0, ell)
        m, nb = s.shape[0], s.shape[2]
        sq = jnp.broadcast_to(s[:, :, None], (m, nB, Q, nb)).reshape(m, nB * Q, nb)
        xq = jnp.tile(x, nB)
        ib = jnp.repeat(inv_b, Q)
        val = _risk(_expand(Ms, Rs, sq, xq, ib), read, w).reshape(nB, Q)
        out = jnp.where(inside[None] & jnp.isnan(out), val, out)
        return (_expand(Ms, Rs, s, jnp.broadcast_to(ell, (nB,)), inv_b), out), None

    s_init = jnp.broadcast_to(s0[:, None], (s0.shape[0], nB, s0.shape[1]))
    xs = (start, length, jnp.asarray(phases.lr_mult), jnp.asarray(phases.batch_mult))
    (_, out), _ = jax.lax.scan(phase, (s_init, jnp.full((nB, Q), jnp.nan)), xs)
    return out


def final_risk(
    prob, lr, beta, gamma, power, batch, lr_mults, piece_steps, *, kind: str, ema: bool, K: int
):
    """Risk after len(lr_mults) pieces of ``piece_steps`` steps (traceable, differentiable in
    lr_mults); ``piece_steps`` is one length for every piece or one per piece (a piece of
    0 steps is skipped); batch is a scalar. Used to optimize piecewise-constant schedules."""
    w = prob[3]
    _, _, s0, read = _config_system(kind, ema, prob, lr, beta, gamma, power)
    inv_b = jnp.reshape(1.0 / batch, (1,))
    lengths = jnp.broadcast_to(piece_steps, lr_mults.shape)

    def piece(s, xs):
        lr_m, k = xs
        M, r, _, _ = _config_system(kind, ema, prob, lr * lr_m, beta, gamma, power)
        Ms, Rs = _tables(M, r, K)
        return _expand(Ms, Rs, s, jnp.reshape(k, (1,)), inv_b), None

    s, _ = jax.lax.scan(piece, s0[:, None], (lr_mults, lengths))
    return _risk(s, read, w)[0]
