"""Schedules are validated per kind: a key the kind does not read is an error, not ignored."""

from __future__ import annotations

import numpy as np
import pytest

from cbs.errors import ConfigError
from cbs.sweep.config import Schedule, load_config


def _cfg(schedule):
    return {
        "name": "s",
        "backend": "nqm",
        "grid": {
            "batch_sizes": [4],
            "learning_rates": [0.1],
            "optimizers": [{"kind": "sgd", "schedule": schedule}],
        },
        "target": {"metric": "risk", "value": 0.05},
        "budget": {"max_steps": 1000},
        "nqm": {"dim": 10},
    }


@pytest.mark.parametrize(
    "schedule,path",
    [
        ({"kind": "cosine", "boundaries": [100]}, "schedule.boundaries"),
        ({"kind": "cosine", "decay_factor": 0.5}, "schedule.decay_factor"),
        ({"kind": "constant", "horizon": 100}, "schedule.horizon"),
        (
            {"kind": "step", "final_lr_fraction": 0.1, "boundaries": [10]},
            "schedule.final_lr_fraction",
        ),
        ({"kind": "constant", "pieces": [[10, 1.0]]}, "schedule.pieces"),
        ({"kind": "optimized_pwc", "ramp": [{"batch_mult": 2}]}, "schedule.ramp"),
        ({"kind": "constant", "seesaw": True}, "schedule.seesaw"),
        ({"kind": "cosine", "num_pieces": 4}, "schedule.num_pieces"),
        ({"kind": "optimized_pwc", "warmup_steps": 5}, "schedule.warmup_steps"),
        ({"kind": "step"}, "schedule.boundaries"),
        ({"kind": "step", "boundaries": [50, 10]}, "schedule.boundaries"),
        ({"kind": "piecewise"}, "schedule.pieces"),
        ({"kind": "piecewise", "pieces": [[0, 1.0]]}, "schedule.pieces[0]"),
        ({"kind": "piecewise", "pieces": [[10, 1.0], [5]]}, "schedule.pieces[1]"),
    ],
)
def test_key_foreign_to_the_kind_is_rejected(schedule, path):
    with pytest.raises(ConfigError) as e:
        load_config(_cfg(schedule))
    assert e.value.path == f"grid.optimizers[0].{path}"
    assert repr(schedule["kind"]) in str(e.value) or "allowed" in str(e.value)


@pytest.mark.parametrize(
    "schedule",
    [
        {"kind": "constant", "warmup_steps": 5},
        {
            "kind": "cosine",
            "warmup_steps": 5,
            "horizon": 500,
            "final_lr_fraction": 0.1,
            "seesaw": True,
        },
        {"kind": "linear_decay", "horizon": 50},
        {
            "kind": "step",
            "boundaries": [10, 20],
            "decay_factor": 0.5,
            "ramp": [{"samples": 40, "batch_mult": 1}, {"samples": 80, "batch_mult": 2}, {}],
        },
        {"kind": "piecewise", "pieces": [[10, 1.0], [1, 0.125]], "seesaw": True},
        {"kind": "optimized_pwc", "num_pieces": 4},
    ],
)
def test_each_kind_accepts_its_own_keys(schedule):
    load_config(_cfg(schedule))


@pytest.mark.parametrize(
    "schedule",
    [
        Schedule(kind="constant", warmup_steps=7),
        Schedule(kind="cosine", warmup_steps=5, horizon=60, final_lr_fraction=0.1),
        Schedule(kind="cosine", warmup_steps=5),  # default horizon: the rest of the budget
        Schedule(kind="linear_decay", warmup_steps=3, horizon=40),
        Schedule(kind="step", warmup_steps=4, boundaries=[10, 30], decay_factor=0.5),
        Schedule(kind="piecewise", warmup_steps=6, pieces=[[20, 1.0], [15, 0.3], [1, 0.1]]),
    ],
    ids=lambda s: f"{s.kind}-w{s.warmup_steps}-h{s.horizon}",
)
def test_train_and_nqm_schedules_are_one_definition(schedule):
    """The train back end's LR multiplier equals the NQM back end's phases at every step
    (warm-up, then boundaries / pieces / horizon counted after it)."""
    from cbs.nqm._schedules import schedule_phases
    from cbs.train.optimizers import schedule_fn

    T = 100
    phases, exact = schedule_phases(schedule, T)
    assert exact
    lengths = phases.steps.copy()
    lengths[-1] = max(T - lengths[:-1].sum(), 0)  # the last phase lasts to the end
    nqm = np.repeat(phases.lr_mult, lengths)[:T]
    m = schedule_fn(schedule, T)
    train = np.array([float(m(t)) for t in range(T)])
    np.testing.assert_allclose(train, nqm, rtol=2e-6, atol=1e-7)
