"""Optimizer registry and learning-rate schedules.

Each kind maps to an :class:`~cbs.sweep.backend.OptimizerSpec` (its hyperparameters with
defaults and bounds) and a builder ``build(learning_rate, hp) -> GradientTransformation``.
The builder is called *inside* the traced, vmapped train step with the cell's
hyperparameters as traced scalars, so one compiled program serves every (LR, momentum,
b2, weight decay, ...) combination of a block. This works because the Optax transforms
used here only do arithmetic with these values (no Python branching on them).

Every kind also takes ``ema_decay``: an exponential moving average of the weights that is
evaluated instead of the raw weights (0 = off), bias-corrected as in Zhang et al. 2024.

Two hooks serve kinds that need more than ``update(grads, state, params)``:
:func:`evaluation_point` (schedule-free AdamW trains at ``y`` and is evaluated at its
average ``x``; every evaluation, the crossing replay and the EMA use that point) and
:data:`NEEDS_OBJECTIVE` (Sophia's Hessian-diagonal estimate needs the step's batch loss as
``obj_fn``). Which leaves are matrices is decided in one place for built-in and user models:
:func:`muon_dimension_numbers` (hidden matrices, for Muon) and :func:`matrix_views` (every
matrix, for Shampoo) share the same views; :func:`adalayer_block_axes` gives Adalayer's
blocks.

Step-dependent branches: SOAP's basis refresh and Shampoo's root recomputation (every 10
steps, a static frequency) branch on the block's shared step (:data:`STEP_AWARE`), so they
stay real conditionals under ``vmap``. Sophia's Hessian estimate is controlled by a per-cell
hyperparameter (``update_interval``, optax's counter), so under ``vmap`` it is a select:
computed every step, kept on its steps (the numbers of the unvmapped transform; the cost is
in benchmarks/README.md).

``kfac`` is special: kfac-jax's optimizer cannot run inside ``lax.scan`` and takes a
Python step counter, so the back end runs its cells one after another (see
:mod:`cbs.train.kfac`); its builder here is ``None``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import optax

from cbs.sweep.backend import HParamSpec, OptimizerSpec

__all__ = [
    "OPTIMIZERS",
    "BUILDERS",
    "build_optimizer",
    "muon_dimension_numbers",
    "matrix_views",
    "adalayer_block_axes",
    "evaluation_point",
    "soap_available",
    "schedule_fn",
]

_EMA = HParamSpec(
    0.0, "EMA decay of the evaluated weights (0 = evaluate the raw weights)", ge=0, lt=1
)
_WD = HParamSpec(0.0, "decoupled weight decay (multiplied by the LR, as in AdamW)", ge=0)
_L2 = HParamSpec(0.0, "L2 weight decay added to the gradient (coupled)", ge=0)
_MOM = HParamSpec(0.9, "momentum coefficient", ge=0, lt=1)


def _adam_moments(b1: float = 0.9, b2: float = 0.999) -> dict[str, HParamSpec]:
    """b1, b2, eps of the Adam family (Adam, AdamW, SOAP), with the kind's defaults."""
    return dict(
        b1=HParamSpec(b1, "first-moment decay", ge=0, lt=1),
        b2=HParamSpec(b2, "second-moment decay", ge=0, lt=1),
        eps=HParamSpec(1e-8, "denominator epsilon", gt=0),
    )


def _sgd(lr, hp, momentum=False, nesterov=False):
    # Coupled L2: the decay term goes through momentum, as in classic SGD + weight decay.
    return optax.chain(
        optax.add_decayed_weights(hp["weight_decay"]),
        optax.sgd(lr, momentum=hp["momentum"] if momentum else None, nesterov=nesterov),
    )


def _soap(lr, hp, block_step=None):
    from cbs.train.soap import soap

    # block_step: the block's shared step, so a vmapped block refreshes SOAP's basis only on
    # refresh steps (see cbs.train.soap.scale_by_soap).
    return soap(
        lr,
        b1=hp["b1"],
        b2=hp["b2"],
        eps=hp["eps"],
        weight_decay=hp["weight_decay"],
        block_step=block_step,
    )


def _muon_readout(tree) -> str | None:
    """Name of the read-out module: the top-level ``Dense_i`` with the largest ``i``.

    Every model in :mod:`cbs.train.models` ends in one Dense layer created last at the top
    level, so Flax names it ``Dense_<largest index>`` there.
    """
    dense = [k for k in tree if re.fullmatch(r"Dense_\d+", str(k))]
    return max(dense, key=lambda k: int(str(k).split("_")[1])) if dense else None


def muon_dimension_numbers(params):
    """Which leaves Muon orthogonalises, and how each is viewed as a matrix.

    Returns a tree like ``params`` with, per leaf, an
    ``optax.contrib.MuonDimensionNumbers`` (Muon) or ``None`` (AdamW). Following the
    method's reference (K. Jordan's Muon: "only the internal >= 2-D parameters; embeddings,
    classifier heads and scalar or vector parameters with AdamW"):

    * Muon: every ``kernel`` of a hidden layer. Dense kernels ``(in, out)`` as they are;
      conv filters ``(*window, in, out)`` as ``(prod(window) * in, out)``; attention's
      query/key/value kernels ``(in, heads, head_dim)`` as ``(in, heads * head_dim)`` and
      its output kernel ``(heads, head_dim, out)`` as ``(heads * head_dim, out)``.
      The first layer of an MLP/CNN on continuous inputs is a hidden matrix in this sense
      (it is not a lookup table).
    * AdamW: token and position embeddings, the read-out (the last top-level Dense layer),
      biases and LayerNorm scales/offsets.
    """
    return _matrix_dims(params, hidden_only=True)


def matrix_views(params):
    """Every leaf of rank >= 2 as a matrix, viewed as :func:`muon_dimension_numbers` views
    Muon's (the same rule for user models), read-out and embeddings included; ``None`` for
    vectors and scalars. Shampoo preconditions these matrices and grafts the rest."""
    return _matrix_dims(params, hidden_only=False)


def _leaf_names(path) -> list[str]:
    names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
    return names[1:] if names and names[0] == "params" else names


def _readout_of(params) -> str | None:
    root = params["params"] if isinstance(params, Mapping) and "params" in params else params
    return _muon_readout(root) if isinstance(root, Mapping) else None


def _matrix_dims(params, hidden_only: bool):
    dims = optax.contrib.MuonDimensionNumbers
    readout = _readout_of(params)

    def label(path, leaf):
        names = _leaf_names(path)
        if leaf.ndim < 2:
            return None
        if hidden_only and (names[-1] != "kernel" or (readout is not None and names[0] == readout)):
            return None
        if len(names) >= 2 and names[-2] in ("query", "key", "value"):
            return dims(reduction_axis=0, output_axis=tuple(range(1, leaf.ndim)))
        return dims(reduction_axis=tuple(range(leaf.ndim - 1)), output_axis=leaf.ndim - 1)

    return jax.tree_util.tree_map_with_path(label, params)


def adalayer_block_axes(params):
    """Adalayer's blocks (:mod:`cbs.train.adalayer`): per leaf, the axes along which
    coordinates are in different blocks. Every leaf is one block (``()``) except the
    read-out kernel (the last top-level Dense layer, as for Muon), one block per output
    unit (its last axis)."""
    readout = _readout_of(params)

    def axes(path, leaf):
        names = _leaf_names(path)
        if readout is not None and names[0] == readout and names[-1] == "kernel":
            return (leaf.ndim - 1,)
        return ()

    return jax.tree_util.tree_map_with_path(axes, params)


def _is_dims(x) -> bool:
    return x is None or isinstance(x, optax.contrib.MuonDimensionNumbers)


def _muon_width_scale(dims_fn) -> optax.GradientTransformation:
    """Scales each Muon update by ``sqrt(max(1, fan_out / fan_in))`` of its matrix view,
    as the reference (and optax.contrib.muon) do, so a wide matrix's update has the RMS
    of a square one's."""

    def update_fn(updates, state, params=None):
        del params

        def scale(u, d):
            if d is None:
                return u
            red = (
                (d.reduction_axis,)
                if isinstance(d.reduction_axis, int)
                else tuple(d.reduction_axis)
            )
            out = (d.output_axis,) if isinstance(d.output_axis, int) else tuple(d.output_axis)
            fan_in = math.prod(u.shape[a] for a in red)
            fan_out = math.prod(u.shape[a] for a in out)
            return u * math.sqrt(max(1.0, fan_out / fan_in))

        return jax.tree.map(scale, updates, dims_fn(updates), is_leaf=_is_dims), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def _muon(lr, hp):
    """Muon on hidden matrices, plain AdamW on the rest (see muon_dimension_numbers).

    Built from optax.contrib's Muon pieces rather than ``optax.contrib.muon`` because that
    one runs its Adam group with Nesterov momentum (NAdamW); the reference uses AdamW.
    """
    # The AdamW group's LR is adam_lr_ratio times Muon's (the reference tunes them apart).
    adam_lr = (
        (lambda count: hp["adam_lr_ratio"] * lr(count))
        if callable(lr)
        else hp["adam_lr_ratio"] * lr
    )
    muon = optax.chain(
        optax.contrib.scale_by_muon(
            beta=hp["momentum"],
            eps=hp["eps"],
            nesterov=True,
            weight_dimension_numbers=muon_dimension_numbers,
        ),
        _muon_width_scale(muon_dimension_numbers),
        optax.add_decayed_weights(hp["weight_decay"]),
        optax.scale_by_learning_rate(lr),
    )
    adamw = optax.adamw(
        adam_lr, b1=hp["b1"], b2=hp["b2"], eps=hp["eps"], weight_decay=hp["weight_decay"]
    )

    def labels(params):
        return jax.tree.map(
            lambda d: "adamw" if d is None else "muon",
            muon_dimension_numbers(params),
            is_leaf=_is_dims,
        )

    return optax.partition({"muon": muon, "adamw": adamw}, labels)


# Steps between Shampoo's inverse-root recomputations: a static integer, so that in a
# vmapped block the recomputation is a real conditional on the block's shared step (as
# SOAP's basis refresh), not a per-step select (see cbs.train.shampoo).
SHAMPOO_PRECONDITION_FREQUENCY = 10


def _shampoo(lr, hp, block_step=None):
    from cbs.train.shampoo import shampoo

    return shampoo(
        lr,
        matrix_views,
        b1=hp["b1"],
        b2=hp["b2"],
        eps=hp["eps"],
        graft_b2=hp["graft_b2"],
        graft_eps=hp["graft_eps"],
        weight_decay=hp["weight_decay"],
        precondition_frequency=SHAMPOO_PRECONDITION_FREQUENCY,
        block_step=block_step,
    )


def _adalayer(lr, hp):
    from cbs.train.adalayer import adalayer

    return adalayer(
        lr,
        adalayer_block_axes,
        b1=hp["b1"],
        b2=hp["b2"],
        eps=hp["eps"],
        weight_decay=hp["weight_decay"],
    )


def ademamix_warmups(hp):
    """AdEMAMix's warm-ups of ``alpha`` and ``b3`` (Pagliardini, Ablin & Grangier 2024,
    "The AdEMAMix Optimizer: Better, Faster, Older", arXiv:2409.03137, Algorithm 1) over
    ``T = warmup_steps`` steps (0 = off), at the paper's step ``t = 1, 2, ...``::

        alpha_t = min(t alpha / T, alpha)
        b3_t    = min(exp(ln(b1) ln(b3) / ((1 - t/T) ln(b3) + (t/T) ln(b1))), b3)  (t < T)

    (``b3_t`` interpolates the half-life linearly from ``b1``'s to ``b3``'s). Returned as
    functions of Optax's 0-based count (``t = count + 1``), traceable in every argument.
    """
    big_t, a, b1, b3 = hp["warmup_steps"], hp["alpha"], hp["b1"], hp["b3"]
    on = big_t > 0
    safe_t = jnp.where(on, big_t, 1.0)

    def alpha(count):
        t = jnp.asarray(count, jnp.float32) + 1.0
        return jnp.where(on & (t < big_t), t * a / safe_t, a)

    def beta3(count):
        t = jnp.asarray(count, jnp.float32) + 1.0
        f = t / safe_t
        lb1, lb3 = jnp.log(b1), jnp.log(b3)
        warm = jnp.minimum(jnp.exp(lb1 * lb3 / ((1.0 - f) * lb3 + f * lb1)), b3)
        return jnp.where(on & (t < big_t), warm, b3)

    return alpha, beta3


def _ademamix(lr, hp):
    alpha, beta3 = ademamix_warmups(hp)
    return optax.contrib.ademamix(
        lr,
        b1=hp["b1"],
        b2=hp["b2"],
        b3=beta3,
        alpha=alpha,
        eps=hp["eps"],
        weight_decay=hp["weight_decay"],
    )


def _simplified_ademamix(lr, hp):
    return optax.contrib.simplified_ademamix(
        lr,
        b1=hp["b1"],
        b2=hp["b2"],
        alpha=hp["alpha"],
        eps=hp["eps"],
        weight_decay=hp["weight_decay"],
    )


def _sophia(lr, hp):
    # Sophia-H: optax's Hutchinson estimate u ⊙ (H u) of the Hessian diagonal (Rademacher
    # u), which needs the batch's loss as `obj_fn` at update time (see NEEDS_OBJECTIVE).
    # The probe key starts at PRNGKey(0) in every cell: probes depend on the step only.
    # optax's Sophia differs from the paper's Algorithm 3 (Liu et al. 2023) in two details,
    # kept as optax has them: the momentum is bias-corrected (m / (1 - b1^t)), and a step
    # divides by the Hessian EMA from before that step's estimate (the paper refreshes h
    # first), so the first step, with h = 0, is a clipped sign step of size lr.
    return optax.contrib.sophia(
        lr,
        b1=hp["b1"],
        b2=hp["b2"],
        eps=hp["eps"],
        weight_decay=hp["weight_decay"],
        gamma=hp["gamma"],
        clip_threshold=hp["clip_threshold"],
        update_interval=hp["update_interval"],
    )


def _schedule_free_adamw(lr, hp):
    """optax.contrib.schedule_free_adamw, built from its parts so the LR schedule lines up.

    ``schedule_free`` reads the LR at its own 1-based ``step_count`` for the averaging
    weight ``c_{t+1} = max_lr**p / sum``, while the base AdamW step reads it at the 0-based
    count; the reference (Defazio et al. 2024) weights each step by that step's own LR, so
    the averaging reads ``lr(step_count - 1)``. With a constant LR this is exactly
    ``optax.contrib.schedule_free_adamw`` (the test checks both). Warm-up comes from the
    config's schedule (``schedule.warmup_steps``), as for every kind.
    """
    base = optax.chain(
        optax.scale_by_rms(decay=hp["b2"], eps=hp["eps"], eps_in_sqrt=False, bias_correction=True),
        optax.add_decayed_weights(hp["weight_decay"]),
        optax.scale_by_learning_rate(lr),
    )
    averaging_lr = (lambda count: lr(count - 1)) if callable(lr) else lr
    return optax.contrib.schedule_free(
        base, averaging_lr, b1=hp["b1"], weight_lr_power=hp["weight_lr_power"]
    )


def soap_available() -> bool:
    """Whether ``cbs.train.soap`` imports (it is written separately)."""
    try:
        from cbs.train.soap import soap  # noqa: F401

        return True
    except Exception:  # noqa: BLE001 - any import failure means "not available"
        return False


BUILDERS: dict[str, Callable | None] = {
    "sgd": lambda lr, hp: _sgd(lr, hp),
    "momentum": lambda lr, hp: _sgd(lr, hp, momentum=True),
    "nesterov": lambda lr, hp: _sgd(lr, hp, momentum=True, nesterov=True),
    "adam": lambda lr, hp: optax.adam(lr, b1=hp["b1"], b2=hp["b2"], eps=hp["eps"]),
    "adamw": lambda lr, hp: optax.adamw(
        lr, b1=hp["b1"], b2=hp["b2"], eps=hp["eps"], weight_decay=hp["weight_decay"]
    ),
    # Relative step sizes (multiply_by_parameter_scale) and update clipping are Adafactor's
    # own defaults; the LR is then relative to the parameter RMS.
    "adafactor": lambda lr, hp: optax.adafactor(
        lr, decay_rate=hp["decay_rate"], eps=hp["eps"], weight_decay_rate=hp["weight_decay"]
    ),
    "lion": lambda lr, hp: optax.lion(
        lr, b1=hp["b1"], b2=hp["b2"], weight_decay=hp["weight_decay"]
    ),
    "signum": lambda lr, hp: optax.signum(lr, beta=hp["momentum"]),
    # Hidden weight matrices (attention and MLP kernels, conv filters; reshaped to 2-D)
    # get Newton-Schulz orthogonalised momentum; embeddings, the read-out, biases and norms
    # get AdamW (see muon_dimension_numbers).
    "muon": lambda lr, hp: _muon(lr, hp),
    "soap": _soap,
    "shampoo": _shampoo,
    "adalayer": _adalayer,
    "ademamix": _ademamix,
    "simplified_ademamix": _simplified_ademamix,
    "sophia": _sophia,
    "schedule_free_adamw": _schedule_free_adamw,
    "kfac": None,
}

OPTIMIZERS: dict[str, OptimizerSpec] = {
    "sgd": OptimizerSpec(
        "plain SGD (optax.sgd), optional coupled L2",
        dict(weight_decay=_L2, ema_decay=_EMA),
        example_lr=0.3,
    ),
    "momentum": OptimizerSpec(
        "heavy-ball momentum SGD (optax.sgd(momentum=...))",
        dict(momentum=_MOM, weight_decay=_L2, ema_decay=_EMA),
        example_lr=0.1,
    ),
    "nesterov": OptimizerSpec(
        "Nesterov momentum SGD (optax.sgd(nesterov=True))",
        dict(momentum=_MOM, weight_decay=_L2, ema_decay=_EMA),
        example_lr=0.1,
    ),
    "adam": OptimizerSpec(
        "Adam (optax.adam)",
        dict(**_adam_moments(), ema_decay=_EMA),
        example_lr=0.01,
    ),
    "adamw": OptimizerSpec(
        "AdamW (optax.adamw), decoupled weight decay",
        dict(
            **_adam_moments(),
            weight_decay=HParamSpec(1e-4, "decoupled weight decay (times the LR)", ge=0),
            ema_decay=_EMA,
        ),
        example_lr=0.01,
    ),
    "adafactor": OptimizerSpec(
        "Adafactor (optax.adafactor; relative step size, update clipping 1)",
        dict(
            decay_rate=HParamSpec(
                0.8, "second-moment decay exponent (beta2_t = 1 - t**-decay_rate)", ge=0, le=1
            ),
            eps=HParamSpec(1e-30, "regulariser of the squared gradient", gt=0),
            weight_decay=_WD,
            ema_decay=_EMA,
        ),
        example_lr=0.03,
    ),
    "lion": OptimizerSpec(
        "Lion (optax.lion)",
        dict(
            b1=HParamSpec(0.9, "interpolation of the update direction", ge=0, le=1),
            b2=HParamSpec(0.99, "momentum decay", ge=0, le=1),
            weight_decay=_WD,
            ema_decay=_EMA,
        ),
        example_lr=0.01,
    ),
    "signum": OptimizerSpec(
        "Signum: sign of momentum (optax.signum)",
        dict(momentum=HParamSpec(0.9, "momentum decay", ge=0, lt=1), ema_decay=_EMA),
        example_lr=0.01,
    ),
    "muon": OptimizerSpec(
        "Muon (optax.contrib.scale_by_muon, Nesterov): orthogonalised momentum on hidden "
        "weight matrices (attention/MLP kernels, conv filters), plain AdamW (not "
        "optax.contrib.muon's NAdamW) on embeddings, read-out, biases, norms",
        dict(
            momentum=HParamSpec(0.95, "Muon momentum (Nesterov)", ge=0, lt=1),
            b1=HParamSpec(0.9, "AdamW b1 (embeddings, read-out, biases, norms)", ge=0, lt=1),
            b2=HParamSpec(0.999, "AdamW b2 (embeddings, read-out, biases, norms)", ge=0, lt=1),
            eps=HParamSpec(1e-8, "epsilon", gt=0),
            adam_lr_ratio=HParamSpec(1.0, "AdamW group's LR / Muon's LR", gt=0),
            weight_decay=HParamSpec(
                0.0, "decoupled weight decay of both groups (multiplied by the LR)", ge=0
            ),
            ema_decay=_EMA,
        ),
        example_lr=0.02,
    ),
    "soap": OptimizerSpec(
        "SOAP (cbs.train.soap): Adam in Shampoo's eigenbasis",
        dict(
            **_adam_moments(b1=0.95, b2=0.95),
            weight_decay=_WD,
            ema_decay=_EMA,
        ),
        example_lr=0.01,
    ),
    "shampoo": OptimizerSpec(
        "Shampoo (cbs.train.shampoo): L^-1/4 G R^-1/4 on every matrix (roots recomputed "
        "every 10 steps), step size grafted from Adam (graft_b2 < 1) or AdaGrad "
        "(graft_b2 = 1) per leaf; vectors take the graft",
        dict(
            b1=HParamSpec(0.9, "decay of the filtered gradient (first moment)", ge=0, lt=1),
            b2=HParamSpec(
                0.999, "decay of the Kronecker factors L, R (1 = running sums)", gt=0, le=1
            ),
            eps=HParamSpec(1e-8, "ridge added to L and R before the inverse 4th root", gt=0),
            graft_b2=HParamSpec(
                0.999, "second-moment decay of the Adam graft (1 = AdaGrad graft)", gt=0, le=1
            ),
            graft_eps=HParamSpec(1e-8, "denominator epsilon of the graft", gt=0),
            weight_decay=_WD,
            ema_decay=_EMA,
        ),
        example_lr=0.01,
    ),
    "adalayer": OptimizerSpec(
        "Adalayer (cbs.train.adalayer): Adam with one second moment per leaf (per output "
        "unit for the read-out kernel)",
        dict(**_adam_moments(), weight_decay=_WD, ema_decay=_EMA),
        example_lr=0.01,
    ),
    "ademamix": OptimizerSpec(
        "AdEMAMix (optax.contrib.ademamix): Adam plus a slow momentum (b3) mixed in by "
        "alpha, with the paper's warm-ups of alpha and b3",
        dict(
            b1=HParamSpec(0.9, "fast first-moment decay", gt=0, lt=1),
            b2=HParamSpec(0.999, "second-moment decay", ge=0, lt=1),
            b3=HParamSpec(0.9999, "slow first-moment decay", gt=0, lt=1),
            alpha=HParamSpec(5.0, "weight of the slow momentum", ge=0),
            warmup_steps=HParamSpec(
                0.0,
                "steps over which alpha and b3 warm up (the paper: the run's length; 0 = off)",
                ge=0,
                lt=2**31,  # a step count: below the engine's 32-bit step counter
            ),
            eps=HParamSpec(1e-8, "denominator epsilon", gt=0),
            weight_decay=_WD,
            ema_decay=_EMA,
        ),
        example_lr=0.01,
    ),
    "simplified_ademamix": OptimizerSpec(
        "Simplified AdEMAMix (optax.contrib.simplified_ademamix): (alpha g + m) / sqrt(v), "
        "m = b1 m + g",
        dict(
            b1=HParamSpec(0.99, "momentum decay (m = b1 m + g, no 1 - b1)", ge=0, lt=1),
            b2=HParamSpec(0.95, "second-moment decay", ge=0, lt=1),
            alpha=HParamSpec(0.0, "weight of the current gradient", ge=0),
            eps=HParamSpec(1e-8, "denominator epsilon", gt=0),
            weight_decay=_WD,
            ema_decay=_EMA,
        ),
        example_lr=0.001,
    ),
    "sophia": OptimizerSpec(
        "Sophia-H (optax.contrib.sophia): momentum over a Hutchinson Hessian-diagonal "
        "estimate refreshed every update_interval steps, clipped element-wise",
        dict(
            b1=HParamSpec(0.965, "momentum decay", ge=0, lt=1),
            b2=HParamSpec(0.99, "decay of the Hessian-diagonal EMA", ge=0, lt=1),
            eps=HParamSpec(1e-8, "floor of gamma * h", gt=0),
            gamma=HParamSpec(0.01, "scale of the Hessian diagonal (the paper's rho)", gt=0),
            clip_threshold=HParamSpec(1.0, "element-wise clip of the update", gt=0),
            update_interval=HParamSpec(
                10.0,
                "steps between Hessian-diagonal estimates (an integer)",
                ge=1,
                lt=2**31,  # a step count: below the engine's 32-bit step counter
            ),
            weight_decay=HParamSpec(1e-4, "decoupled weight decay (times the LR)", ge=0),
            ema_decay=_EMA,
        ),
        example_lr=0.01,
    ),
    "schedule_free_adamw": OptimizerSpec(
        "schedule-free AdamW (optax.contrib.schedule_free_adamw), evaluated at its "
        "averaged point x",
        dict(
            b1=HParamSpec(0.9, "interpolation y = (1 - b1) z + b1 x", gt=0, lt=1),
            b2=HParamSpec(0.999, "second-moment decay", ge=0, lt=1),
            eps=HParamSpec(1e-8, "denominator epsilon", gt=0),
            weight_lr_power=HParamSpec(
                2.0, "averaging weight of a step = max LR so far ** this", ge=0
            ),
            weight_decay=_WD,
            ema_decay=_EMA,
        ),
        example_lr=0.03,
    ),
    "kfac": OptimizerSpec(
        "K-FAC (kfac-jax 0.0.8), fixed LR/momentum/damping; cells run one after another",
        dict(
            momentum=HParamSpec(0.0, "momentum of the K-FAC update", ge=0, lt=1),
            damping=HParamSpec(1e-2, "Tikhonov damping of the curvature", gt=0),
            weight_decay=HParamSpec(0.0, "L2 regularisation (kfac-jax l2_reg)", ge=0),
            burnin_steps=HParamSpec(
                0.0,
                "curvature-only batches before the first update (an integer; each counts "
                "as a step of batch_size examples; 0 = off)",
                ge=0,
            ),
            ema_decay=_EMA,
        ),
        example_lr=0.1,
    ),
}


# Kinds whose builder takes the block's shared step (see build_optimizer).
STEP_AWARE = frozenset({"soap", "shampoo"})

# Kinds whose update needs the batch's loss as a function of the params (``obj_fn``):
# Sophia's Hessian-diagonal estimate differentiates it twice.
NEEDS_OBJECTIVE = frozenset({"sophia"})


def _identity_point(params, opt_state):
    del opt_state
    return params


# Where a kind's model is evaluated, given the trained params and the optimizer state.
# Schedule-free methods train at y and evaluate at the average x = (y - (1 - b1) z) / b1.
EVAL_POINT: dict[str, Callable] = {
    "schedule_free_adamw": lambda params, opt_state: optax.contrib.schedule_free_eval_params(
        opt_state, params
    ),
}


def evaluation_point(kind: str) -> Callable:
    """``point(params, opt_state) -> params`` at which cells of ``kind`` are evaluated
    (validation metrics, the exact-crossing replay, the weights' EMA): the params
    themselves except for schedule-free AdamW, whose averaged point is evaluated."""
    return EVAL_POINT.get(kind, _identity_point)


def build_optimizer(
    kind: str,
    learning_rate: Callable,
    hp: Mapping[str, jax.Array],
    block_step: jax.Array | None = None,
) -> optax.GradientTransformation:
    """The Optax transform of ``kind`` with (possibly traced) hyperparameters ``hp``.

    ``block_step``: the step shared by all cells of a vmapped block (unbatched), which
    equals each live cell's own update count. Kinds in :data:`STEP_AWARE` use it to keep
    step-dependent branching (SOAP's basis refresh) a real conditional under ``vmap``;
    the others ignore it.
    """
    builder = BUILDERS[kind]
    if builder is None:
        raise ValueError(
            f"optimizer kind {kind!r} has no Optax transform (runs through its own loop)"
        )
    if kind in STEP_AWARE:
        return builder(learning_rate, hp, block_step=block_step)
    return builder(learning_rate, hp)


def schedule_fn(schedule, max_steps: int) -> Callable[[jax.Array], jax.Array]:
    """The LR multiplier ``m(step)`` (peak 1) of a :class:`cbs.sweep.config.Schedule`.

    The cell's LR is ``lr * m(step)`` with ``lr`` traced, so the schedule's shape is
    static per block and the LR still varies across cells. The definition is the one
    ``cbs.sweep.config.Schedule`` states for every back end (the NQM's
    ``schedule_phases`` gives the same multiplier at every step): warm-up is linear,
    ``(t + 1) / warmup_steps`` at step ``t`` (no wasted step at LR 0); then the kind's
    own clock ``s = t - warmup_steps`` runs, so ``step`` boundaries, ``piecewise``
    lengths and ``horizon`` count after the warm-up. Cosine and linear decay are
    evaluated at ``s + 0.5`` and reach ``final_lr_fraction`` at ``s = horizon``
    (default ``max_steps - warmup_steps``).

    Args:
      schedule: a Schedule (or None for constant).
      max_steps: the budget; the decay's default horizon is what remains after warm-up.
    """
    if schedule is None:
        return lambda step: jnp.ones((), jnp.float32)
    kind, warm = schedule.kind, schedule.warmup_steps
    horizon = schedule.horizon or max(1, max_steps - warm)
    if kind == "constant":
        rest = lambda s: jnp.ones((), jnp.float32)  # noqa: E731
    elif kind == "cosine":
        cos = optax.cosine_decay_schedule(1.0, horizon, alpha=schedule.final_lr_fraction)
        rest = lambda s: cos(s + 0.5)  # noqa: E731
    elif kind == "linear_decay":
        lin = optax.linear_schedule(1.0, schedule.final_lr_fraction, horizon)
        rest = lambda s: lin(s + 0.5)  # noqa: E731
    elif kind == "step":
        rest = optax.piecewise_constant_schedule(
            1.0, {int(b): schedule.decay_factor for b in schedule.boundaries}
        )
    elif kind == "piecewise":
        if not schedule.pieces:
            raise ValueError("a piecewise schedule needs pieces [[steps, lr_multiplier], ...]")
        ends = jnp.cumsum(jnp.array([p[0] for p in schedule.pieces], jnp.float32))
        mults = jnp.array([p[1] for p in schedule.pieces], jnp.float32)
        rest = lambda s: mults[
            jnp.minimum(jnp.searchsorted(ends, s, side="right"), len(schedule.pieces) - 1)
        ]  # noqa: E731
    else:
        raise ValueError(f"schedule kind {kind!r} is not supported by the train back end")

    def m(step):
        step = jnp.asarray(step, jnp.float32)
        after = rest(jnp.maximum(step - warm, 0.0))
        if warm == 0:
            return jnp.asarray(after, jnp.float32)
        return jnp.where(step < warm, (step + 1.0) / warm, after).astype(jnp.float32)

    return m
