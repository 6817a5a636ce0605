"""Data sources of the training back end: every kind loads the same numbers, trains a small
sweep, and every bad input stops with one line naming the key (no training here except
the sweeps; each a few seconds)."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cbs.sweep.config import load_config
from cbs.train import sources
from cbs.train.backend import TrainSection
from cbs.train.make_example_data import digits_splits, write_all

warnings.filterwarnings("ignore", message="Some donated buffers were not usable")
ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "configs" / "examples"
USER_CODE = str(EXAMPLES / "user_code.py")
try:
    import datasets  # noqa: F401

    HAVE_HF = True
except ImportError:
    HAVE_HF = False


@pytest.fixture(scope="module")
def example_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("examples")
    write_all(out)
    return out


def section(**kw) -> TrainSection:
    return TrainSection(**kw)


# ------------------------------------------------------------------ every kind, same numbers
def test_file_kinds_hold_the_same_numbers(example_dir):
    """npz, the memory-mapped npy folder, Parquet (list column + split column, reshaped)
    and the Hugging Face folder are four independent readers of one set of arrays: they
    must agree with the arrays written, and hence on the content hash."""
    ref = digits_splits()
    names = {"npz": "digits.npz", "npy_folder": "digits_npy", "parquet": "digits.parquet"}
    args = {"parquet": {"x": "pixels", "y": "label", "x_shape": [8, 8, 1]}}
    if HAVE_HF:
        names["hf_disk"] = "digits_hf"
        args["hf_disk"] = {"y": "label"}
    hashes = {}
    for kind, name in names.items():
        path = str(example_dir / name)
        assert sources.source_kind(path) == kind
        d = sources.load(section(dataset=path, dataset_args=args.get(kind, {})))
        for k in sources.SPLIT_NAMES:
            np.testing.assert_array_equal(
                getattr(d, k), ref[k].astype(getattr(d, k).dtype), err_msg=f"{kind} {k}"
            )
        assert d.task == "classification" and d.num_outputs == 10
        assert d.info["source_kind"] == kind
        hashes[kind] = d.sha256
    assert len(set(hashes.values())) == 1, hashes
    mm = sources.load(section(dataset=str(example_dir / "digits_npy")))
    assert isinstance(mm.x_train, np.memmap)  # stays on disk until the back end decides


def test_xy_form_is_split_by_the_options(tmp_path):
    x = np.arange(200, dtype=np.float32).reshape(100, 2)
    y = (np.arange(100) % 3).astype(np.int64)
    np.savez(tmp_path / "xy.npz", x=x, y=y)
    d = sources.load(
        section(dataset=str(tmp_path / "xy.npz"), val_fraction=0.25, split_seed=3, max_train=50)
    )
    perm = np.random.default_rng(3).permutation(100)  # the documented split rule
    np.testing.assert_array_equal(d.x_val, x[perm[:25]])
    np.testing.assert_array_equal(d.x_train, x[perm[25:75]])
    assert d.num_train == 50 and d.info["split"] == "val_fraction"


def test_task_inference(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "reg.npz", x=rng.standard_normal((40, 3)), y=rng.standard_normal(40))
    d = sources.load(section(dataset=str(tmp_path / "reg.npz")))
    assert d.task == "regression" and d.y_train.shape[1:] == (1,) and d.num_outputs == 1
    tok = rng.integers(0, 50, (40, 9))
    np.savez(tmp_path / "lm.npz", x=tok[:, :-1], y=tok[:, 1:])
    d = sources.load(section(dataset=str(tmp_path / "lm.npz")))
    assert d.task == "lm" and d.num_outputs == int(tok.max()) + 1


def test_parquet_scalar_columns(tmp_path):
    df = pd.DataFrame(
        {"a": np.linspace(0, 1, 30), "b": np.linspace(1, 2, 30), "target": np.arange(30) % 2}
    )
    df.to_parquet(tmp_path / "t.parquet")
    d = sources.load(section(dataset=str(tmp_path / "t.parquet")))
    assert d.input_shape == (2,) and d.task == "classification"
    allx = np.concatenate([d.x_train, d.x_val])
    assert sorted(allx[:, 0].tolist()) == pytest.approx(df.a.tolist())


def test_factory_kinds():
    d = sources.load(section(dataset=f"{USER_CODE}:two_spirals", dataset_args={"num_samples": 300}))
    assert d.num_train == 240 and d.input_shape == (2,) and d.info["source_kind"] == "factory"
    # A factory on the Python path, returning a cbs Dataset.
    d2 = sources.load(section(dataset="cbs.train.data:digits"))
    assert d2.num_train == 1438 and d2.info["source"] == "factory"


# ------------------------------------------------------------------ each kind trains a sweep
SWEEP = [
    "grid.batch_sizes=[32, 128]",
    "grid.learning_rates=[0.003, 0.01]",
    "budget.max_steps=60",
    "budget.eval_every=20",
    "target.value=0.5",
]


@pytest.mark.parametrize("name", ["npz", "npy_folder", "parquet", "hf_disk", "factory"])
def test_example_config_runs_a_sweep(name, example_dir, tmp_path, monkeypatch):
    """The shipped example config of each source kind, run from a working directory
    laid out as the README says (data/examples from make_example_data, configs/examples)."""
    if name == "hf_disk" and not HAVE_HF:
        pytest.skip("the optional package datasets is not installed")
    from cbs.sweep.runner import run_sweep

    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    os.symlink(example_dir, tmp_path / "data" / "examples")
    (tmp_path / "configs").mkdir()
    os.symlink(EXAMPLES, tmp_path / "configs" / "examples")
    cfg = load_config(EXAMPLES / f"{name}.yaml", SWEEP + ["output.dir=run"])
    summary = run_sweep(cfg, progress=False, log=lambda s: None)
    assert summary.complete
    res = pd.read_parquet(tmp_path / "run" / "results.parquet")
    assert len(res) >= 4 and res.reached.any()  # >= : the adaptive LR grid may add cells
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    ds = manifest["backend_details"]["dataset"]
    assert ds["source_kind"] == name and len(ds["sha256"]) == 64
    assert ds["shapes"]["x_train"][0] == ds["num_train"]
    assert manifest["backend_details"]["data_placement"]["streaming"] == (name == "npy_folder")
