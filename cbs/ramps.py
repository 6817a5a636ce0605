"""Batch-size schedules (ramps and Seesaw): one definition for every back end.

A cell starts at its grid batch size ``B``. Its schedule is a function of the *samples
consumed so far*, not of the step count: at every step ``t`` the cell has consumed
``n_t`` examples, and the step's LR multiplier and batch size are those of the sample
position ``n_t``. Counting in samples is what makes schedules comparable at equal data:
a ramp that doubles the batch takes half the serial steps through a phase, but the phase
covers the same examples as the constant-batch schedule it replaces.

The base LR schedule (``cbs.sweep.config.Schedule``'s kinds, whose lengths count steps at
the constant batch ``B``) is read on the *base clock* ``u_t = n_t / B``: the number of
constant-``B`` steps that would have consumed the same examples. Batch multipliers are
integers, so ``u_t`` is an integer and the base multiplier is evaluated exactly where the
constant-batch run would evaluate it.

Two ways to ramp the batch (``docs/ramps.md``):

* ``schedule.ramp``: explicit phases ``{samples, lr_mult, batch_mult}``; a phase lasts
  ``samples`` examples (tokens with ``analysis.tokens_per_example``), the last one until
  the budget ends. Its LR multiplier multiplies the base schedule's.
* ``schedule.seesaw``: wherever the base schedule has halved the LR ``k`` times, the
  batch is doubled ``k`` times instead and the LR multiplied by ``2**(-q k)``, with
  ``q = 0`` for SGD, momentum and Nesterov and ``q = 1/2`` for adaptive / normalized
  updates (:func:`seesaw_exponent`). Cosine and linear decay are first rounded down to a
  power of two. Beyond ``max_batch_size`` the remaining halvings stay LR decays.

A phase boundary falls between steps: step ``t`` belongs to the phase containing
``n_t``, so a step that starts before a boundary runs entirely at the old batch size (a
phase may thus consume up to one step's batch more than its length; a phase shorter than
one step of its batch may be skipped).

:func:`ramp_plan` turns (schedule, B, budget) into a :class:`RampPlan`: constant
(steps, LR multiplier, batch multiplier) phases in serial steps, what the NQM's exact
dynamics compose and what the train loop runs phase by phase.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

__all__ = [
    "LINEAR_KINDS",
    "RampPlan",
    "base_regions",
    "is_ramped",
    "ramp_plan",
    "seesaw_exponent",
    "halvings",
]

# Optimizers whose update is linear in the gradient: for them, on a quadratic (and to
# first order anywhere), halving the LR and doubling the batch change the update's mean by
# the same factor and its noise variance by the same factor (docs/ramps.md), so q = 0.
LINEAR_KINDS = frozenset({"sgd", "momentum", "nesterov"})


def seesaw_exponent(kind: str, override: float | None = None) -> float:
    """q of the Seesaw rule (LR x 2**-q per batch doubling): the override when given, else
    0 for the linear-in-the-gradient kinds (:data:`LINEAR_KINDS`) and 1/2 for every other
    kind (adaptive / normalized updates: Adam, AdamW, Lion, Signum, Adafactor, SOAP, Muon,
    and any kind added to the registry that is not plain SGD)."""
    if override is not None:
        return float(override)
    return 0.0 if kind in LINEAR_KINDS else 0.5


def is_ramped(schedule) -> bool:
    """Whether the schedule changes the batch size (an explicit ramp or Seesaw)."""
    return schedule is not None and (bool(getattr(schedule, "ramp", None)) or schedule.seesaw)


def base_regions(schedule, max_steps: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The base LR multiplier as piecewise-constant regions of the base clock.

    Returns ``(starts, mult, warm)``: region ``r`` covers base steps
    ``[starts[r], starts[r + 1])`` (the last one is open) at multiplier ``mult[r]``;
    ``warm[r]`` marks warm-up regions (an increasing LR, never a halving). This is the
    definition ``cbs.sweep.config.Schedule`` states (warm-up ``(t + 1) / w``; cosine and
    linear decay at the middle of each step; ``final_lr_fraction`` from the horizon on).
    """
    starts: list[int] = []
    mult: list[float] = []
    warm: list[bool] = []
    w = schedule.warmup_steps if schedule is not None else 0
    for t in range(w):
        starts.append(t), mult.append((t + 1.0) / w), warm.append(True)
    kind = "constant" if schedule is None else schedule.kind
    if kind in ("constant", "optimized_pwc"):
        starts.append(w), mult.append(1.0), warm.append(False)
    elif kind == "step":
        for i, b in enumerate([0] + sorted(schedule.boundaries)):
            starts.append(w + int(b)), mult.append(schedule.decay_factor**i), warm.append(False)
    elif kind == "piecewise":
        at = w
        for s, m in schedule.pieces:
            starts.append(at), mult.append(float(m)), warm.append(False)
            at += int(s)
    elif kind in ("cosine", "linear_decay"):
        horizon = schedule.horizon or max(1, max_steps - w)
        f = schedule.final_lr_fraction
        x = (np.arange(horizon) + 0.5) / horizon
        shape = 0.5 * (1 + np.cos(np.pi * x)) if kind == "cosine" else 1 - x
        starts += list(w + np.arange(horizon))
        mult += list(f + (1 - f) * shape)
        warm += [False] * horizon
        starts.append(w + horizon), mult.append(f), warm.append(False)
    else:
        raise ValueError(f"unsupported schedule kind {kind!r}")
    return np.array(starts, np.int64), np.array(mult, np.float64), np.array(warm, bool)


def halvings(mult: np.ndarray, exact: bool) -> np.ndarray:
    """How many times the LR has been halved at each multiplier: ``-log2(m)``, which must
    be an integer when ``exact`` (step decay, piecewise) and is rounded down otherwise
    (cosine / linear decay, discretized at halvings). A multiplier of 0 counts as 60
    (callers treat it as an LR of 0, not as halvings)."""
    m = np.maximum(np.asarray(mult, np.float64), 2.0**-60)
    k = -np.log2(m)
    if exact:
        r = np.round(k)
        if np.any(np.abs(k - r) > 1e-9) or np.any(r < 0):
            raise ValueError("Seesaw needs LR multipliers that are powers of 1/2")
        return r.astype(np.int64)
    return np.maximum(np.floor(k + 1e-9), 0).astype(np.int64)


@dataclasses.dataclass(frozen=True)
class RampPlan:
    """A cell's schedule in serial steps: constant phases; the last one is open.

    ``steps[p]`` steps at LR multiplier ``lr_mult[p]`` (times the cell's LR) and batch
    ``batch_size * batch_mult[p]``; ``steps`` sums to the budget. ``start_samples[p]``:
    examples consumed before the phase starts.
    """

    batch_size: int
    steps: np.ndarray
    lr_mult: np.ndarray
    batch_mult: np.ndarray
    start_samples: np.ndarray

    @property
    def max_batch_mult(self) -> int:
        return int(self.batch_mult[self.steps > 0].max())

    def samples_after(self, t) -> np.ndarray:
        """Examples consumed by the first ``t`` steps (array-valued; NaN stays NaN)."""
        t = np.asarray(t, np.float64)
        ends = np.cumsum(self.steps)
        starts = ends - self.steps
        out = np.full(t.shape, np.nan)
        ok = np.isfinite(t)
        ti = t[ok]
        p = np.clip(np.searchsorted(ends, ti, side="left"), 0, len(ends) - 1)
        out[ok] = self.start_samples[p] + (ti - starts[p]) * self.batch_size * self.batch_mult[p]
        return out

    def lr_table(self) -> np.ndarray:
        """The LR multiplier of every step of the budget."""
        return np.repeat(self.lr_mult, self.steps).astype(np.float64)

    def batch_phases(self) -> list[tuple[int, int, int]]:
        """``(start_step, end_step, batch_size)`` of the runs of constant batch size."""
        out: list[list[int]] = []
        at = 0
        for n, b in zip(self.steps.tolist(), self.batch_mult.tolist()):
            if n <= 0:
                continue
            bs = int(self.batch_size * b)
            if out and out[-1][2] == bs:
                out[-1][1] += n
            else:
                out.append([at, at + n, bs])
            at += n
        return [tuple(x) for x in out]


def _ramp_regions(schedule, batch_size: int, tokens_per_example: int):
    """The explicit ramp's phases as regions of the base clock: (starts, lr, batch)."""
    starts, lrs, bms = [], [], []
    at = 0.0  # samples (examples or tokens) before the phase
    for ph in schedule.ramp:
        # step t is in the phase while n_t * tokens_per_example < boundary, i.e. while the
        # (integer) base clock u_t = n_t / B is below ceil(boundary / (B * tokens))
        starts.append(int(math.ceil(at / (batch_size * tokens_per_example) - 1e-12)))
        lrs.append(float(ph.lr_mult)), bms.append(int(ph.batch_mult))
        if ph.samples is not None:
            at += float(ph.samples)
    return np.array(starts, np.int64), np.array(lrs), np.array(bms, np.int64)


def ramp_plan(
    schedule,
    batch_size: int,
    max_steps: int,
    *,
    kind: str = "sgd",
    tokens_per_example: int = 1,
) -> RampPlan:
    """The serial-step phases of a cell at batch size ``batch_size`` (see the module doc).

    Args:
        schedule: a ``cbs.sweep.config.Schedule`` (None: constant).
        batch_size: the cell's starting batch size B (the grid's).
        max_steps: the budget in serial steps.
        kind: the optimizer kind (Seesaw's default exponent, :func:`seesaw_exponent`).
        tokens_per_example: ramp phase lengths count tokens when > 1.
    """
    starts, mult, warm = base_regions(schedule, max_steps)
    n_reg = len(starts)
    bm = np.ones(n_reg, np.int64)
    lr = mult.copy()
    if schedule is not None and schedule.seesaw:
        q = seesaw_exponent(kind, schedule.seesaw_q)
        k = np.zeros(n_reg, np.int64)
        k[~warm] = halvings(mult[~warm], exact=schedule.kind in ("step", "piecewise"))
        zero = ~warm & (mult <= 0)
        if schedule.kind in ("cosine", "linear_decay"):
            mult = np.where(warm, mult, 2.0**-k)  # the discretized base
        cap = schedule.max_batch_size
        kmax = 60 if cap is None else max(0, int(math.floor(math.log2(cap / batch_size) + 1e-12)))
        # an LR of 0 (a decay to final_lr_fraction 0) is no halving to trade: it stays 0
        # at the batch size already reached
        d = np.maximum.accumulate(np.where(zero, 0, np.minimum(k, kmax)))
        lr = np.where(warm, mult, 2.0 ** (-q * d) * 2.0 ** -(k - d).astype(np.float64))
        lr = np.where(zero, 0.0, lr)
        bm = 2**d
    if schedule is not None and getattr(schedule, "ramp", None):
        r_start, r_lr, r_bm = _ramp_regions(schedule, batch_size, tokens_per_example)
        edges = np.union1d(starts, r_start)
        bi = np.searchsorted(starts, edges, side="right") - 1
        ri = np.searchsorted(r_start, edges, side="right") - 1
        ok = bi >= 0
        edges, bi, ri = edges[ok], bi[ok], ri[ok]
        lr = lr[bi] * np.where(ri >= 0, r_lr[np.maximum(ri, 0)], 1.0)
        bm = bm[bi] * np.where(ri >= 0, r_bm[np.maximum(ri, 0)], 1)
        starts = edges
    # Walk the base clock: a region [u0, u1) at batch multiplier b lasts ceil((u1 - u) / b)
    # steps from the clock position u at which it is entered.
    steps, lrs, bms, s0 = [], [], [], []
    u, t, r = 0, 0, 0
    n_reg = len(starts)
    while t < max_steps:
        while r + 1 < n_reg and starts[r + 1] <= u:
            r += 1
        b = int(bm[r])
        n = max_steps - t
        if r + 1 < n_reg:
            n = min(n, -(-(int(starts[r + 1]) - u) // b))
        if steps and lrs[-1] == lr[r] and bms[-1] == b:
            steps[-1] += n
        else:
            steps.append(n), lrs.append(float(lr[r])), bms.append(b), s0.append(u * batch_size)
        u += n * b
        t += n
    return RampPlan(
        int(batch_size),
        np.array(steps, np.int64),
        np.array(lrs, np.float64),
        np.array(bms, np.int64),
        np.array(s0, np.float64),
    )
