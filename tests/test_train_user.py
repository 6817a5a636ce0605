"""User models (linen and nnx) and user losses, defined here and named as
``test_train_user:Name`` in configs, exactly as a researcher would name their own code."""

from __future__ import annotations

import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest
from flax import nnx

from cbs.errors import ConfigError
from cbs.sweep.config import load_config
from cbs.train.backend import TrainBackend
from cbs.train.direct import make_block, make_config
from cbs.train.user import CustomLoss, NnxModel

warnings.filterwarnings("ignore", message="Some donated buffers were not usable")


class TinyNnx(nnx.Module):
    """nnx: flatten, one hidden layer; num_outputs filled in by cbs."""

    def __init__(self, width: int, num_outputs: int, *, rngs: nnx.Rngs):
        self.hidden = nnx.Linear(64, width, rngs=rngs)
        self.out = nnx.Linear(width, num_outputs, rngs=rngs)

    def __call__(self, x):
        return self.out(jax.nn.tanh(self.hidden(x.reshape(x.shape[0], -1))))


class TinyLinen(nn.Module):
    width: int = 16
    num_outputs: int = 10

    @nn.compact
    def __call__(self, x):
        return nn.Dense(self.num_outputs)(nn.relu(nn.Dense(self.width)(x.reshape(x.shape[0], -1))))


class Tempered(nn.Module):
    """Logits divided by a learned temperature exp(log_temp): kfac-jax has no layer for it."""

    @nn.compact
    def __call__(self, x):
        logits = nn.Dense(10)(x.reshape(x.shape[0], -1))
        return logits * jnp.exp(-self.param("log_temp", nn.initializers.zeros, ()))


class WithBatchNorm(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.BatchNorm(use_running_average=True)(x.reshape(x.shape[0], -1))
        return nn.Dense(10)(x)


def focal_loss(outputs, y, gamma: float = 2.0):
    """Focal loss (mean over the batch) and the error rate: train.loss's contract."""
    logp = jax.nn.log_softmax(outputs)
    lp = jnp.take_along_axis(logp, y[:, None], -1)[:, 0]
    loss = -((1 - jnp.exp(lp)) ** gamma * lp).mean()
    return loss, jnp.mean(jnp.argmax(outputs, -1) != y)


def not_a_pair(outputs, y):
    return jnp.mean(outputs)


def tiny_config(model, tmp_path, optimizers, loss=None, **over):
    train = {"dataset": "digits", "model": model, "model_args": {"width": 16}}
    if loss:
        train["loss"] = loss
    raw = dict(
        name="user",
        backend="train",
        grid=dict(batch_sizes=[32, 128], learning_rates=[0.01], optimizers=optimizers, seeds=[0]),
        target=dict(metric="val_error", value=0.5),
        budget=dict(max_steps=60, eval_every=20),
        output=dict(dir=str(tmp_path / "run")),
        train=train,
    )
    raw.update(over)
    return load_config(raw)


def test_nnx_model_and_custom_loss_sweep_with_sgd_adam_muon(tmp_path):
    from cbs.sweep.runner import run_sweep

    cfg = tiny_config(
        "test_train_user:TinyNnx",
        tmp_path,
        [{"kind": "sgd", "learning_rates": [0.3]}, {"kind": "adam"}, {"kind": "muon"}],
        loss="test_train_user:focal_loss",
    )
    summary = run_sweep(cfg, progress=False, log=lambda s: None)
    assert summary.complete
    res = pd.read_parquet(tmp_path / "run" / "results.parquet")
    assert sorted(res.kind.unique()) == ["adam", "muon", "sgd"] and len(res) >= 6
    assert not res.diverged.any()
    curves = pd.read_parquet(tmp_path / "run" / "curves.parquet")
    for cid, c in curves.groupby("cell_id"):
        c = c.sort_values("step")
        assert c.val_loss.iloc[-1] < 0.9 * c.val_loss.iloc[0], cid  # every optimizer trains it
    assert res.reached.all()


@pytest.mark.parametrize("kind", ["sgd", "adam", "muon", "kfac"])
def test_linen_model_every_optimizer(kind):
    lr = dict(sgd=0.3, adam=1e-2, muon=2e-2, kfac=0.1)[kind]
    cfg = make_config(
        {"dataset": "digits", "model": "test_train_user:TinyLinen"},
        max_steps=40,
        eval_every=20,
        kinds=(kind,),
    )
    be = TrainBackend(cfg)
    res = be.run_blocks([make_block(kind, 32, [lr])])[0]
    c = res.curves.sort_values("step")
    assert not res.cells[0].diverged and c.val_loss.iloc[-1] < 0.8 * c.val_loss.iloc[0]
    assert be.manifest()["model"]["kind"] == "test_train_user:TinyLinen"


def test_nnx_adapter_matches_the_module():
    """init(PRNGKey(s)) builds the module with nnx.Rngs(PRNGKey(s)); apply(params, x) is the
    module's own call (an independent computation: nnx's forward on the built module)."""
    adapter = NnxModel(TinyNnx, {"width": 8, "num_outputs": 3})
    key = jax.random.PRNGKey(7)
    params = adapter.init(key, None)
    module = TinyNnx(8, 3, rngs=nnx.Rngs(key))
    x = jnp.asarray(np.random.default_rng(0).standard_normal((5, 8, 8, 1)), jnp.float32)
    np.testing.assert_array_equal(np.asarray(adapter.apply(params, x)), np.asarray(module(x)))
    other = adapter.init(jax.random.PRNGKey(8), None)
    assert not np.array_equal(other["out"]["kernel"], params["out"]["kernel"])
    # A plain pytree of arrays: what every Optax transform and the vmapped engine expect.
    assert all(isinstance(v, jax.Array) for v in jax.tree.leaves(params))


def test_custom_loss_per_example_mean_is_the_batch_loss():
    loss = CustomLoss("focal", focal_loss)
    out = jnp.asarray(np.random.default_rng(1).standard_normal((12, 10)), jnp.float32)
    y = jnp.arange(12) % 10
    per_l, per_e = loss.per_example(out, y)
    bl, be = loss.batch(out, y)
    assert float(jnp.mean(per_l)) == pytest.approx(float(bl), rel=1e-6)
    assert float(jnp.mean(per_e)) == pytest.approx(float(be))


def test_kfac_names_the_layer_it_cannot_register(tmp_path):
    def tempered_with(second):
        return dict(
            name="k",
            backend="train",
            grid=dict(batch_sizes=[32], learning_rates=[0.1], optimizers=[{"kind": "sgd"}, second]),
            target=dict(metric="val_loss", value=0.5),
            budget=dict(max_steps=10, eval_every=5),
            train={"dataset": "digits", "model": "test_train_user:Tempered"},
        )

    with pytest.raises(ConfigError) as e:
        load_config(tempered_with({"kind": "kfac"}))
    assert e.value.path == "grid.optimizers[1].kind"
    assert "['params']['log_temp']" in str(e.value) and "Dense" not in str(e.value)
    # The same model is fine for every other optimizer.
    load_config(tempered_with({"kind": "muon"}))
