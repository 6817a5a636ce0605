"""cbs.train.spectrum against explicit matrices on a model small enough to form them:
the Hessian (jax.hessian), the Gauss-Newton matrix (Jacobians x output Hessians) and the
per-example gradient matrix (jax.jacrev of the per-example losses)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cbs.train import spectrum as sp

jax.config.update("jax_enable_x64", False)


def _problem(n=40, d_in=3, hidden=4, out=3, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d_in))
    y = rng.integers(0, out, size=n)
    sizes = [(d_in, hidden), (hidden,), (hidden, out), (out,)]
    dim = sum(int(np.prod(s)) for s in sizes)

    def apply(th, xb):
        i, ws = 0, []
        for s in sizes:
            size = int(np.prod(s))
            ws.append(th[i : i + size].reshape(s))
            i += size
        return jnp.tanh(xb @ ws[0] + ws[1]) @ ws[2] + ws[3]

    def loss(o, yb):
        return optax.softmax_cross_entropy_with_integer_labels(o, yb)

    theta = rng.normal(size=dim) * 0.8
    return apply, loss, theta, x, y


def _exact(apply, loss, theta, x, y):
    with jax.enable_x64(True):
        return tuple(
            np.asarray(a)
            for a in jax.jit(lambda th, xx, yy: _matrices(apply, loss, th, xx, yy))(
                jnp.asarray(theta), jnp.asarray(x), jnp.asarray(y)
            )
        )


def _matrices(apply, loss, th, xx, yy):
    H = jax.hessian(lambda t: jnp.mean(loss(apply(t, xx), yy)))(th)
    per = jax.jacrev(lambda t: loss(apply(t, xx), yy))(th)  # (N, d) per-example grads
    J = jax.jacfwd(lambda t: apply(t, xx))(th)  # (N, out, d)
    Ho = jax.vmap(jax.hessian(lambda o, yi: loss(o[None], yi[None])[0]))(apply(th, xx), yy)
    ggn = jnp.einsum("nod,nop,npe->de", J, Ho, J) / xx.shape[0]
    return H, per, ggn


@pytest.fixture(scope="module")
def small():
    apply, loss, theta, x, y = _problem()
    H, per, ggn = _exact(apply, loss, theta, x, y)
    return apply, loss, theta, x, y, H, per, ggn


@pytest.fixture(scope="module")
def measured(small):
    """One GGN measurement serves the tests below (each compile costs seconds): Krylov
    dimension d (exact top-k and gradient measure), every example in tr(C Sigma)."""
    apply, loss, theta, x, y, *_ = small
    return sp.measure(
        apply,
        loss,
        theta,
        x,
        y,
        top_k=4,
        lanczos_iters=len(theta),
        slq_probes=400,
        slq_iters=len(theta),
        noise_examples=len(x),
        chunk=16,
        curvature="ggn",
        displacement=_displacement(len(theta)),
    )


def _displacement(d):
    return np.random.default_rng(5).normal(size=d)


@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
def test_lanczos_top_eigenpairs_match_eigh(small, measured, curvature):
    apply, loss, theta, x, y, H, _per, ggn = small
    C = H if curvature == "hessian" else ggn
    m = (
        measured
        if curvature == "ggn"
        else sp.measure(
            apply,
            loss,
            theta,
            x,
            y,
            top_k=4,
            lanczos_iters=len(theta),
            slq_probes=1,
            slq_iters=2,
            noise_examples=2,
            curvature=curvature,
        )
    )
    ev, V = np.linalg.eigh(C)
    np.testing.assert_allclose(m.top_h, ev[::-1][:4], rtol=1e-8, atol=1e-10)
    # Ritz vectors span the same directions (up to sign).
    overlap = np.abs(np.sum(m.top_vectors * V[:, ::-1][:, :4].T, axis=1))
    np.testing.assert_allclose(overlap, 1.0, atol=1e-6)


def test_lanczos_survives_breakdown():
    """A rank-2 operator exhausts the Krylov space after 2 steps: the restart keeps Q
    orthonormal and T's eigenvalues are C's (2 nonzero, the rest 0)."""
    with jax.enable_x64(True):
        rng = np.random.default_rng(1)
        U = np.linalg.qr(rng.normal(size=(8, 2)))[0]
        C = U @ np.diag([3.0, 1.0]) @ U.T
        alpha, beta, Q = sp.lanczos(
            lambda v: jnp.asarray(C) @ v, jnp.ones(8), 8, jax.random.PRNGKey(0)
        )
        np.testing.assert_allclose(np.asarray(Q @ Q.T), np.eye(8), atol=1e-10)
        T = np.diag(alpha) + np.diag(beta, 1) + np.diag(beta, -1)
        np.testing.assert_allclose(
            np.sort(np.linalg.eigvalsh(T)), np.sort(np.linalg.eigvalsh(C)), atol=1e-10
        )


def test_slq_moments_match_traces(small, measured):
    """The quadrature is exact for polynomials of degree < 2m, so d * mean over probes of
    sum_l w_l theta_l^j is Hutchinson's estimate of tr(C^j); with many probes it must match
    the exact trace to Monte Carlo accuracy."""
    _apply, _loss, theta, _x, _y, _H, _per, ggn = small
    d = len(theta)
    m = measured
    for j in (1, 2, 5):
        est = d * np.mean(np.sum(m.slq_weights * m.slq_nodes**j, axis=1))
        exact = np.trace(np.linalg.matrix_power(ggn, j))
        se = d * np.std(np.sum(m.slq_weights * m.slq_nodes**j, axis=1)) / np.sqrt(400)
        assert abs(est - exact) < 4 * se + 1e-9, (j, est, exact, se)
    np.testing.assert_allclose(m.slq_weights.sum(1), 1.0, atol=1e-10)


def test_noise_and_gradient_statistics_match_per_example_matrix(small, measured):
    _apply, _loss, _theta, x, _y, _H, per, ggn = small
    n = len(x)
    m = measured
    G = per.mean(0)
    Sigma = (per - G).T @ (per - G) / n
    np.testing.assert_allclose(m.grad, G, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(m.trace_sigma, np.trace(Sigma), rtol=1e-9)
    np.testing.assert_allclose(m.second_moment, (per**2).mean(0), rtol=1e-9, atol=1e-14)
    V = m.top_vectors
    np.testing.assert_allclose(m.top_grad, V @ G, rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(
        m.top_var, np.einsum("kd,de,ke->k", V, Sigma, V), rtol=1e-8, atol=1e-14
    )
    # noise_examples = N: the Monte Carlo tr(C Sigma) is the exact sum.
    np.testing.assert_allclose(m.trace_c_sigma, np.trace(ggn @ Sigma), rtol=1e-8)
    np.testing.assert_allclose(m.gcg, G @ ggn @ G, rtol=1e-9)
    np.testing.assert_allclose(m.grad_sq, G @ G, rtol=1e-10)
    np.testing.assert_allclose(m.b_simple, np.trace(Sigma) / (G @ G), rtol=1e-8)
    np.testing.assert_allclose(m.b_noise, np.trace(ggn @ Sigma) / (G @ ggn @ G), rtol=1e-7)


def test_gradient_spectral_measure_matches_projections(small, measured):
    """Lanczos started at G with m = d: its weights on each node are the fractions of |G|^2
    in each eigendirection, so sum_l w_l f(theta_l) = G^T f(C) G / |G|^2 exactly."""
    _apply, _loss, _theta, _x, _y, _H, per, ggn = small
    m = measured
    G = per.mean(0)
    ev, V = np.linalg.eigh(ggn)
    frac = (V.T @ G) ** 2 / (G @ G)
    for f in (lambda t: t, lambda t: t**3, lambda t: np.exp(-t)):
        np.testing.assert_allclose(
            np.sum(m.grad_weights * f(m.grad_nodes)), np.sum(frac * f(ev)), rtol=1e-7, atol=1e-10
        )


def test_too_large_names_the_option(small):
    apply, loss, theta, x, y, *_ = small
    with pytest.raises(sp.MeasurementTooLarge, match="--lanczos-iters"):
        sp.measure(apply, loss, theta, x, y, max_memory_mb=1e-4)


def test_displacement_measure_matches_projections(small, measured):
    """Lanczos started at a displacement delta with m = d: sum_l w_l f(theta_l) =
    delta^T f(C) delta / |delta|^2, and its top projections are V delta."""
    ggn = small[7]
    m = measured
    delta = _displacement(len(small[2]))
    ev, V = np.linalg.eigh(ggn)
    frac = (V.T @ delta) ** 2 / (delta @ delta)
    np.testing.assert_allclose(m.disp_sq, delta @ delta, rtol=1e-12)
    np.testing.assert_allclose(m.disp_proj, m.top_vectors @ delta, rtol=1e-10)
    for f in (lambda t: t, lambda t: t**2, lambda t: np.exp(-t)):
        np.testing.assert_allclose(
            np.sum(m.disp_weights * f(m.disp_nodes)), np.sum(frac * f(ev)), rtol=1e-7, atol=1e-10
        )
