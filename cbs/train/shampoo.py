"""Shampoo with Adam/AdaGrad grafting, as an Optax transform.

Optax 0.2.8 has no Shampoo, so it is written here, following Gupta, Koren & Singer 2018
("Shampoo: Preconditioned Stochastic Tensor Optimization") for the preconditioner and the
distributed-Shampoo formulation of Shi et al. 2023 ("A Distributed Data-Parallel PyTorch
Implementation of the Distributed Shampoo Optimizer", arXiv:2309.06497, Algorithm 1) for
the EMA factors, the filtered gradient and the layer-wise grafting of the step size.

Per parameter leaf viewed as a matrix ``G`` of shape ``(m, n)`` (how a leaf is viewed is
decided by :func:`cbs.train.optimizers.matrix_views`: dense kernels as they are, conv
filters as ``(prod(window) * in, out)``, attention kernels as ``(in, heads * head_dim)`` /
``(heads * head_dim, out)``), at step ``t = 1, 2, ...``::

    w1, w2  = b2, (1 if b2 == 1 else 1 - b2)       (b2 = 1: sums, as in Gupta et al.)
    L_t     = w1 L_{t-1} + w2 G Gᵀ                  (m × m)
    R_t     = w1 R_{t-1} + w2 Gᵀ G                  (n × n)
    every k steps (t - 1 ≡ 0 mod k, so the first step has roots):
      L̂ = (L_t + ε I)^(-1/4),  R̂ = (R_t + ε I)^(-1/4)
    M_t     = b1 M_{t-1} + (1 - b1) G,   M̂ = M_t / (1 - b1ᵗ)       (filtered gradient)
    A_t     = graft_b2 A_{t-1} + w2' G ⊙ G,   Â = A_t / c_t        (graft's second moment)
    P_shampoo = L̂ M̂ R̂
    P_graft   = M̂ / (sqrt(Â) + graft_eps)
    P         = (‖P_graft‖_F / ‖P_shampoo‖_F) P_shampoo            (grafting, per leaf)
    Δθ_t    = -η_t (P + λ θ_{t-1})                                 (decoupled weight decay)

with ``w2' = 1, c_t = 1`` when ``graft_b2 == 1`` (AdaGrad grafting) and ``w2' = 1 -
graft_b2, c_t = 1 - graft_b2ᵗ`` otherwise (Adam grafting, bias-corrected). Leaves that are
not matrices (biases, norm scales, scalars) take the graft step ``P_graft`` itself. A side
longer than ``max_precond_dim`` is not preconditioned (its root is the identity).

Choices where the references leave room, stated so the test can check them:

* The inverse roots come from ``eigh``: ``Q diag((max(λ, 0) + ε)^(-1/4)) Qᵀ``. Clamping
  the eigenvalues at 0 first keeps float32 rounding (tiny negative eigenvalues of a
  rank-deficient factor) from producing NaNs; ε is then the ridge of Gupta et al.'s
  ``L_0 = ε I``, added at the root rather than accumulated.
* Between refreshes the roots are the last ones computed (stale, as in both references).
* Every hyperparameter except ``precondition_frequency`` and ``max_precond_dim`` may be a
  traced scalar (so the transform vmaps over cells). As for SOAP (:mod:`cbs.train.soap`),
  the refresh is chosen from ``block_step`` when given: the step shared by every vmapped
  copy (the cells of a block train in lockstep), unbatched, so ``lax.cond`` stays a real
  conditional and the ``eigh`` runs on refresh steps only. A per-cell (traced) frequency
  would make it a select computing every root on every step: on CPU an ``eigh`` of a 64 x 64
  factor costs far more than the rest of the step, so the frequency is a static integer.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

__all__ = ["ScaleByShampooState", "scale_by_shampoo", "shampoo", "inverse_root"]

# Factor products and roots in full float32 (TF32 matmuls on recent GPUs would lose digits).
_PRECISION = lax.Precision.HIGHEST


class ScaleByShampooState(NamedTuple):
    """State of :func:`scale_by_shampoo`. ``factor_*``/``root_*`` are trees shaped like the
    params with a ``(0, 0)`` placeholder for a side that is not preconditioned."""

    count: jax.Array  # int32, updates so far
    mu: optax.Updates  # filtered gradient M (first moment), shaped like the params
    graft_nu: optax.Updates  # graft's second moment A, shaped like the params
    factor_l: optax.Updates
    factor_r: optax.Updates
    root_l: optax.Updates
    root_r: optax.Updates


def inverse_root(mat: jax.Array, eps, p: int = 4) -> jax.Array:
    """``(mat + eps I)^(-1/p)`` of a symmetric PSD matrix by ``eigh`` (eigenvalues clamped
    at 0 before adding eps)."""
    lam, q = jnp.linalg.eigh(mat)
    lam = (jnp.maximum(lam, 0.0) + eps) ** (-1.0 / p)
    return jnp.matmul(q * lam[None, :], q.T, precision=_PRECISION)


def _view(x, d):
    """The leaf as its 2-D matrix view ``(prod(reduction axes), prod(output axes))``."""
    red = (d.reduction_axis,) if isinstance(d.reduction_axis, int) else tuple(d.reduction_axis)
    out = (d.output_axis,) if isinstance(d.output_axis, int) else tuple(d.output_axis)
    perm = red + out
    m = 1
    for a in red:
        m *= x.shape[a]
    return jnp.transpose(x, perm).reshape(m, -1), perm


def _unview(mat, perm, shape):
    tshape = tuple(shape[a] for a in perm)
    inv = [0] * len(perm)
    for i, a in enumerate(perm):
        inv[a] = i
    return jnp.transpose(mat.reshape(tshape), inv)


def _is_dims(x) -> bool:
    return x is None or isinstance(x, optax.contrib.MuonDimensionNumbers)


def scale_by_shampoo(
    matrix_views: Callable[[Any], Any],
    b1=0.9,
    b2=0.999,
    eps=1e-8,
    graft_b2=0.999,
    graft_eps=1e-8,
    precondition_frequency: int = 10,
    max_precond_dim: int = 1024,
    *,
    block_step: jax.Array | None = None,
) -> optax.GradientTransformation:
    """Shampoo's grafted direction ``P`` (module docstring); multiply by ``-lr`` after.

    ``matrix_views(params)``: a tree like the params with, per leaf, an
    ``optax.contrib.MuonDimensionNumbers`` (how the leaf is a matrix) or ``None`` (not a
    matrix: graft step only). ``block_step``: the update count shared by all vmapped copies
    (it must equal each copy's own count), or None to branch on the copy's own count.
    """
    precondition_frequency = int(precondition_frequency)
    eye = jnp.eye

    def sides(x, d):
        """Sizes (m, n) of the leaf's matrix view and which sides are preconditioned."""
        if d is None:
            return None
        red = (d.reduction_axis,) if isinstance(d.reduction_axis, int) else d.reduction_axis
        m = math.prod(x.shape[a] for a in red)
        n = x.size // m
        return m, n, m <= max_precond_dim, n <= max_precond_dim

    def init_fn(params):
        dims = matrix_views(params)

        def factors(x, d, root: bool):
            s = sides(x, d)
            if s is None:
                return (jnp.zeros((0, 0), jnp.float32),) * 2
            m, n, use_l, use_r = s
            init = eye if root else (lambda k: jnp.zeros((k, k), jnp.float32))
            fl = init(m) if use_l else jnp.zeros((0, 0), jnp.float32)
            fr = init(n) if use_r else jnp.zeros((0, 0), jnp.float32)
            return fl, fr

        def pick(i, root):
            return jax.tree.map(lambda x, d: factors(x, d, root)[i], params, dims, is_leaf=_is_dims)

        return ScaleByShampooState(
            count=jnp.zeros((), jnp.int32),
            mu=jax.tree.map(jnp.zeros_like, params),
            graft_nu=jax.tree.map(jnp.zeros_like, params),
            factor_l=pick(0, False),
            factor_r=pick(1, False),
            root_l=pick(0, True),
            root_r=pick(1, True),
        )

    def update_fn(updates, state, params=None):
        dims = matrix_views(updates)
        count = state.count + 1
        t = count.astype(jnp.float32)
        w2 = jnp.where(b2 == 1.0, 1.0, 1.0 - b2)
        gw2 = jnp.where(graft_b2 == 1.0, 1.0, 1.0 - graft_b2)
        gcorr = jnp.where(graft_b2 == 1.0, 1.0, 1.0 - graft_b2**t)
        at = state.count if block_step is None else jnp.asarray(block_step, jnp.int32)
        refresh = (at % precondition_frequency) == 0

        def leaf(g, d, mu, nu, fl, fr, rl, rr):
            g32 = g.astype(jnp.float32)
            mu = b1 * mu + (1.0 - b1) * g32
            nu = graft_b2 * nu + gw2 * g32 * g32
            mhat = mu / (1.0 - b1**t)
            p_graft = mhat / (jnp.sqrt(nu / gcorr) + graft_eps)
            if d is None:
                return p_graft.astype(g.dtype), mu, nu, fl, fr, rl, rr
            gm, perm = _view(g32, d)
            mm, _ = _view(mhat, d)
            m, n = gm.shape
            use_l, use_r = fl.shape[0] == m, fr.shape[0] == n
            if use_l:
                fl = b2 * fl + w2 * jnp.matmul(gm, gm.T, precision=_PRECISION)
            if use_r:
                fr = b2 * fr + w2 * jnp.matmul(gm.T, gm, precision=_PRECISION)

            def roots(_):
                return (
                    inverse_root(fl, eps) if use_l else rl,
                    inverse_root(fr, eps) if use_r else rr,
                )

            rl, rr = lax.cond(refresh, roots, lambda _: (rl, rr), None)
            ps = mm
            if use_l:
                ps = jnp.matmul(rl, ps, precision=_PRECISION)
            if use_r:
                ps = jnp.matmul(ps, rr, precision=_PRECISION)
            ps = _unview(ps, perm, g.shape)
            ns, ng = jnp.linalg.norm(ps), jnp.linalg.norm(p_graft)
            p = jnp.where(ns > 0, ng / jnp.where(ns > 0, ns, 1.0), 0.0) * ps
            return p.astype(g.dtype), mu, nu, fl, fr, rl, rr

        treedef = jax.tree.structure(updates)
        flat_d = treedef.flatten_up_to(dims)
        cols = [
            treedef.flatten_up_to(x)
            for x in (
                updates,
                state.mu,
                state.graft_nu,
                state.factor_l,
                state.factor_r,
                state.root_l,
                state.root_r,
            )
        ]
        outs = [leaf(g, d, *rest) for g, d, *rest in zip(cols[0], flat_d, *cols[1:])]
        unflat = [treedef.unflatten([o[i] for o in outs]) for i in range(7)]
        return unflat[0], ScaleByShampooState(count, *unflat[1:])

    return optax.GradientTransformation(init_fn, update_fn)


def shampoo(
    learning_rate: optax.ScalarOrSchedule,
    matrix_views: Callable[[Any], Any],
    b1=0.9,
    b2=0.999,
    eps=1e-8,
    graft_b2=0.999,
    graft_eps=1e-8,
    weight_decay=0.0,
    precondition_frequency: int = 10,
    max_precond_dim: int = 1024,
    *,
    block_step: jax.Array | None = None,
) -> optax.GradientTransformation:
    """Shampoo (grafted, see the module docstring) with decoupled weight decay and an LR."""
    return optax.chain(
        scale_by_shampoo(
            matrix_views,
            b1,
            b2,
            eps,
            graft_b2,
            graft_eps,
            precondition_frequency,
            max_precond_dim,
            block_step=block_step,
        ),
        optax.add_decayed_weights(weight_decay),
        optax.scale_by_learning_rate(learning_rate),
    )
