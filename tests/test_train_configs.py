"""The shipped train configs validate, and one runs end to end through the sweep runner."""

from __future__ import annotations

import glob
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cbs.sweep.config import load_config

warnings.filterwarnings("ignore", message="Some donated buffers were not usable")
CONFIGS = sorted(glob.glob(str(Path(__file__).parents[1] / "configs" / "train_*.yaml")))


@pytest.mark.parametrize("path", CONFIGS, ids=[Path(p).stem for p in CONFIGS])
def test_config_validates(path):
    cfg = load_config(path)
    assert cfg.backend == "train"


def test_linreg_cpu_runs_through_the_runner(tmp_path):
    from cbs.sweep.runner import run_sweep

    cfg = load_config(
        CONFIGS[[Path(p).stem for p in CONFIGS].index("train_linreg_cpu")],
        [
            "grid.batch_sizes=[8, 64]",
            "budget.max_steps=300",
            "grid.learning_rates=[0.1, 0.3]",
            "grid.optimizers=[{kind: sgd}, {kind: kfac, learning_rates: [0.1]}]",
            f"output.dir={tmp_path}/run",
            "target.value=0.05",
            "grid.seeds=[0]",
            "grid.adaptive.enabled=false",
        ],
    )
    summary = run_sweep(cfg, progress=False, log=lambda s: None)
    assert summary.complete
    res = pd.read_parquet(tmp_path / "run" / "results.parquet")
    assert len(res) == 6 and res.reached.any()
    assert "steps_interpolated" in res.columns
    noise = pd.read_parquet(tmp_path / "run" / "noise_scale.parquet")
    assert {"cell_id", "step", "b_simple", "trace_sigma", "grad_sq"} <= set(noise.columns)
    assert np.isfinite(noise.b_simple).all()
