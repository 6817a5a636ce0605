"""Tests of the training back end on tiny problems (digits, small MLP; seconds each)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from cbs.sweep.schema import ConfigError
from cbs.train.backend import TrainBackend
from cbs.train.direct import make_block, make_config
from cbs.train.optimizers import OPTIMIZERS, soap_available

warnings.filterwarnings("ignore", message="Some donated buffers were not usable")

TINY = dict(dataset="digits", model="mlp", width=16, depth=1)


@pytest.fixture(scope="module")
def backend():
    cfg = make_config(TINY, metric="val_loss", value=1e-3, max_steps=40, eval_every=10)
    return TrainBackend(cfg)


def curve(result, cell_id):
    c = result.curves
    return c[c.cell_id == cell_id].sort_values("step")


@pytest.mark.parametrize("kind", sorted(OPTIMIZERS))
def test_every_optimizer_lowers_the_loss(backend, kind):
    if kind == "soap" and not soap_available():
        pytest.skip("cbs.train.soap not importable")
    # each registry entry names an LR at which it makes clear progress on TINY in 40 steps
    assert OPTIMIZERS[kind].example_lr, f"{kind}: OptimizerSpec.example_lr is not set"
    block = make_block(kind, 32, [OPTIMIZERS[kind].example_lr], seeds=(0,))
    res = backend.run_blocks([block])[0]
    cur = curve(res, block.cells[0].cell_id)
    assert not res.cells[0].diverged
    assert cur.val_loss.iloc[-1] < 0.8 * cur.val_loss.iloc[0], (kind, cur.val_loss.tolist())


def test_vmapped_equals_alone(backend):
    block = make_block("momentum", 16, [0.03, 0.1], hparams=dict(momentum=[0.5, 0.9]), seeds=(0, 1))
    res = backend.run_blocks([block])[0]
    for i in (0, 5, 7):
        cell = block.cells[i]
        alone = backend.run_blocks(
            [block.__class__("alone", block.optimizer, block.kind, 16, (cell,), None)]
        )[0]
        a, v = curve(alone, cell.cell_id), curve(res, cell.cell_id)
        np.testing.assert_allclose(
            a.val_loss.to_numpy(), v.val_loss.to_numpy(), rtol=1e-6, atol=1e-6
        )
        np.testing.assert_allclose(
            a.train_loss.to_numpy()[1:], v.train_loss.to_numpy()[1:], rtol=1e-6, atol=1e-6
        )


def test_divergence_is_isolated(backend):
    stable = make_block("sgd", 32, [0.1, 0.3], seeds=(0,))
    with_bad = make_block("sgd", 32, [0.1, 1e4, 0.3], seeds=(0,))
    r1 = backend.run_blocks([stable])[0]
    r2 = backend.run_blocks([with_bad])[0]
    bad = r2.cells[1]
    assert bad.diverged and not bad.reached and np.isnan(bad.steps_to_target)
    assert bad.steps_run < 40
    for c in stable.cells:
        a, b = curve(r1, c.cell_id), curve(r2, c.cell_id)
        np.testing.assert_allclose(
            a.val_loss.to_numpy(), b.val_loss.to_numpy(), rtol=1e-6, atol=1e-6
        )
    assert not any(c.diverged for c in r1.cells)


def test_stops_at_target_and_shallue_rule():
    cfg = make_config(
        TINY, metric="val_error", value=0.5, max_steps=400, eval_every=5, interpolate=True
    )
    be = TrainBackend(cfg)
    block = make_block("adam", 32, [1e-2, 3e-2], seeds=(0,))
    res = be.run_blocks([block])[0]
    assert all(c.reached for c in res.cells)
    steps = res.curves.step.max()
    assert steps < 400  # stopped early (at the first call boundary after all reached)
    for c in res.cells:
        cur = curve(res, c.cell_id)
        cur = cur[cur.step % 5 == 0]  # the scheduled evaluations
        first = cur[cur.metric < 0.5].step.min()
        prev = cur[cur.step < first].iloc[-1]
        # exact crossing (replayed): inside the evaluation interval that saw it
        assert prev.step < c.steps_to_target <= first
        assert prev.step < c.extra["steps_interpolated"] <= first


def test_deterministic(backend):
    block = make_block("adam", 32, [3e-3], seeds=(3,))
    a = backend.run_blocks([block])[0]
    b = TrainBackend(backend.config).run_blocks([block])[0]
    np.testing.assert_array_equal(a.curves.val_loss.to_numpy(), b.curves.val_loss.to_numpy())


def test_ema_and_schedule_follow_their_definitions(backend):
    """Warm-up + cosine SGD with and without EMA: every recorded validation loss equals a hand
    loop that applies LR x (the schedule written out from its definition) at each step and
    evaluates the bias-corrected EMA of the raw iterates (engine-independent: plain jax.grad,
    the seed's data order and init)."""
    import jax
    import jax.numpy as jnp

    from cbs.sweep.config import Schedule
    from cbs.train.engine import IndexStream
    from cbs.train.models import loss_and_error

    w, horizon, final, lr, B = 5, 20, 0.1, 0.3, 32

    def lr_mult(t):  # warm-up (t+1)/w, then cosine at mid-step s + 0.5 over `horizon` steps
        s = t - w
        cos = final + (1 - final) * 0.5 * (1 + np.cos(np.pi * (s + 0.5) / horizon))
        return (t + 1) / w if t < w else (cos if s < horizon else final)

    sched = Schedule(kind="cosine", warmup_steps=w, horizon=horizon, final_lr_fraction=final)
    block = make_block("sgd", B, [lr], hparams=dict(ema_decay=[0.0, 0.9]), schedule=sched)
    res = backend.run_blocks([block])[0]
    p = backend.problem

    def loss(params, x, y):
        return loss_and_error(p.task, p.model.apply(params, x), y)[0]

    @jax.jit
    def sgd_step(params, ema, x, y, lr_t, d):
        params = jax.tree.map(lambda q, g: q - lr_t * g, params, jax.grad(loss)(params, x, y))
        return params, jax.tree.map(lambda e, q: d * e + (1 - d) * q, ema, params)

    @jax.jit
    def val_loss(params, scale):
        return loss(jax.tree.map(lambda q: q * scale, params), p.x_val, p.y_val)

    for cell in block.cells:
        d = cell.hparams["ema_decay"]
        params = p.init_params(cell.seed)
        ema = jax.tree.map(jnp.zeros_like, params)
        stream, want = IndexStream(cell.seed, p.num_train), [float(val_loss(params, 1.0))]
        for t in range(40):
            idx = stream.take(B)
            params, ema = sgd_step(params, ema, p.x_train[idx], p.y_train[idx], lr * lr_mult(t), d)
            if (t + 1) % 10 == 0:  # bias-corrected EMA
                want.append(float(val_loss(ema, 1 / (1 - d ** (t + 1)))))
        got = curve(res, cell.cell_id)
        assert got.step.tolist() == [0, 10, 20, 30, 40]
        np.testing.assert_allclose(got.val_loss.to_numpy(), want, rtol=2e-5)
    # the EMA is what is evaluated: it differs from the raw iterate's loss after step 0
    raw, avg = (curve(res, c.cell_id).val_loss.to_numpy() for c in block.cells)
    assert raw[0] == avg[0] and np.all(np.abs(raw[1:] - avg[1:]) > 1e-3)


def test_noise_scale_table():
    cfg = make_config(
        dict(TINY, noise_scale=dict(enabled=True, micro_batch=16, num_micro=4)),
        value=1e-3,
        max_steps=20,
        eval_every=10,
    )
    res = TrainBackend(cfg).run_blocks([make_block("sgd", 32, [0.1])])[0]
    t = res.tables["noise_scale"]
    assert list(t.columns) == ["cell_id", "step", "b_simple", "trace_sigma", "grad_sq"]
    assert len(t) == 2 and np.all(t.trace_sigma > 0) and np.all(np.isfinite(t.b_simple))


@pytest.mark.parametrize(
    "train,target,msg",
    [
        (dict(TINY), dict(metric="val_error", value=0.0), "target.value"),
        (dict(TINY), dict(metric="val_loss", value=-1.0), "target.value"),
        (
            dict(dataset="linreg", label_noise=0.5),
            dict(metric="val_loss", value=0.1),
            "target.value",
        ),
        (dict(dataset="linreg"), dict(metric="val_error", value=0.1), "target.metric"),
        (dict(TINY, max_train=16), dict(metric="val_loss", value=0.1), "grid.batch_sizes"),
        (
            dict(dataset="digits", model="transformer"),
            dict(metric="val_loss", value=0.1),
            "train.model",
        ),
        (
            dict(dataset="text", model="transformer", seq_len=16),
            dict(metric="val_loss", value=1.0),
            "analysis.tokens_per_example",
        ),
    ],
)
def test_check_rejects_unreachable(train, target, msg):
    with pytest.raises(ConfigError) as e:
        make_config(train, metric=target["metric"], value=target["value"], batch_sizes=[32])
    assert e.value.path.startswith(msg)


def test_kfac_cells_run_in_turn_with_the_same_records(backend):
    block = make_block("kfac", 32, [0.1, 1e4], seeds=(0,))
    res = backend.run_blocks([block])[0]
    good, bad = res.cells
    assert not good.diverged and good.steps_run == 40
    assert bad.diverged and not bad.reached and bad.steps_run < 40
    assert set(res.curves.columns) >= {
        "cell_id",
        "step",
        "metric",
        "val_loss",
        "val_error",
        "train_loss",
    }
    steps = curve(res, good.cell_id).step.tolist()
    assert steps == [0, 10, 20, 30, 40]


def test_compacting_finished_cells_changes_no_record():
    """Dropping finished cells from the vmap mid-block (compact) changes no recorded value:
    a cell's record ends where it finished, whatever its block does afterwards."""
    block = make_block("sgd", 32, [0.003, 0.01, 0.3, 0.5, 1.0, 0.03, 0.1, 0.2], seeds=(0,))
    results, widths = {}, {}
    for mode in ("always", "never"):
        cfg = make_config(
            dict(TINY, steps_per_call=20, compact=mode),
            metric="val_loss",
            value=1.2,
            max_steps=300,
            eval_every=10,
        )
        backend = TrainBackend(cfg)
        run = backend._run_for("sgd", block.schedule)
        call, seen = run.call, []
        run.call = lambda state, lr, *a, _call=call, _seen=seen, **kw: (
            _seen.append(lr.shape[0]),
            _call(state, lr, *a, **kw),
        )[1]
        results[mode], widths[mode] = backend.run_blocks([block])[0], seen
    compacted, plain = results["always"], results["never"]
    reached = [r.reached for r in plain.cells]
    assert any(reached) and not all(reached)  # the case compaction is for
    assert min(widths["always"]) < 8 == min(widths["never"])  # compaction happened
    for a, b in zip(compacted.cells, plain.cells):
        assert (a.reached, a.diverged, a.steps_run) == (b.reached, b.diverged, b.steps_run)
        np.testing.assert_equal(a.steps_to_target, b.steps_to_target)
        np.testing.assert_allclose(
            [a.final_metric, a.best_metric], [b.final_metric, b.best_metric], rtol=1e-6
        )
        ca, cb = curve(compacted, a.cell_id), curve(plain, b.cell_id)
        assert ca.step.tolist() == cb.step.tolist()
        np.testing.assert_allclose(ca.val_loss.to_numpy(), cb.val_loss.to_numpy(), rtol=1e-6)
    # a reached cell's record ends at its crossing; slow cells ran the full budget
    for r in plain.cells:
        if r.reached:
            # (the exact step may lie before the evaluation that saw the crossing)
            assert 0 <= r.steps_run - r.steps_to_target < 10 and r.steps_run % 10 == 0
            assert r.final_metric < 1.2 and r.best_metric == r.final_metric
    assert max(r.steps_run for r in compacted.cells) == 300


def test_compaction_decision_is_a_cost_model_not_a_timing():
    from cbs.train.loop import COMPILE_COST_FLOPS, compaction_pays

    # 4 lanes x 10 calls x (6 * 1e4 params * 2000 examples) = 4.8e9 < the compile cost
    assert not compaction_pays(4, 10, 2000, 0, 10_000)
    assert compaction_pays(4, 100, 2000, 0, 10_000) == (
        4 * 100 * 6 * 1e4 * 2000 > COMPILE_COST_FLOPS
    )
    assert compaction_pays(4, 1000, 2000, 0, 10_000)
