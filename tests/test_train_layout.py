"""The cell layout of a block's program (vmap / sequential / grouped) changes no recorded
value, the choice rule, the layout option, and the one-shot init compile options."""

from __future__ import annotations

import json
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cbs.sweep.schema import ConfigError
from cbs.train.backend import TrainBackend
from cbs.train.direct import make_block, make_config
from cbs.train.layout import LayoutProbe, choose_layout, over_cells, parse_layout

warnings.filterwarnings("ignore", message="Some donated buffers were not usable")

TINY = dict(dataset="digits", model="mlp", width=16, depth=1)


def run_with(layout: str, block):
    cfg = make_config(
        dict(TINY, layout=layout), metric="val_loss", value=1.0, max_steps=40, eval_every=10
    )
    be = TrainBackend(cfg)
    return be.run_blocks([block])[0]


def test_layouts_record_the_same_values():
    # 8 cells: some reach the target (exact-crossing replays run in the layout too), the
    # largest LR diverges, the rest are censored; grouped:3 leaves a partial last group.
    block = make_block("momentum", 32, [0.01, 0.1, 0.5, 50.0], seeds=(0, 1))
    results = {lay: run_with(lay, block) for lay in ("vmap", "sequential", "grouped:3")}
    ref = results["vmap"]
    assert any(c.reached for c in ref.cells) and any(c.diverged for c in ref.cells)
    assert not all(c.reached or c.diverged for c in ref.cells)
    for lay, res in results.items():
        assert list(res.tables["timing"].layout) == [lay]
        for a, b in zip(ref.cells, res.cells):
            # the outcome and every count: exactly
            assert (a.cell_id, a.reached, a.diverged, a.steps_run) == (
                b.cell_id,
                b.reached,
                b.diverged,
                b.steps_run,
            ), lay
            np.testing.assert_array_equal(a.steps_to_target, b.steps_to_target)
            np.testing.assert_array_equal(
                a.extra.get("crossing_exact", np.nan), b.extra.get("crossing_exact", np.nan)
            )
            # metrics: to float32 rounding (XLA:CPU may round a batched matmul's summation
            # differently from a single one at some shapes: ~1e-7 relative)
            np.testing.assert_allclose(a.final_metric, b.final_metric, rtol=1e-5)
            np.testing.assert_allclose(a.best_metric, b.best_metric, rtol=1e-5)
        ca = ref.curves.sort_values(["cell_id", "step"]).reset_index(drop=True)
        cb = res.curves.sort_values(["cell_id", "step"]).reset_index(drop=True)
        assert ca[["cell_id", "step", "diverged"]].equals(cb[["cell_id", "step", "diverged"]]), lay
        for col in ("val_loss", "val_error", "train_loss"):
            finite = np.isfinite(ca[col].to_numpy())
            np.testing.assert_array_equal(finite, np.isfinite(cb[col].to_numpy()))
            np.testing.assert_allclose(
                ca[col].to_numpy()[finite], cb[col].to_numpy()[finite], rtol=1e-5, atol=1e-7
            )


def test_probe_layout_is_recorded_with_its_probe():
    block = make_block("sgd", 32, [0.1, 0.3], seeds=(0, 1))
    res = run_with("probe", block)
    row = res.tables["timing"].iloc[0]
    probe = json.loads(row.layout_probe)
    assert row.layout in probe["forward_seconds"] and probe["cells"] == 4
    assert set(probe["forward_seconds"]) >= {"vmap", "sequential", "grouped:2"}
    assert all(v > 0 for v in probe["forward_seconds"].values())
    assert run_with("auto", block).tables["timing"].iloc[0].layout == "vmap"


def test_over_cells_layouts_agree_on_a_pure_function():
    # an independent check of the wrapper: every layout stacks fn's outputs in cell order
    x = jnp.arange(7 * 3, dtype=jnp.float32).reshape(7, 3)

    def fn(row, scale):
        return dict(s=jnp.sum(row) * scale, r=row[::-1])

    expect = dict(s=x.sum(1) * 2.0, r=x[:, ::-1])
    for lay in ("vmap", "sequential", "grouped:2", "grouped:7", "grouped:9"):
        out = jax.jit(lambda x, lay=lay: over_cells(lay, fn, (x, jnp.full(7, 2.0))))(x)
        np.testing.assert_array_equal(out["s"], expect["s"])
        np.testing.assert_array_equal(out["r"], expect["r"])


def probe_of(**seconds):
    return lambda: LayoutProbe(8, 32, seconds, 0.1)


def test_choose_layout_rule():
    assert choose_layout("gpu", 64, probe_of(vmap=2.0, sequential=1.0))[0] == "vmap"
    assert choose_layout("cpu", 1, probe_of(vmap=2.0, sequential=1.0))[0] == "vmap"
    assert choose_layout("cpu", 8, None)[0] == "vmap"
    # a clear win is taken, a gain inside the margin is not
    layout, why, probe = choose_layout("cpu", 8, probe_of(vmap=2.0, sequential=1.0))
    assert layout == "sequential" and probe is not None and "2.00x" in why
    assert choose_layout("cpu", 8, probe_of(vmap=1.0, sequential=0.95))[0] == "vmap"
    assert choose_layout("cpu", 8, probe_of(vmap=3.0, sequential=2.0, **{"grouped:4": 1.0}))[0] == (
        "grouped:4"
    )


@pytest.mark.parametrize("bad", ["loop", "grouped", "grouped:0", "grouped:x", "vmap:2", "probe:2"])
def test_bad_layout_is_a_config_error(bad):
    with pytest.raises(ValueError):
        parse_layout(bad)
    with pytest.raises(ConfigError, match="train.layout"):
        make_config(dict(TINY, layout=bad), max_steps=40, eval_every=10)


def test_init_params_are_model_init_bit_for_bit():
    # init_params compiles with lighter one-shot options on CPU; the values must be the
    # default compile's exactly (Flax's truncated-normal and zeros initialisers, which
    # every built-in model uses).
    section = dict(dataset="digits", model="mlp", width=16, depth=2)
    p = TrainBackend(make_config(section, max_steps=10, eval_every=5)).problem
    x0 = jnp.asarray(np.asarray(p.x_train[:1]))
    for seed in (0, 3):
        ours = p.init_params(seed)
        ref = jax.jit(lambda s: p.model.init(jax.random.PRNGKey(s), x0))(jnp.int32(seed))
        for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(ref)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_all_finite_guard_matches_numpy():
    # the divergence guard's "every parameter finite", against NumPy's isfinite
    from cbs.train.engine import _all_finite

    big = np.float32(3e38)  # finite, and its sum with itself overflows: must stay "finite"
    cases = [
        dict(a=np.ones(3, np.float32), b=np.full((2, 2), big, np.float32)),
        dict(a=np.array([1.0, np.inf], np.float32), b=np.zeros(2, np.float32)),
        dict(a=np.array([-np.inf], np.float32), b=np.zeros(2, np.float32)),
        dict(a=np.array([np.nan, 1.0], np.float32), b=np.zeros(2, jnp.bfloat16)),
        dict(a=np.ones(2, np.float32), b=np.array([np.inf], jnp.bfloat16), n=np.arange(3)),
        dict(n=np.arange(3)),
    ]
    for tree in cases:
        expect = all(
            np.all(np.isfinite(np.asarray(x, np.float64)))
            for x in jax.tree.leaves(tree)
            if np.issubdtype(np.asarray(x).dtype, np.inexact) or x.dtype == jnp.bfloat16
        )
        assert bool(jax.jit(_all_finite)(tree)) == expect, tree
