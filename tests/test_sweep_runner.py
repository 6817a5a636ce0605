"""The runner and store: rows, resume without recompute, refusal to mix sweeps."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pandas as pd
import pytest
from cbs_test_backends import FakeBackend, sweep_command
from conftest import fake_config

from cbs.store import RunStore, read_table
from cbs.sweep.config import load_config
from cbs.sweep.runner import RunFolderError, run_sweep


def test_rows_carry_coordinates_outcomes_and_provenance(fake_backend, tmp_path):
    cfg = load_config(fake_config(tmp_path))
    summary = run_sweep(cfg, progress=False)
    df = pd.read_parquet(tmp_path / "run" / "results.parquet")
    assert len(df) == summary.cells == 54 and df["cell_id"].is_unique
    for col in (
        "config_hash",
        "seed",
        "jax_version",
        "optax_version",
        "device_kind",
        "batch_size",
        "lr",
        "hp_momentum",
        "steps_to_target",
        "reached",
        "diverged",
        "censored",
    ):
        assert col in df.columns, col
    assert df["diverged"].sum() == 18 == summary.diverged  # lr=100 cells
    assert np.isnan(df.loc[df.diverged, "steps_to_target"]).all()
    row = df[(df.optimizer == "plain") & (df.batch_size == 4) & (df.lr == 1.0)].iloc[0]
    assert row.steps_to_target == np.ceil(100 + 1000 / 4)
    # every back end's records carry samples_to_target (steps x B at a constant batch)
    assert row.samples_to_target == row.steps_to_target * 4
    assert np.isnan(df.loc[~df.reached, "samples_to_target"]).all()
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
    with pytest.raises(RunFolderError, match="refusing to mix"):
        run_sweep(load_config(fake_config(tmp_path), ["target.value=0.5"]), progress=False)


def test_shards_partition_blocks_and_last_one_merges(fake_backend, tmp_path):
    cfg = load_config(fake_config(tmp_path))
    s0 = run_sweep(cfg, progress=False, shard=(0, 2))
    assert not s0.complete and read_table(tmp_path / "run", "results") is not None
    s1 = run_sweep(cfg, progress=False, shard=(1, 2))
    assert s1.complete
    df = pd.read_parquet(tmp_path / "run" / "results.parquet")
    assert len(df) == 54 and df["cell_id"].is_unique


def test_sigkill_mid_sweep_then_resume_gives_the_uninterrupted_table(tmp_path):
    """A real process killed with SIGKILL mid-sweep, resumed, ends with exactly the rows of
    an uninterrupted run: nothing lost, nothing duplicated."""
    import os
    import signal
    import subprocess
    import time

    import yaml

    tests_dir = os.path.dirname(__file__)
    env = {
        **os.environ,
        "PYTHONPATH": tests_dir + os.pathsep + os.environ.get("PYTHONPATH", ""),
        "CBS_JAX_CACHE": "off",
    }
    raw = fake_config(tmp_path, backend="cbs_test_backends:SlowBackend")
    raw["grid"]["batch_sizes"] = [2**k for k in range(12)]  # 24 blocks, 0.1 s each
    cfg_path = tmp_path / "slow.yaml"
    cfg_path.write_text(yaml.safe_dump(raw))

    def sweep(out):
        return sweep_command(cfg_path, out)

    subprocess.run(sweep(tmp_path / "whole"), env=env, check=True, capture_output=True, timeout=300)
    # The killed run hangs after its 5th block, so the kill lands after exactly 5 parts
    # whatever the machine's load.
    proc = subprocess.Popen(
        sweep(tmp_path / "killed"),
        env={**env, "CBS_TEST_STALL_AFTER": "5"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    parts = tmp_path / "killed" / "parts" / "results"
    deadline = time.time() + 600
    while time.time() < deadline and len(list(parts.glob("*.parquet"))) < 5:
        time.sleep(0.02)
    time.sleep(0.2)  # a 6th part, if the stall failed, would show here
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    n_done = len(list(parts.glob("*.parquet")))
    assert n_done == 5, n_done
    assert not (tmp_path / "killed" / "results.parquet").exists()
    resumed = subprocess.run(
        sweep(tmp_path / "killed"), env=env, capture_output=True, text=True, timeout=300
    )
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from disk" in resumed.stdout
    whole = pd.read_parquet(tmp_path / "whole" / "results.parquet")
    again = pd.read_parquet(tmp_path / "killed" / "results.parquet")
    assert again["cell_id"].is_unique and len(again) == len(whole)
    cols = [c for c in whole.columns if c != "host"]
    pd.testing.assert_frame_equal(whole[cols], again[cols])


def test_calls_respect_blocks_per_call_and_never_mix_optimizers(fake_backend, tmp_path):
    run_sweep(load_config(fake_config(tmp_path)), progress=False)
    assert FakeBackend.calls, "the back end was never called"
    for call in FakeBackend.calls:
        assert len(call) <= FakeBackend.blocks_per_call
        assert len({block_id.split("__")[0] for block_id in call}) == 1
    assert sorted(b for call in FakeBackend.calls for b in call) == sorted(
        f"{o}__B{b}" for o in ("plain", "heavy") for b in (1, 4, 16)
    )


def test_cell_ids_are_stable_hashes_of_the_coordinates(fake_backend, tmp_path):
    """Every expanded cell's id is the SHA-1 of the documented JSON of its coordinates,
    computed here independently; two ids are pinned to values of earlier releases, so a
    resumed run keeps finding its cells."""
    import hashlib

    from cbs.sweep.grid import cell_id, expand_blocks

    cfg = load_config(fake_config(tmp_path))
    cells = [c for b in expand_blocks(cfg, FakeBackend) for c in b.cells]
    assert len(cells) == 54
    for c in cells:
        key = json.dumps(
            [
                c.optimizer,
                c.batch_size,
                c.lr.hex(),
                sorted((k, float(v).hex()) for k, v in c.hparams.items()),
                c.seed,
            ]
        )
        assert c.cell_id == hashlib.sha1(key.encode()).hexdigest()[:16]
    assert cell_id("sgd_p0.25", 16, 0.1, {"precond_power": 0.25, "ema_decay": 0.0}, 3) == (
        "b58939a18a89aab1"
    )
    assert cell_id('é "q"', 1, 1e-8, {}, 0) == "3040464ff0b8bb9b"


def test_result_columns_equal_the_row_by_row_table(fake_backend, tmp_path):
    """The column-wise results table (the fast path) equals the row-by-row one (dtypes and
    column order included) for the fake back end, NQM blocks with their extras, records
    whose extras differ between cells (row path only), and an extra that repeats a name."""
    from cbs.nqm.backend import NQMBackend
    from cbs.sweep.backend import BlockResult, CellResult
    from cbs.sweep.grid import expand_blocks
    from cbs.sweep.runner import _block_tables, _result_columns, _result_rows

    stamp = {"config_hash": "abc", "jax_version": "x", "device_count": 1, "host": "h"}
    cases = []
    cfg = load_config(fake_config(tmp_path))
    for block in expand_blocks(cfg, FakeBackend)[:4]:
        cases.append((cfg, block, FakeBackend(cfg).run_blocks([block])[0]))
    nqm_cfg = load_config(
        {
            "name": "n",
            "backend": "nqm",
            "grid": {
                "batch_sizes": [4, 64],
                "learning_rates": [0.01, 0.3, 3.0],
                "optimizers": [{"kind": "momentum", "hparams": {"momentum": [0.0, 0.9]}}],
            },
            "target": {"metric": "risk", "value": 0.05},
            "budget": {"max_steps": 1000},
            "nqm": {"dim": 20},
        }
    )
    for block in expand_blocks(nqm_cfg, NQMBackend):
        # records shaped like the NQM back end's (reached / diverged / censored, NaN steps,
        # its four extras), made up here so that no JAX program is compiled
        recs = [
            CellResult(
                c.cell_id,
                i % 3 == 0,
                i % 3 == 1,
                float(10 + i) if i % 3 == 0 else float("nan"),
                0.01 * i,
                0.005 * i,
                10 + i if i % 3 == 0 else 1000,
                extra={
                    "settle_step": float(12 + i) if i % 3 == 0 else float("nan"),
                    "crossing_certified": float(i % 2),
                    "steps_lower_bound": float(i),
                    "schedule_exact": 1.0,
                },
            )
            for i, c in enumerate(block.cells)
        ]
        res = BlockResult(recs)
        cases.append((nqm_cfg, block, res))
        # an extra that repeats a fixed column's name: last value, first position
        recs = [dataclasses.replace(r, extra={**r.extra, "lr": 7.0}) for r in res.cells]
        cases.append((nqm_cfg, block, BlockResult(recs)))
    for cfg_, block, res in cases:
        cols = _result_columns(cfg_, block, res, stamp)
        assert cols is not None
        pd.testing.assert_frame_equal(
            pd.DataFrame(cols),
            pd.DataFrame(_result_rows(cfg_, block, res, stamp)),
            check_exact=True,
        )
    # extras that differ between cells: the row path fills the gaps with NaN
    cfg_, block, res = cases[-1]
    recs = [
        dataclasses.replace(r, extra={"a": 1.0} if i % 2 else {"b": 2.0})
        for i, r in enumerate(res.cells)
    ]
    mixed = BlockResult(recs)
    assert _result_columns(cfg_, block, mixed, stamp) is None
    table = _block_tables(cfg_, block, mixed, stamp)["results"]
    assert table["a"].isna().sum() == table["b"].isna().sum() == len(recs) // 2
