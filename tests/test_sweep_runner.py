"""The runner and store: rows, resume without recompute, refusal to mix sweeps."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from cbs.store import RunStore, read_table
from cbs.sweep.config import load_config
from cbs.sweep.runner import RunFolderConflict, run_sweep
from conftest import FakeBackend, fake_config


def test_rows_carry_coordinates_outcomes_and_provenance(fake_backend, tmp_path):
    cfg = load_config(fake_config(tmp_path))
    summary = run_sweep(cfg, progress=False)
    df = pd.read_parquet(tmp_path / "run" / "results.parquet")
    assert len(df) == summary.cells == 54 and df["cell_id"].is_unique
    for col in ("config_hash", "seed", "jax_version", "optax_version", "device_kind", "batch_size", "lr",
                "hp_momentum", "steps_to_target", "reached", "diverged", "censored"):
        assert col in df.columns, col
    assert df["diverged"].sum() == 18 == summary.diverged  # lr=100 cells
    assert np.isnan(df.loc[df.diverged, "steps_to_target"]).all()
    row = df[(df.optimizer == "plain") & (df.batch_size == 4) & (df.lr == 1.0)].iloc[0]
    assert row.steps_to_target == np.ceil(100 + 1000 / 4)
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["config_hash"] == summary.config_hash and "finished" in manifest
    ref = pd.read_parquet(tmp_path / "run" / "reference.parquet")
    assert set(ref["name"]) == {"floor"}


def test_resume_skips_finished_blocks_and_matches_uninterrupted(fake_backend, tmp_path):
    cfg = load_config(fake_config(tmp_path))
    run_sweep(cfg, progress=False)
    full = pd.read_parquet(tmp_path / "run" / "results.parquet")
    # Simulate a crash after some blocks: delete two parts and the merged table.
    store = RunStore(tmp_path / "run")
    (tmp_path / "run" / "results.parquet").unlink()
    for bid in ("heavy__B4", "plain__B16"):
        (store.dir / "parts" / "results" / f"{bid}.parquet").unlink()
    FakeBackend.calls = []
    summary = run_sweep(cfg, progress=False)
    assert sorted(b for call in FakeBackend.calls for b in call) == ["heavy__B4", "plain__B16"]
    assert summary.skipped_cells == 54 - 12 - 6
    again = pd.read_parquet(tmp_path / "run" / "results.parquet")
    cols = [c for c in full.columns if c not in ("host",)]
    pd.testing.assert_frame_equal(full[cols], again[cols])


def test_different_config_same_folder_is_refused(fake_backend, tmp_path):
    run_sweep(load_config(fake_config(tmp_path)), progress=False)
    with pytest.raises(RunFolderConflict, match="refusing to mix"):
        run_sweep(load_config(fake_config(tmp_path), ["target.value=0.5"]), progress=False)


def test_shards_partition_blocks_and_last_one_merges(fake_backend, tmp_path):
    cfg = load_config(fake_config(tmp_path))
    s0 = run_sweep(cfg, progress=False, shard=(0, 2))
    assert not s0.complete and read_table(tmp_path / "run", "results") is not None
    s1 = run_sweep(cfg, progress=False, shard=(1, 2))
    assert s1.complete
    df = pd.read_parquet(tmp_path / "run" / "results.parquet")
    assert len(df) == 54 and df["cell_id"].is_unique
