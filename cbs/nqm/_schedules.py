"""LR and batch-size schedules as constant phases (what the exact dynamics compose).

Every schedule becomes :class:`Phases`: (steps, LR multiplier, batch multiplier) per phase,
the last phase lasting until the budget ends. Constant, step decay, piecewise and batch
ramps are exactly piecewise constant. Linear warm-up, cosine and linear decay change the
LR every step; they are represented step by step (exact) while that needs at most
``max_phases`` phases, and otherwise by ``max_phases`` equal pieces at each piece's
mean LR (an approximation, reported by :func:`schedule_phases`'s ``exact`` flag).

Batch ramps and Seesaw (``schedule.ramp``, ``schedule.seesaw``) are counted in samples,
so their phases depend on the cell's batch size: :func:`schedule_phases` then needs
``batch_size`` and takes the phases of :func:`cbs.ramps.ramp_plan`, the definition every
back end shares (docs/ramps.md).
"""

from __future__ import annotations

import numpy as np

from cbs.nqm._moments import Phases
from cbs.ramps import is_ramped, ramp_plan

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


def _smooth(values: np.ndarray, max_phases: int) -> tuple[list, list, bool]:
    """Per-step multipliers -> at most max_phases (steps, mean multiplier) pieces."""
    n = len(values)
    if n <= max_phases:
        return [1] * n, list(values), True
    edges = np.linspace(0, n, max_phases + 1).round().astype(int)
    steps = list(np.diff(edges))
    means = [float(values[a:b].mean()) for a, b in zip(edges[:-1], edges[1:])]
    return steps, means, False


def _ramp_phases(
    schedule, max_steps: int, max_phases: int, batch_size, kind: str, tokens_per_example: int
) -> tuple[Phases, bool]:
    plan = ramp_plan(
        schedule, int(batch_size), max_steps, kind=kind, tokens_per_example=tokens_per_example
    )
    steps, lrs, bs = plan.steps, plan.lr_mult, plan.batch_mult.astype(np.float64)
    if len(steps) <= max_phases:
        return merge_phases(steps, lrs, bs), True
    # Too many phases (a warm-up or smooth decay tabulated step by step): within each run of
    # constant batch size, equal pieces at their step-weighted mean LR, as _smooth does.
    runs = np.flatnonzero(np.r_[True, bs[1:] != bs[:-1]])
    ends = np.r_[runs[1:], len(bs)]
    share = max(1, max_phases // len(runs))
    out_s, out_l, out_b = [], [], []
    for a, b in zip(runs, ends):
        per_step = np.repeat(lrs[a:b], steps[a:b])
        s_, l_, _ = _smooth(per_step, share)
        out_s += s_
        out_l += l_
        out_b += [bs[a]] * len(s_)
    return merge_phases(out_s, out_l, out_b), False


def schedule_phases(
    schedule,
    max_steps: int,
    max_phases: int = 256,
    *,
    batch_size=None,
    optimizer_kind: str = "sgd",
    tokens_per_example: int = 1,
) -> tuple[Phases, bool]:
    """Phases of a cbs.sweep.config.Schedule (``None`` = constant).

    Args:
        schedule: the optimizer entry's Schedule (kind constant, step, cosine, linear_decay,
            piecewise; optimized_pwc is handled by the tuner, not here).
        max_steps: the budget; cosine / linear decay default to ``max_steps - warmup_steps``
            steps after the warm-up (the definition: cbs.sweep.config.Schedule).
        max_phases: most phases used to represent a per-step-varying stretch.
        batch_size, optimizer_kind, tokens_per_example: the cell's batch size, optimizer kind and
            tokens per example; needed (batch_size) only by batch ramps and Seesaw, whose
            phases count samples (:func:`cbs.ramps.ramp_plan`).

    Returns:
        (phases, exact): exact is False when a smooth stretch was coarse-grained.
    """
    if schedule is None:
        return Phases(np.array([1], np.int64), np.array([1.0]), np.array([1.0])), True
    if is_ramped(schedule):
        if batch_size is None:
            raise ValueError("a batch ramp / Seesaw schedule needs the cell's batch_size")
        return _ramp_phases(
            schedule, max_steps, max_phases, batch_size, optimizer_kind, tokens_per_example
        )
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
    if kind in ("constant", "optimized_pwc"):
        base = [(1, 1.0, 1.0)]
    elif kind == "step":
        bounds = [0] + sorted(schedule.boundaries)
        base = []
        for i, b0 in enumerate(bounds):
            length = bounds[i + 1] - b0 if i + 1 < len(bounds) else 1
            base.append((length, schedule.decay_factor**i, 1.0))
    elif kind == "piecewise":
        if not schedule.pieces:
            raise ValueError("piecewise schedule needs pieces [[steps, lr_mult], ...]")
        base = [(int(s), float(m), 1.0) for s, m in schedule.pieces]
    elif kind in ("cosine", "linear_decay"):
        horizon = schedule.horizon or max(1, max_steps - schedule.warmup_steps)
        f = schedule.final_lr_fraction
        t = np.arange(horizon) + 0.5
        shape = 0.5 * (1 + np.cos(np.pi * t / horizon)) if kind == "cosine" else 1 - t / horizon
        mult = f + (1 - f) * shape
        s, l, ex = _smooth(mult, max_phases)
        exact = exact and ex
        base = [(si, li, 1.0) for si, li in zip(s, l)]
        base.append((1, f, 1.0))
    else:
        raise ValueError(f"unsupported schedule kind {kind!r}")
    for length, m, g in base:
        steps.append(length), lrs.append(m), bs.append(g)
    return merge_phases(steps, lrs, bs), exact
