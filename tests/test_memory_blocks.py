"""Memory-aware blocks (split by the budget, halve on out-of-memory) and ``cbs.doctor``."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from cbs_test_backends import FakeBackend
from conftest import fake_config

from cbs.sweep import backend as backend_mod
from cbs.sweep.config import load_config
from cbs.sweep.memory import parse_bytes, split_block
from cbs.sweep.runner import plan, run_sweep


class OomBackend(FakeBackend):
    """FakeBackend on a device that fits at most 2 cells per program: wider calls fail the
    way XLA does (RESOURCE_EXHAUSTED)."""

    splittable = True
    widths: list = []

    def run_blocks(self, blocks):
        width = sum(len(b.cells) for b in blocks)
        OomBackend.widths.append(width)
        if width > 2:
            raise RuntimeError(
                "RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1.00GiB."
            )
        return super().run_blocks(blocks)


def _cells(df):
    drop = {"config_hash", "backend", "host"}
    return (
        df[[c for c in df.columns if c not in drop]].sort_values("cell_id").reset_index(drop=True)
    )


def test_out_of_memory_blocks_are_retried_in_halves_with_the_same_rows(
    fake_backend, monkeypatch, tmp_path
):
    monkeypatch.setitem(backend_mod.BACKENDS, "oom", "test_memory_blocks:OomBackend")
    whole = run_sweep(load_config(fake_config(tmp_path / "a")), progress=False)
    OomBackend.widths = []
    logs = []
    split = run_sweep(
        load_config(fake_config(tmp_path / "b", backend="oom")), progress=False, log=logs.append
    )
    assert split.complete and split.cells == whole.cells == 54
    pd.testing.assert_frame_equal(
        _cells(pd.read_parquet(whole.out_dir / "results.parquet")),
        _cells(pd.read_parquet(split.out_dir / "results.parquet")),
    )
    assert max(OomBackend.widths) > 2 and any("out of memory" in line for line in logs)


def test_out_of_memory_on_a_single_cell_is_an_error(fake_backend, monkeypatch, tmp_path):
    monkeypatch.setattr(OomBackend, "splittable", False)
    monkeypatch.setitem(backend_mod.BACKENDS, "oom", "test_memory_blocks:OomBackend")
    with pytest.raises(RuntimeError, match="RESOURCE_EXHAUSTED"):
        run_sweep(load_config(fake_config(tmp_path, backend="oom")), progress=False)


def test_train_blocks_split_by_a_small_memory_budget_give_the_same_records(monkeypatch, tmp_path):
    raw = {
        "name": "mem",
        "backend": "train",
        "grid": {
            "batch_sizes": [8, 32],
            "learning_rates": [0.03, 0.1, 0.3],
            "seeds": [0],
            "optimizers": [{"kind": "sgd"}],
        },
        "target": {"metric": "val_loss", "value": 0.05},
        "budget": {"max_steps": 200, "eval_every": 20},
        "train": {
            "dataset": "linreg",
            "model": "mlp",
            "depth": 0,
            "num_samples": 512,
            "linreg_dim": 8,
        },
    }
    whole = run_sweep(
        load_config({**raw, "output": {"dir": str(tmp_path / "whole")}}), progress=False
    )
    cfg = load_config({**raw, "output": {"dir": str(tmp_path / "split")}})
    from cbs.train.backend import TrainBackend

    per_cell = TrainBackend(cfg).cell_memory_bytes(plan(cfg)[0])  # B = 8, the smaller
    assert 0 < per_cell < 10**8
    monkeypatch.setenv("CBS_MEMORY_BUDGET", str(int(1.5 * per_cell)))  # one cell fits, two do not
    logs = []
    split = run_sweep(cfg, progress=False, log=logs.append)
    assert sum("running sub-blocks of" in line for line in logs) >= 2, logs  # both blocks split
    assert all("sub-blocks of 1 cells" in line for line in logs), logs
    a = pd.read_parquet(whole.out_dir / "results.parquet")
    b = pd.read_parquet(split.out_dir / "results.parquet")
    assert list(a.cell_id) == list(b.cell_id)
    np.testing.assert_array_equal(a.reached, b.reached)
    np.testing.assert_array_equal(a.steps_to_target, b.steps_to_target)
    np.testing.assert_array_equal(a.steps_run, b.steps_run)
    # The metrics agree to float32 rounding only: XLA reduces a vmapped batch of width 3 and of
    # width 1 in different orders (measured: relative differences up to ~2e-6).
    np.testing.assert_allclose(a.final_metric, b.final_metric, rtol=1e-4)
    np.testing.assert_allclose(a.best_metric, b.best_metric, rtol=1e-4)


def test_split_block_keeps_order_and_ids(fake_backend, tmp_path):
    block = plan(load_config(fake_config(tmp_path)))[3]
    subs = split_block(block, 5)
    assert [len(s.cells) for s in subs] == [5, 5, 2]
    assert [c for s in subs for c in s.cells] == list(block.cells)
    assert {s.block_id for s in subs} == {block.block_id}


@pytest.mark.parametrize("text,value", [("123", 123), ("2KB", 2048), ("1.5GiB", int(1.5 * 2**30))])
def test_parse_bytes(text, value):
    assert parse_bytes(text) == value


@pytest.mark.parametrize("text", ["", "0", "-1", "12XB", "lots"])
def test_parse_bytes_rejects(text):
    with pytest.raises(ValueError, match="CBS_MEMORY_BUDGET: got"):
        parse_bytes(text)


def test_doctor_reports_devices_x64_cache_defaults_and_smoke_tests():
    from cbs.doctor import report

    lines, ok = report(seconds=0.05)
    text = "\n".join(lines)
    assert ok, text
    for fragment in (
        "versions: cbs",
        "jax 0.9.1",
        "platform: cpu",
        "device 0: cpu",
        "float64 (x64): works",
        "compile cache:",
        "nqm_chunk=4",
        "TFLOP/s",
        "configurations/s",
        "(ok)",
        "all checks passed",
    ):
        assert fragment in text, fragment
