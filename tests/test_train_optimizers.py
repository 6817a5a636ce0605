"""Optimizers are what their names say: Muon's parameter routing, K-FAC's example count."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cbs.train.models import make_model
from cbs.train.optimizers import OPTIMIZERS, build_optimizer, muon_dimension_numbers


@functools.lru_cache(maxsize=1)
def _transformer_params():
    model = make_model("transformer", 16, 1, 64, seq_len=8, heads=2)
    return jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))


def _first_update(lr, grads, **hp_overrides):
    params = _transformer_params()
    hp = {
        k: jnp.float32(hp_overrides.get(k, v.default))
        for k, v in OPTIMIZERS["muon"].hparams.items()
    }
    tx = build_optimizer("muon", lr, hp)
    return jax.jit(tx.update)(grads, tx.init(params), params)[0]


def _paths(tree):
    return {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def test_muon_routes_hidden_matrices_to_muon_and_the_rest_to_adamw():
    params = _transformer_params()
    dims = muon_dimension_numbers(params)
    labels = {}
    for p, d in jax.tree_util.tree_flatten_with_path(
        dims, is_leaf=lambda x: x is None or isinstance(x, optax.contrib.MuonDimensionNumbers)
    )[0]:
        labels[jax.tree_util.keystr(p)] = d
    on_muon = {k for k, d in labels.items() if d is not None}
    for blk in ("Block_0",):
        att = f"['params']['{blk}']['MultiHeadDotProductAttention_0']"
        for part in ("query", "key", "value", "out"):
            assert f"{att}['{part}']['kernel']" in on_muon
            assert f"{att}['{part}']['bias']" not in on_muon
        for dense in ("Dense_0", "Dense_1"):  # the MLP's two kernels
            assert f"['params']['{blk}']['{dense}']['kernel']" in on_muon
    # AdamW: embeddings, read-out, every bias and norm.
    for name in (
        "['params']['Embed_0']['embedding']",
        "['params']['pos_embedding']",
        "['params']['Dense_0']['kernel']",
        "['params']['Dense_0']['bias']",
        "['params']['LayerNorm_0']['scale']",
    ):
        assert name in labels and name not in on_muon, name
    assert len(on_muon) == 6
    q = labels["['params']['Block_0']['MultiHeadDotProductAttention_0']['query']['kernel']"]
    o = labels["['params']['Block_0']['MultiHeadDotProductAttention_0']['out']['kernel']"]
    assert (q.reduction_axis, q.output_axis) == (0, (1, 2))  # (in, heads * head_dim)
    assert (o.reduction_axis, o.output_axis) == ((0, 1), 2)  # (heads * head_dim, out)


def _polar(m):
    u, _, vt = np.linalg.svd(m, full_matrices=False)
    return u @ vt


def test_muon_first_update_is_orthogonalised_on_kernels_and_adamw_elsewhere():
    """Against independent computations: Muon's first update of a hidden matrix points
    along the polar factor U Vᵀ of its gradient (Newton-Schulz approximates it); AdamW's
    first update of any other leaf is -lr * g / (|g| + eps) (plain AdamW; optax.contrib.muon's
    Adam group would be NAdamW, 1.47x larger here)."""
    params = _transformer_params()
    lr = 0.01
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
    # Ill-conditioned gradients (column scales over two decades), so that the polar factor
    # and the raw gradient point in clearly different directions.
    grads = treedef.unflatten(
        [
            jax.random.normal(k, x.shape) * jnp.logspace(0, -2, x.shape[-1])
            for k, x in zip(keys, leaves)
        ]
    )
    updates = _first_update(lr, grads)
    g, u = _paths(grads), _paths(updates)
    att = "['params']['Block_0']['MultiHeadDotProductAttention_0']"
    for name, shape2 in (
        (f"{att}['query']['kernel']", (16, 16)),
        (f"{att}['out']['kernel']", (16, 16)),
        ("['params']['Block_0']['Dense_1']['kernel']", (16, 64)),
    ):
        gm = np.asarray(g[name]).reshape(shape2)
        um = -np.asarray(u[name]).reshape(shape2)
        cos = np.sum(um * _polar(gm)) / np.linalg.norm(um) / np.linalg.norm(_polar(gm))
        assert cos > 0.95, (name, cos)
        # ... and not along the raw gradient (a random matrix is far from orthogonal).
        assert np.sum(um * gm) / np.linalg.norm(um) / np.linalg.norm(gm) < 0.9
    for name in (
        "['params']['Embed_0']['embedding']",
        "['params']['pos_embedding']",
        "['params']['Dense_0']['kernel']",
        "['params']['Block_0']['LayerNorm_0']['scale']",
        f"{att}['query']['bias']",
    ):
        gn = np.asarray(g[name], np.float64)
        np.testing.assert_allclose(
            np.asarray(u[name]), -lr * gn / (np.abs(gn) + 1e-8), rtol=1e-4, err_msg=name
        )


def test_muon_adam_lr_ratio_scales_only_the_adamw_group():
    grads = jax.tree.map(jnp.ones_like, _transformer_params())
    a = _paths(_first_update(0.01, grads))
    b = _paths(_first_update(0.01, grads, adam_lr_ratio=0.1))
    emb = "['params']['Embed_0']['embedding']"
    ker = "['params']['Block_0']['Dense_0']['kernel']"
    np.testing.assert_allclose(np.asarray(b[emb]), 0.1 * np.asarray(a[emb]), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(b[ker]), np.asarray(a[ker]), rtol=1e-6)


def test_kfac_example_count_includes_its_curvature_batches(monkeypatch):
    """Every batch kfac-jax's step consumes (burn-in included) is counted: spy on the
    batches handed to kfac-jax and compare with steps_to_target * B."""
    import kfac_jax

    from cbs.train.backend import TrainBackend
    from cbs.train.direct import make_block, make_config

    consumed = []
    real_step = kfac_jax.Optimizer.step

    def counting_step(self, params, state, rng, data_iterator=None, batch=None, **kw):
        if data_iterator is not None:

            def spy(it):
                for b in it:
                    consumed.append(len(b[0]))
                    yield b

            data_iterator = spy(data_iterator)
        else:
            consumed.append(len(batch[0]))
        return real_step(self, params, state, rng, data_iterator=data_iterator, batch=batch, **kw)

    monkeypatch.setattr(kfac_jax.Optimizer, "step", counting_step)
    cfg = make_config(
        dict(dataset="digits", model="mlp", width=16, depth=1),
        metric="val_loss",
        value=1.0,
        max_steps=60,
        eval_every=1,
    )
    backend = TrainBackend(cfg)
    for burnin in (0, 7):
        consumed.clear()
        block = make_block("kfac", 32, [0.1], hparams=dict(burnin_steps=[burnin]), seeds=(0,))
        (cell,) = backend.run_blocks([block])[0].cells
        assert cell.reached
        # the cell stops at its first evaluation below target (every step here)
        assert sum(consumed) == cell.steps_to_target * 32 == cell.extra["examples_to_target"]
        assert len(consumed) == cell.steps_to_target == cell.steps_run
        assert cell.extra["burnin_steps"] == burnin
        if burnin:
            assert cell.steps_to_target > burnin
