"""Curvature and gradient-noise measurements of a network, for calibrating an NQM.

Everything here is pure JAX on a *flat* parameter vector ``theta`` (``ravel_pytree``), a
model function ``outputs = apply(theta, x)`` and a per-example loss ``loss(outputs, y) ->
(N,)``. The curvature operator C is the Hessian of the mean loss or its Gauss-Newton part
J^T H_out J (positive semi-definite for the convex per-example losses used here, which is
what an NQM with h > 0 needs); both are applied matrix-free (Hessian- / GGN-vector
products), never formed.

Estimators (each tested against an explicit Hessian / per-example-gradient matrix in
tests/test_spectrum.py):

* :func:`lanczos` -- Lanczos with full reorthogonalization (twice, classical Gram-Schmidt),
  restarted with a fresh random direction on breakdown; its Ritz pairs give the top-k
  eigenpairs.
* :func:`slq` -- stochastic Lanczos quadrature: Rademacher probes, each Lanczos tridiagonal's
  eigenvalues (nodes) and squared first eigenvector components (weights) give a discrete
  spectral density whose moments sum_l w_l theta_l^j are exact for j < 2m per probe
  (Gauss quadrature) and unbiased over probes.
* :func:`directional_gradients` -- g_n . v for every example n and direction v from one
  batched JVP per direction (the per-example losses are a vector, so their JVP is the
  vector of per-example directional derivatives; no per-example gradient is formed).
* :func:`gradient_moments` -- mean gradient G, tr(Sigma) = mean_n |g_n|^2 - |G|^2 and the
  elementwise second moment mean_n g_n^2, from per-example gradients computed in chunks
  (only ``chunk`` of them in memory at a time).
* :func:`measure` -- all of the above at one parameter vector, plus tr(C Sigma) (Monte Carlo
  over a subsample of examples, one curvature-vector product each), G^T C G, and the
  gradient's own spectral measure (Lanczos started from G), from which B_simple =
  tr(Sigma)/|G|^2 and B_noise = tr(C Sigma)/G^T C G (McCandlish et al. 2018) follow.

Sigma is the per-example gradient covariance over the examples given (population form,
divide by N): a minibatch of B examples drawn with replacement has gradient covariance
Sigma / B.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from cbs.errors import CbsError

__all__ = [
    "Measurement",
    "MeasurementTooLarge",
    "curvature_vp",
    "directional_gradients",
    "gradient_moments",
    "lanczos",
    "measure",
    "memory_estimate",
    "noise_along",
    "ritz_pairs",
    "slq",
]

Apply = Callable[[jax.Array, jax.Array], jax.Array]
Loss = Callable[[jax.Array, jax.Array], jax.Array]


class MeasurementTooLarge(CbsError, ValueError):
    """The chosen measurement does not fit the memory limit; the message names the option."""


def _mean_loss(apply: Apply, loss: Loss, x, y):
    return lambda th: jnp.mean(loss(apply(th, x), y))


def curvature_vp(
    apply: Apply, loss: Loss, theta, x, y, curvature: Literal["hessian", "ggn"] = "ggn"
):
    """The matrix-free product v -> C v of the mean loss's curvature at theta.

    hessian: forward-over-reverse H v = d/de grad L(theta + e v).
    ggn: J^T H_out J v with J the Jacobian of all outputs and H_out the (block-diagonal)
    Hessian of the per-example losses w.r.t. the outputs: a JVP, an output-space HVP, a VJP.
    """
    if curvature == "hessian":
        grad = jax.grad(_mean_loss(apply, loss, x, y))
        return lambda v: jax.jvp(grad, (theta,), (v,))[1]
    if curvature != "ggn":
        raise ValueError(f"curvature must be 'hessian' or 'ggn', not {curvature!r}")
    out, vjp = jax.vjp(lambda th: apply(th, x), theta)
    out_grad = jax.grad(lambda o: jnp.mean(loss(o, y)))

    def ggn(v):
        jv = jax.jvp(lambda th: apply(th, x), (theta,), (v,))[1]
        hjv = jax.jvp(out_grad, (out,), (jv,))[1]
        return vjp(hjv)[0]

    return ggn


def lanczos(matvec: Callable, v0: jax.Array, num_iters: int, key: jax.Array):
    """Lanczos tridiagonalization with full reorthogonalization.

    Args:
        matvec: a symmetric linear map on R^d. v0: the start vector (normalized here).
        num_iters: m <= d, the Krylov dimension. key: draws a restart direction whenever the
            Krylov space is exhausted (beta ~ 0), so the basis stays orthonormal and the
            tridiagonal splits into blocks (exact eigenvalues of invariant subspaces).

    Returns:
        (alpha (m,), beta (m-1,), Q (m, d)): T = tridiag(beta, alpha, beta) = Q C Q^T.
    """
    d = v0.shape[0]
    m = int(num_iters)
    if not 1 <= m <= d:
        raise ValueError(f"num_iters must be in 1..{d} (the dimension), got {m}")
    dtype = v0.dtype
    q0 = v0 / jnp.linalg.norm(v0)
    Q = jnp.zeros((m, d), dtype).at[0].set(q0)
    restarts = jax.random.normal(key, (m, d), dtype)

    def orth(Q, w):
        for _ in range(2):  # "twice is enough" (Kahan-Parlett)
            w = w - Q.T @ (Q @ w)
        return w

    def body(i, carry):
        Q, alpha, beta, scale = carry
        q = Q[i]
        w = matvec(q)
        a = jnp.vdot(q, w)
        w = orth(Q, w)  # rows > i are zero, so this projects on q_0..q_i only
        b = jnp.linalg.norm(w)
        scale = jnp.maximum(scale, jnp.abs(a) + b)
        broke = b <= 1e3 * jnp.finfo(dtype).eps * scale
        fresh = orth(Q, restarts[i])
        fresh = fresh / jnp.linalg.norm(fresh)
        nxt = jnp.where(broke, fresh, w / jnp.where(broke, 1.0, b))
        Q = jnp.where(i + 1 < m, Q.at[jnp.minimum(i + 1, m - 1)].set(nxt), Q)
        return Q, alpha.at[i].set(a), beta.at[i].set(jnp.where(broke, 0.0, b)), scale

    Q, alpha, beta, _ = jax.lax.fori_loop(
        0, m, body, (Q, jnp.zeros(m, dtype), jnp.zeros(m, dtype), jnp.zeros((), dtype))
    )
    return alpha, beta[:-1], Q


def _tridiag_eigh(alpha, beta):
    T = jnp.diag(alpha) + jnp.diag(beta, 1) + jnp.diag(beta, -1)
    return jnp.linalg.eigh(T)


def ritz_pairs(alpha, beta, Q, k: int):
    """The k largest Ritz values (descending) and their Ritz vectors (k, d)."""
    theta, Y = _tridiag_eigh(alpha, beta)
    idx = jnp.argsort(-theta)[:k]
    return theta[idx], (Y[:, idx].T @ Q)


def slq(
    matvec: Callable, dim: int, num_probes: int, num_iters: int, key: jax.Array, dtype=jnp.float64
):
    """Stochastic Lanczos quadrature: nodes and weights (num_probes, m) of the spectral density.

    Each probe z is Rademacher / sqrt(d) (unit norm); its Lanczos nodes theta_l and weights
    tau_l^2 satisfy sum_l tau_l^2 f(theta_l) ~ z^T f(C) z, so d * mean over probes estimates
    tr f(C) (Hutchinson), exactly for polynomials of degree < 2m per probe.
    """
    k1, k2 = jax.random.split(key)
    probes = jax.random.rademacher(k1, (num_probes, dim), dtype) / math.sqrt(dim)
    keys = jax.random.split(k2, num_probes)

    def one(args):
        z, kk = args
        alpha, beta, _ = lanczos(matvec, z, num_iters, kk)
        theta, Y = _tridiag_eigh(alpha, beta)
        return theta, Y[0] ** 2

    return jax.lax.map(one, (probes, keys))


def directional_gradients(apply: Apply, loss: Loss, theta, x, y, vectors):
    """(k, N) matrix of per-example directional derivatives g_n . v_j (one JVP per vector)."""
    per_example = lambda th: loss(apply(th, x), y)
    return jax.vmap(lambda v: jax.jvp(per_example, (theta,), (v,))[1])(vectors)


def gradient_moments(apply: Apply, loss: Loss, theta, x, y, chunk: int = 256):
    """Mean gradient G, tr(Sigma) and the elementwise second moment mean_n g_n^2.

    Per-example gradients are formed ``chunk`` at a time (vmapped ``grad`` of one example's
    loss) and reduced on the fly. Returns (G (d,), trace_sigma, second_moment (d,)).
    """
    n = x.shape[0]
    pieces = -(-n // chunk)
    pad = pieces * chunk - n
    xs = jnp.concatenate([x, jnp.zeros((pad,) + x.shape[1:], x.dtype)]).reshape(
        pieces, chunk, *x.shape[1:]
    )
    ys = jnp.concatenate([y, jnp.zeros((pad,) + y.shape[1:], y.dtype)]).reshape(
        pieces, chunk, *y.shape[1:]
    )
    mask = (jnp.arange(pieces * chunk) < n).astype(theta.dtype).reshape(pieces, chunk)
    one = jax.grad(lambda th, xi, yi: loss(apply(th, xi[None]), yi[None])[0])

    def body(acc, args):
        xc, yc, mc = args
        g = jax.vmap(one, (None, 0, 0))(theta, xc, yc) * mc[:, None]
        s, s2 = acc
        return (s + g.sum(0), s2 + (g**2).sum(0)), None

    zero = jnp.zeros_like(theta)
    (s, s2), _ = jax.lax.scan(body, (zero, zero), (xs, ys, mask))
    G = s / n
    second = s2 / n
    return G, jnp.sum(second) - jnp.sum(G**2), second


@dataclasses.dataclass(frozen=True)
class Measurement:
    """What :func:`measure` found at one parameter vector (numpy, float64).

    Attributes:
        dim: number of parameters d. num_examples: N, the examples the averages run over.
        curvature: "ggn" or "hessian".
        top_h: (k,) largest curvature eigenvalues (Ritz values), descending.
        top_vectors: (k, d) their Ritz vectors (unit norm).
        top_grad: (k,) G . v_i, the mean gradient along each. top_var: (k,) per-example
            variance Var_n(g_n . v_i) = v_i^T Sigma v_i.
        slq_nodes, slq_weights: (P, m) stochastic Lanczos quadrature of the curvature density
            (each probe's weights sum to 1; d * weights counts eigenvalues).
        grad_nodes, grad_weights: (m,) the spectral measure of G: Lanczos started at G/|G|,
            sum of weights over an interval ~ the fraction of |G|^2 in those eigendirections.
        grad_sq: |G|^2. trace_sigma: tr(Sigma). trace_c_sigma: tr(C Sigma) (Monte Carlo over
            ``noise_examples`` examples; trace_c_sigma_se its standard error). gcg: G^T C G.
        second_moment: (d,) mean_n g_n^2 (elementwise; Adam's second-moment statistic).
        grad: (d,) G.
        loss: mean loss at theta.
        disp_*: with a displacement delta (e.g. initial minus current parameters): its
            projections on the top vectors, squared norm, and spectral measure (Lanczos
            started at delta: weights = fractions of |delta|^2 near each node).
        seconds: wall time of the measurement (compile included).
    """

    dim: int
    num_examples: int
    curvature: str
    top_h: np.ndarray
    top_vectors: np.ndarray
    top_grad: np.ndarray
    top_var: np.ndarray
    slq_nodes: np.ndarray
    slq_weights: np.ndarray
    grad_nodes: np.ndarray
    grad_weights: np.ndarray
    grad_sq: float
    trace_sigma: float
    trace_c_sigma: float
    trace_c_sigma_se: float
    gcg: float
    second_moment: np.ndarray
    grad: np.ndarray
    loss: float
    seconds: float = float("nan")
    # Only with ``measure(displacement=delta)``: delta . v_i, |delta|^2 and delta's spectral measure.
    disp_proj: np.ndarray | None = None
    disp_sq: float | None = None
    disp_nodes: np.ndarray | None = None
    disp_weights: np.ndarray | None = None

    @property
    def b_simple(self) -> float:
        """McCandlish's simple noise scale tr(Sigma) / |G|^2."""
        return self.trace_sigma / self.grad_sq

    @property
    def b_noise(self) -> float:
        """McCandlish's noise scale tr(C Sigma) / G^T C G (C the measured curvature)."""
        return self.trace_c_sigma / self.gcg


def noise_along(apply: Apply, loss: Loss, theta, x, y, vectors, chunk: int = 128):
    """(tr Sigma, v_i^T Sigma v_i for each row of ``vectors``) at theta, in float64: the
    gradient noise at another point (e.g. where training reached the target) along
    directions measured elsewhere."""
    with jax.enable_x64(True):
        theta = jnp.asarray(theta, jnp.float64)
        x = jnp.asarray(x, jnp.float64) if jnp.issubdtype(x.dtype, jnp.floating) else jnp.asarray(x)
        y = jnp.asarray(y, jnp.float64) if jnp.issubdtype(y.dtype, jnp.floating) else jnp.asarray(y)
        tr, proj = _noise_jit(
            apply, loss, theta, x, y, jnp.asarray(vectors, jnp.float64), chunk=chunk
        )
        return float(tr), np.asarray(proj).var(1)


def _noise_impl(apply, loss, theta, x, y, vectors, *, chunk):
    _, tr, _ = gradient_moments(apply, loss, theta, x, y, chunk)
    return tr, directional_gradients(apply, loss, theta, x, y, vectors)


_noise_jit = jax.jit(_noise_impl, static_argnums=(0, 1), static_argnames=("chunk",))


def memory_estimate(dim: int, *, top_k: int, lanczos_iters: int, chunk: int) -> int:
    """Bytes of the largest float64 buffers: the Lanczos basis and its restart directions
    (2 m d), the per-example gradient chunk (chunk d) and the top vectors (k d)."""
    return 8 * dim * (2 * lanczos_iters + chunk + top_k + 4)


def measurement_flops(
    forward_flops: float, n: int, *, m: int, ms: int, probes: int, k: int, noise_examples: int
) -> float:
    """FLOPs of one :func:`measure`, from the model's forward FLOPs per example.

    A curvature-vector product is a JVP and a VJP through the n examples (~4 forward passes
    each); a measurement makes m (top Lanczos) + probes * ms (SLQ) + 2 ms (the gradient's and
    the displacement's Lanczos) + noise_examples (tr C Sigma) + 1 of them, and the
    per-example gradients and the k directional derivatives add (3 + 2 k) forward passes
    per example.
    """
    products = m + probes * ms + 2 * ms + noise_examples + 1
    return float(forward_flops) * n * (4.0 * products + 3.0 + 2.0 * k)


def _forward_flops(apply: Apply, theta, x) -> float | None:
    """XLA's FLOP count of one example's forward pass (lowering only, no compile); None when
    the platform does not report it."""
    try:
        cost = jax.jit(apply).lower(theta, x[:1]).cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        flops = float(cost.get("flops", 0.0)) if cost else 0.0
    except Exception:  # noqa: BLE001 - an estimate only; the measurement itself decides
        return None
    return flops if flops > 0 else None


def measure(
    apply: Apply,
    loss: Loss,
    theta,
    x,
    y,
    *,
    top_k: int = 16,
    lanczos_iters: int = 64,
    slq_probes: int = 4,
    slq_iters: int = 48,
    noise_examples: int = 128,
    chunk: int = 128,
    curvature: Literal["hessian", "ggn"] = "ggn",
    seed: int = 0,
    max_memory_mb: float = 2048.0,
    max_tflop: float | None = None,
    displacement=None,
) -> Measurement:
    """All measurements at ``theta`` over the examples (x, y), in float64.

    Iteration counts are capped at the dimension d (the Krylov space cannot be larger).

    Raises:
        MeasurementTooLarge: the buffers would exceed ``max_memory_mb``, or the estimated
            compute (:func:`measurement_flops`) ``max_tflop`` TFLOP (the message names the
            option that shrinks them).
    """
    import time

    t0 = time.perf_counter()
    d = int(theta.shape[0])
    need = memory_estimate(d, top_k=top_k, lanczos_iters=lanczos_iters, chunk=chunk)
    if need > max_memory_mb * 2**20:
        raise MeasurementTooLarge(
            f"the spectrum measurement of this model (d = {d} parameters) needs ~{need / 2**20:.0f} MB "
            f"> max_memory_mb = {max_memory_mb:g}; lower --lanczos-iters (now {lanczos_iters}) or --chunk "
            f"(now {chunk}), or raise --max-memory-mb"
        )
    m = min(lanczos_iters, d)
    ms = min(slq_iters, d)
    k = min(top_k, m)
    n = int(x.shape[0])
    with jax.enable_x64(True):
        theta = jnp.asarray(theta, jnp.float64)
        x = jnp.asarray(x, jnp.float64) if jnp.issubdtype(x.dtype, jnp.floating) else jnp.asarray(x)
        y = jnp.asarray(y, jnp.float64) if jnp.issubdtype(y.dtype, jnp.floating) else jnp.asarray(y)
        f1 = _forward_flops(apply, theta, x) if max_tflop is not None else None
        if f1 is not None:
            sizes = dict(m=m, ms=ms, probes=slq_probes, k=k, noise_examples=min(noise_examples, n))
            flops = measurement_flops(f1, n, **sizes)
            if flops > max_tflop * 1e12:
                fits = int(max_tflop * 1e12 / measurement_flops(f1, 1, **sizes))
                raise MeasurementTooLarge(
                    f"the spectrum measurement of this model ({f1:.3g} FLOPs per example forward, "
                    f"d = {d}) over {n} examples needs ~{flops / 1e12:.2g} TFLOP (float64) > "
                    f"max_tflop = {max_tflop:g}; lower --examples (now {n}; <= {fits} fits) or "
                    f"--lanczos-iters / --slq-probes / --slq-iters, or raise --max-tflop"
                )
        # Always measured (a zero displacement when none is given, its results dropped): one
        # compiled program serves the measurements with and without it.
        disp = (
            jnp.zeros_like(theta)
            if displacement is None
            else jnp.asarray(displacement, jnp.float64)
        )
        out = _measure_jit(
            apply,
            loss,
            theta,
            x,
            y,
            disp,
            m=m,
            ms=ms,
            k=k,
            probes=slq_probes,
            noise_examples=min(noise_examples, int(x.shape[0])),
            chunk=chunk,
            curvature=curvature,
            seed=seed,
        )
        out = jax.tree.map(np.asarray, out)
    n_sub = min(noise_examples, int(x.shape[0]))
    quad = out["quad"]
    return Measurement(
        dim=d,
        num_examples=int(x.shape[0]),
        curvature=curvature,
        top_h=out["top_h"],
        top_vectors=out["top_v"],
        top_grad=out["proj"].mean(1),
        top_var=out["proj"].var(1),
        slq_nodes=out["slq_nodes"],
        slq_weights=out["slq_weights"],
        grad_nodes=out["g_nodes"],
        grad_weights=out["g_weights"],
        grad_sq=float(out["grad_sq"]),
        trace_sigma=float(out["trace_sigma"]),
        trace_c_sigma=float(quad.mean()),
        trace_c_sigma_se=float(quad.std(ddof=1) / math.sqrt(n_sub)) if n_sub > 1 else float("nan"),
        gcg=float(out["gcg"]),
        second_moment=out["second"],
        grad=out["grad"],
        loss=float(out["loss"]),
        seconds=time.perf_counter() - t0,
        **(
            {}
            if displacement is None
            else {
                "disp_proj": out["disp_proj"],
                "disp_sq": float(out["disp_sq"]),
                "disp_nodes": out["d_nodes"],
                "disp_weights": out["d_weights"],
            }
        ),
    )


def _measure_impl(
    apply,
    loss,
    theta,
    x,
    y,
    disp,
    *,
    m,
    ms,
    k,
    probes,
    noise_examples,
    chunk,
    curvature,
    seed,
):
    key = jax.random.PRNGKey(seed)
    k_top, k_slq, k_g, k_sub = jax.random.split(key, 4)
    d = theta.shape[0]
    cvp = curvature_vp(apply, loss, theta, x, y, curvature)
    start = jax.random.normal(k_top, (d,), theta.dtype)
    alpha, beta, Q = lanczos(cvp, start, m, k_top)
    top_h, top_v = ritz_pairs(alpha, beta, Q, k)
    slq_nodes, slq_weights = slq(cvp, d, probes, ms, k_slq, theta.dtype)
    G, trace_sigma, second = gradient_moments(apply, loss, theta, x, y, chunk)
    grad_sq = jnp.sum(G**2)
    ga, gb, _ = lanczos(cvp, G + jnp.where(grad_sq > 0, 0.0, 1.0), ms, k_g)
    g_nodes, gY = _tridiag_eigh(ga, gb)
    proj = directional_gradients(apply, loss, theta, x, y, top_v)
    # tr(C Sigma) = mean_n (g_n - G)^T C (g_n - G), Monte Carlo over a subsample of examples.
    sub = jax.random.choice(k_sub, x.shape[0], (noise_examples,), replace=False)
    one = jax.grad(lambda th, xi, yi: loss(apply(th, xi[None]), yi[None])[0])

    def quad_form(i):
        u = one(theta, x[i], y[i]) - G
        return jnp.vdot(u, cvp(u))

    quad = jax.lax.map(quad_form, sub)
    dsq = jnp.sum(disp**2)
    da, db, _ = lanczos(cvp, disp + jnp.where(dsq > 0, 0.0, 1.0), ms, jax.random.fold_in(k_g, 1))
    d_nodes, dY = _tridiag_eigh(da, db)
    extra = {
        "disp_proj": top_v @ disp,
        "disp_sq": dsq,
        "d_nodes": d_nodes,
        "d_weights": dY[0] ** 2,
    }
    return extra | {
        "top_h": top_h,
        "top_v": top_v,
        "slq_nodes": slq_nodes,
        "slq_weights": slq_weights,
        "grad": G,
        "grad_sq": grad_sq,
        "trace_sigma": trace_sigma,
        "second": second,
        "g_nodes": g_nodes,
        "g_weights": gY[0] ** 2,
        "proj": proj,
        "quad": quad,
        "gcg": jnp.vdot(G, cvp(G)),
        "loss": jnp.mean(loss(apply(theta, x), y)),
    }


_measure_jit = jax.jit(
    _measure_impl,
    static_argnums=(0, 1),
    static_argnames=(
        "m",
        "ms",
        "k",
        "probes",
        "noise_examples",
        "chunk",
        "curvature",
        "seed",
    ),
)
