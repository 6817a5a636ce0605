"""Exact first crossing by replay: the answer equals the eval_every = 1 run, step for step."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from cbs.train.backend import TrainBackend
from cbs.train.direct import make_block, make_config

warnings.filterwarnings("ignore", message="Some donated buffers were not usable")

TINY = {"dataset": "digits", "model": "mlp", "width": 16, "depth": 1, "steps_per_call": 30}


def steps(kind, lrs, eval_every, exact=True, metric="val_loss", value=0.6, **hp):
    cfg = make_config(
        dict(TINY, exact_crossing=exact),
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
def test_exact_crossing_equals_every_step_run(kind, lrs, metric, value):
    every, flag1 = steps(kind, lrs, 1, metric=metric, value=value)
    coarse, flag = steps(kind, lrs, 7, metric=metric, value=value)
    assert np.isfinite(every).sum() >= 3, every  # enough cells cross within the budget
    assert flag1[np.isfinite(every)].all()
    np.testing.assert_array_equal(coarse, every)
    assert flag[np.isfinite(coarse)].all()
    # Without the replay the counts are those of the cadence (multiples of 7), not exact.
    quant, qflag = steps(kind, lrs, 7, exact=False, metric=metric, value=value)
    reached = np.isfinite(quant)
    assert np.all(quant[reached] % 7 == 0) and not qflag[reached].any()
    assert np.any(quant[reached] != every[reached])


def test_exact_crossing_kfac_equals_every_step_run():
    every, _ = steps("kfac", [0.1], 1, value=0.9)
    coarse, flag = steps("kfac", [0.1], 7, value=0.9)
    assert np.isfinite(every).all(), every
    np.testing.assert_array_equal(coarse, every)
    assert flag.all()
