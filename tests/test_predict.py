"""cbs.predict: the NQM built from measurements, the anchor, the optimizer mapping, the CLI's
input errors. The estimators themselves are tested in tests/test_spectrum.py."""

import subprocess
import sys

import numpy as np
import pytest

from cbs import nqm
from cbs.predict import (
    adam_power,
    anchor_noise_scale,
    anchor_target,
    effective_batch,
    nqm_from_measurement,
    tuned_steps,
)
from cbs.train.spectrum import Measurement


def _measurement(h, c, m0, *, dim=None, k=None, slq=None, second=None, vectors=None):
    """A Measurement of a diagonal quadratic whose top-k directions are its k largest h."""
    h, c, m0 = (np.asarray(a, np.float64) for a in (h, c, m0))
    k = len(h) if k is None else k
    d = len(h) if dim is None else dim
    g = h * np.sqrt(m0)
    nodes, weights = slq if slq is not None else (np.array([h]), np.full((1, len(h)), 1.0 / len(h)))
    return Measurement(
        dim=d,
        num_examples=100,
        curvature="ggn",
        top_h=h[:k],
        top_vectors=np.eye(d)[:k] if vectors is None else vectors,
        top_grad=g[:k],
        top_var=c[:k],
        slq_nodes=nodes,
        slq_weights=weights,
        grad_nodes=h,
        grad_weights=g**2 / np.sum(g**2),
        grad_sq=float(np.sum(g**2)),
        trace_sigma=float(c.sum()),
        trace_c_sigma=float(np.sum(h * c)),
        trace_c_sigma_se=0.0,
        gcg=float(np.sum(h * g**2)),
        second_moment=np.zeros(d) if second is None else second,
        grad=np.zeros(d) if second is None else g,
        loss=float(0.5 * np.sum(h * m0)),
    )


def test_all_top_directions_reproduce_the_problem():
    h = np.array([2.0, 1.0, 0.5, 0.1])
    c, m0 = np.array([0.3, 0.2, 0.4, 0.05]), np.array([1.0, 0.5, 2.0, 3.0])
    cal = nqm_from_measurement(_measurement(h, c, m0))
    np.testing.assert_allclose(cal.problem.h, h)
    np.testing.assert_allclose(cal.problem.c, c)
    np.testing.assert_allclose(cal.problem.m0, m0)
    np.testing.assert_allclose(cal.problem.count, 1.0)


def test_displacement_start_sets_m0_directly():
    """Measured at theta_T with delta = theta_0 - theta_T: m_i(0) = (delta . v_i)^2, no 1/h^2."""
    import dataclasses

    h = np.array([2.0, 1.0, 0.5])
    delta = np.array([0.3, -1.0, 2.0])
    meas = dataclasses.replace(
        _measurement(h, np.ones(3), np.ones(3)),
        disp_proj=delta,
        disp_sq=float(delta @ delta),
        disp_nodes=h,
        disp_weights=delta**2 / (delta @ delta),
    )
    np.testing.assert_allclose(nqm_from_measurement(meas).problem.m0, delta**2)


def test_start_risk_scales_the_start_to_the_measured_loss_drop():
    """start_risk rescales every m_i(0) by one factor so that the NQM's initial risk equals
    the loss drop: checked against a hand computation on the top directions, against the
    risk of an explicit (rotated) quadratic where the drop is exactly 1/2 delta^T A delta
    (factor 1), and on a binned bulk (count-weighted)."""
    import dataclasses

    h = np.array([2.0, 1.0, 0.5])
    delta = np.array([0.3, -1.0, 2.0])
    meas = dataclasses.replace(
        _measurement(h, np.ones(3), np.ones(3)),
        disp_proj=delta,
        disp_sq=float(delta @ delta),
        disp_nodes=h,
        disp_weights=delta**2 / (delta @ delta),
    )
    quad = 0.5 * float(np.sum(h * delta**2))  # 0.5*(2*0.09 + 1 + 0.5*4) = 1.59
    assert quad == pytest.approx(1.59)
    p = nqm_from_measurement(meas, start_risk=4.77).problem
    np.testing.assert_allclose(p.m0, delta**2 * 3.0)
    assert p.initial_risk == pytest.approx(4.77)
    # An explicit quadratic L(theta) = 1/2 theta^T A theta, A = Q diag(h) Q^T, minimum 0:
    # its drop from theta_0 = Q delta is 1/2 delta^T diag(h) delta, so the start is unchanged.
    q, _ = np.linalg.qr(np.random.default_rng(1).normal(size=(3, 3)))
    a, theta0 = q @ np.diag(h) @ q.T, q @ delta
    drop = 0.5 * theta0 @ a @ theta0
    np.testing.assert_allclose(nqm_from_measurement(meas, start_risk=drop).problem.m0, delta**2)
    # Binned bulk: the count-weighted risk is what is matched.
    rng = np.random.default_rng(0)
    d, k = 200, 5
    hb = np.sort(rng.uniform(0.01, 1.0, d))[::-1]
    hb[:k] *= 10
    mb = _measurement(
        hb, 0.3 * hb, rng.uniform(0.5, 2, d), dim=d, k=k, slq=(hb[None], np.full((1, d), 1 / d))
    )
    base = nqm_from_measurement(mb, num_bins=20).problem
    scaled = nqm_from_measurement(mb, num_bins=20, start_risk=7.0).problem
    assert scaled.initial_risk == pytest.approx(7.0)
    np.testing.assert_allclose(scaled.m0 / base.m0, 7.0 / base.initial_risk)
    with pytest.raises(ValueError, match="start_risk"):
        nqm_from_measurement(meas, start_risk=0.0)


def test_bulk_noise_rule_matches_trace_and_counts_match_dimension():
    """Bulk from an SLQ measure: counts add up to d - k, sum count * c = tr(Sigma) (trace rule),
    c proportional to h in the bulk; with the curvature rule sum count * h * c = tr(C Sigma)."""
    rng = np.random.default_rng(0)
    d, k = 200, 5
    h = np.sort(rng.uniform(0.01, 1.0, d))[::-1]
    h[:k] *= 10
    c = 0.3 * h * rng.uniform(0.5, 1.5, d)
    m0 = rng.uniform(0.5, 2, d)
    slq = (np.array([h]), np.full((1, d), 1.0 / d))  # one probe that sees every eigenvalue
    meas = _measurement(h, c, m0, dim=d, k=k, slq=slq)
    cal = nqm_from_measurement(meas, num_bins=20)
    p = cal.problem
    np.testing.assert_allclose(p.count.sum(), d)
    np.testing.assert_allclose(np.sum(p.count * p.c), c.sum(), rtol=1e-10)
    np.testing.assert_allclose(np.sum(p.count * p.h), h.sum(), rtol=1e-10)  # bins keep the trace
    bulk = slice(k, None)
    np.testing.assert_allclose(p.c[bulk] / p.h[bulk], cal.kappa)
    cal2 = nqm_from_measurement(meas, num_bins=20, bulk_noise="curvature")
    p2 = cal2.problem
    np.testing.assert_allclose(np.sum(p2.count * p2.h * p2.c), np.sum(h * c), rtol=1e-10)
    # Bulk start: the gradient's energy below h_k is all there (bins hold sum count h^2 m0 of it
    # up to the bin's spread of h).
    e_bulk = np.sum((h * np.sqrt(m0))[k:] ** 2)
    got = np.sum(p.count[bulk] * p.h[bulk] ** 2 * p.m0[bulk])
    assert 0.5 * e_bulk < got < 2.0 * e_bulk


def test_anchor_recovers_the_target_and_the_curve():
    """Pick a target, compute the tuned steps at B0, give only (B0, S0) to the anchor: the
    recovered target reproduces S0 at B0 and the whole S(B) curve elsewhere (to the width of
    the band of targets that give the same integer S0)."""
    prob = nqm.bin_problem(nqm.harmonic_problem(1000), 30)
    target = 0.05
    bs = np.array([4.0, 32.0, 256.0, 2048.0])
    s_true, _ = tuned_steps(prob, "sgd", 0.0, 0.0, bs, target, refine=False)
    t, s0 = anchor_target(prob, "sgd", 0.0, 0.0, bs[0], s_true[0])
    assert s0 == s_true[0]
    s_fc, _ = tuned_steps(prob, "sgd", 0.0, 0.0, bs, t, refine=False)
    np.testing.assert_allclose(s_fc, s_true, rtol=0.03)
    assert abs(np.log(t / target)) < 0.05


def test_anchor_noise_scale_recovers_a_planted_noise_level():
    """The anchor's (steps, best LR) of an NQM whose noise is 4x the one given: the second
    calibration finds nu ~ 4 (to the LR grid's resolution) and the target back."""
    h = np.geomspace(1.0, 1e-3, 24)
    true = nqm.custom_problem(h, 4.0 * 0.5 * h, 1.0)
    given = nqm.custom_problem(h, 0.5 * h, 1.0)
    b, target = 8.0, 0.05 * true.initial_risk
    steps, lr = tuned_steps(true, "sgd", 0.0, 0.0, [b], target, refine=False)
    assert np.isfinite(steps[0])
    nu, p, t, s = anchor_noise_scale(given, "sgd", 0.0, 0.0, b, steps[0], lr[0])
    assert 4.0 / 2.0 < nu < 4.0 * 2.0
    np.testing.assert_allclose(p.c, nu * given.c)
    assert target / 2.0 < t < target * 2.0
    assert abs(s - steps[0]) <= 0.05 * steps[0]
    # Given the LR the noise as given tunes to, nothing changes (nu ~ 1).
    t1, _ = anchor_target(given, "sgd", 0.0, 0.0, b, steps[0])
    lr1 = tuned_steps(given, "sgd", 0.0, 0.0, [b], t1, refine=False)[1][0]
    nu1 = anchor_noise_scale(given, "sgd", 0.0, 0.0, b, steps[0], lr1)[0]
    assert 0.5 < nu1 < 2.0


def test_start_option_is_checked_before_any_compute():
    from cbs.predict import PredictOptions
    from cbs.predict._run import PredictOptionError

    PredictOptions(start="loss-drop").check()
    with pytest.raises(PredictOptionError, match=r"--start: got 'energy'; allowed: 'displacement'"):
        PredictOptions(start="energy").check()


def test_effective_batch_without_replacement():
    np.testing.assert_allclose(effective_batch([1, 50, 100], 100)[:2], [1.0, 50 * 99 / 50])
    assert effective_batch([100], 100)[0] >= 1e12
    np.testing.assert_allclose(effective_batch([7], None), [7.0])


@pytest.mark.parametrize("power", [0.0, 0.5, 1.0])
def test_adam_power_recovers_a_planted_preconditioner(power):
    """Axis-aligned top directions and sqrt(G^2 + diag(Sigma)/B) = h^power: p = power."""
    h = np.array([4.0, 2.0, 1.0, 0.5, 0.25])
    g = np.full(5, 1e-3)
    diag_sigma = (h ** (2 * power) - g**2) * 64
    meas = _measurement(h, np.ones(5), (g / h) ** 2, second=g**2 + diag_sigma)
    assert adam_power(meas, 64, eps=0.0) == pytest.approx(power, abs=1e-9)


def _cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "cbs.predict", *args],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


def test_cli_refuses_nqm_config_and_bad_flags():
    r = _cli("configs/nqm_quickstart.yaml")
    assert r.returncode == 2 and "backend" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    r = _cli("configs/train_digits_cpu.yaml", "--lanczos-iters", "0")
    assert (
        r.returncode == 2
        and "--lanczos-iters" in r.stderr
        and len(r.stderr.strip().splitlines()) == 1
    )


def test_cli_too_large_model_names_the_option(tmp_path):
    r = _cli("configs/train_digits_cpu.yaml", f"output.dir={tmp_path}", "--max-memory-mb", "0.01")
    assert r.returncode == 2 and "--lanczos-iters" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_forward_flops_is_xla_count_of_a_dense_layer():
    import jax.numpy as jnp

    from cbs.train.spectrum import _forward_flops, measurement_flops

    w = jnp.ones((30 * 20,))
    flops = _forward_flops(lambda th, xb: xb @ th.reshape(30, 20), w, jnp.ones((5, 30)))
    assert flops == pytest.approx(2 * 30 * 20, rel=0.1)  # one example: a 30 x 20 matvec
    # 2 examples cost twice 1; each extra curvature product costs ~4 forward passes per example
    one = measurement_flops(100.0, 1, m=4, ms=4, probes=1, k=2, noise_examples=2)
    assert measurement_flops(100.0, 2, m=4, ms=4, probes=1, k=2, noise_examples=2) == 2 * one
    more = measurement_flops(100.0, 1, m=5, ms=4, probes=1, k=2, noise_examples=2)
    assert more - one == pytest.approx(400.0)


def test_cli_too_much_compute_names_the_options_before_training(tmp_path):
    r = _cli("configs/train_digits_cpu.yaml", f"output.dir={tmp_path}", "--max-tflop", "1e-6")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert "--examples" in r.stderr and "--max-tflop" in r.stderr and "fits" in r.stderr
    assert not (tmp_path / "parts").exists()  # refused before the anchor blocks trained


# A sweep small enough to run twice in a test: linear regression, two batch sizes, 2 LRs, 2 seeds
# (adaptive LR rounds on: the anchor block's rounds must be reused too).
_SMALL_SWEEP = [
    "grid.batch_sizes=[4,32]",
    "grid.learning_rates=[0.1,0.3]",
    "grid.seeds=[0,1]",
    "grid.optimizers=[{kind: sgd}]",
    "budget.max_steps=200",
    "budget.eval_every=10",
    "train.num_samples=512",
    "train.linreg_dim=8",
    "target.value=0.02",
    "output.plots=false",
]


def test_sweep_after_predict_reuses_the_anchor_blocks(tmp_path):
    """predict trains its anchor blocks as the sweep's own blocks in the sweep's folder: a
    later sweep there skips them, and its tables equal a plain sweep's; predict run again
    reads them instead of training."""
    from test_reproducible import _assert_same, _tables  # from tests/

    from cbs.predict._run import _run_anchor
    from cbs.store import read_sessions
    from cbs.sweep.config import load_config
    from cbs.sweep.runner import run_sweep

    cfg = lambda d: load_config("configs/train_linreg_cpu.yaml", _SMALL_SWEEP + [f"output.dir={d}"])
    after, plain = tmp_path / "after_predict", tmp_path / "plain"
    anchor_df, _, source = _run_anchor(cfg(after), 4, after, log=lambda s: None)
    assert source == "trained into the sweep folder"
    assert list(anchor_df.index) == ["sgd"] and anchor_df.steps.notna().all()
    assert not (after / "predict_anchor").exists()
    again_df, _, source = _run_anchor(cfg(after), 4, after, log=lambda s: None)
    assert source == "reused from the sweep folder"
    assert again_df.equals(anchor_df)

    summary = run_sweep(cfg(after), progress=False, log=lambda s: None)
    assert summary.complete and summary.skipped_cells == 2 * 2  # the anchor block's cells
    computed = [b for r in read_sessions(after) for b in r["block_seconds"]]
    assert sorted(computed) == sorted(set(computed))  # no block (nor adaptive round) run twice
    assert {b for b in computed if b.startswith("sgd__B4")} and summary.computed_cells > 0
    run_sweep(cfg(plain), progress=False, log=lambda s: None)
    _assert_same(_tables(after), _tables(plain), "sweep after predict vs plain sweep")


def test_cli_refuses_a_folder_of_another_sweep_before_measuring(tmp_path):
    from cbs.sweep.config import load_config
    from cbs.sweep.runner import run_sweep

    cfg = load_config(
        "configs/train_linreg_cpu.yaml",
        _SMALL_SWEEP + ["grid.batch_sizes=[4]", f"output.dir={tmp_path}"],
    )
    run_sweep(cfg, progress=False, log=lambda s: None)
    args = _SMALL_SWEEP + ["budget.max_steps=300", f"output.dir={tmp_path}"]
    r = _cli("configs/train_linreg_cpu.yaml", *args, "--max-tflop", "1e-12")
    # refused on the folder (naming the key that differs), not on the compute guard
    assert r.returncode == 2 and "budget.max_steps" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_sweep_seconds_sums_the_sessions_that_computed(tmp_path):
    """The sweep's cost is the wall time of the sessions that trained blocks or merged (the
    predict that trained the anchor blocks included), not the span from the folder's first
    session to its merge (which counts the time between a predict and the sweep)."""
    import json

    from cbs.predict._run import _sweep_seconds

    (tmp_path / "sessions").mkdir()
    sessions = [  # predict's anchor blocks at 10:00, a no-op predict, the sweep an hour later
        ("2026-12-01T10:00:00", "2026-12-01T10:00:40", {"sgd__B1": [38.0, 6]}, False),
        ("2026-12-01T10:30:00", "2026-12-01T10:30:05", {}, False),
        ("2026-12-01T11:00:00", "2026-12-01T11:04:00", {"sgd__B4": [200.0, 6]}, True),
    ]
    for i, (start, end, blocks, merged) in enumerate(sessions):
        rec = dict(
            session_id=f"s{i}", started=start, ended=end, block_seconds=blocks, merged=merged
        )
        (tmp_path / "sessions" / f"s{i}.json").write_text(json.dumps(rec))
    (tmp_path / "manifest.json").write_text(
        json.dumps({"started": "2026-12-01T10:00:00", "finished": "2026-12-01T11:04:00"})
    )
    assert _sweep_seconds(tmp_path) == 40.0 + 240.0


def test_sweep_lr_grid_covers_every_batch_size_s_lrs():
    """--lr-grid sweep picks from every LR the sweep tries: the config's list, or, when the
    LRs follow the batch size (grid.lr_scaling), the union of every batch size's list."""
    from cbs.predict._run import sweep_lrs
    from cbs.sweep.config import load_config

    path = "configs/train_linreg_cpu.yaml"
    plain = load_config(path)
    entry = plain.grid.optimizers[0]
    listed = entry.learning_rates or plain.grid.learning_rates
    listed = listed.values() if hasattr(listed, "values") else list(listed)
    assert sweep_lrs(plain, entry) == sorted(listed)
    scaled = load_config(
        path, ["grid.lr_scaling.power=1", f"grid.optimizers.0.learning_rates={listed}"]
    )
    bs = scaled.grid.batch_size_values()
    want = sorted({lr * (b / min(bs)) for b in bs for lr in listed})  # linear rule
    assert len(want) > len(listed)
    assert sweep_lrs(scaled, scaled.grid.optimizers[0]) == want
