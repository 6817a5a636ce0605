"""End to end: the CLI runs an NQM sweep, analyses it, and the paper's headline holds."""

from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd


def test_nqm_sweep_cli_to_cbs_preconditioning_raises_critical_batch_size(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "cbs.sweep",
            "configs/nqm_quickstart.yaml",
            f"output.dir={out}",
            "grid.batch_sizes={log2_min: 2, log2_max: 20, step: 2}",
            "grid.learning_rates={log10_min: -5, log10_max: 0.5, num: 40}",
            "grid.optimizers=[{kind: sgd, name: p0, hparams: {precond_power: 0.0}},"
            " {kind: sgd, name: p0.5, hparams: {precond_power: 0.5}}]",
            "analysis.bootstrap=200",
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1].startswith("sweep nqm_quickstart: 800 cells")
    for name in (
        "results.parquet",
        "cbs.json",
        "report.md",
        "steps_vs_batch.png",
        "manifest.json",
        "config.yaml",
    ):
        assert (out / name).exists(), name
    cbs = pd.read_parquet(out / "cbs.parquet").set_index("optimizer")
    assert cbs.loc["p0.5", "b_crit"] > 5 * cbs.loc["p0", "b_crit"]
    # The interval excludes the other optimizer's estimate: the ordering is not noise.
    assert cbs.loc["p0.5", "b_crit_ci_low"] > cbs.loc["p0", "b_crit_ci_high"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["cells"] == 800 and manifest["jax_version"]


def test_dry_run_prints_the_grid_and_writes_nothing(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "cbs.sweep",
            "configs/nqm_quickstart.yaml",
            f"output.dir={tmp_path}/o",
            "--dry-run",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    assert "7600 cells in 76 blocks" in proc.stdout and "batch sizes (19)" in proc.stdout
    assert not (tmp_path / "o").exists()


def test_help_explains_options_and_config_keys():
    proc = subprocess.run(
        [sys.executable, "-m", "cbs.sweep", "--help"], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0
    for fragment in (
        "--dry-run",
        "--shard",
        "grid.batch_sizes",
        "target.value",
        "budget.max_steps",
        "backend 'nqm'",
        "backend 'train'",
        "kind momentum",
    ):
        assert fragment in proc.stdout, fragment
