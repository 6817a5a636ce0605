"""benchmarks/gpu_check.sh --dry-run: every step of the GPU check runs on the CPU at tiny
sizes and the summary table lists them all as passed (the script itself is checked; the GPU
figures are in benchmarks/README.md)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("timeout") is None, reason="needs coreutils timeout")
def test_gpu_check_dry_run(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable, PYTHONPATH=str(ROOT))
    out = tmp_path / "gc"
    proc = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run", "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    summary = (out / "summary.md").read_text()
    assert proc.returncode == 0, summary + proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = [line.split("|")[1:-1] for line in summary.splitlines() if line.startswith("| ")]
    steps = {r[0].strip(): r for r in rows[1:]}
    assert set(steps) == {"doctor", "quickstart", "train_speed", "nqm_speed", "train_mnist1d_mlp"}
    assert all(r[1].strip() == "ok" for r in steps.values()), summary
    # the figures come from each benchmark's RESULT line
    assert (
        "speedup_strong=" in steps["train_speed"][3] and "cells_per_s=" in steps["train_speed"][3]
    )
    assert "ours_cold_s=" in steps["nqm_speed"][3]
    assert (out / "train_mnist1d_mlp" / "results.parquet").exists()


def test_gpu_check_rejects_unknown_arguments(tmp_path):
    proc = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--fast"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and "unknown argument --fast" in proc.stderr
