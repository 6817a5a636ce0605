"""Tests for cbs.train.soap against an independent dense NumPy port of the SOAP reference."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cbs.train.soap import ScaleBySoapState, scale_by_soap, soap


# --------------------------------------------------------------------------------------
# Reference: a float64 NumPy transcription of the authors' PyTorch `SOAP.step`
# (github.com/nikhilvyas/SOAP), kept structurally close to it on purpose (per-parameter
# dict state, tensordot projections, exp_avg projected back and forth on every step,
# `continue` on the first step) so that it does not share code paths with the JAX
# implementation. The two documented deviations of cbs.train.soap are applied here too:
# eps is added to the bias-corrected sqrt(v), and weight decay is p - lr * (u + wd * p).
# --------------------------------------------------------------------------------------
class NumpySoap:
    def __init__(
        self,
        lr,
        b1,
        b2,
        eps,
        weight_decay,
        precondition_frequency,
        max_precond_dim,
        shampoo_beta,
        method,
    ):
        self.lr, self.b1, self.b2, self.eps, self.wd = lr, b1, b2, eps, weight_decay
        self.freq, self.max_dim, self.method = precondition_frequency, max_precond_dim, method
        self.shampoo_beta = b2 if shampoo_beta is None else shampoo_beta
        self.state = {}
        self.basis_change = []  # how far each periodic refresh moved Q (test sanity)

    @staticmethod
    def _as_matrix(g):
        if g.ndim < 2:
            return g.reshape(1, -1)
        return g.reshape(-1, g.shape[-1])

    def _project(self, x, qs):
        for q in qs:
            x = np.moveaxis(x, 0, -1) if q is None else np.tensordot(x, q, axes=([0], [0]))
        return x

    def _project_back(self, x, qs):
        for q in qs:
            x = np.moveaxis(x, 0, -1) if q is None else np.tensordot(x, q, axes=([0], [1]))
        return x

    def _eigh(self, mat):
        _, q = np.linalg.eigh(mat)
        return np.flip(q, axis=1)

    def _refresh(self, st):
        new_qs = []
        exp_avg_sq = st["exp_avg_sq"]
        for ind, (mat, o) in enumerate(zip(st["GG"], st["Q"])):
            if mat is None:
                new_qs.append(None)
                continue
            est_eig = np.diag(o.T @ mat @ o)
            sort_idx = np.argsort(est_eig)[::-1]
            exp_avg_sq = np.take(exp_avg_sq, sort_idx, axis=ind)
            o = o[:, sort_idx]
            if self.method == "qr":
                q, _ = np.linalg.qr(mat @ o)
            else:
                q = self._eigh(mat)
            # |Q_oldᵀ Q_new| far from a permutation means the refresh really rotated.
            self.basis_change.append(np.abs(np.abs(o.T @ q) - np.eye(len(q))).max())
            new_qs.append(q)
        st["exp_avg_sq"] = exp_avg_sq
        return new_qs

    def _update_preconditioner(self, st, grad):
        if st["Q"] is not None:
            st["exp_avg"] = self._project_back(st["exp_avg"], st["Q"])
        for idx, mat in enumerate(st["GG"]):
            if mat is not None:
                other = [i for i in range(grad.ndim) if i != idx]
                outer = np.tensordot(grad, grad, axes=(other, other))
                st["GG"][idx] = mat + (1 - self.shampoo_beta) * (outer - mat)  # torch lerp_
        if st["Q"] is None:
            st["Q"] = [None if m is None else self._eigh(m) for m in st["GG"]]
        if st["step"] > 0 and st["step"] % self.freq == 0:
            st["Q"] = self._refresh(st)
        if st["step"] > 0:
            st["exp_avg"] = self._project(st["exp_avg"], st["Q"])

    def step(self, name, p, g):
        """Returns (new parameter, direction u) for one leaf; u is None on the first call."""
        p = np.asarray(p, np.float64)
        grad = self._as_matrix(np.asarray(g, np.float64))
        st = self.state.setdefault(name, {})
        if "Q" not in st:
            st["step"] = 0
            st["exp_avg"] = np.zeros_like(grad)
            st["exp_avg_sq"] = np.zeros_like(grad)
            precond = g.ndim >= 2
            st["GG"] = [
                np.zeros((d, d)) if precond and d <= self.max_dim else None for d in grad.shape
            ]
            st["Q"] = None
            self._update_preconditioner(st, grad)
            return p, None
        grad_projected = self._project(grad, st["Q"])
        st["step"] += 1
        st["exp_avg"] = self.b1 * st["exp_avg"] + (1 - self.b1) * grad_projected
        st["exp_avg_sq"] = self.b2 * st["exp_avg_sq"] + (1 - self.b2) * grad_projected**2
        bc1 = 1 - self.b1 ** st["step"]
        bc2 = 1 - self.b2 ** st["step"]
        denom = np.sqrt(st["exp_avg_sq"] / bc2) + self.eps
        u = self._project_back((st["exp_avg"] / bc1) / denom, st["Q"]).reshape(p.shape)
        p = p - self.lr * (u + self.wd * p)
        self._update_preconditioner(st, grad)
        return p, u


def _random_tree(key, shapes):
    keys = jax.random.split(key, len(shapes))
    return {k: jax.random.normal(kk, s) for kk, (k, s) in zip(keys, shapes.items())}


# Leaves are chosen so that no Shampoo factor has a repeated eigenvalue after the
# first gradient (a (6, 4) view would give L a 2-D null space whose basis eigh picks
# arbitrarily, and Adam's per-coordinate normalisation is not invariant to that choice,
# so no two implementations, including the reference, would agree there).
SHAPES = {"w": (3, 4), "b": (5,), "k": (2, 2, 1, 3), "s": ()}
HP = dict(b1=0.9, b2=0.99, eps=1e-8, weight_decay=0.1, precondition_frequency=3, shampoo_beta=0.8)


# max_precond_dim=3 leaves the 4-sized sides unrotated (w: right, k: left); with 2 no
# side is rotated and every leaf is Adam.
@pytest.mark.parametrize(
    "method,max_precond_dim", [("qr", 10000), ("eigh", 10000), ("qr", 3), ("qr", 2)]
)
def test_matches_numpy_reference(method, max_precond_dim):
    """8 calls = init + 7 Adam steps, with basis refreshes at steps 3 and 6."""
    lr, n_calls = 0.05, 8
    params = _random_tree(jax.random.PRNGKey(0), SHAPES)
    opt = soap(lr, max_precond_dim=max_precond_dim, refresh_method=method, **HP)
    direction = scale_by_soap(
        b1=HP["b1"],
        b2=HP["b2"],
        eps=HP["eps"],
        precondition_frequency=HP["precondition_frequency"],
        max_precond_dim=max_precond_dim,
        shampoo_beta=HP["shampoo_beta"],
        refresh_method=method,
    )
    ref = NumpySoap(
        lr,
        HP["b1"],
        HP["b2"],
        HP["eps"],
        HP["weight_decay"],
        HP["precondition_frequency"],
        max_precond_dim,
        HP["shampoo_beta"],
        method,
    )
    state, dstate = opt.init(params), direction.init(params)
    opt_update, dir_update = jax.jit(opt.update), jax.jit(direction.update)
    ref_params = {k: np.asarray(v, np.float64) for k, v in params.items()}
    for t in range(n_calls):
        grads = _random_tree(jax.random.PRNGKey(100 + t), SHAPES)
        updates, state = opt_update(grads, state, params)
        dirs, dstate = dir_update(grads, dstate)
        params = optax.apply_updates(params, updates)
        for name in SHAPES:
            ref_params[name], ref_u = ref.step(name, ref_params[name], grads[name])
            if ref_u is None:  # first call: nothing moves, not even by weight decay
                np.testing.assert_array_equal(np.asarray(dirs[name]), 0.0)
                np.testing.assert_array_equal(np.asarray(updates[name]), 0.0)
            else:
                np.testing.assert_allclose(
                    dirs[name], ref_u, rtol=1e-5, atol=1e-5, err_msg=f"direction {name} call {t}"
                )
            np.testing.assert_allclose(
                params[name],
                ref_params[name],
                rtol=1e-5,
                atol=1e-5,
                err_msg=f"param {name} call {t}",
            )
    assert int(state[0].count) == n_calls
    # The test only means something if the refreshes actually rotated the bases.
    if max_precond_dim >= 3:
        assert ref.basis_change and max(ref.basis_change) > 1e-2
    else:
        assert not ref.basis_change and state[0].basis_l["w"].shape == (0, 0)


def test_state_layout_and_identity_sides():
    params = {"w": jnp.zeros((3, 4)), "b": jnp.zeros(5), "big": jnp.zeros((6, 2))}
    state = scale_by_soap(max_precond_dim=5).init(params)
    assert isinstance(state, ScaleBySoapState)
    assert state.factor_l["w"].shape == (3, 3) and state.factor_r["w"].shape == (4, 4)
    assert state.factor_l["b"].shape == (0, 0) and state.basis_r["b"].shape == (0, 0)
    # 6 > max_precond_dim: the left side of "big" is the identity and stores nothing.
    assert state.basis_l["big"].shape == (0, 0) and state.basis_r["big"].shape == (2, 2)
    assert state.mu["w"].shape == (3, 4) and state.nu["b"].shape == (5,)


def test_vector_leaf_is_adam():
    """A 1-D leaf is optax.adam applied from the second call on (first call = init)."""
    b1, b2, eps, lr = 0.8, 0.9, 1e-3, 0.1  # eps large enough that its placement matters
    grads = [jax.random.normal(jax.random.PRNGKey(t), (7,)) * 0.01 for t in range(6)]
    params = jnp.zeros(7)
    s_opt, a_opt = soap(lr, b1=b1, b2=b2, eps=eps), optax.adam(lr, b1=b1, b2=b2, eps=eps)
    s_state, a_state = s_opt.init(params), a_opt.init(params)
    s_update, a_update = jax.jit(s_opt.update), jax.jit(a_opt.update)
    u0, s_state = s_update(grads[0], s_state, params)
    np.testing.assert_array_equal(u0, 0.0)
    for g in grads[1:]:
        su, s_state = s_update(g, s_state, params)
        au, a_state = a_update(g, a_state, params)
        np.testing.assert_allclose(su, au, rtol=1e-6, atol=1e-9)


def test_high_rank_leaf_is_flattened_matrix():
    k = jax.random.normal(jax.random.PRNGKey(1), (1, 2, 2, 5))  # HWIO-like kernel
    opt = soap(0.1, precondition_frequency=2)
    s4, s2 = opt.init(k), opt.init(k.reshape(4, 5))
    update = jax.jit(opt.update)
    for t in range(5):
        g = jax.random.normal(jax.random.PRNGKey(10 + t), k.shape)
        u4, s4 = update(g, s4, k)
        u2, s2 = update(g.reshape(4, 5), s2, k.reshape(4, 5))
        np.testing.assert_allclose(u4.reshape(4, 5), u2, rtol=1e-6, atol=1e-7)
    assert s4[0].basis_l.shape == (4, 4) and s4[0].mu.shape == k.shape


def _least_squares():
    """A linear regression; `batch_loss(p, t)` uses minibatch t (16 of 64 rows, cycled).

    Minibatches matter: with full-batch gradients and SOAP's first call skipped, the
    first Adam step sees G_2 = G_1, whose rotation Q_Lᵀ G_1 Q_R by G_1's own singular
    vectors is diagonal up to float32 noise, and Adam's first step normalises that noise
    to ±1, so bit-level differences (batched vs unbatched eigh) decide the trajectory.
    """
    kx, kw, kn = jax.random.split(jax.random.PRNGKey(3), 3)
    # Ill-conditioned inputs, where a preconditioner helps. w is (4, 5) so that each
    # gradient Xᵀ E is full rank on the left and has a single null direction on the
    # right: the eigenbases are unique up to sign (see SHAPES above).
    x = jax.random.normal(kx, (64, 4)) * jnp.array([2.0, 1.0, 0.7, 0.5])
    y = x @ jax.random.normal(kw, (4, 5)) + 1.0 + 0.01 * jax.random.normal(kn, (64, 5))

    def loss(p, rows=slice(None)):
        return jnp.mean(jnp.square(x[rows] @ p["w"] + p["b"] - y[rows]))

    def batch_loss(p, t):
        return loss(p, (16 * t + jnp.arange(16)) % 64)

    return loss, batch_loss, {"w": jnp.zeros((4, 5)), "b": jnp.zeros(5)}


def _train(opt, batch_loss, params, steps):
    def body(carry, t):
        p, s = carry
        value, g = jax.value_and_grad(batch_loss)(p, t)
        u, s = opt.update(g, s, p)
        return (optax.apply_updates(p, u), s), value

    (params, _), losses = jax.lax.scan(body, (params, opt.init(params)), jnp.arange(steps))
    return params, losses


def test_lowers_least_squares_loss():
    loss, batch_loss, params = _least_squares()
    final, losses = jax.jit(
        lambda p: _train(soap(0.02, precondition_frequency=5), batch_loss, p, 200)
    )(params)
    assert float(batch_loss(params, 1)) == float(losses[1])  # init call moved nothing
    assert float(loss(final)) < 1e-3 * float(loss(params))  # measured: ~2e-4


def test_jit_vmap_over_lr_and_b2_matches_separate_runs():
    _, batch_loss, params = _least_squares()
    lrs = jnp.array([0.01, 0.03, 0.1])
    b2s = jnp.array([0.9, 0.95, 0.999])
    steps = 13  # refreshes at Adam steps 4, 8, 12

    def make(lr, b2):
        return soap(lr, b2=b2, weight_decay=0.01, precondition_frequency=4)

    def run(lr, b2):
        return _train(make(lr, b2), batch_loss, params, steps)[0]

    # (a) The whole scan under vmap: the step counter stays unbatched, lax.switch runs
    # one branch.
    scanned = jax.jit(jax.vmap(run))(lrs, b2s)

    # (b) One vmapped step at a time with a batched state: the counter is batched, so
    # vmap turns lax.switch into a select that evaluates every branch.
    def step(lr, b2, p, s, t):
        u, s = make(lr, b2).update(jax.grad(batch_loss)(p, t), s, p)
        return optax.apply_updates(p, u), s

    states = jax.vmap(lambda lr, b2: make(lr, b2).init(params))(lrs, b2s)
    assert states[0].count.shape == (3,)
    stepped = jax.tree_util.tree_map(lambda x: jnp.stack([x] * 3), params)
    vstep = jax.jit(jax.vmap(step, in_axes=(0, 0, 0, 0, None)))
    for t in range(steps):
        stepped, states = vstep(lrs, b2s, stepped, states, t)

    run_one = jax.jit(run)  # one compile, then one unbatched run per cell
    for i in range(len(lrs)):
        single = run_one(lrs[i], b2s[i])
        for name in params:
            np.testing.assert_allclose(scanned[name][i], single[name], rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(stepped[name][i], single[name], rtol=1e-5, atol=1e-6)
    # Different cells really differ (the batch axis is not silently shared).
    assert not np.allclose(scanned["w"][0], scanned["w"][2], rtol=1e-3)


def test_inject_hyperparams_with_schedule():
    _, batch_loss, params = _least_squares()
    sched = optax.linear_schedule(0.1, 0.01, 20)
    kwargs = dict(b1=0.9, b2=0.95, weight_decay=0.05, precondition_frequency=3, max_precond_dim=4)
    injected = optax.inject_hyperparams(soap, static_args=("max_precond_dim",))(
        learning_rate=sched, **kwargs
    )
    plain = soap(sched, **kwargs)
    p1, l1 = jax.jit(lambda p: _train(injected, batch_loss, p, 15))(params)
    p2, l2 = jax.jit(lambda p: _train(plain, batch_loss, p, 15))(params)
    np.testing.assert_allclose(l1, l2, rtol=1e-5)
    np.testing.assert_allclose(p1["w"], p2["w"], rtol=1e-5, atol=1e-6)


def test_traced_max_precond_dim_is_rejected_clearly():
    opt = optax.inject_hyperparams(soap)(learning_rate=0.1, max_precond_dim=4)
    params = {"w": jnp.zeros((3, 4))}
    state = opt.init(params)
    with pytest.raises(TypeError, match="static_args"):
        jax.jit(opt.update)(params, state, params)


def _count_refreshes(monkeypatch):
    """Counts executed basis refreshes (one per preconditioned side) with a host callback."""
    import cbs.train.soap as soap_mod

    calls = []
    real = soap_mod._refresh_side

    def counted(factor, q_old, nu, axis, method):
        jax.debug.callback(lambda: calls.append(1))
        return real(factor, q_old, nu, axis, method)

    monkeypatch.setattr(soap_mod, "_refresh_side", counted)
    return calls


def test_block_step_runs_the_refresh_only_on_refresh_steps(monkeypatch):
    """Vmapped cells with a batched state: given the shared (unbatched) block step, the
    basis refresh executes only on refresh steps; without it, every branch runs every
    step. Both give the same numbers."""
    calls = _count_refreshes(monkeypatch)
    _, batch_loss, params = _least_squares()
    lrs = jnp.array([0.01, 0.03, 0.1])
    steps, freq = 13, 4
    sides = sum(len(p.shape) == 2 for p in jax.tree.leaves(params)) * 2

    def run(shared):
        def one(lr, t, p, s):
            tx = soap(lr, precondition_frequency=freq, block_step=t if shared else None)
            u, s = tx.update(jax.grad(batch_loss)(p, t), s, p)
            return optax.apply_updates(p, u), s

        def body(carry, t):
            return jax.vmap(one, in_axes=(0, None, 0, 0))(lrs, t, *carry), None

        p0 = jax.tree.map(lambda x: jnp.stack([x] * 3), params)
        s0 = jax.vmap(lambda lr: soap(lr, precondition_frequency=freq).init(params))(lrs)
        (p, _), _ = jax.lax.scan(body, (p0, s0), jnp.arange(steps))
        return jax.block_until_ready(p)

    calls.clear()
    fast = run(True)
    refresh_steps = len([t for t in range(steps) if t % freq == 0])  # 0 (initial eigh), 4, 8, 12
    assert len(calls) == refresh_steps * sides
    calls.clear()
    slow = run(False)
    assert len(calls) == steps * sides * 2  # select: the eigh and the QR branch, every step
    for name in params:
        np.testing.assert_allclose(fast[name], slow[name], rtol=1e-5, atol=1e-6)


def test_vmapped_training_block_refreshes_soap_only_on_refresh_steps(monkeypatch):
    """The train back end passes the block step: a SOAP block of several cells computes the
    refresh on steps 0, 10, 20 of 25 (precondition_frequency 10), once for all cells."""
    from cbs.train.backend import TrainBackend
    from cbs.train.direct import make_block, make_config

    calls = _count_refreshes(monkeypatch)
    cfg = make_config(
        dict(dataset="digits", model="mlp", width=16, depth=1, steps_per_call=25),
        metric="val_loss",
        value=1e-3,
        max_steps=25,
        eval_every=5,
    )
    block = make_block("soap", 32, [1e-3, 3e-3, 1e-2], seeds=(0,))
    TrainBackend(cfg).run_blocks([block])
    sides = 2 * 2  # two Dense kernels, a left and a right factor each
    assert len(calls) == 3 * sides
