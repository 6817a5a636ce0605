"""Every bad data / model / loss input: one line naming the config key, what was found and
what is expected; exit status 2; nothing written; no compute (the config check reads and
traces abstractly, it never trains)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from cbs.errors import ConfigError
from cbs.sweep.__main__ import main
from cbs.train import sources
from cbs.train.backend import TrainSection

HERE = Path(__file__).resolve().parent


def good_arrays():
    rng = np.random.default_rng(0)
    return {
        "x_train": rng.standard_normal((40, 8, 8, 1)).astype(np.float32),
        "y_train": np.arange(40) % 10,
        "x_val": rng.standard_normal((10, 8, 8, 1)).astype(np.float32),
        "y_val": np.arange(10) % 10,
    }


# Bad-data factories live here; configs name them as test_train_bad_inputs:NAME.
def raises(**kw):
    raise RuntimeError("the bucket is empty")


def returns_string(**kw):
    return "not arrays"


def returns_mismatched():
    a = good_arrays()
    a["y_train"] = a["y_train"][:-1]
    return a


def nan_in_val():
    a = good_arrays()
    a["x_val"][3, 2, 2, 0] = np.nan
    return a


def three_logits(width: int = 4, num_classes: int = 3):
    import flax.linen as nn

    class Three(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(num_classes)(x.reshape(x.shape[0], -1))

    return Three()


def broken_model(**kw):
    raise ValueError("width must be even")


def mse_on_logits(outputs, y):
    """A valid custom loss (mean over examples, error rate)."""
    import jax
    import jax.numpy as jnp

    return jnp.mean((outputs - jax.nn.one_hot(y, outputs.shape[-1])) ** 2), jnp.mean(
        outputs.argmax(-1) != y
    )


def scalar_loss(outputs, y):
    return outputs.mean()


def run_cli(tmp_path, train: dict, capsys, optimizers=("sgd",)):
    cfg = {
        "name": "bad",
        "backend": "train",
        "grid": {
            "batch_sizes": [8],
            "learning_rates": [0.1],
            "optimizers": [{"kind": k} for k in optimizers],
        },
        "target": {"metric": "val_loss", "value": 0.5},
        "budget": {"max_steps": 10, "eval_every": 5},
        "output": {"dir": str(tmp_path / "out")},
        "train": train,
    }
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    code = main([str(path), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()  # nothing written
    return err


def _npz(tmp_path, **arrays):
    p = tmp_path / "d.npz"
    np.savez(p, **arrays)
    return str(p)


CASES = {
    "missing file": (
        lambda t: {"dataset": str(t / "nope" / "missing.npz")},
        "train.dataset",
        "no such file",
    ),
    "missing keys": (lambda t: {"dataset": _npz(t, a=np.zeros(3))}, "train.dataset", "found [a]"),
    "mismatched lengths": (
        lambda t: {"dataset": _npz(t, x=np.zeros((5, 2)), y=np.zeros(4, int))},
        "train.dataset",
        "found 5 and 4",
    ),
    "mismatched example shapes": (
        lambda t: {
            "dataset": _npz(
                t,
                x_train=np.zeros((5, 2)),
                y_train=np.arange(5) % 2,
                x_val=np.zeros((3, 4)),
                y_val=np.arange(3) % 2,
            )
        },
        "train.dataset",
        "found (2,) and (4,)",
    ),
    "label out of range": (
        lambda t: {"dataset": _npz(t, x=np.zeros((9, 2)), y=np.arange(9) - 1)},
        "train.dataset",
        "found values in [-1, 7]",
    ),
    "unknown name": (lambda t: {"dataset": "digts"}, "train.dataset", "did you mean 'digits'"),
    "unknown dataset_args key": (
        lambda t: {"dataset": _npz(t, **good_arrays()), "dataset_args": {"colum": "x"}},
        "train.dataset_args.colum",
        "reads only these keys",
    ),
    "factory not importable": (
        lambda t: {"dataset": "no_such_pkg.mod:make"},
        "train.dataset",
        "No module",
    ),
    "factory attribute missing": (
        lambda t: {"dataset": "test_train_bad_inputs:rasies"},
        "train.dataset",
        "did you mean 'raises'",
    ),
    "factory raises": (
        lambda t: {"dataset": "test_train_bad_inputs:raises"},
        "train.dataset",
        "RuntimeError: the bucket is empty",
    ),
    "factory wrong return": (
        lambda t: {"dataset": "test_train_bad_inputs:returns_string"},
        "train.dataset",
        "found str",
    ),
    "factory bad kwargs": (
        lambda t: {"dataset": "test_train_bad_inputs:returns_mismatched", "dataset_args": {"n": 3}},
        "train.dataset_args",
        "unexpected keyword",
    ),
    "factory mismatched": (
        lambda t: {"dataset": "test_train_bad_inputs:returns_mismatched"},
        "train.dataset",
        "found 40 and 39",
    ),
    "non-finite value": (
        lambda t: {"dataset": "test_train_bad_inputs:nan_in_val"},
        "train.dataset",
        "x_val[3]",
    ),
    "model output shape": (
        lambda t: {"dataset": "digits", "model": "test_train_bad_inputs:three_logits"},
        "train.model",
        "expected outputs of shape (2, 10)",
    ),
    "model factory raises": (
        lambda t: {"dataset": "digits", "model": "test_train_bad_inputs:broken_model"},
        "train.model",
        "width must be even",
    ),
    "model not a module": (
        lambda t: {"dataset": "digits", "model": "test_train_bad_inputs:returns_string"},
        "train.model",
        "found str",
    ),
    "model typo": (
        lambda t: {"dataset": "digits", "model": "mpl"},
        "train.model",
        "did you mean 'mlp'",
    ),
    "loss wrong return": (
        lambda t: {"dataset": "digits", "loss": "test_train_bad_inputs:scalar_loss"},
        "train.loss",
        "two scalars",
    ),
    "kfac with a custom loss": (
        lambda t: {"dataset": "digits", "loss": "test_train_bad_inputs:mse_on_logits"},
        "grid.optimizers[1].kind",
        "custom function",
        ("sgd", "kfac"),
    ),
    "regression with classification task": (
        lambda t: {
            "dataset": _npz(t, x=np.zeros((9, 2)), y=np.linspace(0, 1, 9)),
            "task": "classification",
        },
        "train.task",
        "fractional",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_exit_2_nothing_written(case, tmp_path, capsys):
    make, key, found, *optimizers = CASES[case]
    err = run_cli(tmp_path, make(tmp_path), capsys, *optimizers)
    assert f"'{key}'" in err and found in err, err


def test_bad_input_from_the_shell(tmp_path):
    """The same through a real process: exit 2, one line on stderr, no traceback."""
    cfg = HERE.parent / "configs" / "examples" / "npz.yaml"
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "cbs.sweep",
            str(cfg),
            f"train.dataset={tmp_path}/missing.parquet",
            f"output.dir={tmp_path}/out",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert (
        p.returncode == 2
        and len(p.stderr.strip().splitlines()) == 1
        and "train.dataset" in p.stderr
    )
    assert not (tmp_path / "out").exists()


# Mutations of a valid set of arrays: every result is either a valid Dataset or a
# ConfigError naming train.dataset / train.task, never another exception.
MUTATIONS = [
    "drop",
    "truncate",
    "nan",
    "inf",
    "strings",
    "scalar",
    "negative_label",
    "float_label",
    "reshape_val",
    "empty_val",
    "none",
]


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(MUTATIONS), st.sampled_from(sources.SPLIT_NAMES), st.integers(0, 9)
        ),
        min_size=1,
        max_size=3,
    )
)
# The draw that once crashed this helper (reshaping an emptied array); kept explicitly.
@example([("empty_val", "x_val", 0), ("reshape_val", "x_val", 0)])
@example([("empty_val", "x_train", 0), ("nan", "x_train", 3), ("reshape_val", "x_train", 1)])
def test_mutated_arrays_give_a_config_error_or_a_dataset(muts):
    a = {k: np.array(v) for k, v in good_arrays().items()}
    broken = False
    for kind, key, i in muts:
        if key not in a:
            continue
        v = a[key]
        if np.ndim(v) == 0:
            continue  # already made a scalar: nothing left to mutate along axis 0
        if kind == "drop":
            del a[key]
        elif kind == "truncate":
            a[key] = v[: i % max(len(v), 1)]
        elif kind in ("nan", "inf") and v.dtype.kind == "f" and v.size:
            v = v.copy()
            v.reshape(len(v), -1)[i % len(v), 0] = np.nan if kind == "nan" else np.inf
            a[key] = v
        elif kind == "strings":
            a[key] = v.astype(str)
        elif kind == "scalar":
            a[key] = np.float32(1.0)
        elif kind == "negative_label" and key.startswith("y") and len(v):
            v = v.copy()
            v[i % len(v)] = -1
            a[key] = v
        elif kind == "float_label" and key.startswith("y"):
            a[key] = v + 0.5
        elif kind == "reshape_val" and key.startswith("x") and v.ndim == 4 and len(v):
            a[key] = v.reshape(len(v), -1)
        elif kind == "empty_val":
            a[key] = v[:0]
        broken |= kind != "none"
    try:
        d = sources.from_arrays("mutated", a, TrainSection(dataset="x.npz"))
    except ConfigError as e:
        assert e.path in ("train.dataset", "train.task"), e
        assert "\n" not in str(e)
        return
    # Accepted: then it really is consistent and finite.
    assert d.x_train.shape[0] == d.y_train.shape[0] and d.x_val.shape[1:] == d.x_train.shape[1:]
    assert np.isfinite(d.x_train).all() and np.isfinite(d.x_val).all()
    if d.task == "classification":
        assert d.y_train.min() >= 0 and d.y_train.max() < d.num_outputs
