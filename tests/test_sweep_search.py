"""Quasi-random search per batch size (grid.search): deterministic trials that cover the
box, extension of any searched range whose side holds the optimum, flags at bounds, and
the bad inputs of the search space. Fake back ends only (no JAX)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from cbs_test_backends import FakeBackend

from cbs.store import read_table
from cbs.sweep import backend as backend_mod
from cbs.sweep.__main__ import main
from cbs.sweep.config import load_config
from cbs.sweep.grid import expand_blocks
from cbs.sweep.runner import run_sweep
from cbs.sweep.schema import ConfigError
from cbs.sweep.search import unit_points


class BowlBackend(FakeBackend):
    """steps = 100 * (1 + log10(lr / lr_opt)**2 + log10((1 - momentum) / om_opt)**2) with
    lr_opt = 0.1 and om_opt = scale: a bowl in (log LR, log(1 - momentum)); lr > 30
    diverges. The LR-grid adaptive rounds are off (as for the NQM), so any round seen here
    is the search's own."""

    name = "bowl"

    def steps_of(self, c):
        om = 1.0 - c.hparams["momentum"]
        s = 100 * (
            1 + math.log10(c.lr / 0.1) ** 2 + math.log10(om / self.config.section.scale) ** 2
        )
        return s, c.lr > 30


def _setup(monkeypatch):
    monkeypatch.setitem(backend_mod.BACKENDS, "bowl", "test_sweep_search:BowlBackend")
    monkeypatch.setitem(backend_mod.BACKENDS, "fake", "cbs_test_backends:FakeBackend")
    BowlBackend.calls = []


def raw_config(tmp_path, space, *, scale=0.1, trials=16, max_rounds=4, **grid):
    return {
        "name": "search",
        "backend": "bowl",
        "grid": {
            "batch_sizes": [4, 16],
            "seeds": [0, 1],
            "optimizers": [{"kind": "heavy"}],
            "search": {"trials": trials, "seed": 3, "space": space, "max_rounds": max_rounds},
            **grid,
        },
        "target": {"metric": "loss", "value": 0.1},
        "budget": {"max_steps": 100_000},
        "output": {"dir": str(tmp_path / "run")},
        "bowl": {"scale": scale},
    }


SPACE = {
    "lr": {"min": 1e-3, "max": 10.0},
    "one_minus_momentum": {"min": 1e-2, "max": 1.0},
}


def test_trials_are_the_same_for_the_same_seed_and_cover_the_box(monkeypatch, tmp_path):
    _setup(monkeypatch)
    a = unit_points("halton", 2, 7, 0, 64)
    assert np.array_equal(a, unit_points("halton", 2, 7, 0, 64))
    assert not np.array_equal(a, unit_points("halton", 2, 8, 0, 64))
    # a round continues the sequence: points 32.. of one draw are the draw from 32
    assert np.array_equal(a[32:], unit_points("halton", 2, 7, 32, 32))
    # low discrepancy, unlike independent uniform points: every cell of a 4 x 4 grid over
    # the unit square holds a point (64 iid points miss one with probability ~0.26) and
    # each eighth of each axis holds 8 +- 1 of the 64 (iid: binomial, sd 2.6)
    for seq in ("halton", "sobol"):
        u = unit_points(seq, 2, 7, 0, 64)
        assert len({(int(x * 4), int(y * 4)) for x, y in u}) == 16, seq
        for j in range(2):
            counts = np.bincount((u[:, j] * 8).astype(int), minlength=8)
            assert counts.min() >= 7 and counts.max() <= 9, (seq, counts)
    # the config's trials: the same ids for the same config, in the box, spread over it
    cfg = load_config(raw_config(tmp_path, SPACE))
    blocks = expand_blocks(cfg, BowlBackend)
    again = expand_blocks(
        load_config(raw_config(tmp_path, dict(reversed(SPACE.items())))), BowlBackend
    )
    assert [c.cell_id for b in blocks for c in b.cells] == [
        c.cell_id for b in again for c in b.cells
    ]  # the space's key order is not part of the trials
    b = blocks[0]
    assert len(b.cells) == 16 * 2 and b.search is not None
    lr = np.log10([c.lr for c in b.cells])
    om = np.log10([1 - c.hparams["momentum"] for c in b.cells])
    assert lr.min() >= -3 and lr.max() <= 1 and om.min() >= -2 and om.max() <= 0
    for t, lo, hi in ((lr, -3, 1), (om, -2, 0)):  # each quarter of each range is sampled
        q = np.floor((t - lo) / (hi - lo) * 4).astype(int)
        assert set(q) == {0, 1, 2, 3}
    # every batch size sees the same trials (common random numbers)
    assert [c.lr for c in blocks[1].cells] == [c.lr for c in b.cells]
    changed = raw_config(tmp_path, SPACE)
    changed["grid"]["search"]["seed"] = 4
    assert {
        c.cell_id for c in expand_blocks(load_config(changed), BowlBackend)[0].cells
    }.isdisjoint({c.cell_id for c in b.cells})


def test_lr_scaling_multiplies_the_searched_lr(monkeypatch, tmp_path):
    _setup(monkeypatch)
    raw = raw_config(tmp_path, SPACE, lr_scaling={"power": 1.0})
    blocks = expand_blocks(load_config(raw), BowlBackend)
    a, b = blocks[0].cells, blocks[1].cells  # B = 4 and B = 16
    assert np.allclose([y.lr / x.lr for x, y in zip(a, b)], 4.0, rtol=1e-12)
    assert [x.hparams for x in a] == [y.hparams for y in b]


def test_edge_of_a_non_lr_range_is_extended_until_interior(monkeypatch, tmp_path):
    _setup(monkeypatch)
    # the optimum 1 - momentum = 1e-3 lies a decade below the searched range [1e-2, 1]
    cfg = load_config(raw_config(tmp_path, SPACE, scale=1e-3))
    run_sweep(cfg, progress=False)
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    fam = manifest["adaptive"]["families"]["heavy__B4"]
    assert fam["search"] and fam["finished"] and fam["rounds"] >= 1
    assert all("one_minus_momentum: low edge" in h["reasons"] for h in fam["history"][:1])
    lo, hi = fam["box"]["one_minus_momentum"]
    assert lo <= 1e-3 * (1 + 1e-12) and hi == 1.0  # grew on the low side only, to the optimum
    assert fam["box"]["lr"] == [1e-3, 10.0]  # the LR range was interior: unchanged
    assert fam["edge"] == {} and manifest["adaptive"]["flagged"] == []  # ended interior
    df = read_table(tmp_path / "run", "results")
    assert df["cell_id"].is_unique
    first = df[df["block_id"] == "heavy__B4"]
    mine = df[df["block_id"].str.startswith("heavy__B4")]
    # the extension found a faster trial, and the best one is interior
    assert mine["steps_to_target"].min() < first["steps_to_target"].min()
    best_om = fam["best"]["0"]["one_minus_momentum"]
    best = mine.loc[mine["steps_to_target"].idxmin()]
    assert math.isclose(best_om, 1 - best["hp_momentum"], rel_tol=1e-12)
    t = (math.log10(best_om) - math.log10(lo)) / (math.log10(hi) - math.log10(lo))
    assert 0.1 <= t <= 0.9
    # resume: nothing recomputed, no row duplicated
    n = len(BowlBackend.calls)
    assert run_sweep(cfg, progress=False).complete
    assert len(BowlBackend.calls) == n and len(read_table(tmp_path / "run", "results")) == len(df)


def test_edge_at_a_bound_ends_flagged(monkeypatch, tmp_path):
    _setup(monkeypatch)
    # momentum on a linear range [0.5, 0.9] with its optimum at 0.999: the high side moves
    # towards momentum < 1 (halfway each round) but never reaches it, and is flagged
    space = {
        "lr": {"min": 1e-3, "max": 10.0},
        "momentum": {"min": 0.5, "max": 0.9, "scale": "linear"},
    }
    cfg = load_config(raw_config(tmp_path, space, scale=1e-3, max_rounds=2))
    run_sweep(cfg, progress=False)
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    fam = manifest["adaptive"]["families"]["heavy__B16"]
    assert fam["rounds"] == 2 and fam["edge"] == {"momentum": ["high"]}
    assert 0.9 < fam["box"]["momentum"][1] < 1.0  # admitted values only
    assert "heavy__B16" in manifest["adaptive"]["flagged"]
    df = read_table(tmp_path / "run", "results")
    assert (df["hp_momentum"] < 1).all() and df["cell_id"].is_unique
    # the analysis: the best point per batch size with every tuned value, and the flag
    from cbs.analysis import analyze_run

    a = analyze_run(tmp_path / "run", n_boot=0, write=False)
    pb = a.per_batch.set_index("batch_size")
    assert pb.loc[16, "search_edge"] == "momentum high"
    assert {"best_lr", "best_effective_lr", "best_hp_momentum"} <= set(pb.columns)
    assert a.swept_hparams["heavy"] == ["momentum"]
    assert any("B = 16" in w and "momentum high" in w for w in a.warnings)


BAD = [
    ({"lr": {"min": 1.0, "max": 1.0}}, "grid.search.space.lr", "empty range"),
    ({"lr": {"min": 1.0, "max": 0.1}}, "grid.search.space.lr", "inverted range"),
    ({"lr": {"min": 0.0, "max": 0.1}}, "grid.search.space.lr", "log range cannot"),
    (
        {"lr": {"min": 0.01, "max": 0.1}, "damping": {"min": 1e-3, "max": 1}},
        "grid.search.space.damping",
        "kind 'heavy' has no such hyperparameter; allowed: lr, momentum, one_minus_momentum",
    ),
    (
        {"lr": {"min": 0.01, "max": 0.1}, "one_minus_momentum": {"min": 0.5, "max": 2}},
        "grid.search.space.one_minus_momentum",
        "momentum = -1",
    ),
    (
        {
            "lr": {"min": 0.01, "max": 0.1},
            "momentum": {"min": 0.1, "max": 0.5, "scale": "linear"},
            "one_minus_momentum": {"min": 0.1, "max": 0.5},
        },
        "grid.search.space.one_minus_momentum",
        "one range per hyperparameter",
    ),
    ({"momentum": {"min": 0.1, "max": 0.5}}, "grid.search.space", "includes lr"),
]


@pytest.mark.parametrize("space,path,message", BAD)
def test_bad_search_space(monkeypatch, tmp_path, space, path, message):
    _setup(monkeypatch)
    with pytest.raises(ConfigError) as e:
        load_config(raw_config(tmp_path, space))
    assert e.value.path == path and message in str(e.value), str(e.value)


def test_search_conflicts_and_guard(monkeypatch, tmp_path):
    _setup(monkeypatch)
    raw = raw_config(tmp_path, SPACE)
    raw["grid"]["optimizers"][0]["hparams"] = {"momentum": [0.5, 0.9]}
    with pytest.raises(ConfigError) as e:
        load_config(raw)
    assert e.value.path == "grid.optimizers[0].hparams.momentum" and "one of the two" in str(
        e.value
    )
    raw = raw_config(tmp_path, SPACE, learning_rates=[0.1, 1.0])
    with pytest.raises(ConfigError) as e:
        load_config(raw)
    assert e.value.path == "grid.learning_rates"
    raw = raw_config(tmp_path, SPACE, trials=1000, max_cells=2000)
    with pytest.raises(ConfigError) as e:
        load_config(raw)
    # 2 batch sizes x 2 seeds = 4 cells per trial: 500 trials allowed
    assert e.value.path == "grid.search.trials" and "500 trials" in str(e.value)
    # per optimizer entry: its own search, checked against its own kind
    raw = raw_config(tmp_path, SPACE)
    raw["grid"].pop("search")
    raw["grid"]["optimizers"] = [
        {"kind": "plain", "learning_rates": [0.1]},
        {"kind": "plain", "name": "p2", "search": {"trials": 4, "space": SPACE}},
    ]
    with pytest.raises(ConfigError) as e:
        load_config(raw)
    assert e.value.path == "grid.optimizers[1].search.space.one_minus_momentum"
    assert "allowed: lr" in str(e.value)


def test_bad_search_exits_2_with_one_line_and_writes_nothing(monkeypatch, tmp_path, capsys):
    _setup(monkeypatch)
    import yaml

    raw = raw_config(tmp_path, {"lr": {"min": 1.0, "max": 0.1}})
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main([str(path), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "grid.search.space.lr" in err[0] and "min < max" in err[0]
    assert not (tmp_path / "run").exists()
