"""The paper's qualitative findings (Zhang et al. 2019) on the default binned problem."""

from __future__ import annotations

import numpy as np
import pytest

from cbs import nqm

PROBLEM = nqm.bin_problem(nqm.harmonic_problem())
TARGET = 0.01
BS = 2.0 ** np.arange(2, 21, 2)
SGD_LRS = np.logspace(-5, 0.5, 100)
MOM_LRS = np.logspace(-8, 1, 100)
DECAYS = 1 - np.logspace(-5, 0, 20)


def _best(kind, lrs, hp=None, hp_name="momentum", power=0.0, batch_sizes=BS, max_steps=10**9):
    kw = {}
    if hp is not None:
        L, H = np.meshgrid(lrs, hp, indexing="ij")
        lrs, kw = L.ravel(), {hp_name: H.ravel()}
    out = nqm.evaluate_grid(
        PROBLEM,
        kind,
        lrs,
        precond_power=power,
        batch_sizes=batch_sizes,
        target=TARGET,
        max_steps=max_steps,
        **kw,
    )
    return np.nanmin(out["steps"], axis=0)


@pytest.fixture(scope="module")
def sgd_steps():
    return {p: _best("sgd", SGD_LRS, power=p) for p in (0.0, 0.25, 0.5, 0.75)}


def _critical(steps, bs=BS, factor=2.0):
    """First B whose examples-to-target B * S(B) exceed `factor` times the smallest B's."""
    work = bs * steps
    over = np.flatnonzero(work > factor * work[0])
    return bs[over[0]] if len(over) else np.inf


def test_perfect_scaling_then_plateau(sgd_steps):
    s = sgd_steps[0.0]
    # perfect scaling well below the critical batch size: S(B) B constant within 10%
    work = s[:3] * BS[:3]
    assert np.max(work) / np.min(work) < 1.10
    # plateau well above it: quadrupling B changes S by less than 5%
    assert s[-2] / s[-1] < 1.05 and s[-3] / s[-1] < 1.10
    assert s[0] / s[-1] > 100


def test_stronger_preconditioning_raises_critical_batch_size(sgd_steps):
    cbs = [_critical(sgd_steps[p]) for p in (0.0, 0.25, 0.5, 0.75)]
    assert all(np.isfinite(cbs))
    assert cbs[0] < cbs[1] < cbs[2] < cbs[3]


def test_momentum_matches_sgd_at_small_batch_and_helps_at_large(sgd_steps):
    bs = BS[[0, -1]]
    mom = _best("momentum", MOM_LRS, DECAYS, batch_sizes=bs, max_steps=10**7)
    sgd = sgd_steps[0.0][[0, -1]]
    # small B: equal up to the ~15% under-damped effect documented in docs/nqm.md section 6
    assert 0.75 < mom[0] / sgd[0] <= 1.0
    # large B: momentum's larger stable effective LR cuts steps by a large factor
    assert mom[1] / sgd[1] < 0.2


def test_ema_helps_at_small_batch_not_at_large(sgd_steps):
    bs = BS[[0, -1]]
    ema = _best("sgd", MOM_LRS, DECAYS, hp_name="ema_decay", batch_sizes=bs, max_steps=10**7)
    sgd = sgd_steps[0.0][[0, -1]]
    assert ema[0] / sgd[0] < 0.5
    assert ema[1] / sgd[1] > 0.9


def test_optimized_schedule_closes_most_of_the_gap_at_small_batch(sgd_steps):
    bs = np.array([4.0, 2.0**20])
    pwc = nqm.optimize_pwc(
        PROBLEM, "sgd", bs, target=TARGET, max_steps=2 * 10**6, opt_steps=100, rel_tol=1e-2
    )
    const = sgd_steps[0.0][[0, -1]]
    lb = nqm.lower_bound_steps(PROBLEM, TARGET, bs)
    closed = (const[0] - pwc["steps"][0]) / (const[0] - lb[0])
    assert closed > 0.8
    # at large B a fixed LR is already (close to) optimal: the schedule gains under 5%
    assert pwc["steps"][1] > 0.95 * const[1]
    # the optimal schedule starts at its largest LR and decays
    assert np.all(np.diff(pwc["lrs"][0]) <= 1e-9)
