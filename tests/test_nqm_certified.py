"""Certified first crossing (steps_to_target) and long-horizon / delicate-regime accuracy."""

from __future__ import annotations

import numpy as np
import pytest
from nqm_reference import constant_batch_risk as _brute
from nqm_reference import problem_risk

from cbs import nqm
from cbs.nqm import _crossing, _moments


def test_early_dip_far_before_the_bisection_crossing_is_found():
    """Under-damped momentum on two coordinates: the risk first dips below target at t ~ 2, rises
    back above it and stays above until t ~ 60 (the crossing the bisection finds), far outside
    the +-16-step window of the uncertified scan. The certified scan must report the first dip."""
    problem = nqm.custom_problem([1.0, 0.9])
    kind, lr, beta, B, T = "momentum", 0.5, 0.95, 1e6, 400
    r = _brute(problem, kind, lr, beta, 0.0, 0.0, B, T)
    target = 0.05 * r[0]
    below = r < target
    want = int(np.flatnonzero(below)[0])
    settle = int(np.flatnonzero(~below)[-1]) + 1
    assert (
        settle - want > 32 and not below[want + 1 : settle].all()
    )  # really non-monotone, far apart
    out = nqm.evaluate_grid(problem, kind, lr, beta, batch_sizes=[B], target=target, max_steps=T)
    assert out["steps"][0, 0] == want
    assert out["crossing_certified"][0, 0]
    # other levels: a certified answer is always the brute-force first crossing; the two
    # levels just above the global minimum need more unit steps than the iteration budget
    # (4 K + 2 window) allows and are flagged instead
    certified = []
    for tgt in np.geomspace(r.min() * 1.01, r[0] * 0.9, 9):
        got = nqm.evaluate_grid(problem, kind, lr, beta, batch_sizes=[B], target=tgt, max_steps=T)
        if got["crossing_certified"][0, 0]:
            assert got["steps"][0, 0] == np.flatnonzero(r < tgt)[0]
        certified.append(got["crossing_certified"][0, 0])
    assert sum(certified) >= 7


def test_quickstart_cells_are_certified():
    """The default quickstart grid (configs/nqm_quickstart.yaml): SGD, p in {0, .25, .5, .75},
    100 LRs, B = 2^2..2^20, target 0.01, budget 1e9: every cell that does not diverge has
    its first crossing (or its censoring) certified."""
    problem = nqm.bin_problem(nqm.harmonic_problem())
    lrs = np.logspace(-5, 0.5, 100)
    powers = np.array([0.0, 0.25, 0.5, 0.75])
    lr, pw = np.tile(lrs, 4), np.repeat(powers, 100)
    bs = 2.0 ** np.arange(2, 21)
    out = nqm.evaluate_grid(
        problem, "sgd", lr, 0.0, 0.0, pw, batch_sizes=bs, target=0.01, max_steps=10**9
    )
    diverged = ~np.isfinite(out["final"]) | (out["final"] > 10 * problem.initial_risk)
    assert out["crossing_certified"][~diverged].all()
    assert out["reached"].sum() > 1000
    # diverging cells (a > 2): certified only through the nondecreasing noise bound (once the
    # noise alone exceeds the target, no later step can be below it); never reached
    assert not out["reached"][diverged].any()
    assert out["crossing_certified"].mean() > 0.98


def test_uncertified_cells_keep_the_bisection_answer():
    """With no iteration budget the scan certifies nothing and the bisection + window answer
    is returned unchanged (flagged)."""
    problem = nqm.harmonic_problem(30)
    kind, lr, beta, B, T = "momentum", 0.1, 0.9, 256.0, 2000
    r = _brute(problem, kind, lr, beta, 0.0, 0.0, B, T)
    target = r[0] * 0.2
    import jax
    import jax.numpy as jnp

    from cbs.nqm._grid import _padded, _prob

    with jax.enable_x64(True):
        out = _crossing.search_steps(
            _prob(problem),
            jnp.float64(lr),
            jnp.float64(beta),
            jnp.float64(0.0),
            jnp.float64(0.0),
            jnp.asarray([B]),
            _moments.Phases(*(jnp.asarray(p) for p in _padded(None))),
            jnp.float64(target),
            jnp.int64(T),
            kind=kind,
            ema=False,
            K=11,
            window=16,
            max_iter=1,
        )
    assert not bool(out["certified"][0])
    assert (
        int(out["steps"][0]) == np.flatnonzero(r < target)[0]
    )  # monotone here: the bisection is right


def _affine_power_longdouble(kind, ema, h, c, m0, lr, beta, gamma, power, B, t):
    """Reference at large t: binary powering of the moment map in extended precision."""
    import jax

    with jax.enable_x64(True):
        M, r, s0, read = _moments.moment_system(
            kind, ema, *(np.asarray(x, np.float64) for x in (h, c, m0)), lr, beta, gamma, power
        )
    M = np.moveaxis(np.asarray(M), -1, 0).astype(np.longdouble)
    r = (np.asarray(r).T / B).astype(np.longdouble)
    s = np.asarray(s0).T.astype(np.longdouble)
    # exact (M, r) in long double from the float64 parameters (the float64 rounding of M's
    # entries is shared with the tested code; what differs is everything after)
    Pm, Pr = M.copy(), r.copy()
    while t:
        if t & 1:
            s = np.einsum("bij,bj->bi", Pm, s) + Pr
        Pr = np.einsum("bij,bj->bi", Pm, Pr) + Pr
        Pm = np.einsum("bij,bjk->bik", Pm, Pm)
        t >>= 1
    return s, read


@pytest.mark.parametrize(
    "case",
    [
        ("momentum", 1e-3, 1 - 1e-5, 0.0, 0.0),  # beta -> 1
        ("momentum", 0.25, 0.25, 0.0, 0.0),  # exact critical damping at h = 1
        ("momentum", 0.25 * (1 + 1e-9), 0.25, 0.0, 0.0),  # near-critical
        ("sgd", 1e-4, 0.0, 1 - 1e-5, 0.5),  # EMA with gamma -> 1
    ],
    ids=["beta1", "critical", "near-critical", "ema-gamma1"],
)
def test_long_horizon_and_delicate_regimes(case):
    kind, lr, beta, gamma, power = case
    H = np.array([1.0, 0.5, 0.1, 1e-2, 1e-4])
    problem = nqm.custom_problem(H)
    B = 16.0
    steps = np.array([0, 1, 7, 1000, 123_457, 10**6, 10**7 - 1, 10**7])
    got = nqm.expected_risk(problem, kind, lr, beta, gamma, power, batch_sizes=[B], steps=steps)[
        0, 0
    ]
    want = []
    for t in steps:
        s, read = _affine_power_longdouble(
            kind, gamma > 0, problem.h, problem.c, problem.m0, lr, beta, gamma, power, B, int(t)
        )
        want.append(float(np.sum(problem.loss_weights * (s @ read.astype(np.longdouble)))))
    np.testing.assert_allclose(got, np.array(want), rtol=1e-9, atol=0)
    # and the short-horizon part against the step-by-step recurrence
    r = _brute(problem, kind, lr, beta, gamma, power, B, 1000)
    np.testing.assert_allclose(got[:4], r[steps[:4]], rtol=1e-9, atol=0)


def test_unstable_configuration_is_never_reached():
    """Regression: an unstable heavy-ball configuration (a = lr * h_max > 2 (1 + beta)) whose
    moments overflow must not be counted as reaching the target (overflow made the risk -inf,
    which compared below the target)."""
    import numpy as np

    from cbs.nqm import evaluate_grid
    from cbs.nqm._problem import bin_problem, harmonic_problem

    problem = bin_problem(harmonic_problem())
    lr, beta = 4.328761281083062, 0.9784556530996812  # a = 4.33 > 2 (1 + beta) = 3.96
    out = evaluate_grid(
        problem,
        "momentum",
        [lr, 0.5],
        [beta, beta],
        0.0,
        0.0,
        batch_sizes=2.0 ** np.arange(2, 21, 6),
        target=0.01,
        max_steps=10**9,
    )
    assert not out["reached"][0].any() and np.isnan(out["steps"][0]).all()
    alone = evaluate_grid(
        problem,
        "momentum",
        [0.5],
        [beta],
        0.0,
        0.0,
        batch_sizes=2.0 ** np.arange(2, 21, 6),
        target=0.01,
        max_steps=10**9,
    )
    assert out["reached"][1].any()  # a stable neighbour in the same call is unaffected
    np.testing.assert_array_equal(out["steps"][1], alone["steps"][0])


@pytest.mark.parametrize("m", [1, 3, 6])
def test_small_solver_matches_lapack(m):
    """The unrolled pivoted elimination used for the stationary moments (m = 1, 3, 6 for
    SGD, momentum, momentum + EMA) against numpy's LAPACK solve, including a system that
    needs pivoting (zero leading entry)."""
    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(m)
    A = rng.normal(size=(m, m, 40))
    if m > 1:
        A[0, 0, :5] = 0.0
    b = rng.normal(size=(m, 40))
    with jax.enable_x64(True):
        got = np.asarray(_crossing._solve_small(jnp.asarray(A), jnp.asarray(b)))
    want = np.linalg.solve(np.moveaxis(A, -1, 0), b.T[..., None])[..., 0].T
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    "kind,ema", [("sgd", False), ("momentum", False), ("nesterov", False), ("momentum", True)]
)
def test_certified_answers_equal_brute_force_on_random_cells(kind, ema):
    """Random small problems and configurations (incl. oscillating, noisy and diverging ones):
    every certified answer is the brute-force first crossing of the step-by-step recurrence,
    and most cells are certified."""
    rng = np.random.default_rng(7)
    T, n = 300, 24
    h = np.sort(rng.uniform(0.01, 1.0, 4))[::-1]
    problem = nqm.custom_problem(h)
    lr = np.exp(rng.uniform(np.log(0.02), np.log(2.5), n))
    beta = 0.0 if kind == "sgd" else rng.uniform(0.0, 0.99, n)
    gamma = rng.uniform(0.5, 0.99, n) if ema else 0.0
    power = rng.choice([0.0, 0.5], n)
    bs = np.array([1.0, 16.0, 1024.0])
    target = 0.05 * problem.initial_risk
    out = nqm.evaluate_grid(
        problem, kind, lr, beta, gamma, power, batch_sizes=bs, target=target, max_steps=T
    )
    certified = 0
    for i in range(n):
        b = 0.0 if kind == "sgd" else beta[i]
        g = gamma[i] if ema else 0.0
        for j, B in enumerate(bs):
            r = _brute(problem, kind, lr[i], b, g, power[i], B, T)
            below = np.flatnonzero((r < target) & np.isfinite(r))
            want = below[0] if len(below) else np.nan
            if out["crossing_certified"][i, j]:
                certified += 1
                got = out["steps"][i, j]
                assert (np.isnan(want) and np.isnan(got)) or got == want, (i, j, got, want)
    assert certified >= 0.7 * n * len(bs)


@pytest.mark.parametrize("kind", ["sgd", "momentum"])
def test_certified_answers_equal_brute_force_with_schedules(kind):
    """Multi-phase schedules (LR step decay + batch ramp): later phases start with nonzero
    noise moments and use the general bound. Every certified answer is the brute-force first
    crossing of the step-by-step recurrence, including crossings in later phases."""
    rng = np.random.default_rng(11)
    T, n = 240, 16
    problem = nqm.custom_problem(np.array([1.0, 0.3, 0.05]))
    phases = nqm.Phases(
        np.array([40, 60, 1], np.int64), np.array([1.0, 0.3, 0.1]), np.array([1.0, 4.0, 16.0])
    )
    lr = np.exp(rng.uniform(np.log(0.05), np.log(1.5), n))
    beta = 0.0 if kind == "sgd" else rng.uniform(0.0, 0.95, n)
    bs = np.array([1.0, 8.0, 256.0])
    lr_m = np.repeat(phases.lr_mult, [40, 60, T - 100])
    b_m = np.repeat(phases.batch_mult, [40, 60, T - 100])
    certified, late = 0, 0
    for target in (0.3 * problem.initial_risk, 0.03 * problem.initial_risk):
        out = nqm.evaluate_grid(
            problem, kind, lr, beta, batch_sizes=bs, target=target, max_steps=T, phases=phases
        )
        for i in range(n):
            for j, B in enumerate(bs):
                r = problem_risk(
                    problem,
                    kind,
                    lr[i],
                    0.0 if kind == "sgd" else beta[i],
                    0.0,
                    0.0,
                    B * b_m,
                    lr_m,
                )
                below = np.flatnonzero((r < target) & np.isfinite(r))
                want = below[0] if len(below) else np.nan
                if out["crossing_certified"][i, j]:
                    certified += 1
                    late += bool(want >= 40)
                    got = out["steps"][i, j]
                    assert (np.isnan(want) and np.isnan(got)) or got == want, (
                        target,
                        i,
                        j,
                        got,
                        want,
                    )
    assert certified >= 0.7 * 2 * n * len(bs) and late > 5


def test_early_dip_in_a_later_phase_is_found():
    """Under-damped momentum whose oscillating dips start in the second phase of a schedule
    (nonzero noise moments at the phase start, so the general bound is used): certified
    answers equal the brute-force first crossing, and some of them are dips earlier than
    the bisection's crossing."""
    problem = nqm.custom_problem([1.0, 0.9])
    kind, lr, beta, B, T = "momentum", 0.5, 0.95, 1e6, 400
    phases = nqm.Phases(np.array([6, 1], np.int64), np.array([0.02, 1.0]), np.array([1.0, 1.0]))
    lr_m = np.repeat(phases.lr_mult, [6, T - 6])
    r = problem_risk(
        problem,
        kind,
        lr,
        beta,
        0.0,
        0.0,
        np.full(T, B),
        lr_m,
    )
    earlier = 0
    for tgt in np.geomspace(r.min() * 1.05, r[:7].min() * 0.95, 12):
        want = np.flatnonzero(r < tgt)[0]
        got = nqm.evaluate_grid(
            problem, kind, lr, beta, batch_sizes=[B], target=tgt, max_steps=T, phases=phases
        )
        fast = nqm.evaluate_grid(
            problem,
            kind,
            lr,
            beta,
            batch_sizes=[B],
            target=tgt,
            max_steps=T,
            phases=phases,
            certify=False,
        )
        assert want >= 6
        if got["crossing_certified"][0, 0]:
            assert got["steps"][0, 0] == want
            earlier += bool(got["steps"][0, 0] < fast["steps"][0, 0])
    assert earlier >= 2


@pytest.mark.parametrize("kind", ["sgd", "momentum"])
def test_lower_bound_brackets_the_first_crossing(kind):
    """With a tiny certified-scan budget most cells stay uncertified; for every cell the
    brute-force first crossing lies in [steps_lower_bound, steps] (the lower bound is what
    the scan proved before its budget ran out; steps is a genuine crossing)."""
    rng = np.random.default_rng(3)
    T, n = 300, 24
    problem = nqm.custom_problem(np.array([1.0, 0.6, 0.2, 0.05]))
    lr = np.exp(rng.uniform(np.log(0.02), np.log(1.8), n))
    beta = 0.0 if kind == "sgd" else rng.uniform(0.5, 0.97, n)
    bs = np.array([1.0, 32.0, 4096.0])
    target = 0.05 * problem.initial_risk
    out = nqm.evaluate_grid(
        problem, kind, lr, beta, batch_sizes=bs, target=target, max_steps=T, certify_iters=3
    )
    lower, steps = out["steps_lower_bound"], out["steps"]
    assert (~out["crossing_certified"]).sum() > 10 and (lower[~out["crossing_certified"]] > 0).any()
    for i in range(n):
        for j, B in enumerate(bs):
            r = _brute(problem, kind, lr[i], 0.0 if kind == "sgd" else beta[i], 0.0, 0.0, B, T)
            below = np.flatnonzero((r < target) & np.isfinite(r))
            if out["crossing_certified"][i, j]:
                want = below[0] if len(below) else np.nan
                np.testing.assert_equal(lower[i, j], want)
            elif len(below):
                assert lower[i, j] <= below[0] and (
                    np.isnan(steps[i, j]) or below[0] <= steps[i, j]
                )
            else:
                assert np.isnan(steps[i, j])
