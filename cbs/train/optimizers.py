"""Optimizer registry and learning-rate schedules.

Each kind maps to an :class:`~cbs.sweep.backend.OptimizerSpec` (its hyperparameters with
defaults and bounds) and a builder ``build(learning_rate, hp) -> GradientTransformation``.
The builder is called *inside* the traced, vmapped train step with the cell's
hyperparameters as traced scalars, so one compiled program serves every (LR, momentum,
b2, weight decay, ...) combination of a block. This works because the Optax transforms
used here only do arithmetic with these values (no Python branching on them).

Every kind also takes ``ema_decay``: an exponential moving average of the weights that is
evaluated instead of the raw weights (0 = off), bias-corrected as in Zhang et al. 2024.

``kfac`` is special: kfac-jax's optimizer cannot run inside ``lax.scan`` and takes a
Python step counter, so the back end runs its cells one after another (see
:mod:`cbs.train.kfac`); its builder here is ``None``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import optax

from cbs.sweep.backend import HParamSpec, OptimizerSpec

__all__ = ["OPTIMIZERS", "BUILDERS", "build_optimizer", "soap_available", "schedule_fn"]

_EMA = HParamSpec(0.0, "EMA decay of the evaluated weights (0 = evaluate the raw weights)", ge=0, lt=1)
_WD = HParamSpec(0.0, "decoupled weight decay (multiplied by the LR, as in AdamW)", ge=0)
_L2 = HParamSpec(0.0, "L2 weight decay added to the gradient (coupled)", ge=0)
_MOM = HParamSpec(0.9, "momentum coefficient", ge=0, lt=1)


def _sgd(lr, hp, momentum=False, nesterov=False):
    # Coupled L2: the decay term goes through momentum, as in classic SGD + weight decay.
    return optax.chain(optax.add_decayed_weights(hp["weight_decay"]),
                       optax.sgd(lr, momentum=hp["momentum"] if momentum else None, nesterov=nesterov))


def _soap(lr, hp):
    from cbs.train.soap import soap
    return soap(lr, b1=hp["b1"], b2=hp["b2"], eps=hp["eps"], weight_decay=hp["weight_decay"])


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
    "adamw": lambda lr, hp: optax.adamw(lr, b1=hp["b1"], b2=hp["b2"], eps=hp["eps"],
                                        weight_decay=hp["weight_decay"]),
    # Relative step sizes (multiply_by_parameter_scale) and update clipping are Adafactor's
    # own defaults; the LR is then relative to the parameter RMS.
    "adafactor": lambda lr, hp: optax.adafactor(lr, decay_rate=hp["decay_rate"], eps=hp["eps"],
                                                weight_decay_rate=hp["weight_decay"]),
    "lion": lambda lr, hp: optax.lion(lr, b1=hp["b1"], b2=hp["b2"], weight_decay=hp["weight_decay"]),
    "signum": lambda lr, hp: optax.signum(lr, beta=hp["momentum"]),
    # 2-D weights get Newton-Schulz orthogonalised momentum; biases, norms, embeddings of
    # other ranks get Adam with the same LR (optax.contrib.muon's default split).
    "muon": lambda lr, hp: optax.contrib.muon(lr, beta=hp["momentum"], eps=hp["eps"],
                                              weight_decay=hp["weight_decay"], adam_b1=hp["b1"],
                                              adam_b2=hp["b2"]),
    "soap": _soap,
    "kfac": None,
}

OPTIMIZERS: dict[str, OptimizerSpec] = {
    "sgd": OptimizerSpec("plain SGD (optax.sgd), optional coupled L2",
                         dict(weight_decay=_L2, ema_decay=_EMA), example_lr=0.3),
    "momentum": OptimizerSpec("heavy-ball momentum SGD (optax.sgd(momentum=...))",
                              dict(momentum=_MOM, weight_decay=_L2, ema_decay=_EMA), example_lr=0.1),
    "nesterov": OptimizerSpec("Nesterov momentum SGD (optax.sgd(nesterov=True))",
                              dict(momentum=_MOM, weight_decay=_L2, ema_decay=_EMA), example_lr=0.1),
    "adam": OptimizerSpec("Adam (optax.adam)", dict(
        b1=HParamSpec(0.9, "first-moment decay", ge=0, lt=1),
        b2=HParamSpec(0.999, "second-moment decay", ge=0, lt=1),
        eps=HParamSpec(1e-8, "denominator epsilon", gt=0), ema_decay=_EMA), example_lr=0.01),
    "adamw": OptimizerSpec("AdamW (optax.adamw), decoupled weight decay", dict(
        b1=HParamSpec(0.9, "first-moment decay", ge=0, lt=1),
        b2=HParamSpec(0.999, "second-moment decay", ge=0, lt=1),
        eps=HParamSpec(1e-8, "denominator epsilon", gt=0),
        weight_decay=HParamSpec(1e-4, "decoupled weight decay (times the LR)", ge=0), ema_decay=_EMA), example_lr=0.01),
    "adafactor": OptimizerSpec("Adafactor (optax.adafactor; relative step size, update clipping 1)", dict(
        decay_rate=HParamSpec(0.8, "second-moment decay exponent (beta2_t = 1 - t**-decay_rate)", ge=0, le=1),
        eps=HParamSpec(1e-30, "regulariser of the squared gradient", gt=0),
        weight_decay=_WD, ema_decay=_EMA), example_lr=0.03),
    "lion": OptimizerSpec("Lion (optax.lion)", dict(
        b1=HParamSpec(0.9, "interpolation of the update direction", ge=0, le=1),
        b2=HParamSpec(0.99, "momentum decay", ge=0, le=1),
        weight_decay=_WD, ema_decay=_EMA), example_lr=0.01),
    "signum": OptimizerSpec("Signum: sign of momentum (optax.signum)",
                            dict(momentum=HParamSpec(0.9, "momentum decay", ge=0, lt=1), ema_decay=_EMA), example_lr=0.01),
    "muon": OptimizerSpec("Muon (optax.contrib.muon): orthogonalised momentum on 2-D weights, Adam elsewhere", dict(
        momentum=HParamSpec(0.95, "Muon momentum (Nesterov)", ge=0, lt=1),
        b1=HParamSpec(0.9, "Adam b1 for non-matrix parameters", ge=0, lt=1),
        b2=HParamSpec(0.999, "Adam b2 for non-matrix parameters", ge=0, lt=1),
        eps=HParamSpec(1e-8, "epsilon", gt=0), weight_decay=_WD, ema_decay=_EMA), example_lr=0.02),
    "soap": OptimizerSpec("SOAP (cbs.train.soap): Adam in Shampoo's eigenbasis", dict(
        b1=HParamSpec(0.95, "first-moment decay", ge=0, lt=1),
        b2=HParamSpec(0.95, "second-moment decay", ge=0, lt=1),
        eps=HParamSpec(1e-8, "denominator epsilon", gt=0), weight_decay=_WD, ema_decay=_EMA), example_lr=0.01),
    "kfac": OptimizerSpec("K-FAC (kfac-jax 0.0.8), fixed LR/momentum/damping; cells run one after another", dict(
        momentum=HParamSpec(0.0, "momentum of the K-FAC update", ge=0, lt=1),
        damping=HParamSpec(1e-2, "Tikhonov damping of the curvature", gt=0),
        weight_decay=HParamSpec(0.0, "L2 regularisation (kfac-jax l2_reg)", ge=0),
        ema_decay=_EMA), example_lr=0.1),
}


def build_optimizer(kind: str, learning_rate: Callable, hp: Mapping[str, jax.Array]) -> optax.GradientTransformation:
    """The Optax transform of ``kind`` with (possibly traced) hyperparameters ``hp``."""
    builder = BUILDERS[kind]
    if builder is None:
        raise ValueError(f"optimizer kind {kind!r} has no Optax transform (runs through its own loop)")
    return builder(learning_rate, hp)


def schedule_fn(schedule, max_steps: int) -> Callable[[jax.Array], jax.Array]:
    """The LR multiplier ``m(step)`` (peak 1) of a :class:`cbs.sweep.config.Schedule`.

    The cell's LR is ``lr * m(step)`` with ``lr`` traced, so the schedule's shape is
    static per block and the LR still varies across cells. Warm-up is linear and reaches
    the peak at step ``warmup_steps - 1`` (no wasted step at LR 0); the decay kinds start
    after warm-up and reach ``final_lr_fraction`` at ``horizon`` (default
    ``max_steps``). ``step`` boundaries and ``piecewise`` lengths count from step 0.

    Args:
      schedule: a Schedule (or None for constant).
      max_steps: the budget, the default horizon.
    """
    if schedule is None:
        return lambda step: jnp.ones((), jnp.float32)
    kind, warm = schedule.kind, schedule.warmup_steps
    horizon = schedule.horizon or max_steps
    decay_len = max(1, horizon - warm)
    if kind == "constant":
        rest = lambda t: jnp.ones((), jnp.float32)  # noqa: E731
    elif kind == "cosine":
        cos = optax.cosine_decay_schedule(1.0, decay_len, alpha=schedule.final_lr_fraction)
        rest = lambda t: cos(t - warm)  # noqa: E731
    elif kind == "linear_decay":
        lin = optax.linear_schedule(1.0, schedule.final_lr_fraction, decay_len)
        rest = lambda t: lin(t - warm)  # noqa: E731
    elif kind == "step":
        rest = optax.piecewise_constant_schedule(1.0, {int(b): schedule.decay_factor for b in schedule.boundaries})
    elif kind == "piecewise":
        if not schedule.pieces:
            raise ValueError("a piecewise schedule needs pieces [[steps, lr_multiplier], ...]")
        ends = jnp.cumsum(jnp.array([p[0] for p in schedule.pieces], jnp.float32))
        mults = jnp.array([p[1] for p in schedule.pieces], jnp.float32)
        rest = lambda t: mults[jnp.minimum(jnp.searchsorted(ends, t, side="right"), len(schedule.pieces) - 1)]  # noqa: E731
    else:
        raise ValueError(f"schedule kind {kind!r} is not supported by the train back end")

    def m(step):
        step = jnp.asarray(step, jnp.float32)
        w = jnp.minimum(1.0, (step + 1.0) / warm) if warm > 0 else 1.0
        return (w * rest(jnp.maximum(step, warm) if kind in ("cosine", "linear_decay") else step)).astype(jnp.float32)
    return m
