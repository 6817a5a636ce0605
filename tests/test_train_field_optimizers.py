"""The field's optimizers equal step-by-step references written from their papers' equations.

Shampoo and Adalayer are written here (cbs.train.shampoo, cbs.train.adalayer): each is
checked against a float64 NumPy transcription of its defining equations. AdEMAMix,
Simplified AdEMAMix, Sophia and schedule-free AdamW come from optax.contrib: the tests check
our wiring (hyperparameter mapping, warm-ups, LR alignment, the objective Sophia needs, the
evaluation point) against direct optax calls and, where our wiring adds arithmetic, against
the paper's equations.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cbs.train.direct import make_block, make_config
from cbs.train.optimizers import (
    OPTIMIZERS,
    adalayer_block_axes,
    build_optimizer,
    evaluation_point,
    matrix_views,
)

warnings.filterwarnings("ignore", message="Some donated buffers were not usable")

RTOL, ATOL = 2e-5, 1e-7  # float32 against float64 references, a few steps


def _params(seed=0):
    """A small Flax-like tree: a conv kernel, a hidden dense layer, a read-out, a norm."""
    rng = np.random.default_rng(seed)
    f = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)  # noqa: E731
    return {
        "params": {
            "Conv_0": {"kernel": f(2, 2, 3), "bias": f(3)},
            "Dense_0": {"kernel": f(3, 4), "bias": f(4)},
            "LayerNorm_0": {"scale": f(4)},
            "Dense_1": {"kernel": f(4, 2), "bias": f(2)},
        }
    }


def _grads(steps, seed=1):
    rng = np.random.default_rng(seed)
    return [
        jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), _params())
        for _ in range(steps)
    ]


def _hp(kind, **over):
    return {k: jnp.float32(over.get(k, s.default)) for k, s in OPTIMIZERS[kind].hparams.items()}


def _run(kind, lr, hp, grads, params=None):
    """Updates of `kind` over the gradient sequence (params moved by each update)."""
    params = _params() if params is None else params
    tx = build_optimizer(kind, lr, hp)
    state = tx.init(params)
    upd = jax.jit(tx.update)
    out = []
    for g in grads:
        u, state = upd(g, state, params)
        params = optax.apply_updates(params, u)
        out.append(u)
    return out, params, state


def _np(tree):
    return jax.tree.map(lambda x: np.asarray(x, np.float64), tree)


def _assert_trees_close(a, b, rtol=RTOL, atol=ATOL):
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(
            np.asarray(x), y, rtol=rtol, atol=atol, err_msg=jax.tree_util.keystr(path)
        )


# ---------------------------------------------------------------------------- Shampoo


def _np_inv_root(mat, eps):
    lam, q = np.linalg.eigh(mat)
    return (q * (np.maximum(lam, 0.0) + eps) ** -0.25) @ q.T


def _np_shampoo(grads, params, lr, b1, b2, eps, gb2, geps, wd, k):
    """Shampoo (Gupta et al. 2018) with EMA factors, filtered gradient and per-leaf grafting
    (Shi et al. 2023, Algorithm 1), in float64; matrices are 2-D views: conv kernel
    (2, 2, 3) -> (4, 3); vectors take the graft step."""
    params = _np(params)
    flat, tdef = jax.tree.flatten(params)
    st = [dict(m=0.0 * p, a=0.0 * p, L=None, R=None, rl=None, rr=None) for p in flat]
    w2 = 1.0 if b2 == 1 else 1 - b2
    gw2 = 1.0 if gb2 == 1 else 1 - gb2
    out = []
    for t, g in enumerate(grads, start=1):
        gl = [np.asarray(x, np.float64) for x in jax.tree.leaves(g)]
        ups = []
        for i, (p, gi) in enumerate(zip(flat, gl)):
            s = st[i]
            s["m"] = b1 * s["m"] + (1 - b1) * gi
            s["a"] = gb2 * s["a"] + gw2 * gi * gi
            mhat = s["m"] / (1 - b1**t)
            corr = 1.0 if gb2 == 1 else 1 - gb2**t
            pg = mhat / (np.sqrt(s["a"] / corr) + geps)
            if gi.ndim < 2:
                u = pg
            else:
                G = gi.reshape(-1, gi.shape[-1])
                M = mhat.reshape(G.shape)
                if s["L"] is None:
                    s["L"], s["R"] = np.zeros((G.shape[0],) * 2), np.zeros((G.shape[1],) * 2)
                s["L"] = b2 * s["L"] + w2 * G @ G.T
                s["R"] = b2 * s["R"] + w2 * G.T @ G
                if (t - 1) % k == 0:
                    s["rl"], s["rr"] = _np_inv_root(s["L"], eps), _np_inv_root(s["R"], eps)
                ps = (s["rl"] @ M @ s["rr"]).reshape(gi.shape)
                u = np.linalg.norm(pg) / np.linalg.norm(ps) * ps
            ups.append(-lr * (u + wd * p))
        flat = [p + u for p, u in zip(flat, ups)]
        out.append(tdef.unflatten(ups))
    return out


@pytest.mark.parametrize(
    "b2,gb2,k,shared_step",
    # Adam graft + EMA factors; AdaGrad graft + sums; the block's shared step as the clock
    [(0.9, 0.99, 2, False), (1.0, 1.0, 3, False), (0.9, 0.99, 3, True)],
)
def test_shampoo_equals_its_equations(b2, gb2, k, shared_step):
    from cbs.train.shampoo import shampoo

    grads = _grads(5)
    kw = dict(b1=0.8, b2=b2, eps=1e-2, graft_b2=gb2, graft_eps=1e-6, weight_decay=0.1)
    params = _params()

    def tx(step=None):
        return shampoo(0.05, matrix_views, **kw, precondition_frequency=k, block_step=step)

    state = tx().init(params)
    upd = jax.jit(lambda g, s, p, t: tx(t if shared_step else None).update(g, s, p))
    got = []
    for t, g in enumerate(grads):
        u, state = upd(g, state, params, jnp.int32(t))
        params = optax.apply_updates(params, u)
        got.append(u)
    ref = _np_shampoo(grads, _params(), 0.05, 0.8, b2, 1e-2, gb2, 1e-6, 0.1, k)
    for g, r in zip(got, ref):
        _assert_trees_close(g, r, rtol=1e-4, atol=1e-6)


def test_shampoo_registry_entry_is_the_transform():
    hp = _hp("shampoo", b1=0.8, b2=0.9, eps=1e-2, graft_b2=0.99, weight_decay=0.1)
    grads = _grads(3)
    got, _, _ = _run("shampoo", 0.05, hp, grads)
    ref = _np_shampoo(grads, _params(), 0.05, 0.8, 0.9, 1e-2, 0.99, 1e-8, 0.1, 10)
    for g, r in zip(got, ref):
        _assert_trees_close(g, r, rtol=1e-4, atol=1e-6)


def test_shampoo_matrices_follow_muons_views():
    views = matrix_views(_params())["params"]
    assert views["Conv_0"]["kernel"].reduction_axis == (0, 1)  # (window * in, out)
    assert views["Dense_1"]["kernel"] is not None  # the read-out is a matrix too
    assert views["Dense_0"]["bias"] is None and views["LayerNorm_0"]["scale"] is None


# ---------------------------------------------------------------------------- Adalayer


def _np_adalayer(grads, params, lr, b1, b2, eps, wd):
    """Adalayer (Zhao et al. 2024): per-coordinate momentum, one second moment per block:
    each leaf, except the read-out kernel (Dense_1 here), one block per output column."""
    params = _np(params)
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]
    flat, tdef = jax.tree.flatten(params)
    m = [0.0 * p for p in flat]
    v = [0.0 for _ in flat]
    out = []
    for t, g in enumerate(grads, start=1):
        ups = []
        for i, (path, p, gi) in enumerate(zip(paths, flat, jax.tree.leaves(g))):
            gi = np.asarray(gi, np.float64)
            readout = "Dense_1" in path and "kernel" in path
            sq = (gi**2).mean(axis=0, keepdims=True) if readout else (gi**2).mean()
            m[i] = b1 * m[i] + (1 - b1) * gi
            v[i] = b2 * v[i] + (1 - b2) * sq
            u = (m[i] / (1 - b1**t)) / (np.sqrt(v[i] / (1 - b2**t)) + eps)
            ups.append(-lr * (u + wd * p))
        flat = [p + u for p, u in zip(flat, ups)]
        out.append(tdef.unflatten(ups))
    return out


def test_adalayer_equals_its_equations():
    grads = _grads(4)
    hp = _hp("adalayer", b1=0.8, b2=0.9, eps=1e-6, weight_decay=0.1)
    got, _, state = _run("adalayer", 0.03, hp, grads)
    ref = _np_adalayer(grads, _params(), 0.03, 0.8, 0.9, 1e-6, 0.1)
    for g, r in zip(got, ref):
        _assert_trees_close(g, r)
    nu = state[0].nu["params"]  # one statistic per leaf, per output unit for the read-out
    assert nu["Dense_0"]["kernel"].shape == (1, 1) and nu["Dense_1"]["kernel"].shape == (1, 2)
    assert adalayer_block_axes(_params())["params"]["Dense_1"]["kernel"] == (1,)


# ---------------------------------------------------------------------------- AdEMAMix


def _np_ademamix(grads, params, lr, b1, b2, b3, alpha, big_t, eps, wd):
    """AdEMAMix (Pagliardini et al. 2024, Algorithm 1) with its alpha and b3 warm-ups."""
    params = _np(params)
    flat, tdef = jax.tree.flatten(params)
    m1 = [0.0 * p for p in flat]
    m2 = [0.0 * p for p in flat]
    nu = [0.0 * p for p in flat]
    out = []
    for t, g in enumerate(grads, start=1):
        if big_t and t < big_t:
            a = t * alpha / big_t
            f = t / big_t
            lb1, lb3 = np.log(b1), np.log(b3)
            b3t = min(np.exp(lb1 * lb3 / ((1 - f) * lb3 + f * lb1)), b3)
        else:
            a, b3t = alpha, b3
        ups = []
        for i, (p, gi) in enumerate(zip(flat, jax.tree.leaves(g))):
            gi = np.asarray(gi, np.float64)
            m1[i] = b1 * m1[i] + (1 - b1) * gi
            m2[i] = b3t * m2[i] + (1 - b3t) * gi
            nu[i] = b2 * nu[i] + (1 - b2) * gi**2
            u = (m1[i] / (1 - b1**t) + a * m2[i]) / (np.sqrt(nu[i] / (1 - b2**t)) + eps)
            ups.append(-lr * (u + wd * p))
        flat = [p + u for p, u in zip(flat, ups)]
        out.append(tdef.unflatten(ups))
    return out


def test_ademamix_wiring_and_warmups():
    grads = _grads(5)
    kw = dict(b1=0.8, b2=0.9, b3=0.99, alpha=2.0, eps=1e-6, weight_decay=0.1)
    # without warm-up: exactly optax.contrib.ademamix with the same hyperparameters
    got, _, _ = _run("ademamix", 0.01, _hp("ademamix", **kw, warmup_steps=0), grads)
    direct, _, _ = _run_tx(optax.contrib.ademamix(0.01, **kw), grads)
    for g, d in zip(got, direct):
        _assert_trees_close(g, _np(d), rtol=1e-6, atol=1e-9)
    # with the paper's warm-ups of alpha and b3 over T = 4 steps
    got, _, _ = _run("ademamix", 0.01, _hp("ademamix", **kw, warmup_steps=4), grads)
    ref = _np_ademamix(grads, _params(), 0.01, 0.8, 0.9, 0.99, 2.0, 4, 1e-6, 0.1)
    for g, r in zip(got, ref):
        _assert_trees_close(g, r)


def _run_tx(tx, grads, params=None, **extra):
    params = _params() if params is None else params
    state = tx.init(params)
    upd = jax.jit(tx.update)
    out = []
    for g in grads:
        u, state = upd(g, state, params, **extra)
        params = optax.apply_updates(params, u)
        out.append(u)
    return out, params, state


def test_simplified_ademamix_equals_its_equations():
    """Morwani et al. 2025: m = b1 m + g; v = b2 v + (1 - b2) g²;
    Δθ = -η ((alpha g + m) / (sqrt(v / (1 - b2ᵗ)) + eps) + λ θ)."""
    grads = _grads(4)
    b1, b2, alpha, eps, wd, lr = 0.9, 0.8, 3.0, 1e-6, 0.1, 0.01
    hp = _hp("simplified_ademamix", b1=b1, b2=b2, alpha=alpha, eps=eps, weight_decay=wd)
    got, _, _ = _run("simplified_ademamix", lr, hp, grads)
    flat, tdef = jax.tree.flatten(_np(_params()))
    m = [0.0 * p for p in flat]
    v = [0.0 * p for p in flat]
    for t, (g, out) in enumerate(zip(grads, got), start=1):
        ups = []
        for i, (p, gi) in enumerate(zip(flat, jax.tree.leaves(g))):
            gi = np.asarray(gi, np.float64)
            m[i] = b1 * m[i] + gi
            v[i] = b2 * v[i] + (1 - b2) * gi**2
            ups.append(-lr * ((alpha * gi + m[i]) / (np.sqrt(v[i] / (1 - b2**t)) + eps) + wd * p))
        flat = [p + u for p, u in zip(flat, ups)]
        _assert_trees_close(out, tdef.unflatten(ups))


# ---------------------------------------------------------------------------- Sophia


def _quadratic_problem():
    """A tiny least-squares problem in a Flax-like tree, for the curvature-using kinds."""
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=(16, 3)), jnp.float32)
    y = jnp.asarray(rng.normal(size=(16, 2)), jnp.float32)

    def loss(p, idx):
        out = jnp.tanh(x[idx] @ p["params"]["Dense_0"]["kernel"]) + p["params"]["Dense_0"]["bias"]
        return 0.5 * jnp.mean(jnp.sum((out - y[idx]) ** 2, -1))

    params = {
        "params": {
            "Dense_0": {
                "kernel": jnp.asarray(rng.normal(size=(3, 2)), jnp.float32),
                "bias": jnp.zeros(2, jnp.float32),
            }
        }
    }
    return loss, params


def test_sophia_wiring_equals_direct_optax_with_the_batch_objective():
    loss, params = _quadratic_problem()
    kw = dict(b1=0.9, b2=0.8, eps=1e-6, gamma=0.05, clip_threshold=0.5, weight_decay=0.01)
    hp = _hp("sophia", **kw, update_interval=2)
    ours = build_optimizer("sophia", 0.05, hp)
    direct = optax.contrib.sophia(0.05, **kw, update_interval=2)
    batches = [np.arange(i, i + 8) % 16 for i in range(0, 20, 4)]
    p1, p2 = params, params
    s1, s2 = ours.init(p1), direct.init(p2)

    @jax.jit
    def steps(p1, s1, p2, s2, idx):
        obj = lambda p: loss(p, idx)  # noqa: E731
        u1, s1 = ours.update(jax.grad(obj)(p1), s1, p1, obj_fn=obj)
        u2, s2 = direct.update(jax.grad(obj)(p2), s2, p2, obj_fn=obj)
        return optax.apply_updates(p1, u1), s1, optax.apply_updates(p2, u2), s2

    for idx in batches:
        p1, s1, p2, s2 = steps(p1, s1, p2, s2, jnp.asarray(idx))
    _assert_trees_close(p1, _np(p2), rtol=1e-6, atol=1e-9)
    assert np.any(np.asarray(jax.tree.leaves(s1[0].nu)[0]) != 0)  # the curvature was estimated


# ---------------------------------------------------------------------------- schedule-free


def test_schedule_free_adamw_equals_optax_at_constant_lr():
    grads = _grads(4)
    kw = dict(b1=0.8, b2=0.9, eps=1e-6, weight_decay=0.1, weight_lr_power=2.0)
    got, p_got, s_got = _run("schedule_free_adamw", 0.02, _hp("schedule_free_adamw", **kw), grads)
    ref, p_ref, s_ref = _run_tx(optax.contrib.schedule_free_adamw(0.02, **kw), grads)
    for g, r in zip(got, ref):  # updates are differences of O(1) params: absolute rounding
        _assert_trees_close(g, _np(r), rtol=1e-6, atol=3e-7)
    point = evaluation_point("schedule_free_adamw")
    _assert_trees_close(
        point(p_got, s_got),
        _np(optax.contrib.schedule_free_eval_params(s_ref, p_ref)),
        rtol=1e-6,
        atol=1e-8,
    )
    assert evaluation_point("adamw")(p_got, s_got) is p_got


def test_schedule_free_adamw_weights_each_step_by_its_own_lr():
    """Defazio et al. 2024 (schedule-free AdamW, bias-corrected second moment) with a
    warm-up: y = (1 - b1) z + b1 x; z -= γ_t (g / (sqrt(v̂) + eps) + λ y);
    x = (1 - c) x + c z, c = γ̄_t^p / Σ_{s<=t} γ̄_s^p with γ̄ the running max of the LR."""
    grads = _grads(4)
    b1, b2, eps, wd, pw, lr = 0.8, 0.9, 1e-6, 0.1, 2.0, 0.02
    sched = lambda c: lr * (c + 1.0) / 3.0 if c < 3 else lr  # noqa: E731 - warm-up, 0-based
    hp = _hp("schedule_free_adamw", b1=b1, b2=b2, eps=eps, weight_decay=wd, weight_lr_power=pw)
    tx = build_optimizer(
        "schedule_free_adamw", lambda c: jnp.where(c < 3, lr * (c + 1.0) / 3.0, lr), hp
    )
    params = _params()
    state = tx.init(params)
    y = _np(params)
    flat, tdef = jax.tree.flatten(y)
    z = [p.copy() for p in flat]
    x = [p.copy() for p in flat]
    v = [0.0 * p for p in flat]
    wsum, gmax = 0.0, 0.0
    for t, g in enumerate(grads, start=1):
        u, state = tx.update(g, state, params)
        params = optax.apply_updates(params, u)
        gam = sched(t - 1)
        gmax = max(gmax, gam)
        wsum += gmax**pw
        c = gmax**pw / wsum
        yl = [(1 - b1) * zi + b1 * xi for zi, xi in zip(z, x)]
        for i, gi in enumerate(jax.tree.leaves(g)):
            gi = np.asarray(gi, np.float64)
            v[i] = b2 * v[i] + (1 - b2) * gi**2
            z[i] = z[i] - gam * (gi / (np.sqrt(v[i] / (1 - b2**t)) + eps) + wd * yl[i])
            x[i] = (1 - c) * x[i] + c * z[i]
        y_next = [(1 - b1) * zi + b1 * xi for zi, xi in zip(z, x)]
        _assert_trees_close(params, tdef.unflatten(y_next), rtol=1e-5, atol=1e-6)
        _assert_trees_close(
            evaluation_point("schedule_free_adamw")(params, state),
            tdef.unflatten(x),
            rtol=1e-5,
            atol=1e-6,
        )


@pytest.fixture(scope="module")
def tiny_problem():
    from cbs.train.backend import TrainBackend

    cfg = make_config(
        dict(dataset="digits", model="mlp", width=8, depth=1), max_steps=5, eval_every=1
    )
    return TrainBackend(cfg).problem


def test_engine_evaluates_schedule_free_at_its_average(tiny_problem):
    """The train engine's evaluation (and so the crossing replay, which runs the same
    program) uses the averaged point."""
    from cbs.train.engine import make_block_fns
    from cbs.train.models import loss_and_error

    problem = tiny_problem
    hp = _hp("schedule_free_adamw")
    init, train_interval, evaluate, _ = make_block_fns(
        problem, "schedule_free_adamw", lambda c: 1.0, 5
    )
    state = init(problem.init_params(0), hp)
    idx = jnp.asarray(np.arange(5 * 16).reshape(5, 16) % problem.num_train)
    state, _ = jax.jit(train_interval)(state, jnp.float32(0.05), hp, idx)
    x = optax.contrib.schedule_free_eval_params(state.opt_state, state.params)
    vl, _ = evaluate(state, hp)
    want = loss_and_error(problem.task, problem.model.apply(x, problem.x_val), problem.y_val)[0]
    at_y = loss_and_error(
        problem.task, problem.model.apply(state.params, problem.x_val), problem.y_val
    )[0]
    np.testing.assert_allclose(float(vl), float(want), rtol=1e-5)
    assert abs(float(at_y) - float(want)) > 1e-4  # the two points differ: the test can fail


def test_engine_gives_sophia_the_steps_batch_loss(tiny_problem):
    """Sophia's update gets the loss of the step's own batch as its objective."""
    from cbs.train.engine import make_block_fns
    from cbs.train.models import loss_and_error

    problem = tiny_problem
    hp = _hp("sophia", update_interval=1)
    init, train_interval, _, _ = make_block_fns(problem, "sophia", lambda c: 1.0, 4)
    params = problem.init_params(0)
    idx = np.arange(4 * 16).reshape(4, 16) % problem.num_train
    state, _ = jax.jit(train_interval)(init(params, hp), jnp.float32(0.01), hp, jnp.asarray(idx))
    tx = optax.contrib.sophia(0.01, **{k: float(v) for k, v in hp.items() if k != "ema_decay"})
    st = tx.init(params)

    @jax.jit
    def one(params, st, rows):
        def obj(p):
            out = problem.model.apply(p, problem.x_train[rows])
            return loss_and_error(problem.task, out, problem.y_train[rows])[0]

        u, st = tx.update(jax.grad(obj)(params), st, params, obj_fn=obj)
        return optax.apply_updates(params, u), st

    for rows in idx:
        params, st = one(params, st, jnp.asarray(rows))
    _assert_trees_close(state.params, _np(params), rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------- end to end

NEW_KINDS = (
    "shampoo",
    "adalayer",
    "ademamix",
    "simplified_ademamix",
    "sophia",
    "schedule_free_adamw",
)


def test_schedule_free_exact_crossing_equals_every_step_run():
    """The crossing replay evaluates at the averaged point too: eval_every 7 + replay gives
    the eval_every 1 counts."""
    from cbs.train.backend import TrainBackend

    def counts(every):
        cfg = make_config(
            dict(dataset="digits", model="mlp", width=16, depth=1, exact_crossing=True),
            metric="val_loss",
            value=1.2,
            max_steps=40,
            eval_every=every,
        )
        block = make_block("schedule_free_adamw", 16, [0.05, 0.1], seeds=(0,))
        res = TrainBackend(cfg).run_blocks([block])[0]
        return np.array([c.steps_to_target for c in res.cells])

    every = counts(1)
    assert np.isfinite(every).all(), every
    assert np.any(every % 7 != 0), every  # the replay has something to find
    np.testing.assert_array_equal(counts(7), every)
