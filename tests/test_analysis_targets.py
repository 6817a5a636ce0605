"""The CBS at other targets, from stored curves (McCandlish/Kaplan per-target fits)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from synthetic_runs import write_synthetic_run

from cbs.analysis import AnalysisError, analyze_targets, steps_from_curves


def _write_power_law_curves(run, target=0.1):
    """metric(step) = target * S_cell / step: a cell crosses target t at S_cell * target / t,
    which (log step, log metric) interpolation recovers exactly between stored points."""
    results = pd.read_parquet(run / "results.parquet")
    steps = np.unique(np.round(np.geomspace(1, 1e7, 45)))
    rows = []
    for r in results.itertuples(index=False):
        metric = np.full(steps.size, np.nan) if r.diverged else target * r.steps_to_target / steps
        rows.append(pd.DataFrame(dict(cell_id=r.cell_id, step=steps.astype(int), metric=metric)))
    pd.concat(rows).to_parquet(run / "curves.parquet")
    return results


def test_cbs_per_target_from_curves(tmp_path):
    run = write_synthetic_run(tmp_path / "run", seeds=(0,), noise=0.0, max_steps=10**7)
    _write_power_law_curves(run)
    sweep = analyze_targets(run, [0.1, 0.05, 0.025], n_boot=50)
    t = sweep.table.set_index(["target", "optimizer"])
    for opt in ("sgd", "adam"):
        # Tighter targets scale every S(B) by the same factor: S_min scales, B_crit does not.
        assert t.loc[(0.05, opt), "s_min"] == pytest.approx(
            2 * t.loc[(0.1, opt), "s_min"], rel=1e-3
        )
        assert t.loc[(0.025, opt), "b_crit"] == pytest.approx(t.loc[(0.1, opt), "b_crit"], rel=1e-3)
    for name in ("cbs_targets.parquet", "cbs_targets.json", "cbs_vs_target.png"):
        assert (run / name).exists()
    assert "CBS vs target" in sweep.text


def test_steps_from_curves_matches_results_at_the_sweeps_target(tmp_path):
    run = write_synthetic_run(
        tmp_path / "run",
        planted={"sgd": (800.0, 800.0 * 256)},
        seeds=(0,),
        noise=0.0,
        max_steps=10**7,
    )
    results = _write_power_law_curves(run)
    curves = pd.read_parquet(run / "curves.parquet")
    again = steps_from_curves(results, curves, 0.1)
    reached = results["reached"].to_numpy()
    np.testing.assert_allclose(
        again["steps_to_target"].to_numpy()[reached],
        results["steps_to_target"].to_numpy()[reached],
        rtol=1e-9,
    )
    assert (again["diverged"] == results["diverged"]).all()
    loose = steps_from_curves(results, curves, 1e-9)  # never reached: censored, not NaN steps
    assert loose["censored"].sum() == (~results["diverged"]).sum()
    coarse = steps_from_curves(results, curves, 0.1, interpolate=False)
    assert (coarse["steps_to_target"][reached] >= results["steps_to_target"][reached] - 1e-9).all()


def test_targets_need_curves(tmp_path):
    run = write_synthetic_run(tmp_path / "run", seeds=(0,))
    with pytest.raises(AnalysisError, match="curves"):
        analyze_targets(run, [0.05])
    proc = subprocess.run(
        [sys.executable, "-m", "cbs.analyze", str(run), "--targets", "0.05", "--no-plots"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
