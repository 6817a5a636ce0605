"""Adaptive LR grids: an edge optimum is extended until interior, then zoomed; bounded."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
from cbs_test_backends import FakeBackend

from cbs.store import read_table
from cbs.sweep import backend as backend_mod
from cbs.sweep.config import load_config
from cbs.sweep.runner import run_sweep


class BowlBackend(FakeBackend):
    """steps = 100 * (1 + log10(lr / lr_opt)**2) with lr_opt = scale (per seed a tiny shift);
    lr > 50 * scale diverges. Adaptive grids on, as for the train back end."""

    name = "bowl"
    adaptive_default = True

    def steps_of(self, c):
        opt = self.config.section.scale * (1 + 0.01 * c.seed)
        return 100 * (1 + math.log10(c.lr / opt) ** 2), c.lr > 50 * self.config.section.scale


def config(tmp_path, scale, adaptive=None):
    raw = {
        "name": "bowl",
        "backend": "bowl",
        "grid": {
            "batch_sizes": [4, 16],
            "learning_rates": [0.01, 0.1],
            "seeds": [0, 1, 2],
            "optimizers": [{"kind": "plain"}],
            **({"adaptive": adaptive} if adaptive else {}),
        },
        "target": {"metric": "loss", "value": 0.1},
        "budget": {"max_steps": 10_000},
        "output": {"dir": str(tmp_path / "run")},
        "fake": {"scale": scale},
    }
    raw["bowl"] = raw.pop("fake")
    return load_config(raw)


def _setup(monkeypatch):
    monkeypatch.setitem(backend_mod.BACKENDS, "bowl", "test_sweep_adaptive:BowlBackend")
    BowlBackend.calls = []


def best_lr(df):
    g = df.groupby("lr")["steps_to_target"].median()
    return float(g.idxmin()), np.sort(df["lr"].unique())


def test_edge_optimum_is_extended_until_interior_then_zoomed(monkeypatch, tmp_path):
    _setup(monkeypatch)
    cfg = config(tmp_path, scale=1.0)  # optimum at lr ~ 1, grid stops at 0.1
    run_sweep(cfg, progress=False)
    df = read_table(tmp_path / "run", "results")
    assert df["cell_id"].is_unique
    for _bs, g in df.groupby("batch_size"):
        lr, lrs = best_lr(g)
        assert lrs[0] < lr < lrs[-1], (lr, lrs)  # interior now
        assert lr == 1.0  # 0.1 * 10**1 (same spacing)
        assert np.isclose(lrs, 10**0.5).any() and np.isclose(lrs, 10**-0.5).any()  # zoom midpoints
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    fam = manifest["adaptive"]["families"]["plain__B4"]
    assert [h["kind"] for h in fam["history"]] == ["extend", "zoom"] and fam["finished"]
    assert manifest["adaptive"]["flagged"] == [] and "finished" in manifest
    # Resume: nothing is recomputed, no row duplicated.
    n_calls = len(BowlBackend.calls)
    again = run_sweep(cfg, progress=False)
    assert len(BowlBackend.calls) == n_calls and again.complete
    assert len(read_table(tmp_path / "run", "results")) == len(df)


def test_non_converging_grid_ends_flagged(monkeypatch, tmp_path):
    _setup(monkeypatch)
    # Optimum at lr = 1e6 and nothing diverges below 5e7: two rounds of 1 point cannot reach it.
    cfg = config(tmp_path, scale=1e6, adaptive={"max_extend": 2, "points": 1})
    summary = run_sweep(cfg, progress=False)
    assert summary.complete
    df = read_table(tmp_path / "run", "results")
    assert sorted(df["lr"].unique()) == [
        0.01,
        0.1,
        1.0,
        10.0,
    ]  # two single-point extensions, no zoom
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["adaptive"]["flagged"] == ["plain__B16", "plain__B4"]
    assert manifest["adaptive"]["families"]["plain__B4"]["edge"] == {"-": ["high"]}
    # The analysis flags the edge.
    from cbs.analysis import steps_table

    table = steps_table(df)
    assert (table["lr_at_edge"] == "high").all()


def test_off_switch_runs_the_grid_only(monkeypatch, tmp_path):
    _setup(monkeypatch)
    run_sweep(config(tmp_path, scale=1.0, adaptive={"enabled": False}), progress=False)
    df = read_table(tmp_path / "run", "results")
    assert sorted(df["lr"].unique()) == [0.01, 0.1]
    assert isinstance(pd.read_parquet(tmp_path / "run" / "results.parquet"), pd.DataFrame)
