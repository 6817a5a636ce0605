"""target.rule: the target from a pilot (best metric any optimizer reaches, relaxed by a
stated margin), reproducible and recorded; epochs to target counted by the train back end."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from cbs_test_backends import FakeBackend

from cbs.store import read_table
from cbs.sweep import backend as backend_mod
from cbs.sweep.config import load_config
from cbs.sweep.runner import run_sweep
from cbs.sweep.schema import ConfigError
from cbs.sweep.target_rule import RULE_FILE, target_from_pilot


class CurveBackend(FakeBackend):
    """The best metric a cell reaches within its budget: 0.1 + (log10 lr + 1)**2 / 10 +
    1 / B (+0.05 for kind plain), so the pilot's best is at lr = 0.1 and the largest B.
    A cell reaches the target when its best metric is below it, in 100 steps per unit of
    the best metric (any law would do: the rule only reads best_metric)."""

    name = "curve"

    def run_blocks(self, blocks):
        from cbs.sweep.backend import BlockResult, CellResult

        type(self).calls.append([b.block_id for b in blocks])
        out = []
        for b in blocks:
            recs = []
            for c in b.cells:
                best = 0.1 + (math.log10(c.lr) + 1) ** 2 / 10 + 1 / c.batch_size
                best += 0.05 * (c.kind == "plain")
                reached = best < self.config.target.value
                recs.append(
                    CellResult(
                        c.cell_id,
                        reached,
                        False,
                        math.ceil(100 * best) if reached else math.nan,
                        best,
                        best,
                        self.config.budget.max_steps,
                    )
                )
            out.append(BlockResult(recs))
        return out


def raw(tmp_path, folder="run", **rule):
    return {
        "name": "rule",
        "backend": "curve",
        "grid": {
            "batch_sizes": [4, 16, 64],
            "learning_rates": [0.01, 0.1, 1.0],
            "seeds": [0, 1],
            "optimizers": [{"kind": "plain"}, {"kind": "heavy"}],
        },
        "target": {"metric": "loss", "rule": {"margin": 0.2, **rule}},
        "budget": {"max_steps": 1000},
        "output": {"dir": str(tmp_path / folder)},
        "curve": {},
    }


@pytest.fixture
def curve(monkeypatch):
    monkeypatch.setitem(backend_mod.BACKENDS, "curve", "test_target_rule:CurveBackend")
    CurveBackend.calls = []


def test_target_rule_value_is_reproducible_and_recorded(curve, tmp_path):
    cfg = load_config(raw(tmp_path))
    run_sweep(cfg, progress=False)
    rec = json.loads((tmp_path / "run" / RULE_FILE).read_text())
    # independent: the best over optimizers, LRs and seeds at B = 64 is heavy at lr = 0.1
    best = 0.1 + 1 / 64
    assert math.isclose(rec["best"], best, rel_tol=1e-12)
    assert rec["best_optimizer"] == "heavy"
    assert math.isclose(rec["best_by_optimizer"]["plain"], best + 0.05, rel_tol=1e-12)
    assert math.isclose(rec["value"], best * 1.2, rel_tol=1e-12)
    assert rec["pilot_batch_size"] == 64 and rec["pilot_max_steps"] == 1000
    assert rec["pilot_cells"] == 2 * 3 * 2  # optimizers x LRs x seeds, one batch size
    pilot = read_table(tmp_path / "run" / "pilot", "results")
    assert set(pilot["batch_size"]) == {64} and not pilot["reached"].any()  # full budgets
    results = read_table(tmp_path / "run", "results")
    assert np.allclose(results["target"], rec["value"]) and set(results["batch_size"]) == {
        4,
        16,
        64,
    }
    import yaml

    stored = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert stored["target"]["rule"]["margin"] == 0.2 and stored["target"]["value"] == rec["value"]
    # the same config elsewhere: the same value; the same folder: nothing recomputed
    n = len(CurveBackend.calls)
    run_sweep(load_config(raw(tmp_path)), progress=False)
    assert len(CurveBackend.calls) == n
    run_sweep(load_config(raw(tmp_path, "again")), progress=False)
    again = json.loads((tmp_path / "again" / RULE_FILE).read_text())
    assert again["value"] == rec["value"] and again["best"] == rec["best"]
    # the pure rule on the pilot's rows, absolute margin
    from cbs.sweep.config import TargetRule

    assert math.isclose(
        target_from_pilot(pilot, TargetRule(margin=0.01, margin_kind="absolute"))["value"],
        best + 0.01,
        rel_tol=1e-12,
    )


def test_target_rule_bad_input(curve, tmp_path):
    bad = raw(tmp_path)
    bad["target"]["value"] = 0.3
    with pytest.raises(ConfigError) as e:
        load_config(bad)
    assert e.value.path == "target.value" and "one of the two" in str(e.value)
    bad = raw(tmp_path, batch_size=32)
    with pytest.raises(ConfigError) as e:
        load_config(bad)
    assert e.value.path == "target.rule.batch_size"
    bad = raw(tmp_path)
    del bad["target"]["rule"]
    with pytest.raises(ConfigError) as e:
        load_config(bad)
    assert e.value.path == "target.value" and "required" in str(e.value)


def test_epochs_to_target_are_counted():
    from cbs.train.backend import TrainBackend
    from cbs.train.direct import make_block, make_config

    cfg = make_config(
        dict(dataset="digits", model="mlp", width=16, depth=1),
        metric="val_error",
        value=0.5,
        max_steps=200,
        eval_every=10,
    )
    be = TrainBackend(cfg)
    res = be.run_blocks([make_block("adam", 64, [1e-2, 1e-5], seeds=(0,))])[0]
    n_train = be.dataset.num_train
    fast, slow = res.cells
    assert fast.reached and not slow.reached
    assert fast.extra["train_examples"] == n_train
    assert math.isclose(
        fast.extra["epochs_to_target"], fast.steps_to_target * 64 / n_train, rel_tol=1e-12
    )
    assert math.isnan(slow.extra["epochs_to_target"])
