"""Batch-size schedules (cbs.ramps): samples counted in phases, Seesaw's rule per optimizer
family, the NQM's halving = doubling, and the train back end's ramp against a hand loop."""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cbs import nqm
from cbs.errors import ConfigError
from cbs.nqm._schedules import schedule_phases
from cbs.ramps import ramp_plan, seesaw_exponent
from cbs.sweep.config import RampPhase, Schedule, load_config
from cbs.train.backend import TrainBackend
from cbs.train.direct import make_block, make_config
from cbs.train.engine import IndexStream, per_example_metrics
from cbs.train.models import loss_and_error

warnings.filterwarnings("ignore", message="Some donated buffers were not usable")


def _ramp(*phases):
    return Schedule(ramp=[RampPhase(*p) for p in phases])


def test_samples_are_counted_in_phases():
    """Phase lengths count examples (or tokens): at B = 8, 800 examples take 100 steps at
    batch 8, the next 1600 take 100 steps at batch 16; step t belongs to the phase that holds
    the examples consumed before it, so a boundary inside a step rounds up."""
    sch = _ramp((800, 1.0, 1), (1600, 0.5, 2), (None, 1.0, 4))
    p = ramp_plan(sch, 8, 1000)
    assert p.steps.tolist() == [100, 100, 800]
    assert p.batch_phases() == [(0, 100, 8), (100, 200, 16), (200, 1000, 32)]
    np.testing.assert_array_equal(p.lr_table()[[0, 99, 100, 199, 200]], [1, 1, 0.5, 0.5, 1])
    np.testing.assert_array_equal(
        p.samples_after([0, 100, 150, 200, 201]), [0, 800, 1600, 2400, 2432]
    )
    # a boundary that is not a multiple of the batch: 810 examples need 102 steps of 8
    assert ramp_plan(_ramp((810, 1.0, 1), (None, 1.0, 2)), 8, 500).steps.tolist() == [102, 398]
    # tokens: 64 tokens per example, so 800 * 64 tokens are the same 100 steps
    p_tok = ramp_plan(_ramp((800 * 64, 1.0, 1), (None, 1.0, 2)), 8, 500, tokens_per_example=64)
    assert p_tok.steps.tolist() == [100, 400]
    # the same ramp at another batch size: the same examples per phase, other step counts
    assert ramp_plan(sch, 16, 1000).steps.tolist() == [50, 50, 900]


@pytest.mark.parametrize(
    "kind,q",
    [("sgd", 0.0), ("momentum", 0.0), ("nesterov", 0.0), ("adam", 0.5), ("adamw", 0.5)]
    + [(k, 0.5) for k in ("lion", "signum", "adafactor", "soap", "muon")],
)
def test_seesaw_picks_the_rule_by_optimizer_kind(kind, q):
    assert seesaw_exponent(kind) == q
    sch = Schedule(kind="step", boundaries=[100, 200], decay_factor=0.5, seesaw=True)
    p = ramp_plan(sch, 4, 1000, kind=kind)
    # each halving: batch x 2 (so half the steps for the same examples), LR x 2**-q
    assert p.steps.tolist() == [100, 50, 850]
    np.testing.assert_allclose(p.lr_mult, [1, 2**-q, 4**-q])
    assert p.batch_mult.tolist() == [1, 2, 4]
    # the override, and the cap: past max_batch_size the halvings stay LR decays
    p = ramp_plan(
        Schedule(
            kind="step",
            boundaries=[100, 200],
            decay_factor=0.5,
            seesaw=True,
            seesaw_q=0.25,
            max_batch_size=8,
        ),
        4,
        1000,
        kind=kind,
    )
    assert p.batch_mult.tolist() == [1, 2, 2] and p.steps.tolist() == [100, 50, 850]
    np.testing.assert_allclose(p.lr_mult, [1, 2**-0.25, 2**-0.25 / 2])


def test_seesaw_cosine_is_discretized_at_halvings():
    """Cosine: the batch doubles where the cosine crosses 1/2, 1/4, ... (on the sample clock)."""
    h = 400
    p = ramp_plan(
        Schedule(kind="cosine", horizon=h, seesaw=True, max_batch_size=32), 8, h, kind="sgd"
    )
    s = np.arange(h) + 0.5
    cos = 0.5 * (1 + np.cos(np.pi * s / h))
    first_half = int(np.argmax(cos <= 0.5))  # base step of the first halving
    assert p.steps[0] == first_half and p.batch_mult[1] == 2 and np.all(p.lr_mult[:3] == 1)
    # max_batch_size 32 = 4 B: the third halving is an LR decay
    assert p.max_batch_mult == 4 and p.batch_mult[3] == 4 and p.lr_mult[3] == 0.5


def _nqm_cfg(schedule, max_steps=1000, bs=(4,)):
    return {
        "name": "s",
        "backend": "nqm",
        "grid": {
            "batch_sizes": list(bs),
            "learning_rates": [0.1],
            "optimizers": [{"kind": "sgd", "schedule": schedule}],
        },
        "target": {"metric": "risk", "value": 0.05},
        "budget": {"max_steps": max_steps},
        "nqm": {"dim": 10},
    }


@pytest.mark.parametrize(
    "schedule,path",
    [
        (
            {"kind": "step", "boundaries": [100], "decay_factor": 0.1, "seesaw": True},
            "decay_factor",
        ),
        ({"kind": "cosine", "final_lr_fraction": 0.6, "seesaw": True}, "seesaw"),
        (
            {"kind": "constant", "ramp": [{"samples": 40}, {"batch_mult": 2, "samples": 8}]},
            "ramp[1].samples",
        ),
        ({"kind": "constant", "ramp": [{"batch_mult": 2}, {"batch_mult": 4}]}, "ramp[0].samples"),
        ({"kind": "constant", "ramp": [{"samples": 10**6}, {"batch_mult": 2}]}, "ramp"),
        (
            {"kind": "constant", "ramp": [{"samples": 40}, {"batch_mult": 1.5}]},
            "ramp[1].batch_mult",
        ),
        (
            {"kind": "constant", "ramp": [{"samples": 40}, {"batch_mult": 4}], "max_batch_size": 8},
            "max_batch_size",
        ),
        ({"kind": "step", "boundaries": [10], "seesaw_q": 0.5}, "seesaw_q"),
        (
            {"kind": "step", "boundaries": [10], "decay_factor": 0.5, "seesaw": True, "ramp": [{}]},
            "ramp",
        ),
    ],
)
def test_bad_ramps_are_config_errors(schedule, path):
    with pytest.raises(ConfigError) as e:
        load_config(_nqm_cfg(schedule))
    assert e.value.path == f"grid.optimizers[0].schedule.{path}", str(e.value)


def test_nqm_sgd_halving_equals_doubling():
    """Exact NQM risk, SGD: a step decay by 1/2 and its Seesaw ramp (LR kept, B doubled)
    agree at the end of every phase at equal samples (within 0.5% at LR x h_max = 0.1, 0.1%
    at 0.05: the equivalence is exact in the small-LR limit, the discrete steps' second
    order term lr^2 h^2 is what differs), in half the serial steps per phase after the first."""
    prob = nqm.custom_problem(np.logspace(0, -3, 30))
    B, T = 8, 800
    bounds = [200, 400, 600]
    dec = Schedule(kind="step", boundaries=bounds, decay_factor=0.5)
    see = Schedule(kind="step", boundaries=bounds, decay_factor=0.5, seesaw=True)
    plan = ramp_plan(see, B, T, kind="sgd")
    assert plan.steps[:3].tolist() == [200, 100, 50]
    p_dec, _ = schedule_phases(dec, T)
    p_see, _ = schedule_phases(see, T, batch_size=B)
    ends = np.array(bounds + [T])
    ramp_steps = np.array([200, 300, 350, 350 + 200 // 8])  # the same examples
    np.testing.assert_array_equal(plan.samples_after(ramp_steps), ends * B)
    for lr, tol in ((0.1, 5e-3), (0.05, 1e-3)):
        rd = nqm.expected_risk(prob, "sgd", lr, batch_sizes=[B], steps=ends, phases=p_dec)[0, 0]
        rs = nqm.expected_risk(prob, "sgd", lr, batch_sizes=[B], steps=ramp_steps, phases=p_see)[
            0, 0
        ]
        np.testing.assert_allclose(rs, rd, rtol=tol)


TINY = {"dataset": "digits", "model": "mlp", "width": 8, "depth": 1, "steps_per_call": 12}


def _train(schedule, eval_every, kind="sgd", lrs=(0.3,), seeds=(0, 1), value=0.3, max_steps=40):
    cfg = make_config(
        TINY, value=value, max_steps=max_steps, eval_every=eval_every, batch_sizes=[8]
    )
    backend = TrainBackend(cfg)
    block = make_block(kind, 8, list(lrs), seeds=seeds, schedule=schedule)
    return backend, block, backend.run_blocks([block])[0]


def _sgd_step(loss, tx):
    @jax.jit
    def step(params, opt, idx):
        updates, opt = tx.update(jax.grad(loss)(params, idx), opt, params)
        return optax.apply_updates(params, updates), opt

    return step


def test_two_phase_ramp_equals_hand_loop():
    """A 2-phase ramp (8 examples x 15 steps, then batch 24 at LR x 0.5) on a small MLP: the
    back end's per-step validation loss equals a hand-written optax loop over the seed's
    index stream (its examples in order, whatever the batch size)."""
    sch = _ramp((120, 1.0, 1), (None, 0.5, 3))
    # 20 steps: the second phase (5 steps) is shorter than a call (12 steps), and the
    # first phase's last call runs past the budget
    backend, block, res = _train(sch, 1, lrs=(0.3,), seeds=(0, 1), value=1e-6, max_steps=20)
    p = backend.problem
    curves = res.curves

    def loss(q, idx):
        return loss_and_error(p.task, p.model.apply(q, p.x_train[idx]), p.y_train[idx])[0]

    for c in block.cells:
        params = p.init_params(c.seed)
        tx = optax.sgd(lambda t, lr=c.lr: lr * jnp.where(t < 15, 1.0, 0.5))
        opt = tx.init(params)
        stream = IndexStream(c.seed, p.num_train)
        step = _sgd_step(loss, tx)
        want = []
        for t in range(20):
            params, opt = step(params, opt, jnp.asarray(stream.take(8 if t < 15 else 24)))
            want.append(
                float(
                    jnp.mean(
                        per_example_metrics(p.task, p.model.apply(params, p.x_val), p.y_val)[0]
                    )
                )
            )
        got = curves[(curves.cell_id == c.cell_id) & (curves.step > 0)].sort_values("step")
        assert got.step.tolist() == list(range(1, 21))
        np.testing.assert_allclose(got.val_loss.to_numpy(), want, rtol=2e-5)
    # samples to target: none reached (target 1e-6); the plan's count is in the records
    assert all(np.isnan(r.extra["samples_to_target"]) for r in res.cells)


def test_exact_crossing_across_a_phase_boundary_equals_every_step_run():
    """Crossings in the second phase (and the first interval after the boundary, which
    starts the new cadence) give the eval_every = 1 counts with eval_every = 7."""
    sch = _ramp((8 * 30, 1.0, 1), (None, 1.0, 2))
    lrs = (0.3, 0.5, 1.0)
    _, _, every = _train(sch, 1, lrs=lrs, value=2.0, max_steps=60)
    _, _, coarse = _train(sch, 7, lrs=lrs, value=2.0, max_steps=60)
    s1 = np.array([r.steps_to_target for r in every.cells])
    s7 = np.array([r.steps_to_target for r in coarse.cells])
    assert np.isfinite(s1).sum() >= 4 and np.any(s1 > 30), s1  # some cross after the boundary
    assert np.any(s1 % 7 != 0)
    np.testing.assert_array_equal(s7, s1)
    assert all(r.extra["crossing_exact"] == 1 for r in coarse.cells if r.reached)
    plan = ramp_plan(sch, 8, 60)
    np.testing.assert_array_equal(
        [r.extra["samples_to_target"] for r in coarse.cells], plan.samples_after(s1)
    )


def test_linreg_sgd_halving_equals_doubling_in_expectation():
    """Linear regression, SGD, 8 seeds: step decay by 1/2 vs its Seesaw ramp. At equal
    samples the seed-mean validation losses agree within their seed-to-seed spread."""
    train = dict(
        dataset="linreg",
        model="mlp",
        depth=0,
        num_samples=4096,
        linreg_dim=16,
        label_noise=0.5,
        steps_per_call=60,
    )
    T = 240
    seeds = tuple(range(8))
    out = {}
    for name, sch in (
        ("decay", Schedule(kind="step", boundaries=[80, 160], decay_factor=0.5)),
        ("seesaw", Schedule(kind="step", boundaries=[80, 160], decay_factor=0.5, seesaw=True)),
    ):
        cfg = make_config(
            train, value=0.125 * (1 + 1e-6), max_steps=T, eval_every=10, batch_sizes=[4]
        )
        backend = TrainBackend(cfg)
        block = make_block("sgd", 4, [0.05], seeds=seeds, schedule=sch)
        out[name] = backend.run_blocks([block])[0].curves
    plan = ramp_plan(
        Schedule(kind="step", boundaries=[80, 160], decay_factor=0.5, seesaw=True), 4, T
    )
    for t_dec in (80, 160, T):
        t_see = int(np.searchsorted(plan.samples_after(np.arange(T + 1)), t_dec * 4))
        a = out["decay"][out["decay"].step == t_dec].val_loss.to_numpy()
        b = out["seesaw"][out["seesaw"].step == t_see].val_loss.to_numpy()
        diff = b - a
        # paired by seed: the mean difference is within 3 standard errors of 0, and small
        assert abs(diff.mean()) <= 3 * diff.std(ddof=1) / np.sqrt(len(diff)) + 1e-3 * a.mean()
