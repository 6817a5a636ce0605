"""Example user code for configs/examples/: a data factory, two models, a loss.

Referenced from the configs as ``configs/examples/user_code.py:NAME`` (a file path,
relative to the working directory); a module on the Python path works the same way as
``mypkg.mymodule:NAME``.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx


def two_spirals(num_samples: int = 2000, noise: float = 0.3, turns: float = 1.5, seed: int = 0):
    """Two interleaved noisy spirals in the plane: x (n, 2) float32, y (n,) int labels.
    Returns ``x, y``: the config's ``train.val_fraction`` / ``split_seed`` split them."""
    rng = np.random.default_rng(seed)
    t = np.sqrt(rng.uniform(0, 1, num_samples)) * turns * 2 * np.pi
    y = rng.integers(0, 2, num_samples)
    sign = np.where(y == 1, 1.0, -1.0)
    x = np.stack([sign * t * np.cos(t), sign * t * np.sin(t)], axis=1) / (turns * 2 * np.pi)
    x += noise / (turns * 2 * np.pi) * rng.standard_normal(x.shape)
    return {"x": x.astype(np.float32), "y": y.astype(np.int64)}


class ResidualMLP(nnx.Module):
    """An nnx model: a linear embedding, ``depth`` residual ReLU blocks, a read-out.
    ``num_outputs`` is filled in from the data set by cbs."""

    def __init__(
        self, in_features: int, width: int, depth: int, num_outputs: int, *, rngs: nnx.Rngs
    ):
        self.embed = nnx.Linear(in_features, width, rngs=rngs)
        self.blocks = nnx.List([nnx.Linear(width, width, rngs=rngs) for _ in range(depth)])
        self.out = nnx.Linear(width, num_outputs, rngs=rngs)

    def __call__(self, x):
        h = self.embed(x.reshape(x.shape[0], -1))
        for block in self.blocks:
            h = h + jax.nn.relu(block(h))
        return self.out(h)


class GatedMLP(nn.Module):
    """A linen model: one hidden layer whose units are gated by a second projection."""

    width: int = 64
    num_outputs: int = 10

    @nn.compact
    def __call__(self, x):
        x = x.reshape(x.shape[0], -1)
        h = nn.relu(nn.Dense(self.width)(x)) * nn.sigmoid(nn.Dense(self.width)(x))
        return nn.Dense(self.num_outputs)(h)


def smoothed_cross_entropy(outputs, y, smoothing: float = 0.1):
    """Label-smoothed cross-entropy (mean over the batch) and the top-1 error rate: the
    contract of ``train.loss``."""
    k = outputs.shape[-1]
    target = optax.smooth_labels(jax.nn.one_hot(y, k), smoothing)
    loss = optax.softmax_cross_entropy(outputs, target).mean()
    return loss, jnp.mean(jnp.argmax(outputs, -1) != y)
