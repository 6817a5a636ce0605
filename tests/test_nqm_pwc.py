"""Optimized piecewise-constant schedules count their steps exactly and never lose to a
constant LR (which is one of their feasible schedules)."""

from __future__ import annotations

import numpy as np
from nqm_reference import risk_by_recurrence

from cbs import nqm
from cbs.nqm._tuning import pwc_piece_lengths

PROBLEM = nqm.bin_problem(nqm.harmonic_problem())
TARGET = 0.01


def test_piece_lengths_sum_exactly_and_differ_by_at_most_one():
    for total in (0, 3, 10, 17, 11, 1234):
        lengths = pwc_piece_lengths(total, 10)
        assert lengths.sum() == total and lengths.max() - lengths.min() <= 1
        assert np.all(np.diff(lengths) <= 0)


def _per_step(lrs, total):
    return np.repeat(lrs, pwc_piece_lengths(total, len(lrs)))


def test_optimized_schedule_beats_or_ties_constant_with_exact_counts():
    """The issue's cases (p = 0.75; B = 65,536 and 262,144): constant LR 17 and 11 steps,
    the old multiple-of-10 count gave 20 for both. Checked against a step-by-step NumPy
    recurrence: the reported schedule is below target after exactly `steps` steps."""
    p, bs = 0.75, np.array([65536.0, 262144.0])
    cap = nqm.pwc_lr_cap(PROBLEM, p)
    r = nqm.optimize_pwc(
        PROBLEM, "sgd", bs, target=TARGET, max_steps=10**8, precond_power=p, opt_steps=60
    )
    # independent constant-LR optimum: a fine grid below the cap, exact counts
    lrs = cap * np.logspace(-2, 0, 60)
    grid = nqm.evaluate_grid(
        PROBLEM, "sgd", lrs, precond_power=p, batch_sizes=bs, target=TARGET, max_steps=10**6
    )["steps"]
    const = np.nanmin(grid, axis=0)
    np.testing.assert_array_equal(const, [17, 11])
    assert np.all(r["steps"] <= const) and np.all(r["steps"] <= r["constant_steps"])
    assert np.all(r["constant_lr"] <= cap)
    assert r["steps"][0] < 17  # strictly better where a schedule can help
    assert not np.any(r["steps"] % 10 == 0)
    for j, b in enumerate(bs):
        T = int(r["steps"][j])
        assert np.all(r["lrs"][j] <= cap * (1 + 1e-12))
        risk = risk_by_recurrence(
            PROBLEM.h,
            PROBLEM.c,
            PROBLEM.m0,
            PROBLEM.count,
            "sgd",
            cap,
            0.0,
            0.0,
            p,
            np.full(T, b),
            _per_step(r["lrs"][j] / cap, T),
        )
        assert risk[T] < TARGET


def test_fig3b_config_pairs_each_constant_with_its_optimized_schedule():
    from pathlib import Path

    import yaml

    from cbs.analysis._plots import schedule_pairs

    cfg = yaml.safe_load((Path(__file__).parents[1] / "configs" / "nqm_fig3b.yaml").read_text())
    pairs = schedule_pairs(cfg)
    assert [(c, o) for _, c, o in pairs] == [
        (f"sgd_p{p}", f"pwc_p{p}") for p in ("0", "0.25", "0.5", "0.75")
    ]
