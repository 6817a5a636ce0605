"""The MNIST-1D paper's CNN has the paper's shapes (ConvBase: 40 -> 19 -> 10 -> 5, 125 features)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from cbs.train.models import make_model


def test_mnist1d_cnn_matches_the_paper_layout():
    model = make_model("mnist1d_cnn", 25, 3, 10)
    params = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((2, 40, 1)))["params"]
    shapes = {k: v["kernel"].shape for k, v in params.items()}
    assert shapes == {
        "Conv_0": (5, 1, 25),
        "Conv_1": (3, 25, 25),
        "Conv_2": (3, 25, 25),
        "Dense_0": (125, 10),
    }
    # parameter count of the paper's ConvBase (PyTorch layout, same numbers)
    n = sum(x.size for x in jax.tree.leaves(params))
    assert n == (5 * 25 + 25) + 2 * (3 * 25 * 25 + 25) + (125 * 10 + 10)
    assert model.apply({"params": params}, jnp.zeros((2, 40, 1))).shape == (2, 10)
