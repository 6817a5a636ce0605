"""steps_to_target against a brute-force scan of the step-by-step recurrence."""

from __future__ import annotations

import numpy as np
import pytest
from nqm_reference import constant_batch_risk as _brute

from cbs import nqm

PROBLEM = nqm.harmonic_problem(30)


def _first_below(r, target):
    idx = np.flatnonzero(r < target)
    return float(idx[0]) if len(idx) else np.nan


@pytest.mark.parametrize(
    "case",
    [
        ("sgd", 0.5, 0.0, 0.0, 0.0, 64.0),
        ("sgd", 0.2, 0.0, 0.9, 0.5, 16.0),
        ("momentum", 0.3, 0.9, 0.0, 0.0, 1e4),  # under-damped: the risk oscillates
        ("nesterov", 0.3, 0.9, 0.0, 0.25, 1e3),
        ("momentum", 0.1, 0.95, 0.5, 0.0, 256.0),
    ],
    ids=lambda c: f"{c[0]}-b{c[2]}-g{c[3]}",
)
def test_steps_match_brute_force_for_many_targets(case):
    kind, lr, beta, gamma, power, B = case
    T = 3000
    r = _brute(PROBLEM, kind, lr, beta, gamma, power, B, T)
    # targets spread over the whole trajectory, including levels the oscillation crosses repeatedly
    targets = np.geomspace(r.min() * 1.001, r[0] * 0.99, 17)
    # keep clear of rounding-level ties between the closed form and the recurrence
    targets = np.array([t * (1 + 1e-7) if np.min(np.abs(r / t - 1)) < 1e-9 else t for t in targets])
    got = np.array(
        [
            nqm.steps_to_target(
                PROBLEM, kind, lr, beta, gamma, power, batch_size=B, target=t, max_steps=T
            )[0, 0]
            for t in targets
        ]
    )
    want = np.array([_first_below(r, t) for t in targets])
    np.testing.assert_array_equal(got, want)


def test_oscillating_dip_is_found_before_the_bisection_crossing():
    """One under-damped coordinate: the risk dips below target at the first zero of D_t,
    rises back above it and only settles many steps later; the first dip must be reported
    and the settle step must be the later one."""
    problem = nqm.custom_problem([1.0])
    kind, lr, beta, B = "momentum", 0.5, 0.7, 1e6
    r = _brute(problem, kind, lr, beta, 0.0, 0.0, B, 200)
    target = 0.05 * r[0]
    want = _first_below(r, target)
    above = np.flatnonzero(r >= target)
    settle = above[-1] + 1
    assert settle > want + 1  # the case really is non-monotone
    out = nqm.evaluate_grid(problem, kind, lr, beta, batch_sizes=[B], target=target, max_steps=200)
    assert out["steps"][0, 0] == want
    assert out["settle_step"][0, 0] == settle


def test_censored_and_immediate():
    out = nqm.evaluate_grid(
        PROBLEM, "sgd", [1e-4, 0.5, 3.0], batch_sizes=[4.0], target=0.05, max_steps=100
    )
    assert np.isnan(out["steps"][0, 0]) and not out["reached"][0, 0]  # too slow: censored
    assert np.isnan(out["steps"][2, 0]) and not out["reached"][2, 0]  # a > 2: diverges
    assert out["final"][2, 0] > 1e6 or not np.isfinite(out["final"][2, 0])
    r0 = PROBLEM.initial_risk
    out = nqm.evaluate_grid(PROBLEM, "sgd", 0.5, batch_sizes=[4.0], target=2 * r0, max_steps=100)
    assert out["steps"][0, 0] == 0


def test_grid_is_vectorized_over_batch_sizes_and_configs():
    """One call over configs x batch sizes equals per-cell calls."""
    lrs, betas, Bs = np.array([0.05, 0.3]), np.array([0.0, 0.9]), np.array([4.0, 1024.0])
    L, Be = np.meshgrid(lrs, betas, indexing="ij")
    out = nqm.evaluate_grid(
        PROBLEM, "momentum", L, Be, batch_sizes=Bs, target=0.02, max_steps=10**6
    )
    for i, (lr, beta) in enumerate(zip(L.ravel(), Be.ravel())):
        for j, B in enumerate(Bs):
            one = nqm.steps_to_target(
                PROBLEM, "momentum", lr, beta, batch_size=B, target=0.02, max_steps=10**6
            )
            assert np.array_equal(one[0, 0], out["steps"][i, j], equal_nan=True)


def test_refinement_rows_do_not_depend_on_their_batch_mates():
    """refine_lr batches many golden-section searches into one evaluate_grid call per
    iteration (padded with inert LR-0 rows, chunks ordered by the previous iteration's scan
    cost): each search's answer equals the same search run alone, and equals a brute-force
    scan of the step-by-step recurrence at the LR it reports. The cost hint of
    evaluate_grid reorders work only (every output identical under a shuffled hint)."""
    p = nqm.harmonic_problem(30)
    kw = dict(target=0.05, max_steps=20_000, ratio=1.5, iters=4)
    lr0 = np.array([0.3, 0.05, 0.8, 0.1, 0.02])
    beta = np.array([0.9, 0.5, 0.0, 0.99, 0.7])
    batch = np.array([64.0, 4.0, 1e4, 256.0, 16.0])
    steps, lr = nqm.refine_lr(p, "momentum", lr0, beta, 0.0, 0.0, batch, **kw)
    assert np.isfinite(steps).sum() >= 4
    for i in range(len(lr0)):
        one = slice(i, i + 1)
        alone = nqm.refine_lr(p, "momentum", lr0[one], beta[one], 0.0, 0.0, batch[one], **kw)
        assert np.array_equal(alone[0], steps[one], equal_nan=True)
        assert np.array_equal(alone[1], lr[one])
        if np.isfinite(steps[i]):
            risk = _brute(p, "momentum", lr[i], beta[i], 0.0, 0.0, batch[i], int(steps[i]) + 1)
            assert _first_below(risk, kw["target"]) == steps[i]
    # the refinement's program shape (64 rows, one batch size each): nothing new to compile
    lrs, betas = np.geomspace(0.01, 1.0, 64), np.resize([0.0, 0.9, 0.99], 64)
    grid = dict(batch_sizes=np.resize([4.0, 1e4], 64)[:, None], target=0.05, max_steps=20_000)
    plain = nqm.evaluate_grid(p, "momentum", lrs, betas, **grid)
    hint = np.random.default_rng(0).permutation(64)
    hinted = nqm.evaluate_grid(p, "momentum", lrs, betas, cost_hint=hint, **grid)
    for k in plain:
        assert np.array_equal(plain[k], hinted[k], equal_nan=True), k
    assert (plain["scan_iterations"] > 0).all()
