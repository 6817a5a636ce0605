"""Exact first crossing by replay: the answer equals the eval_every = 1 run, step for step."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from cbs.train import loop
from cbs.train.backend import TrainBackend
from cbs.train.direct import make_block, make_config

warnings.filterwarnings("ignore", message="Some donated buffers were not usable")

TINY = {"dataset": "digits", "model": "mlp", "width": 16, "depth": 1, "steps_per_call": 30}


def steps(kind, lrs, eval_every, exact=True, metric="val_loss", value=0.6, train=None, **hp):
    cfg = make_config(
        dict(TINY, exact_crossing=exact, **(train or {})),
        metric=metric,
        value=value,
        max_steps=90,
        eval_every=eval_every,
    )
    block = make_block(kind, 16, lrs, hparams=hp, seeds=(0, 1))
    res = TrainBackend(cfg).run_blocks([block])[0]
    return (
        np.array([c.steps_to_target for c in res.cells]),
        np.array([c.extra["crossing_exact"] for c in res.cells]),
    )


@pytest.mark.parametrize("kind,lrs,metric,value", [("sgd", [0.2, 0.3], "val_loss", 0.9)])
def test_exact_crossing_equals_every_step_run(kind, lrs, metric, value, monkeypatch):
    every, flag1 = steps(kind, lrs, 1, metric=metric, value=value)
    # the call keeps each cell's state at its last evaluation above target: replays start
    # at t0, not at the start of the call
    starts = []
    schedule = loop._replay_schedule
    monkeypatch.setattr(
        loop, "_replay_schedule", lambda c, e: starts.append((c.s0, c.t0)) or schedule(c, e)
    )
    coarse, flag = steps(kind, lrs, 7, metric=metric, value=value)
    assert starts and all(s0 == t0 for s0, t0 in starts), starts
    assert np.isfinite(every).sum() >= 3, every  # enough cells cross within the budget
    assert flag1[np.isfinite(every)].all()
    np.testing.assert_array_equal(coarse, every)
    assert flag[np.isfinite(coarse)].all()
    # Without the replay the counts are those of the cadence (multiples of 7), not exact.
    quant, qflag = steps(kind, lrs, 7, exact=False, metric=metric, value=value)
    reached = np.isfinite(quant)
    assert np.all(quant[reached] % 7 == 0) and not qflag[reached].any()
    assert np.any(quant[reached] != every[reached])


@pytest.mark.parametrize(
    "kind,lrs,train",
    [
        # cells finish at different calls: the replays of the wide layout run before the
        # block narrows, in the wide program
        ("adam", [0.01, 0.03], {"compact": "always"}),
        # SOAP branches on the block's shared step: one replay pass per crossing interval
        ("soap", [0.01, 0.03], {}),
        # a streamed training set: each call's chunk serves that call's replays
        ("sgd", [0.2, 0.3], {"device_budget_mb": 0.001}),
    ],
)
def test_exact_crossing_layouts_equal_every_step_run(kind, lrs, train):
    every, _ = steps(kind, lrs, 1, value=0.9, train=train)
    coarse, flag = steps(kind, lrs, 7, value=0.9, train=train)
    assert np.isfinite(every).sum() >= 3, every
    assert np.any(every % 7 != 0)  # the cadence alone would not give these counts
    np.testing.assert_array_equal(coarse, every)
    assert flag[np.isfinite(coarse)].all()


def test_exact_crossing_kfac_equals_every_step_run():
    every, _ = steps("kfac", [0.1], 1, value=0.9)
    coarse, flag = steps("kfac", [0.1], 7, value=0.9)
    assert np.isfinite(every).all(), every
    np.testing.assert_array_equal(coarse, every)
    assert flag.all()


def test_program_target_rounds_up_to_float32():
    for t in (0.2, 0.5, 1e-3, 2.4, 0.1 + 1e-9):
        p = np.float32(loop.program_target(t))
        assert float(p) >= t and float(np.nextafter(p, np.float32(-np.inf))) < t
