"""The S(B) fitter, the CBS definitions derived from it, and their bootstrap intervals."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cbs.analysis import (
    aggregate_seeds,
    b_star_closed_form,
    fit_critical_batch_size,
    fit_power_law,
    fit_steps_curve,
    local_efficiencies,
    raw_knee,
)

B = 2.0 ** np.arange(3, 14)  # 8 .. 8192, B_crit = 300 sits mid-range
S_MIN, B_CRIT = 500.0, 300.0
TRUE = S_MIN * (1.0 + B_CRIT / B)


def _noisy(noise, seed, shape=None):
    rng = np.random.default_rng(seed)
    return TRUE * np.exp(rng.normal(0.0, noise, shape or B.shape))


def test_exact_data_is_recovered_exactly():
    fit = fit_critical_batch_size(B, TRUE, n_boot=0)
    assert fit.s_min == pytest.approx(S_MIN, rel=1e-6)
    assert fit.e_min == pytest.approx(S_MIN * B_CRIT, rel=1e-6)
    assert fit.b_crit == pytest.approx(B_CRIT, rel=1e-6)
    assert fit.warnings == []


@pytest.mark.parametrize("noise", [0.01, 0.05, 0.2])
def test_planted_values_recovered_within_noise_scaled_tolerance(noise):
    # Tolerances scale with the noise: 99% of draws fall within ~1.5x (S_min, E_min) and
    # ~2.5x (B_crit) the log-noise level with 11 batch sizes.
    for seed in range(10):
        fit = fit_critical_batch_size(B, _noisy(noise, seed), n_boot=0)
        assert fit.s_min == pytest.approx(S_MIN, rel=2 * noise)
        assert fit.e_min == pytest.approx(S_MIN * B_CRIT, rel=2 * noise)
        assert fit.b_crit == pytest.approx(B_CRIT, rel=3 * noise)


def test_log_space_fit_differs_from_unweighted_fit_in_s_on_skewed_data():
    # Steps span two orders of magnitude across the sweep; with multiplicative errors an
    # unweighted fit in S is dominated by the few small-B points with large S.
    b = 2.0 ** np.arange(0, 13)
    true = 1000.0 * (1.0 + 64.0 / b)
    cases = {
        "smallest B 30% slow": np.r_[1.3, np.ones(b.size - 1)],
        "alternating +-15%": np.exp(0.15 * (-1.0) ** np.arange(b.size)),
    }
    for name, mult in cases.items():
        steps = true * mult
        (a, e), *_ = np.linalg.lstsq(
            np.stack([np.ones_like(b), 1.0 / b], axis=1), steps, rcond=None
        )
        linear_b_crit = e / a
        fit = fit_critical_batch_size(b, steps, n_boot=0)
        assert fit.b_crit == pytest.approx(64.0, rel=0.1), name
        assert not 0.5 < linear_b_crit / 64.0 < 2.0, name  # off by more than 2x


@pytest.mark.parametrize("delta,b0", [(0.2, None), (0.2, 256.0), (0.1, 32.0), (0.5, 100.0)])
def test_b_star_closed_form_matches_root_of_fitted_curve(delta, b0):
    fit = fit_critical_batch_size(B, _noisy(0.05, 1), delta=delta, b0=b0, n_boot=0)
    anchor = B[0] if b0 is None else b0
    s_lin = lambda x: fit.predict([anchor])[0] * anchor / x  # perfect scaling from B0
    gap = lambda x: fit.predict([x])[0] - (1 + delta) * s_lin(x)
    lo, hi = anchor, anchor * 1e6
    assert gap(lo) < 0 < gap(hi)
    for _ in range(200):
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if gap(mid) < 0 else (lo, mid)
    assert fit.b_star == pytest.approx(lo, rel=1e-8)
    assert fit.b_star == pytest.approx(b_star_closed_form(fit.b_crit, anchor, delta), rel=1e-12)


def test_general_form_b_star_is_the_numerical_root_and_alpha_is_recovered():
    true = S_MIN * (1 + (B_CRIT / B) ** 0.7)
    fit = fit_critical_batch_size(B, true, n_boot=0, form="general")
    assert fit.alpha == pytest.approx(0.7, abs=0.02)
    assert fit.b_crit == pytest.approx(B_CRIT, rel=0.1)
    ratio = fit.b_star * fit.predict([fit.b_star])[0] / (B[0] * fit.predict([B[0]])[0])
    assert ratio == pytest.approx(1.2, rel=1e-6)


@pytest.mark.parametrize("n_seeds,method", [(1, "residuals"), (4, "seeds")])
def test_bootstrap_intervals_cover_planted_b_crit_at_roughly_nominal_rate(n_seeds, method):
    reps = 40
    hits95, hits50 = [], []
    for r in range(reps):
        steps = _noisy(0.1, 1000 + r, (n_seeds, B.size))
        f95 = fit_critical_batch_size(B, steps, n_boot=300, seed=r, ci_level=0.95)
        assert f95.bootstrap == method
        hits95.append(f95.b_crit_ci[0] <= B_CRIT <= f95.b_crit_ci[1])
        lo50, hi50 = np.quantile(f95.b_crit_samples, [0.25, 0.75])  # same replicates, 50% level
        hits50.append(lo50 <= B_CRIT <= hi50)
        b_star = 1.2 * B[0] + 0.2 * B_CRIT
        assert f95.b_star_ci[0] <= f95.b_star <= f95.b_star_ci[1]
        assert (f95.b_star_ci[0] <= b_star <= f95.b_star_ci[1]) == hits95[
            -1
        ]  # B* is monotone in B_crit
    assert np.mean(hits95) >= 0.82
    assert 0.25 <= np.mean(hits50) <= 0.8  # calibrated, not just wide


def test_intervals_narrow_with_less_noise():
    wide = fit_critical_batch_size(B, _noisy(0.2, 5), n_boot=300)
    narrow = fit_critical_batch_size(B, _noisy(0.02, 5), n_boot=300)
    width = lambda f: f.b_crit_ci[1] / f.b_crit_ci[0]
    assert width(narrow) < width(wide)


def test_censored_points_are_excluded_not_used_as_numbers():
    steps = TRUE.copy()
    steps[:2] = np.nan  # the budget was too small at the smallest B
    steps[-1] = np.inf
    fit = fit_critical_batch_size(B, steps, n_boot=0)
    assert fit.n_points == B.size - 3
    assert fit.censored.tolist() == [True, True] + [False] * (B.size - 3) + [True]
    assert fit.b_crit == pytest.approx(B_CRIT, rel=1e-6)
    assert any("censored" in w for w in fit.warnings)


def test_seed_aggregation_counts_censored_seeds_as_slow():
    log_s = np.log(np.array([[100.0, 10.0], [200.0, 20.0], [400.0, 40.0]]))
    cens = np.array([[False, True], [False, True], [False, False]])
    y, c = aggregate_seeds(log_s, cens, axis=0)
    assert np.exp(y[0]) == pytest.approx(200.0)
    assert c.tolist() == [False, True]  # two of three seeds censored -> censored
    y, c = aggregate_seeds(log_s[:2], np.zeros((2, 2), bool), axis=0)
    assert np.exp(y[0]) == pytest.approx(math.sqrt(100 * 200))  # two seeds: geometric mean
    present = np.array([[True, True], [False, True], [False, True]])
    y, c = aggregate_seeds(log_s, np.zeros((3, 2), bool), present, axis=0)
    assert np.exp(y[0]) == pytest.approx(100.0)


def test_multi_seed_table_with_a_censored_seed():
    steps = np.vstack([TRUE, TRUE * 1.05, TRUE * 0.95])
    steps[0, 0] = np.nan  # one of three seeds censored: median still finite
    fit = fit_critical_batch_size(B, steps, n_boot=100)
    assert not fit.censored[0]
    assert fit.bootstrap == "seeds"
    assert fit.b_crit == pytest.approx(B_CRIT, rel=0.1)


def test_warnings_fire():
    extrap = fit_critical_batch_size(B[:4], TRUE[:4], n_boot=0)  # B_crit above every point
    assert any("extrapolated" in w for w in extrap.warnings)
    few = fit_critical_batch_size(B[[0, 5, 10]], TRUE[[0, 5, 10]], n_boot=0)
    assert any("too few points" in w for w in few.warnings)
    assert not any("too few points" in w for w in extrap.warnings)
    perfect = fit_critical_batch_size(B, 1e6 / B, n_boot=50)
    assert math.isinf(perfect.b_crit) and perfect.s_min == 0
    assert perfect.e_min == pytest.approx(1e6)
    assert any("inf" in w for w in perfect.warnings)
    flat = fit_critical_batch_size(B, np.full(B.size, 77.0), n_boot=0)
    assert flat.b_crit == 0 and flat.s_min == pytest.approx(77.0)
    assert any("B_crit = 0" in w for w in flat.warnings)
    none = fit_critical_batch_size(B, np.r_[np.full(B.size - 1, np.nan), 10.0], n_boot=10)
    assert math.isnan(none.b_crit) and any("no fit" in w for w in none.warnings)
    assert "n/a" in str(none)


def test_knee_and_local_efficiencies_follow_the_model():
    b = 2.0 ** np.arange(3, 14, 0.125)  # dense, so log interpolation is nearly exact
    steps = S_MIN * (1 + B_CRIT / b)
    knee, r = raw_knee(b, steps, b0=b[0], delta=0.2)
    assert knee == pytest.approx(b_star_closed_form(B_CRIT, b[0], 0.2), rel=0.01)
    assert r[0] == pytest.approx(1.0)
    eff = local_efficiencies(B, TRUE)
    assert math.isnan(eff[0])
    np.testing.assert_allclose(eff[1:], (B[:-1] + B_CRIT) / (2 * B[:-1] + B_CRIT))
    # Quadrupling steps: normalized per doubling, so perfect scaling is still 1.
    np.testing.assert_allclose(local_efficiencies([4, 16, 64], [64.0, 16.0, 4.0])[1:], 1.0)
    np.testing.assert_allclose(local_efficiencies([4, 16], [64.0, 64.0])[1:], 0.5)


def test_leave_one_out_range_brackets_the_fit():
    fit = fit_critical_batch_size(B, _noisy(0.05, 2), n_boot=0)
    assert fit.b_crit_loo[0] <= fit.b_crit <= fit.b_crit_loo[1]


def test_result_text_and_dict():
    fit = fit_critical_batch_size(B, _noisy(0.05, 3), n_boot=100)
    text = str(fit)
    for word in ("S_min", "E_min", "B_crit", "B*", "knee", "95% CI"):
        assert word in text
    d = fit.to_dict()
    assert d["b_crit"] == pytest.approx(fit.b_crit) and len(d["b_crit_ci"]) == 2
    assert "b_crit_samples" not in repr(fit)


def test_input_validation():
    with pytest.raises(ValueError, match="one value per batch size"):
        fit_critical_batch_size(B, TRUE[:-1])
    with pytest.raises(ValueError, match="distinct"):
        fit_critical_batch_size([8, 8, 16], [3.0, 2.0, 1.0])
    with pytest.raises(ValueError, match="form"):
        fit_critical_batch_size(B, TRUE, form="kaplan")
    # Unsorted input is fine; a lowercase form name too.
    perm = np.random.default_rng(0).permutation(B.size)
    fit = fit_critical_batch_size(B[perm], TRUE[perm], n_boot=0, form="mccandlish")
    assert fit.b_crit == pytest.approx(B_CRIT, rel=1e-6)
    assert fit_steps_curve(B, TRUE)["b_crit"] == pytest.approx(B_CRIT, rel=1e-6)


def test_power_law_recovers_exponent_with_intervals():
    n = np.array([85, 151, 302, 604, 1200.0])
    rng = np.random.default_rng(0)
    cbs = 93.2 * n**0.468 * np.exp(rng.normal(0, 0.05, n.size))
    pl = fit_power_law(n, cbs, n_boot=500)
    assert pl.exponent == pytest.approx(0.468, abs=0.06)
    assert pl.exponent_ci[0] < pl.exponent < pl.exponent_ci[1]
    samples = [c * np.exp(rng.normal(0, 0.05, 200)) for c in cbs]
    pl2 = fit_power_law(n, cbs, y_samples=samples, n_boot=500)
    assert pl2.bootstrap == "samples" and pl2.exponent_ci[0] < pl2.exponent < pl2.exponent_ci[1]
    assert pl.predict(1000.0) == pytest.approx(pl.coef * 1000.0**pl.exponent)
    two = fit_power_law([1, 2], [3, 6], n_boot=100)
    assert two.exponent == pytest.approx(1.0) and any("two points" in w for w in two.warnings)
