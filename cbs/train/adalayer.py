"""Adalayer: Adam with one second-moment statistic per layer block, as an Optax transform.

Zhao, Morwani, Brandfonbrener, Vyas & Kakade 2024 ("Deconstructing What Makes a Good
Optimizer for Language Models", arXiv:2407.07972) introduce Adalayer to ask where Adam's
per-coordinate preconditioning matters: the first moment stays per coordinate, the second
moment becomes one number per parameter block. Optax has no such transform, so it is
written here. Per block ``b`` (a set of coordinates) at step ``t = 1, 2, ...``::

    m_t   = b1 m_{t-1} + (1 - b1) g_t                     (per coordinate, as Adam)
    v_t^b = b2 v_{t-1}^b + (1 - b2) mean_{i in b} g_{t,i}²  (one scalar per block)
    Δθ_t  = -η_t ( (m_t / (1 - b1ᵗ)) / (sqrt(v_t^b / (1 - b2ᵗ)) + ε) + λ θ_{t-1} )

The block statistic is the *mean* squared gradient over the block (the average of Adam's
per-coordinate second moments), so a block of one coordinate is exactly Adam and the LR is
on Adam's scale.

Blocks (``block_axes``): every parameter leaf (a layer's kernel, its bias, a norm's scale)
is one block, except the read-out kernel, where each output unit (logit) is its own block:
its statistic is reduced over every axis but the last. Weight decay is decoupled (AdamW's
form). All hyperparameters may be traced scalars (the transform vmaps over cells).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

__all__ = ["ScaleByAdalayerState", "scale_by_adalayer", "adalayer"]


class ScaleByAdalayerState(NamedTuple):
    count: jax.Array  # int32, updates so far
    mu: optax.Updates  # per-coordinate first moment
    nu: optax.Updates  # per-block second moment: the leaf's shape with reduced axes of size 1


def _reduced(axes_kept: tuple[int, ...], ndim: int) -> tuple[int, ...]:
    return tuple(a for a in range(ndim) if a not in axes_kept)


def scale_by_adalayer(
    block_axes: Callable[[Any], Any], b1=0.9, b2=0.999, eps=1e-8
) -> optax.GradientTransformation:
    """Adalayer's direction (module docstring); multiply by ``-lr`` after.

    ``block_axes(params)``: a tree like the params with, per leaf, the tuple of axes along
    which coordinates are in *different* blocks (``()``: the leaf is one block).
    """

    def is_axes(x):
        return isinstance(x, tuple) and all(isinstance(a, int) for a in x)

    def init_fn(params):
        axes = block_axes(params)

        def nu0(x, kept):
            shape = tuple(1 if a in _reduced(kept, x.ndim) else s for a, s in enumerate(x.shape))
            return jnp.zeros(shape, jnp.float32)

        return ScaleByAdalayerState(
            count=jnp.zeros((), jnp.int32),
            mu=jax.tree.map(jnp.zeros_like, params),
            nu=jax.tree.map(nu0, params, axes, is_leaf=is_axes),
        )

    def update_fn(updates, state, params=None):
        del params
        axes = block_axes(updates)
        count = state.count + 1
        t = count.astype(jnp.float32)
        mu = jax.tree.map(lambda m, g: b1 * m + (1.0 - b1) * g, state.mu, updates)

        def block_nu(g, v, kept):
            sq = jnp.mean(jnp.square(g.astype(jnp.float32)), _reduced(kept, g.ndim), keepdims=True)
            return b2 * v + (1.0 - b2) * sq

        # The axes tree comes first so its tuples are leaves, not subtrees.
        nu = jax.tree.map(
            lambda k, g, v: block_nu(g, v, k), axes, updates, state.nu, is_leaf=is_axes
        )

        def direction(m, v):
            return (m / (1.0 - b1**t)) / (jnp.sqrt(v / (1.0 - b2**t)) + eps)

        out = jax.tree.map(lambda m, v, g: direction(m, v).astype(g.dtype), mu, nu, updates)
        return out, ScaleByAdalayerState(count, mu, nu)

    return optax.GradientTransformation(init_fn, update_fn)


def adalayer(
    learning_rate: optax.ScalarOrSchedule,
    block_axes: Callable[[Any], Any],
    b1=0.9,
    b2=0.999,
    eps=1e-8,
    weight_decay=0.0,
) -> optax.GradientTransformation:
    """Adalayer with decoupled weight decay and an LR (see the module docstring)."""
    return optax.chain(
        scale_by_adalayer(block_axes, b1, b2, eps),
        optax.add_decayed_weights(weight_decay),
        optax.scale_by_learning_rate(learning_rate),
    )
