"""Vectorized evaluation of many NQM configurations: risk curves and steps to target.

All functions take a :class:`NQMProblem` and flat per-configuration arrays (LR, momentum,
EMA decay, preconditioner power) of one common length C, plus batch sizes, and run every
configuration x batch size in one compiled program (``lax.map`` over chunks of
configurations, each chunk vmapped; batch sizes vectorized inside, sharing the
configuration's B-independent power tables).
"""

from __future__ import annotations

import functools
from concurrent.futures import ThreadPoolExecutor

import jax
import jax.numpy as jnp
import numpy as np

from cbs import devices
from cbs.nqm._crossing import search_steps
from cbs.nqm._moments import Phases, constant_phases, expected_risk_curve
from cbs.nqm._problem import NQMProblem

__all__ = ["evaluate_grid", "steps_to_target", "expected_risk", "num_levels"]


def num_levels(max_steps: int) -> int:
    """K with 2^K > max_steps: the binary-powering depth."""
    return max(1, int(max_steps).bit_length())


def _prob(problem: NQMProblem):
    return tuple(jnp.asarray(x) for x in (problem.h, problem.c, problem.m0, problem.loss_weights))


def _padded(phases: Phases | None) -> Phases:
    """Phases padded to a power-of-two count with empty phases before the open last one, so
    that schedules of similar length share one compiled program."""
    phases = constant_phases() if phases is None else phases
    P = len(phases.steps)
    pad = (1 << (P - 1).bit_length()) - P
    ins = lambda x, v: np.concatenate([x[:-1], np.full(pad, v, x.dtype), x[-1:]])
    return Phases(
        ins(np.asarray(phases.steps, np.int64), 0),
        ins(np.asarray(phases.lr_mult, np.float64), 1.0),
        ins(np.asarray(phases.batch_mult, np.float64), 1.0),
    )


def _as_configs(lr, momentum, ema_decay, precond_power):
    arrs = np.broadcast_arrays(
        *(
            np.atleast_1d(np.asarray(x, np.float64))
            for x in (lr, momentum, ema_decay, precond_power)
        )
    )
    return [a.ravel() for a in arrs]


@functools.partial(
    jax.jit, static_argnames=("kind", "ema", "K", "window", "chunk", "certify", "max_iter")
)
def _grid(
    prob,
    cfg,
    batch,
    phases,
    target,
    max_steps,
    *,
    kind,
    ema,
    K,
    window,
    chunk,
    certify=True,
    max_iter=0,
):
    def one(x):
        lr, beta, gamma, power, b = x
        return search_steps(
            prob,
            lr,
            beta,
            gamma,
            power,
            b,
            phases,
            target,
            max_steps,
            kind=kind,
            ema=ema,
            K=K,
            window=window,
            certify=certify,
            max_iter=max_iter,
        )

    lr, beta, gamma, power = cfg
    return jax.lax.map(one, (lr, beta, gamma, power, batch), batch_size=chunk)


def evaluate_grid(
    problem: NQMProblem,
    kind: str,
    lr,
    momentum=0.0,
    ema_decay=0.0,
    precond_power=0.0,
    *,
    batch_sizes,
    target: float,
    max_steps: int,
    phases: Phases | None = None,
    window: int = 16,
    chunk: int | None = None,
    threads: int | None = None,
    certify: bool = True,
    certify_iters: int | None = None,
    cost_hint=None,
) -> dict[str, np.ndarray]:
    """Steps to target for every configuration x batch size.

    Args:
        problem: the NQM.
        kind: "sgd", "momentum" or "nesterov".
        lr, momentum, ema_decay, precond_power: broadcastable arrays, flattened to C configs.
        batch_sizes: (nB,) shared by all configurations, or (C, nB) one row per configuration.
        target: risk to fall strictly below. max_steps: budget (censoring).
        phases: the LR / batch schedule (default constant). window: the exact scan after
            the bisection's crossing (settle step; see ``_crossing.search_steps``).
        chunk: configurations vmapped together (default: 4 on CPU, 64 on accelerators; on
            CPU small chunks keep the per-iteration state in cache: 0.55 s at 4 vs 1.4 s at 64
            for the Fig. 3a momentum grid). threads: parallel parts (default: :func:`cbs.devices.nqm_threads`).
        certify: run the certified first-crossing scan (default; False is faster and flags
            every cell uncertified). certify_iters: its iteration budget per configuration and
            phase (default 4 K + 2 window; see ``_crossing.search_steps``).
        cost_hint: (C,) expected cost per configuration (e.g. ``scan_iterations`` of a
            previous call at nearby points): configurations of similar cost are then vmapped
            together. Default: grouped by (momentum, EMA decay, LR, power). No result depends
            on it (each configuration is computed independently of its chunk's others).

    Returns:
        dict of (C, nB) numpy arrays: ``steps`` (first step with risk < target; NaN when not
        reached within max_steps), ``reached``, ``settle_step`` (one plus the last step with
        risk >= target in the scanned window; NaN if not reached), ``best`` (smallest risk
        among all evaluated steps), ``final`` (risk at max_steps), ``crossing_certified``
        (True when the certified scan proved ``steps`` is the first crossing, or that there is
        none within max_steps; see ``_crossing.search_steps``), ``steps_lower_bound`` (proven:
        no step before it has risk below target; equals ``steps`` for certified cells, NaN for
        certified censored ones; for uncertified cells the first crossing lies in
        [steps_lower_bound, steps]); and ``scan_iterations`` (C,), the certified scan's
        iterations per configuration (its cost; 0 without certify).
    """
    lr, beta, gamma, power = _as_configs(lr, momentum, ema_decay, precond_power)
    C = len(lr)
    batch = np.asarray(batch_sizes, np.float64)
    batch = np.broadcast_to(batch, (C, batch.shape[-1])) if batch.ndim == 1 else batch
    phases = _padded(phases)
    ema = bool(np.any(gamma > 0))
    chunk = chunk or devices.nqm_chunk()
    cols = [lr, beta, gamma, power, batch]
    # XLA's CPU loops here run on one core: split the configurations into equal parts (the
    # last padded by repetition, so all parts share one compiled program) run in threads.
    parts = max(1, min(threads or devices.nqm_threads(), C // chunk))
    size = -(-C // parts)
    # The certified scan (a while loop) runs per chunk until its slowest configuration is
    # done: order configurations by their cost hint, else by (momentum, EMA decay, LR,
    # power), so that similar ones (similar iteration counts) share chunks, and deal them
    # round-robin to the parts.
    order = (
        np.lexsort((power, lr, gamma, beta))
        if cost_hint is None
        else np.argsort(np.asarray(cost_hint), kind="stable")
    )
    idx = order[np.minimum(np.arange(parts * size), C - 1)].reshape(size, parts).T

    def run(rows):
        with jax.enable_x64(True):
            out = _grid(
                _prob(problem),
                tuple(jnp.asarray(x[rows]) for x in cols[:4]),
                jnp.asarray(batch[rows]),
                Phases(*(jnp.asarray(p) for p in phases)),
                jnp.float64(target),
                jnp.int64(max_steps),
                kind=kind,
                ema=ema,
                K=num_levels(max_steps),
                window=window,
                chunk=min(chunk, size),
                certify=certify,
                max_iter=certify_iters or 0,
            )
            return jax.tree.map(np.asarray, out)

    if parts == 1:
        outs = [run(idx[0])]
    else:
        with ThreadPoolExecutor(parts) as pool:
            outs = list(pool.map(run, idx))
    out = {}
    for k in outs[0]:
        vals = np.concatenate([o[k] for o in outs])
        res = np.empty((C,) + vals.shape[1:], vals.dtype)
        res[idx.ravel()] = vals  # repeated padding rows write the same values
        out[k] = res
    reached = out["steps"] >= 0
    return dict(
        steps=np.where(reached, out["steps"], np.nan).astype(np.float64),
        reached=reached,
        settle_step=np.where(reached, out["settle"], np.nan).astype(np.float64),
        best=out["best"],
        final=out["final"],
        crossing_certified=out["certified"],
        steps_lower_bound=np.where(
            out["certified"], np.where(reached, out["steps"], np.nan), out["lower"]
        ).astype(np.float64),
        scan_iterations=out["iters"],
    )


# (Its signature repeats evaluate_grid's on purpose: a public function whose parameters
# help() and the docs show by name, rather than **kwargs.)
def steps_to_target(
    problem: NQMProblem,
    kind: str,
    lr,
    momentum=0.0,
    ema_decay=0.0,
    precond_power=0.0,
    *,
    batch_size,
    target: float,
    max_steps: int,
    phases: Phases | None = None,
    window: int = 16,
) -> np.ndarray:
    """First step t <= max_steps with expected risk strictly below target (NaN if none).

    Exact integer; see ``cbs.nqm._crossing.search_steps`` for how the first crossing is
    guaranteed (certified) when the risk is not monotone; ``evaluate_grid`` returns the
    per-cell flag ``crossing_certified``. Returns shape (C, nB) like :func:`evaluate_grid`.
    """
    return evaluate_grid(
        problem,
        kind,
        lr,
        momentum,
        ema_decay,
        precond_power,
        batch_sizes=np.atleast_1d(batch_size),
        target=target,
        max_steps=max_steps,
        phases=phases,
        window=window,
    )["steps"]


@functools.partial(jax.jit, static_argnames=("kind", "ema", "K"))
def _curves(prob, cfg, batch, phases, steps, *, kind, ema, K):
    def one(x):
        lr, beta, gamma, power, b = x
        return expected_risk_curve(
            prob, lr, beta, gamma, power, b, phases, steps, kind=kind, ema=ema, K=K
        )

    return jax.lax.map(one, (*cfg, batch), batch_size=64)


def expected_risk(
    problem: NQMProblem,
    kind: str,
    lr,
    momentum=0.0,
    ema_decay=0.0,
    precond_power=0.0,
    *,
    batch_sizes,
    steps,
    phases: Phases | None = None,
) -> np.ndarray:
    """Exact expected risk E[L(theta_t)] at the given steps, shape (C, nB, Q).

    L(t; B) = Det(t) + Noise(t) / B for constant phases; across phases the full second-moment
    state is carried, so schedules and batch ramps are exact too.
    """
    lr, beta, gamma, power = _as_configs(lr, momentum, ema_decay, precond_power)
    C = len(lr)
    batch = np.asarray(np.atleast_1d(batch_sizes), np.float64)
    batch = np.broadcast_to(batch, (C, batch.shape[-1])) if batch.ndim == 1 else batch
    steps = np.atleast_1d(np.asarray(steps, np.int64))
    phases = _padded(phases)
    # Pad the configurations (repeating the last) to a power of two >= 64: calls with similar
    # counts share one compiled program (a compile costs ~1.5 s, evaluating 200 curves ~0.07 s).
    pad = _bucket(C) - C
    cfg = [np.concatenate([x, np.repeat(x[-1:], pad, 0)]) for x in (lr, beta, gamma, power, batch)]
    with jax.enable_x64(True):
        out = _curves(
            _prob(problem),
            tuple(jnp.asarray(x) for x in cfg[:4]),
            jnp.asarray(cfg[4]),
            Phases(*(jnp.asarray(p) for p in phases)),
            jnp.asarray(steps),
            kind=kind,
            ema=bool(np.any(gamma > 0)),
            K=num_levels(int(steps.max())),
        )
        return np.asarray(out)[:C]


def _bucket(n: int, least: int = 64) -> int:
    return max(least, 1 << (int(n) - 1).bit_length())
