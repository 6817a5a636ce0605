"""NQMBackend through the sweep config and grid expansion."""

from __future__ import annotations

import numpy as np
import pytest

from cbs import nqm
from cbs.nqm.backend import NQMBackend
from cbs.sweep.config import load_config
from cbs.sweep.grid import expand_blocks
from cbs.sweep.schema import ConfigError


def _cfg(**over):
    cfg = {
        "name": "nqm-test",
        "backend": "nqm",
        "grid": {
            "batch_sizes": [4, 64, 1024],
            "learning_rates": {"log10_min": -3, "log10_max": 0.3, "num": 12},
            "seeds": [0, 1],
            "optimizers": [
                {"kind": "sgd", "name": "sgd"},
                {"kind": "momentum", "name": "mom", "hparams": {"momentum": [0.0, 0.9]}},
            ],
        },
        "target": {"metric": "risk", "value": 0.05},
        "budget": {"max_steps": 100_000},
        "nqm": {"dim": 50},
    }
    for k, v in over.items():
        cfg[k] = v
    return cfg


def _run(cfg):
    config = load_config(cfg)
    backend = NQMBackend(config)
    blocks = expand_blocks(config, NQMBackend)
    return config, backend, blocks, backend.run_blocks(blocks)


def test_records_tuned_table_and_curves():
    config, backend, blocks, results = _run(_cfg())
    assert len(results) == len(blocks) == 6
    problem = backend.problem
    for block, res in zip(blocks, results):
        assert [c.cell_id for c in res.cells] == [c.cell_id for c in block.cells]
        # deterministic: both seeds of a configuration agree
        by_key = {}
        for cell, rec in zip(block.cells, res.cells):
            assert rec.reached == np.isfinite(rec.steps_to_target)
            by_key.setdefault((cell.lr, tuple(cell.hparams.values())), set()).add(
                rec.steps_to_target
            )
        assert all(len(v) == 1 or all(np.isnan(list(v))) for v in by_key.values())
        # every record equals the direct library call
        cell, rec = block.cells[5], res.cells[5]
        want = nqm.steps_to_target(
            problem,
            block.kind,
            cell.lr,
            cell.hparams.get("momentum", 0.0),
            batch_size=block.batch_size,
            target=0.05,
            max_steps=100_000,
        )[0, 0]
        assert np.array_equal(want, rec.steps_to_target, equal_nan=True)
        tuned = res.tables["tuned"]
        assert len(tuned) == 1
        row = tuned.iloc[0]
        for col in (
            "optimizer",
            "kind",
            "batch_size",
            "seed",
            "steps_to_target",
            "reached",
            "lr",
            "grid_steps_to_target",
            "grid_lr",
            "hp_precond_power",
            "hp_ema_decay",
        ):
            assert col in tuned.columns
        grid_best = np.nanmin([r.steps_to_target for r in res.cells])
        assert row.grid_steps_to_target == grid_best
        # the tuned record is a real configuration: its LR, run again, gives its steps
        again = nqm.steps_to_target(
            problem,
            block.kind,
            row.lr,
            row.hp_momentum if block.kind != "sgd" else 0.0,
            batch_size=block.batch_size,
            target=0.05,
            max_steps=100_000,
        )[0, 0]
        assert again == row.steps_to_target
        assert set(res.curves.columns) >= {"cell_id", "step", "metric"}
        assert set(res.curves.cell_id) == {c.cell_id for c in block.cells}
    ref = backend.reference_curves(np.array([4, 64]))
    np.testing.assert_allclose(ref["lower_bound"], 50 / (2 * 0.05 * np.array([4, 64])))


def test_refined_optimum_is_a_real_improvement():
    """On a coarse LR grid (ratio ~2 between LRs) the refined LR takes strictly fewer steps
    than the grid's best, and as few as a dense scan of the same bracket finds."""
    _, backend, blocks, results = _run(_cfg())
    ratio = 10 ** (3.3 / 11)  # the spacing of _cfg's LR grid
    for block, res in zip(blocks, results):
        if block.kind != "sgd" or block.batch_size not in (4, 64):
            continue
        row = res.tables["tuned"].iloc[0]
        assert row.steps_to_target < row.grid_steps_to_target, (block.batch_size, row)
        dense = row.grid_lr * np.geomspace(1 / ratio, ratio, 301)
        scan = nqm.steps_to_target(
            backend.problem,
            "sgd",
            dense,
            batch_size=block.batch_size,
            target=0.05,
            max_steps=100_000,
        )[:, 0]
        assert row.steps_to_target <= np.nanmin(scan), (row.steps_to_target, np.nanmin(scan))


def _per_step(schedule, T):
    """(LR multiplier, batch multiplier) of every step, written out by hand from the
    schedule's definition (docs/nqm.md section 3.3), independently of cbs.nqm._schedules."""
    t = np.arange(T)
    if schedule["kind"] == "step":  # decay 0.5 at step 100 under Seesaw for (Nesterov) SGD:
        # the LR stays, B x 2 (q = 0)
        return np.ones(T), np.where(t < 100, 1.0, 2.0)
    if schedule["kind"] == "piecewise":  # 50 steps at 1, then 0.3
        return np.where(t < 50, 1.0, 0.3), np.ones(T)
    w, h = schedule["warmup_steps"], schedule["horizon"]  # warm-up (t+1)/w, then cosine to 0
    s = t - w
    cos = 0.5 * (1 + np.cos(np.pi * (np.clip(s, 0, h - 1) + 0.5) / h))
    return np.where(t < w, (t + 1) / w, np.where(s < h, cos, 0.0)), np.ones(T)


@pytest.mark.parametrize(
    "schedule",
    [
        {"kind": "step", "boundaries": [100], "decay_factor": 0.5, "seesaw": True},
        {"kind": "cosine", "warmup_steps": 5, "horizon": 60},
        {"kind": "piecewise", "pieces": [[50, 1.0], [1, 0.3]]},
    ],
)
def test_schedules_give_the_step_by_step_first_crossing(schedule):
    """Each scheduled cell's steps to target equal the first crossing of the step-by-step
    recurrence driven by the per-step LR and batch size written out in _per_step."""
    from nqm_reference import risk_by_recurrence

    cfg = _cfg()
    cfg["grid"]["optimizers"] = [
        {"kind": "nesterov", "hparams": {"momentum": 0.5}, "schedule": schedule}
    ]
    _, backend, blocks, results = _run(cfg)
    p = backend.problem
    checked = 0
    for block, res in zip(blocks, results):
        cells = sorted(
            (r.steps_to_target, c.lr)
            for c, r in zip(block.cells, res.cells)
            if r.reached and c.seed == 0 and r.steps_to_target <= 3000
        )
        for steps, lr in cells[:3]:
            T = int(steps) + 5
            lr_m, b_m = _per_step(schedule, T)
            risk = risk_by_recurrence(
                p.h, p.c, p.m0, p.count, "nesterov", lr, 0.5, 0.0, 0.0, block.batch_size * b_m, lr_m
            )
            first = int(np.argmax(risk < 0.05))
            assert risk[first] < 0.05 and first == steps, (block.batch_size, lr, first, steps)
            checked += 1
    assert checked >= 3


def test_optimized_pwc_uses_cell_lr_as_cap():
    cfg = _cfg()
    cfg["grid"]["optimizers"] = [
        {
            "kind": "sgd",
            "learning_rates": [1.0, 1.9],
            "schedule": {"kind": "optimized_pwc", "num_pieces": 4},
        }
    ]
    cfg["grid"]["batch_sizes"] = [4, 1024]
    cfg["nqm"]["pwc_opt_steps"] = 60
    _, _, blocks, results = _run(cfg)
    for res in results:
        row = res.tables["tuned"].iloc[0]
        assert row.reached and len(row.pwc_lrs) == 4
        assert max(row.pwc_lrs) <= row.lr * (1 + 1e-12)
        # exact counts (any horizon, not multiples of num_pieces), never above the best
        # constant LR below the cap
        for c in res.cells:
            assert c.steps_to_target <= c.extra["pwc_constant_steps"]


@pytest.mark.parametrize(
    "path,value",
    [
        ("target", {"metric": "risk", "value": 0.0}),
        ("target", {"metric": "risk", "value": -1.0}),
        ("nqm", {"spectrum": "custom"}),
        ("nqm", {"noise": "custom", "noise_values": [1.0]}),
    ],
)
def test_config_errors(path, value):
    with pytest.raises(ConfigError):
        load_config(_cfg(**{path: value}))


def test_unsupported_schedule_combination_is_rejected():
    cfg = _cfg()
    cfg["grid"]["optimizers"] = [
        {"kind": "sgd", "schedule": {"kind": "optimized_pwc", "seesaw": True}}
    ]
    with pytest.raises(ConfigError, match="optimized_pwc"):
        load_config(cfg)


def test_momentum_out_of_range_is_rejected():
    cfg = _cfg()
    cfg["grid"]["optimizers"] = [{"kind": "momentum", "hparams": {"momentum": 1.0}}]
    with pytest.raises(ConfigError):
        load_config(cfg)
