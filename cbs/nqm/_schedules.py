"""LR and batch-size schedules as constant phases (what the exact dynamics compose).

Every schedule becomes :class:`Phases`: (steps, LR multiplier, batch multiplier) per phase,
the last phase lasting until the budget ends. Constant, step decay, piecewise and batch
ramps are exactly piecewise constant. Linear warm-up, cosine and linear decay change the
LR every step; they are represented step by step (exact) while that needs at most
``max_phases`` phases, and otherwise by ``max_phases`` equal pieces at each piece's
mean LR (an approximation, reported by :func:`schedule_phases`'s ``exact`` flag).

Seesaw (Meterez et al. 2025): wherever the base schedule multiplies the LR by m < 1
(relative to its peak), Seesaw multiplies it by sqrt(m) and the batch size by 1/m. For
cosine and linear decay the base multiplier is first rounded down to a power of two, as
in the paper ("whenever the scheduler would halve the LR"), so B doubles in discrete steps.
"""

from __future__ import annotations

import math

import numpy as np

from cbs.nqm._moments import Phases

__all__ = ["schedule_phases", "merge_phases"]


def merge_phases(steps, lr_mult, batch_mult) -> Phases:
    """Phases with adjacent identical (LR, B) phases merged and empty ones dropped."""
    out_s, out_l, out_b = [], [], []
    for i, (s, l, b) in enumerate(zip(steps, lr_mult, batch_mult)):
        last = i == len(steps) - 1
        if s <= 0 and not last:
            continue
        if out_s and out_l[-1] == l and out_b[-1] == b:
            out_s[-1] += int(s)
            continue
        out_s.append(int(s)), out_l.append(float(l)), out_b.append(float(b))
    return Phases(np.array(out_s, np.int64), np.array(out_l), np.array(out_b))


def _growth(batch_growth, i: int) -> float:
    if not batch_growth:
        return 1.0
    return float(batch_growth[min(i, len(batch_growth) - 1)])


def _smooth(values: np.ndarray, max_phases: int) -> tuple[list, list, bool]:
    """Per-step multipliers -> at most max_phases (steps, mean multiplier) pieces."""
    n = len(values)
    if n <= max_phases:
        return [1] * n, list(values), True
    edges = np.linspace(0, n, max_phases + 1).round().astype(int)
    steps = list(np.diff(edges))
    means = [float(values[a:b].mean()) for a, b in zip(edges[:-1], edges[1:])]
    return steps, means, False


def schedule_phases(schedule, max_steps: int, max_phases: int = 256) -> tuple[Phases, bool]:
    """Phases of a cbs.sweep.config.Schedule (``None`` = constant).

    Args:
        schedule: the optimizer entry's Schedule (kind constant, step, cosine, linear_decay,
            piecewise; optimized_pwc is handled by the tuner, not here).
        max_steps: the budget; cosine / linear decay default to ``max_steps - warmup_steps``
            steps after the warm-up (the definition: cbs.sweep.config.Schedule).
        max_phases: most phases used to represent a per-step-varying stretch.

    Returns:
        (phases, exact): exact is False when a smooth stretch was coarse-grained.
    """
    if schedule is None:
        return Phases(np.array([1], np.int64), np.array([1.0]), np.array([1.0])), True
    kind = schedule.kind
    exact = True
    steps, lrs, bs = [], [], []
    if schedule.warmup_steps:
        w = schedule.warmup_steps
        # Step t (0-based) of the warm-up uses (t + 1) / w of the peak, so no step is wasted at LR 0.
        s, l, exact = _smooth((np.arange(w) + 1.0) / w, max_phases)
        steps += s
        lrs += l
        bs += [1.0] * len(s)
    seesaw = schedule.seesaw
    if kind in ("constant", "optimized_pwc"):
        base = [(1, 1.0, _growth(schedule.batch_growth, 0))]
    elif kind == "step":
        bounds = [0] + sorted(schedule.boundaries)
        base = []
        for i, b0 in enumerate(bounds):
            length = bounds[i + 1] - b0 if i + 1 < len(bounds) else 1
            base.append((length, schedule.decay_factor**i, _growth(schedule.batch_growth, i)))
    elif kind == "piecewise":
        if not schedule.pieces:
            raise ValueError("piecewise schedule needs pieces [[steps, lr_mult], ...]")
        base = [
            (int(s), float(m), _growth(schedule.batch_growth, i))
            for i, (s, m) in enumerate(schedule.pieces)
        ]
    elif kind in ("cosine", "linear_decay"):
        horizon = schedule.horizon or max(1, max_steps - schedule.warmup_steps)
        f = schedule.final_lr_fraction
        t = np.arange(horizon) + 0.5
        shape = 0.5 * (1 + np.cos(np.pi * t / horizon)) if kind == "cosine" else 1 - t / horizon
        mult = f + (1 - f) * shape
        if seesaw:
            # round down to powers of two; cap the batch growth at 2^20.
            k = np.minimum(np.floor(-np.log2(np.maximum(mult, 2.0**-20)) + 1e-12), 20)
            mult = 2.0**-k
            base, start = [], 0
            for i in range(1, horizon + 1):
                if i == horizon or mult[i] != mult[start]:
                    base.append((i - start, float(mult[start]), 1.0))
                    start = i
            f = max(f, 2.0**-20)
        else:
            s, l, ex = _smooth(mult, max_phases)
            exact = exact and ex
            base = [(si, li, 1.0) for si, li in zip(s, l)]
        base.append((1, f, 1.0))
    else:
        raise ValueError(f"unsupported schedule kind {kind!r}")
    for length, m, g in base:
        if seesaw and m < 1:
            lr, b = math.sqrt(m), g / m
        else:
            lr, b = m, g
        steps.append(length), lrs.append(lr), bs.append(b)
    return merge_phases(steps, lrs, bs), exact
