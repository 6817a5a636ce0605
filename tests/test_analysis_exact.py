"""The analysis fits only proven first crossings by default and reports what it left out."""

from __future__ import annotations

import numpy as np
import pandas as pd
from synthetic_runs import write_synthetic_run

from cbs.analysis import analyze_run, steps_table


def test_unproven_points_are_excluded_counted_and_reported(tmp_path):
    run = write_synthetic_run(
        tmp_path / "run", planted={"sgd": (800.0, 800.0 * 256)}, seeds=(0, 1, 2)
    )
    df = pd.read_parquet(run / "results.parquet")
    df["crossing_exact"] = np.where(df["reached"], 1.0, np.nan)
    # Make the best cell of (B = 64, seed 0) unproven, and make it much faster than it is.
    sel = (df.batch_size == 64) & (df.seed == 0) & df.reached
    best = df[sel].steps_to_target.idxmin()
    df.loc[best, ["crossing_exact", "steps_to_target"]] = [0.0, 1.0]
    df.to_parquet(run / "results.parquet")

    table = steps_table(df)
    point = table[(table.batch_size == 64) & (table.seed == 0)].iloc[0]
    assert not point["exact"] and point["n_uncertified"] == 1
    assert table.drop(point.name)["exact"].all()

    a = analyze_run(run, n_boot=50)
    row = a.summary.iloc[0]
    assert row["n_inexact_points"] == 1
    assert any("without a proven first crossing" in w for w in a.fits["sgd"].warnings)
    assert "without a proven first crossing (excluded)" in (run / "report.md").read_text()
    assert (run / "steps_all_optimizers.png").stat().st_size > 0
    # Excluded, the batch size's value is the median of the two proven seeds; kept
    # (uncertified=True), the 1-step point pulls it down.
    kept = analyze_run(run, n_boot=50, uncertified=True, write=False)
    fit_ex, fit_in = a.fits["sgd"], kept.fits["sgd"]
    j = list(fit_ex.batch_sizes).index(64)
    assert fit_in.steps[j] < fit_ex.steps[j]


def test_an_unproven_slower_cell_does_not_spoil_a_proven_best(tmp_path):
    run = write_synthetic_run(tmp_path / "run", planted={"sgd": (800.0, 800.0 * 256)}, seeds=(0,))
    df = pd.read_parquet(run / "results.parquet")
    df["crossing_certified"] = np.where(df["reached"], 1.0, np.nan)
    sel = (df.batch_size == 64) & df.reached
    worst = df[sel].steps_to_target.idxmax()
    df.loc[worst, "crossing_certified"] = 0.0
    best = df[sel].steps_to_target.min()
    # With a lower bound above the best, the point is still proven; without, it is not.
    df["steps_lower_bound"] = df["steps_to_target"]
    assert steps_table(df).set_index("batch_size").loc[64, "exact"]
    df.loc[worst, "steps_lower_bound"] = best - 1
    assert not steps_table(df).set_index("batch_size").loc[64, "exact"]
