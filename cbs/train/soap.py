"""SOAP: Adam run in the eigenbasis of Shampoo's preconditioner, as an Optax transform.

Optax 0.2.8 ships neither Shampoo nor SOAP, so this module implements SOAP (Vyas et al.
2024, "SOAP: Improving and Stabilizing Shampoo using Adam", arXiv:2409.11321) following
the authors' PyTorch reference (github.com/nikhilvyas/SOAP, ``soap.py``) at its defaults
``precondition_1d=False``, ``normalize_grads=False``, ``correct_bias=True``, except that
a leaf of rank > 2 is always flattened to a matrix instead of getting one factor per
dimension (the reference's ``merge_dims=False`` default).

Per parameter leaf, viewed as a matrix ``G`` of shape ``(m, n)`` (a leaf of rank > 2,
e.g. an HWIO conv kernel, is flattened to ``(prod(shape[:-1]), shape[-1])``; a vector or
scalar leaf is ``(1, n)`` and gets no rotation at all, i.e. plain Adam), step ``t``::

    L_t  = β_s L_{t-1} + (1 - β_s) G_t G_tᵀ          (m × m, Shampoo's left factor)
    R_t  = β_s R_{t-1} + (1 - β_s) G_tᵀ G_t          (n × n, Shampoo's right factor)
    G'_t = Q_Lᵀ G_t Q_R                               (gradient in the eigenbasis)
    m_t  = β_1 m_{t-1} + (1 - β_1) G'_t               (kept in the rotated basis)
    v_t  = β_2 v_{t-1} + (1 - β_2) G'_t ⊙ G'_t        (kept in the rotated basis)
    u_t  = Q_L [ (m_t / (1 - β_1ᵗ)) / (sqrt(v_t / (1 - β_2ᵗ)) + ε) ] Q_Rᵀ
    Δθ_t = -η_t (u_t + λ θ_{t-1})                     (decoupled weight decay, AdamW)

where ``Q_L``/``Q_R`` are the eigenvectors of ``L``/``R`` (columns sorted by decreasing
eigenvalue), refreshed every ``precondition_frequency`` steps. A side whose size exceeds
``max_precond_dim`` keeps ``Q = I`` and stores no factor.

Details that follow the reference implementation:

* The first call only initialises the preconditioner: it accumulates ``G_1`` into
  ``L``/``R``, sets ``Q_L``, ``Q_R`` by a full ``eigh`` and returns a **zero** update
  (weight decay included), so the basis a gradient is rotated by never contains that
  same gradient. Adam's step counter ``t`` (bias correction) therefore lags the call
  count by one: call ``k`` (1-based) performs Adam step ``t = k - 1``.
* ``L``/``R`` are updated *after* the gradient has been rotated, and the basis refresh
  at Adam step ``t`` (``t % precondition_frequency == 0``) uses factors that already
  include ``G_t``; the new basis is first used at step ``t + 1``.
* The refresh is one power-iteration step plus QR per side (the paper's Algorithm 4):
  sort the old basis by its Rayleigh quotients ``diag(Qᵀ L Q)`` (decreasing), permute
  ``v``'s axis the same way so each second-moment entry stays with its direction,
  then ``Q ← qr(L Q_sorted).Q``. ``refresh_method="eigh"`` instead recomputes an exact
  ``eigh`` at every refresh (same permutation of ``v``).
* The first moment ``m`` lives in the rotated basis. When the basis changes it is
  re-projected, ``m ← Q_newᵀ (Q_old m Q_oldᵀ) Q_new`` (per side), exactly what the
  reference does. The second moment cannot be rotated (it is not a linear object); it is
  only permuted, as above.

Deliberate differences from the reference:

* ``ε`` is added to the bias-corrected ``sqrt(v̂)`` as in ``optax.adam`` and
  ``torch.optim.Adam``; the reference adds it to the uncorrected ``sqrt(v)``, i.e. uses
  an effective ``ε / sqrt(1 - β_2ᵗ)``. This makes a vector leaf exactly ``optax.adam``
  (from the second call on).
* Weight decay is the Optax/AdamW form ``θ - η (u + λ θ)``; the reference applies
  ``θ ← θ (1 - η λ)`` after the gradient step, which differs by ``O(η² λ)``.

Numerics: Adam's per-coordinate normalisation is not invariant to the choice of basis
inside a repeated (or numerically zero) eigenvalue cluster of ``L`` or ``R``, e.g. the
null space of a rank-deficient early factor of a tall matrix, and in float32 those
eigenvectors are fixed by rounding. Likewise, if ``G_2 = G_1`` (full-batch training, since
the first call does not move the parameters) the first rotated gradient is diagonal up to
rounding noise, which Adam's first step normalises to ±1. The reference behaves the same;
minibatch noise removes the effect in practice.

Every hyperparameter except ``max_precond_dim`` (shapes depend on it) and
``refresh_method`` may be a traced JAX scalar, so the transform can be ``vmap``-ed over
grid cells and wrapped in ``optax.inject_hyperparams`` (pass
``static_args=("max_precond_dim",)`` if you set that argument). Branching on the step
uses ``lax.switch``. Under ``vmap`` with a batched optimizer state the step counter is
batched too, and JAX then turns the switch into a select that evaluates every branch
(the refresh's ``eigh``/QR) on every step: correct, but ``O(m³ + n³)`` per step instead
of per refresh. When every vmapped copy steps together (the cells of a training block),
pass the shared step as ``block_step`` (an unbatched scalar): the branch is then chosen
from it, the switch stays a real conditional, and the refresh runs only on refresh steps.
"""

from __future__ import annotations

import operator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

__all__ = ["ScaleBySoapState", "scale_by_soap", "soap"]

# Rotations and factor updates are done in full float32. On Ampere+/Hopper GPUs the
# default matmul precision is TF32 (~10 mantissa bits), which would make Q_Lᵀ G Q_R lose
# three digits and the round trip through the basis visibly non-orthogonal.
_PRECISION = lax.Precision.HIGHEST

_REFRESH_METHODS = ("qr", "eigh")


class ScaleBySoapState(NamedTuple):
    """State of :func:`scale_by_soap`.

    Every field but ``count`` is a pytree with the structure of the parameters. A side
    that is not preconditioned (vector/scalar leaves, sides over ``max_precond_dim``)
    stores a ``(0, 0)`` placeholder in ``factor_*``/``basis_*`` so the trees keep that
    structure (``tree_map`` over params and state works, ``vmap`` sees only arrays).

    Attributes:
        count: int32 scalar, number of ``update`` calls so far (Adam's step is
            ``count`` during a call, since the first call only initialises).
        mu: first moment, in the rotated basis, shaped like the parameter.
        nu: second moment, in the rotated basis, shaped like the parameter.
        factor_l: ``L = EMA(G Gᵀ)``, ``(m, m)``.
        factor_r: ``R = EMA(Gᵀ G)``, ``(n, n)``.
        basis_l: ``Q_L``, eigenvectors of ``L`` as columns (decreasing eigenvalue).
        basis_r: ``Q_R``, eigenvectors of ``R`` as columns (decreasing eigenvalue).
    """

    count: jax.Array
    mu: optax.Updates
    nu: optax.Updates
    factor_l: optax.Updates
    factor_r: optax.Updates
    basis_l: optax.Updates
    basis_r: optax.Updates


def _static_int(value: Any, name: str) -> int:
    """Returns ``value`` as a Python int, with a clear error if it is traced."""
    try:
        return operator.index(value)
    except TypeError:
        try:
            return int(value)  # a concrete numpy/jax scalar
        except (TypeError, jax.errors.ConcretizationTypeError) as err:
            raise TypeError(
                f"{name} must be a static Python int (array shapes depend on it); with "
                f"optax.inject_hyperparams pass static_args=({name!r},)"
            ) from err


def _matrix_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    """The 2-D view of a leaf: all but the last dim × the last dim; (1, n) for rank < 2."""
    if len(shape) == 0:
        return 1, 1
    if len(shape) == 1:
        return 1, shape[0]
    rows = 1
    for d in shape[:-1]:
        rows *= d
    return rows, shape[-1]


def _sides(shape: tuple[int, ...], max_precond_dim: int) -> tuple[bool, bool]:
    """Which sides of the 2-D view get a Shampoo factor (static, from the shape)."""
    if len(shape) < 2:
        # Vector and scalar leaves are plain Adam (reference: precondition_1d=False).
        return False, False
    m, n = _matrix_shape(shape)
    return m <= max_precond_dim, n <= max_precond_dim


def _compute_dtype(dtype: Any) -> Any:
    # eigh/QR need at least float32; low-precision params keep float32 optimizer state.
    return jnp.promote_types(dtype, jnp.float32)


def _placeholder(dtype: Any) -> jax.Array:
    return jnp.zeros((0, 0), dtype)


def _rotate(x: jax.Array, q_l: jax.Array | None, q_r: jax.Array | None) -> jax.Array:
    """Q_Lᵀ x Q_R, skipping identity sides."""
    if q_l is not None:
        x = jnp.matmul(q_l.T, x, precision=_PRECISION)
    if q_r is not None:
        x = jnp.matmul(x, q_r, precision=_PRECISION)
    return x


def _unrotate(x: jax.Array, q_l: jax.Array | None, q_r: jax.Array | None) -> jax.Array:
    """Q_L x Q_Rᵀ, skipping identity sides (inverse of :func:`_rotate`)."""
    if q_l is not None:
        x = jnp.matmul(q_l, x, precision=_PRECISION)
    if q_r is not None:
        x = jnp.matmul(x, q_r.T, precision=_PRECISION)
    return x


def _eigh_basis(factor: jax.Array) -> jax.Array:
    """Eigenvectors of a symmetric PSD factor, columns by decreasing eigenvalue."""
    _, vecs = jnp.linalg.eigh(factor)  # ascending, like the reference's torch.linalg.eigh
    return vecs[:, ::-1]


def _refresh_side(
    factor: jax.Array, q_old: jax.Array, nu: jax.Array, axis: int, method: str
) -> tuple[jax.Array, jax.Array]:
    """One side of the periodic basis refresh (paper Algorithm 4).

    Args:
        factor: current Shampoo factor ``L`` or ``R`` (already includes this step's G).
        q_old: basis in use so far.
        nu: second moment in the old basis (2-D view).
        axis: the axis of ``nu`` this side acts on (0 for L, 1 for R).
        method: ``"qr"`` (one power iteration + QR) or ``"eigh"`` (exact).

    Returns:
        The new basis and ``nu`` with ``axis`` permuted to match its column order.
    """
    # Rayleigh quotients of the old directions estimate the new eigenvalues; sorting by
    # them (decreasing) lines the old columns up with the new ones, so v's entries keep
    # describing (approximately) the same directions after the refresh.
    est_eig = jnp.diag(
        jnp.matmul(q_old.T, jnp.matmul(factor, q_old, precision=_PRECISION), precision=_PRECISION)
    )
    order = jnp.argsort(-est_eig)
    nu = jnp.take(nu, order, axis=axis)
    if method == "eigh":
        return _eigh_basis(factor), nu
    power = jnp.matmul(factor, q_old[:, order], precision=_PRECISION)
    q_new, _ = jnp.linalg.qr(power)
    return q_new, nu


def scale_by_soap(
    b1: float | jax.Array = 0.95,
    b2: float | jax.Array = 0.95,
    eps: float | jax.Array = 1e-8,
    precondition_frequency: int | jax.Array = 10,
    max_precond_dim: int = 10000,
    shampoo_beta: float | jax.Array | None = None,
    *,
    refresh_method: str = "qr",
    block_step: jax.Array | None = None,
) -> optax.GradientTransformation:
    """Rescales updates by Adam in the eigenbasis of Shampoo's preconditioner (SOAP).

    Returns the *direction* ``u_t`` of the module docstring (no learning rate, no sign
    flip, no weight decay); :func:`soap` adds those. With ``G`` the 2-D view of a leaf::

        L ← β_s L + (1-β_s) G Gᵀ,  R ← β_s R + (1-β_s) Gᵀ G
        G' = Q_Lᵀ G Q_R
        m ← β_1 m + (1-β_1) G',    v ← β_2 v + (1-β_2) G'²
        u = Q_L [m̂ / (sqrt(v̂) + ε)] Q_Rᵀ,  m̂ = m / (1-β_1ᵗ),  v̂ = v / (1-β_2ᵗ)

    The first call returns zeros and only builds ``L``, ``R``, ``Q_L = eigh(L)``,
    ``Q_R = eigh(R)``; every ``precondition_frequency``-th Adam step re-estimates the
    bases (after using the old ones for that step) and re-projects ``m``.

    Args:
        b1: decay of the first moment ``β_1``.
        b2: decay of the second moment ``β_2``.
        eps: ``ε`` added to ``sqrt(v̂)``.
        precondition_frequency: Adam steps between basis refreshes (an int; may be a
            traced integer scalar).
        max_precond_dim: a side larger than this uses the identity (static int).
        shampoo_beta: decay ``β_s`` of ``L``/``R``; ``None`` means ``b2`` (the reference
            uses ``b2`` when ``shampoo_beta < 0``).
        refresh_method: ``"qr"`` (the paper's choice: one power-iteration step
            ``L Q`` + QR, warm-started from the previous basis; a matmul and a QR are
            several times cheaper than an ``eigh``, especially on GPU, and the basis
            moves little between refreshes) or ``"eigh"`` (exact eigenvectors at every
            refresh). The very first basis is always ``eigh``: there is no previous
            basis to warm-start from.
        block_step: the call index shared by every ``vmap``-ed copy of this transform
            (e.g. the step of a block of cells that train in lockstep), or ``None``.
            When given it must equal each copy's own ``count`` (this builds a new
            transform per step: use it where the transform is constructed inside the
            traced step); only the choice of branch uses it, so with an unbatched
            ``block_step`` the basis refresh is computed only on refresh steps.

    Returns:
        An ``optax.GradientTransformation`` with state :class:`ScaleBySoapState`.
    """
    max_precond_dim = _static_int(max_precond_dim, "max_precond_dim")
    if refresh_method not in _REFRESH_METHODS:
        raise ValueError(
            f"refresh_method must be one of {_REFRESH_METHODS}, got {refresh_method!r}"
        )
    beta_s = b2 if shampoo_beta is None else shampoo_beta

    def init_fn(params: optax.Params) -> ScaleBySoapState:
        def leaf_state(p):
            dtype = _compute_dtype(p.dtype)
            m, n = _matrix_shape(p.shape)
            use_l, use_r = _sides(p.shape, max_precond_dim)
            zeros = jnp.zeros(p.shape, dtype)
            return (
                zeros,
                zeros,
                jnp.zeros((m, m), dtype) if use_l else _placeholder(dtype),
                jnp.zeros((n, n), dtype) if use_r else _placeholder(dtype),
                jnp.eye(m, dtype=dtype) if use_l else _placeholder(dtype),
                jnp.eye(n, dtype=dtype) if use_r else _placeholder(dtype),
            )

        leaves, treedef = jax.tree_util.tree_flatten(params)
        per_leaf = [leaf_state(p) for p in leaves]
        fields = [treedef.unflatten([s[i] for s in per_leaf]) for i in range(6)]
        return ScaleBySoapState(jnp.zeros([], jnp.int32), *fields)

    def update_fn(
        updates: optax.Updates, state: ScaleBySoapState, params: optax.Params | None = None
    ):
        del params
        count = state.count
        first = count == 0
        # Adam's step t: the first call is only initialisation, so call k is step k-1.
        # max(., 1) keeps the (discarded) first-call bias correction finite.
        t = jnp.maximum(count, 1)
        bc1 = 1 - jnp.asarray(b1) ** t
        bc2 = 1 - jnp.asarray(b2) ** t
        freq = jnp.asarray(precondition_frequency).astype(count.dtype)
        # The branch: from the shared block step when given (unbatched under vmap, so the
        # switch below stays a conditional), else from this copy's own counter.
        at = count if block_step is None else jnp.asarray(block_step).astype(count.dtype)
        refresh_now = at % freq == 0  # true on the first call (count 0) too
        if refresh_method == "eigh":
            # 0: eigh (first call or periodic refresh), 1: keep the basis.
            branch = jnp.where(refresh_now, 0, 1)
        else:
            # 0: initial eigh (first call), 1: periodic QR refresh, 2: keep the basis.
            branch = jnp.where(refresh_now, jnp.where(at == 0, 0, 1), 2)

        def leaf_update(g, mu, nu, f_l, f_r, q_l, q_r):
            shape, dtype = g.shape, _compute_dtype(g.dtype)
            m, n = _matrix_shape(shape)
            use_l, use_r = _sides(shape, max_precond_dim)
            g2 = g.astype(dtype).reshape(m, n)
            mu2 = mu.reshape(m, n)
            nu2 = nu.reshape(m, n)
            ql = q_l if use_l else None
            qr = q_r if use_r else None

            g_rot = _rotate(g2, ql, qr)
            mu_new = b1 * mu2 + (1 - b1) * g_rot
            nu_new = b2 * nu2 + (1 - b2) * jnp.square(g_rot)
            # Moments stay zero on the initialisation call (the reference `continue`s).
            mu_new = jnp.where(first, mu2, mu_new)
            nu_new = jnp.where(first, nu2, nu_new)
            direction = (mu_new / bc1) / (jnp.sqrt(nu_new / bc2) + eps)
            u = jnp.where(first, 0.0, _unrotate(direction, ql, qr))

            if use_l:
                f_l = beta_s * f_l + (1 - beta_s) * jnp.matmul(g2, g2.T, precision=_PRECISION)
            if use_r:
                f_r = beta_s * f_r + (1 - beta_s) * jnp.matmul(g2.T, g2, precision=_PRECISION)

            if use_l or use_r:

                def refresh(method):
                    def branch_fn(ops):
                        mu_b, nu_b, ql_b, qr_b = ops
                        # Back to the original space with the old basis, forward with
                        # the new one: m follows the basis change exactly.
                        mu_orig = _unrotate(mu_b, ql_b if use_l else None, qr_b if use_r else None)
                        if use_l:
                            ql_b, nu_b = _refresh_side(f_l, ql_b, nu_b, 0, method)
                        if use_r:
                            qr_b, nu_b = _refresh_side(f_r, qr_b, nu_b, 1, method)
                        mu_b = _rotate(mu_orig, ql_b if use_l else None, qr_b if use_r else None)
                        return mu_b, nu_b, ql_b, qr_b

                    return branch_fn

                # lax.switch (not Python `if`) so the step counter may be traced; only
                # the selected branch runs unless vmap batches the counter.
                branches = [refresh("eigh")]
                if refresh_method != "eigh":
                    branches.append(refresh(refresh_method))
                branches.append(lambda ops: ops)
                mu_new, nu_new, q_l, q_r = lax.switch(branch, branches, (mu_new, nu_new, q_l, q_r))

            return (
                u.reshape(shape).astype(g.dtype),
                mu_new.reshape(shape),
                nu_new.reshape(shape),
                f_l,
                f_r,
                q_l,
                q_r,
            )

        leaves, treedef = jax.tree_util.tree_flatten(updates)
        rest = [
            treedef.flatten_up_to(x)
            for x in (
                state.mu,
                state.nu,
                state.factor_l,
                state.factor_r,
                state.basis_l,
                state.basis_r,
            )
        ]
        out = [leaf_update(g, *xs) for g, *xs in zip(leaves, *rest)]
        fields = [treedef.unflatten([o[i] for o in out]) for i in range(7)]
        new_state = ScaleBySoapState(optax.safe_int32_increment(count), *fields[1:])
        return fields[0], new_state

    return optax.GradientTransformation(init_fn, update_fn)


class _GatedDecayState(NamedTuple):
    count: jax.Array


def _decoupled_weight_decay(weight_decay: float | jax.Array) -> optax.GradientTransformation:
    """``u + λ θ`` from the second call on (SOAP's first call moves nothing).

    Like ``optax.add_decayed_weights`` except that the initialisation call of
    :func:`scale_by_soap` also skips the decay, as the reference does.
    """

    def init_fn(params):
        del params
        return _GatedDecayState(jnp.zeros([], jnp.int32))

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError(optax.NO_PARAMS_MSG)
        wd = jnp.where(state.count == 0, 0.0, weight_decay)
        updates = jax.tree_util.tree_map(lambda u, p: (u + wd * p).astype(u.dtype), updates, params)
        return updates, _GatedDecayState(optax.safe_int32_increment(state.count))

    return optax.GradientTransformation(init_fn, update_fn)


# (The signature repeats scale_by_soap's plus the LR and decay, as optax.adam's does
# scale_by_adam's: public functions whose parameters help() shows by name.)
def soap(
    learning_rate: optax.ScalarOrSchedule,
    b1: float | jax.Array = 0.95,
    b2: float | jax.Array = 0.95,
    eps: float | jax.Array = 1e-8,
    weight_decay: float | jax.Array = 0.0,
    precondition_frequency: int | jax.Array = 10,
    max_precond_dim: int = 10000,
    shampoo_beta: float | jax.Array | None = None,
    *,
    refresh_method: str = "qr",
    block_step: jax.Array | None = None,
) -> optax.GradientTransformation:
    """SOAP optimizer (Vyas et al. 2024): Adam in Shampoo's eigenbasis, AdamW decay.

    ``Δθ_t = -η_t (u_t + λ θ_{t-1})`` with ``u_t`` from :func:`scale_by_soap` (see the
    module docstring for the full equations). The first call returns a zero update (it
    only initialises the preconditioner). A schedule is evaluated at the call index
    (0 for the first call), so the first real step uses ``η(1)``, as with a PyTorch
    scheduler stepped every iteration.

    Args:
        learning_rate: ``η``, a float, a traced scalar, or an ``optax`` schedule.
        b1: ``β_1``.
        b2: ``β_2``.
        eps: ``ε``.
        weight_decay: decoupled weight decay ``λ`` (multiplied by ``η``).
        precondition_frequency: Adam steps between basis refreshes.
        max_precond_dim: sides larger than this are not rotated (static int).
        shampoo_beta: decay of the Shampoo factors; ``None`` means ``b2``.
        refresh_method: ``"qr"`` (paper) or ``"eigh"``; see :func:`scale_by_soap`.
        block_step: shared, unbatched call index of vmapped copies; see :func:`scale_by_soap`.

    Returns:
        An ``optax.GradientTransformation``.
    """
    return optax.chain(
        scale_by_soap(
            b1=b1,
            b2=b2,
            eps=eps,
            precondition_frequency=precondition_frequency,
            max_precond_dim=max_precond_dim,
            shampoo_beta=shampoo_beta,
            refresh_method=refresh_method,
            block_step=block_step,
        ),
        _decoupled_weight_decay(weight_decay),
        optax.scale_by_learning_rate(learning_rate),
    )
