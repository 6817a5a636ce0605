"""Train back end: the noise-scale estimator against its closed form, one compiled program
per block layout, and compaction's auto mode changing no record."""

from __future__ import annotations

import warnings

import jax
import numpy as np
import pytest

from cbs.train.backend import TrainBackend
from cbs.train.direct import make_block, make_config
from cbs.train.engine import make_block_fns, noise_scale_estimates

warnings.filterwarnings("ignore", message="Some donated buffers were not usable")

TINY = dict(dataset="digits", model="mlp", width=16, depth=1)


def test_noise_scale_estimator_matches_closed_form_on_linear_regression():
    """On noisy linear regression (a linear model, loss 0.5 r^2 with r = w.x + b - y) the
    per-example gradient is r (x, 1), so the gradient G and tr(Sigma) of the training set
    have closed forms. Micro-batches drawn with replacement make the two-batch-size
    estimates unbiased for exactly these; their mean over many draws must match."""
    cfg = make_config(
        dict(
            dataset="linreg", model="mlp", depth=0, num_samples=1280, linreg_dim=8, label_noise=0.3
        ),
        metric="val_loss",
        value=0.1,
    )
    problem = TrainBackend(cfg).problem
    params = problem.init_params(0)
    _, _, _, grad_fn = make_block_fns(problem, "sgd", lambda count: 1.0, 10)

    dense = params["params"]["Dense_0"]
    X = np.asarray(problem.x_train, np.float64)
    Y = np.asarray(problem.y_train, np.float64)[:, 0]
    r = X @ np.asarray(dense["kernel"], np.float64)[:, 0] + float(dense["bias"][0]) - Y
    g = np.concatenate([X * r[:, None], r[:, None]], axis=1)  # per-example gradients
    G = g.mean(axis=0)
    grad_sq = float(G @ G)
    trace_sigma = float(np.mean(np.sum((g - G) ** 2, axis=1)))

    k, b, draws = 4, 16, 3000
    idx = np.random.default_rng(0).integers(0, X.shape[0], size=(draws, k, b))
    est = jax.jit(jax.vmap(lambda i: noise_scale_estimates(grad_fn, params, i)))(idx)
    gsq, tr = (np.asarray(e, np.float64) for e in est)
    for name, samples, exact in (("|G|^2", gsq, grad_sq), ("tr Sigma", tr, trace_sigma)):
        se = samples.std() / np.sqrt(draws)
        assert abs(samples.mean() - exact) < max(4 * se, 1e-6 * exact), (
            name,
            samples.mean(),
            exact,
            se,
        )
        assert abs(samples.mean() / exact - 1) < 0.05, (name, samples.mean(), exact)
    # the quantity the table reports, B_simple = tr(Sigma) / |G|^2, from the averaged estimates
    assert tr.mean() / gsq.mean() == pytest.approx(trace_sigma / grad_sq, rel=0.05)


def _count_compiles():
    """A list that grows by one per XLA backend compilation from now on."""
    seen = []

    def listener(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            seen.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    return seen


def test_one_compiled_program_per_block_layout():
    """A second block with the same layout (kind, batch size, number of cells) but other
    LRs, hyperparameters and seeds reuses the compiled programs: no recompilation (a Python
    scalar leaking into a static argument, or a shape that depends on values, would show)."""
    cfg = make_config(
        dict(TINY, compact="never"), metric="val_loss", value=1e-3, max_steps=20, eval_every=10
    )
    backend = TrainBackend(cfg)
    first = make_block("momentum", 32, [0.05, 0.1], hparams=dict(momentum=[0.5, 0.9]), seeds=(0,))
    second = make_block("momentum", 32, [0.2, 0.4], hparams=dict(momentum=[0.8, 0.95]), seeds=(3,))
    compiles = _count_compiles()
    backend.run_blocks([first])
    assert len(compiles) >= 1  # the listener sees compilations at all
    before = len(compiles)
    backend.run_blocks([second])
    assert len(compiles) == before, (
        f"{len(compiles) - before} recompilation(s) for an identical layout"
    )


def test_nqm_grid_compiles_once_per_shape():
    from cbs import nqm

    problem = nqm.bin_problem(nqm.harmonic_problem(1000), num_bins=20)
    kw = dict(batch_sizes=[4.0, 64.0], target=0.05, max_steps=10**5)
    nqm.evaluate_grid(problem, "momentum", np.geomspace(1e-3, 1, 8), 0.5, **kw)
    compiles = _count_compiles()
    nqm.evaluate_grid(problem, "momentum", np.geomspace(2e-3, 2, 8), 0.9, **kw)
    assert compiles == []


def _run_recording_widths(block, **train):
    """Run ``block`` on TINY with these train options; also return the vmap width of every
    call of the block program (compaction narrows it)."""
    kw = dict(metric="val_loss", value=1.2, max_steps=200, eval_every=10)
    backend = TrainBackend(make_config(dict(TINY, **train), **kw))
    run = backend._run_for(block.kind, block.schedule)
    call, widths = run.call, []
    run.call = lambda state, lr, *a, **kw: (widths.append(lr.shape[0]), call(state, lr, *a, **kw))[
        1
    ]
    return backend.run_blocks([block])[0], widths, backend


def test_compaction_auto_follows_the_cost_model_and_changes_no_record(monkeypatch):
    """compact: auto narrows the vmap exactly when the cost model says it pays, asking it
    with the block's real numbers (lanes dropped, calls left, examples, parameters), and
    every cell's record is the one it gets without compaction."""
    import cbs.train.loop as loop

    block = make_block("sgd", 32, [0.003, 0.01, 0.3, 0.5, 1.0, 0.03, 0.1, 0.2], seeds=(0,))
    results, widths, asked = {}, {}, {}
    for pays in (True, False):
        asked[pays] = []
        monkeypatch.setattr(
            loop, "compaction_pays", lambda *a, _asked=asked[pays], _p=pays: _asked.append(a) or _p
        )
        results[pays], widths[pays], backend = _run_recording_widths(
            block, steps_per_call=20, compact="auto"
        )
    assert min(widths[True]) < 8 and set(widths[False]) == {8}, widths
    num_params = sum(x.size for x in jax.tree.leaves(backend.problem.init_params(0)))
    calls_left = [a[1] for a in asked[False]]  # asked after every call of 20 steps
    assert calls_left == list(range(9, 9 - len(calls_left), -1)), calls_left
    assert any(a[0] > 0 for a in asked[False])  # lanes it could drop
    assert {(a[2], a[4]) for a in asked[False]} == {(20 * 32, num_params)}
    compacted, plain = results[True], results[False]
    assert any(r.reached for r in plain.cells) and not all(r.reached for r in plain.cells)
    for a, b in zip(compacted.cells, plain.cells):
        assert (a.reached, a.diverged, a.steps_run) == (b.reached, b.diverged, b.steps_run)
        np.testing.assert_equal(a.steps_to_target, b.steps_to_target)
        ca = compacted.curves[compacted.curves.cell_id == a.cell_id].sort_values("step")
        cb = plain.curves[plain.curves.cell_id == b.cell_id].sort_values("step")
        np.testing.assert_allclose(ca.val_loss.to_numpy(), cb.val_loss.to_numpy(), rtol=1e-6)


def test_adaptive_round_block_reuses_the_first_pass_program():
    """A zoom / extension round has fewer cells than its family's first pass; it is padded
    to the first pass's width and runs in the program the first pass compiled (no compile
    at all), and the padding changes no record (same cells run at their own width)."""
    import dataclasses

    from cbs.sweep.adaptive import round_block_id
    from cbs.sweep.config import load_config
    from cbs.sweep.grid import expand_blocks

    raw = dict(
        name="t",
        backend="train",
        grid=dict(
            batch_sizes=[32], learning_rates=[0.03, 0.1, 0.3, 1.0], optimizers=[dict(kind="sgd")]
        ),
        target=dict(metric="val_loss", value=1.2),
        budget=dict(max_steps=60, eval_every=10),
        train=dict(TINY, compact="never"),
    )
    raw["grid"]["seeds"] = [0, 1]
    cfg = load_config(raw)
    backend = TrainBackend(cfg)
    (first,) = expand_blocks(cfg, TrainBackend)
    # a zoom round's cells: two new LRs x the two seeds (half the first pass's width)
    zoom_cells = make_block("sgd", 32, [0.17, 0.55], seeds=(0, 1)).cells
    zoom = dataclasses.replace(first, block_id=round_block_id(first.block_id, 2), cells=zoom_cells)
    assert backend.program_width(zoom) == len(first.cells) == 8
    backend.run_blocks([first])
    compiles = _count_compiles()
    padded = backend.run_blocks([zoom])[0]
    assert compiles == [], f"{len(compiles)} compilation(s) for an adaptive round block"
    alone = TrainBackend(cfg)
    alone.program_width = lambda block: len(block.cells)  # the unpadded layout
    own = alone.run_blocks([zoom])[0]
    assert sum(c.reached for c in own.cells) >= 2
    for a, b in zip(padded.cells, own.cells):
        assert (a.cell_id, a.reached, a.diverged, a.steps_run) == (
            b.cell_id,
            b.reached,
            b.diverged,
            b.steps_run,
        )
        np.testing.assert_equal(a.steps_to_target, b.steps_to_target)
        np.testing.assert_allclose(a.final_metric, b.final_metric, rtol=1e-6)
    assert len(padded.curves) == len(own.curves)  # padded lanes are never recorded
