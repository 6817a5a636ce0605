"""Certified first crossing of the NQM's exact expected risk (docs/nqm.md section 4).

:func:`search_steps` finds, per batch size, the first step whose exact expected risk is
below the target, by bisection on the closed-form moments (``_moments.py``) plus a
certified forward scan: per phase the risk is a finite sum of exponentials, so modal lower
bounds exclude whole intervals and every other step is evaluated exactly. The algorithm is
described step by step in the docstring of :func:`search_steps`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from cbs.nqm._moments import (
    Phases,
    _apply_t,
    _as_tuple_tables,
    _config_system,
    _expand_t,
    _phase_budget,
    _risk,
    _risk_t,
    _tables,
    _vech_pairs,
    linear_system,
    state_dim,
)

__all__ = ["search_steps"]


def _reduction_system(kind: str, ema: bool, a, beta, gamma):
    """E = I - A built directly from (a, beta, gamma) (no 1 - (1 - a) rounding).

    A second encoding of the system of ``_moments.linear_system`` on purpose: I - A formed
    from A loses every digit of a (or 1 - beta) below 1e-16, and the stationary moments
    (I - M)^-1 r divide by exactly those small quantities. ``_modes`` uses A itself.
    """
    one = jnp.ones_like(a)
    if kind == "sgd":
        rows = [[a]]
        A0 = [1 - a]
    elif kind == "momentum":
        rows = [[a, -beta * one], [a, (1 - beta) * one]]
        A0 = [1 - a, beta * one]
    else:
        rows = [[a * (1 + beta), (beta**2) * one], [-a, (1 - beta) * one]]
        A0 = [1 - a * (1 + beta), -(beta**2) * one]
    if ema:
        zero = jnp.zeros_like(a)
        rows = [r + [zero] for r in rows] + [[-(1 - gamma) * x for x in A0] + [(1 - gamma) * one]]
    return jnp.stack([jnp.stack(r, -1) for r in rows], -2)


def _stationary(kind, ema, a, beta, gamma, r):
    """s_inf = (I - M)^-1 r per bin, with I - M built from E = I - A: (I - M) S = E S + S E^T - E S E^T."""
    E = _reduction_system(kind, ema, a, beta, gamma)  # (nb, k, k)
    k = E.shape[-1]
    I, J = _vech_pairs(k)
    m = len(I)
    # column q of (I - M): apply the map to the symmetric basis matrix of vech index q
    cols = []
    for q in range(m):
        S = np.zeros((k, k))
        S[I[q], J[q]] = S[J[q], I[q]] = 1.0
        S = jnp.asarray(S)
        out = E @ S + S @ jnp.swapaxes(E, -1, -2) - E @ S @ jnp.swapaxes(E, -1, -2)
        cols.append(out[:, I, J])
    IM = jnp.stack(cols, -1)  # (nb, m, m)
    return _solve_small(jnp.moveaxis(IM, 0, -1), r)  # (m, nb)


def _solve_small(A, b):
    """Solve A x = b for many tiny systems: A (m, m, n), b (m, n) -> x (m, n).

    Gaussian elimination with partial pivoting, unrolled over the m <= 6 rows. Under vmap,
    jnp.linalg.solve becomes one LAPACK call per 3x3 system (~20x slower here).
    """
    m = A.shape[0]
    rows = [[A[i, j] for j in range(m)] + [b[i]] for i in range(m)]
    for col in range(m):
        # partial pivoting: bring the largest remaining |entry| of this column to row col
        for i in range(col + 1, m):
            swap = jnp.abs(rows[i][col]) > jnp.abs(rows[col][col])
            rows[col], rows[i] = (
                [jnp.where(swap, x, y) for x, y in zip(rows[i], rows[col])],
                [jnp.where(swap, y, x) for x, y in zip(rows[i], rows[col])],
            )
        for i in range(col + 1, m):
            f = rows[i][col] / rows[col][col]
            rows[i] = [x - f * y for x, y in zip(rows[i], rows[col])]
    x = [None] * m
    for i in reversed(range(m)):
        acc = rows[i][m] - sum(rows[i][j] * x[j] for j in range(i + 1, m))
        x[i] = acc / rows[i][i]
    return jnp.stack(x)


def _modes(kind, ema, a, beta, gamma, c):
    """Eigenvalues lam_i of A (complex, (k, nb)) and vectors h_i with c^T A^t = sum_i lam_i^t h_i^T."""
    A, _, _, _ = linear_system(kind, ema, a, beta, gamma)
    A = A.astype(jnp.complex128)
    k = A.shape[-1]
    if k == 1:
        lam = [A[:, 0, 0]]
    else:
        tr = A[:, 0, 0] + A[:, 1, 1]
        det = A[:, 0, 0] * A[:, 1, 1] - A[:, 0, 1] * A[:, 1, 0]
        sq = jnp.sqrt(tr * tr - 4 * det)
        sgn = jnp.where(jnp.real(tr) >= 0, 1.0, -1.0)
        l1 = (tr + sgn * sq) / 2
        l2 = jnp.where(
            jnp.abs(l1) > 0, det / jnp.where(jnp.abs(l1) > 0, l1, 1.0), (tr - sgn * sq) / 2
        )
        lam = [l1, l2] + ([A[:, 2, 2]] if k == 3 else [])
    AT = jnp.swapaxes(A, -1, -2)
    cv = jnp.asarray(c, jnp.complex128)
    hs = []
    for i in range(k):
        v = jnp.broadcast_to(cv, (A.shape[0], k))
        den = jnp.ones_like(lam[0])
        for j in range(k):
            if j != i:
                # (elementwise: a batched complex einsum of 2x2 blocks is slow on CPU under vmap)
                v = (
                    jnp.stack([sum(AT[:, p, q] * v[:, q] for q in range(k)) for p in range(k)], -1)
                    - lam[j][:, None] * v
                )
                den = den * (lam[i] - lam[j])
        hs.append(v / den[:, None])
    return jnp.stack(lam), jnp.stack(hs)  # (k, nb), (k, nb, k)


def _mode_pairs(k):
    return [(i, j) for i in range(k) for j in range(i, k)]


def _modal_coeffs(hs, s, k):
    """K_ij = (2 - [i == j]) h_i^T X h_j for the symmetric X of vech s (m, nb) -> (npairs, nb)."""
    I, J = _vech_pairs(k)
    X = [[None] * k for _ in range(k)]
    for q, (p, r) in enumerate(zip(I, J)):
        X[p][r] = X[r][p] = s[q]
    Xh = [[sum(X[p][r] * hs[j][:, r] for r in range(k)) for p in range(k)] for j in range(k)]
    out = []
    for i, j in _mode_pairs(k):
        v = sum(hs[i][:, p] * Xh[j][p] for p in range(k))
        out.append(v * (1.0 if i == j else 2.0))
    return jnp.stack(out)


def _osc_terms(Kc, rot, arc, pw, ang_err=0.0):
    """Lower bounds of Re(K z^s) = |K| |z|^s cos(arg K + s arg z), s in [0, L), for oscillating
    (complex or negative) modes, without transcendentals: Kc is already conjugated where
    arg z < 0, rot = exp(i sp) with sp = (L-1) |arg z| the arc swept, arc = 0, 1, 2 for
    sp < pi, pi <= sp < 2 pi, sp >= 2 pi. The cosine's minimum over the arc [arg K, arg K + sp]
    is -1 if the arc reaches pi (mod 2 pi), else the smaller end; it is then multiplied by
    |z|^s at its least favourable end. An arc shorter than pi reaches pi iff it starts in the
    upper half plane and ends in the lower one; one in [pi, 2 pi) misses pi iff it starts in
    the lower half plane and ends in the upper one."""
    Ka = jnp.abs(Kc)
    end = Kc * rot
    up0, up1 = jnp.imag(Kc), jnp.imag(end)
    reach = jnp.where(
        arc == 0, (up0 > 0) & (up1 < 0), jnp.where(arc == 1, ~((up0 < 0) & (up1 > 0)), True)
    )
    cm = jnp.where(reach, -Ka, jnp.minimum(jnp.real(Kc), jnp.real(end)))
    cm = cm - (1e-12 + ang_err) * Ka
    return cm * jnp.where(cm >= 0, jnp.minimum(1.0, pw), jnp.maximum(1.0, pw))


UNIT_LVL = 1  # every iteration evaluates the exact risk at 2^UNIT_LVL consecutive steps


def _gallop(Tt, two, lam, hs, sinf, read, w, batch, ell, target, K, max_iter, goal, fresh_noise):
    """Certified forward scan over local steps [0, ell] of one phase, shared by all batch sizes.

    two: tuple over m of (2, nb) [Det, Noise at B = 1]; Tt: tuple tables (M^(2^j), R_j) with
    the noise scaled by 1 / batch_mult (R at B = 1); sinf the matching stationary Noise.
    goal: (nB,) the bisection's crossing per batch size (local; > ell if none). The risk
    there is below target, so an interval reaching it cannot be excluded: intervals are
    capped to end before the nearest unresolved goal (fewer failed bounds; a cap only
    shortens intervals, so it never affects validity).
    fresh_noise (static): whether the phase starts with zero noise moments (the first phase),
    which makes them nondecreasing within the phase and allows a cheaper bound (``bounds``).
    Returns (hit (nB,) local step or -1, certified (nB,) bool, the scan's final step t: no
    step in [0, t) is below target for a batch size still unresolved, and the iterations
    run: the scan's cost, which callers use to group configurations of similar cost).

    The modal coefficients of Det and Noise - sinf are computed once and then carried along:
    advancing by s steps multiplies each by z^s (a table of z^(2^j)), which is exact up to
    rounding, so an iteration costs a few complex products per bin instead of a change of
    basis. Rounding of the carried coefficients (relative ~1e-16 per product, < 1e-13 after
    the iteration budget) is far inside the bound's 1e-10 relative margin.
    """
    k = lam.shape[0]
    pairs = _mode_pairs(k)
    # z_01 = lam_0 lam_1 = det of the 2x2 (base) block: real (real roots or a conjugate pair);
    # other products are real exactly when their roots are (a real sqrt has zero imaginary part)
    is01 = np.array([(i, j) == (0, 1) for i, j in pairs])[:, None]
    z = jnp.stack([lam[i] * lam[j] for i, j in pairs])  # (np, nb)
    z = jnp.where(is01, jnp.real(z) + 0j, z)
    za = jnp.abs(z)
    real_mode = ((jnp.imag(z) == 0) | is01) & (jnp.real(z) >= 0)
    # Complex roots come in a conjugate pair (lam_1 = conj lam_0): then the pairs (i, j) and
    # (s(i), s(j)), s swapping 0 and 1, have conjugate z and conjugate coefficients, i.e. equal
    # terms. The oscillation bound is computed for one of them and doubled (the rounding
    # difference between the two coefficients is far inside the 1e-10 margin).
    swap = lambda i: {0: 1, 1: 0}.get(i, i) if k > 1 else i
    partner = np.array([pairs.index(tuple(sorted((swap(i), swap(j))))) for i, j in pairs])
    primary = partner >= np.arange(len(pairs))
    conj_roots = (jnp.imag(lam[0]) != 0) if k > 1 else jnp.zeros_like(jnp.real(lam[0]), bool)
    osc_weight = jnp.where(
        jnp.asarray(partner != np.arange(len(pairs)))[:, None] & conj_roots[None], 2.0, 1.0
    )
    osc_weight = jnp.where(jnp.asarray(primary)[:, None], osc_weight, 0.0)
    # secondary pairs outside the conjugate case are real (negative z: alternating sign,
    # bounded by -|K| max(1, |z|^(L-1)) over intervals of >= 2 steps)
    sec_negative = jnp.asarray(~primary)[:, None] & ~conj_roots[None] & ~real_mode
    prim = np.flatnonzero(primary)
    Lm1 = 2.0 ** jnp.arange(K) - 1.0
    phi = jnp.angle(z)
    sp_tab = Lm1[:, None, None] * jnp.abs(phi)[None]  # (K, np, nb)
    arc_tab = (sp_tab >= jnp.pi).astype(jnp.int8) + (sp_tab >= 2 * jnp.pi).astype(jnp.int8)
    # Tables by repeated squaring (x^(2^(j+1) - 1) = (x^(2^j - 1))^2 x), not by pow / exp per
    # level, which dominated the setup: |z|^(2^j - 1), exp(i (2^j - 1) |arg z|) and z^(2^j)
    # (the carried coefficients' step tables). Squaring doubles the relative error per level,
    # as rounding (2^j - 1) |arg z| does: the bound's angular margin below covers it.
    unit_rot = jnp.exp(1j * jnp.abs(phi))

    def squarings(c, _):
        p, r, q = c
        return (p * p * za, r * r * unit_rot, q * q), c

    _, (pw_tab, rot_tab, zp_tab) = jax.lax.scan(
        squarings, (jnp.ones_like(za), jnp.ones_like(z), z), None, length=K
    )  # (K, np, nb) each
    ang_err = (
        16 * np.finfo(np.float64).eps * (2.0 ** np.arange(K)) * np.pi
    )  # angular margin per level
    flip = phi < 0
    hs_t = [hs[i] for i in range(k)]
    const_n = (
        0.0 if fresh_noise else sum(read[i] * sinf[i] for i in range(len(read)) if read[i] != 0)
    )
    nB = batch.shape[0]
    ib = (1.0 / batch)[:, None, None]
    Ms, Rs = Tt
    m = len(Rs)
    unit = 1 << UNIT_LVL

    def bounds(Kd, Kn, st, lvl):
        """Lower bound of the risk over [t, t + 2^lvl) for every batch size, (nB,)."""
        pw = pw_tab[lvl]
        rot, arc, da = rot_tab[lvl], arc_tab[lvl], jnp.asarray(ang_err)[lvl]
        grow = jnp.maximum(1.0, pw)
        Kdp = Kd[prim]
        oscD = jnp.sum(
            jnp.where(
                real_mode[prim],
                0.0,
                _osc_terms(
                    jnp.where(flip[prim], jnp.conj(Kdp), Kdp), rot[prim], arc[prim], pw[prim], da
                ),
            )
            * osc_weight[prim],
            0,
        ) - jnp.sum(jnp.where(sec_negative, jnp.abs(Kd) * grow, 0.0), 0)
        Krd = jnp.where(real_mode, jnp.real(Kd), 0.0)
        magD = jnp.sum(jnp.abs(Kd) * grow, 0)
        if fresh_noise:
            # This phase's noise started from zero: every bin's Noise is n sum_{k<s}
            # (impulse response_k)^2, nondecreasing, so Noise >= its exact value at t; and Det
            # (a second moment) >= max(0, its modal bound). Shared by all B, and on the paper's
            # grids as tight as the general bound below (measured: same cells certified).
            lbD = (oscD + jnp.sum(jnp.minimum(Krd, Krd * pw), 0)) - 1e-10 * magD
            noise_t = sum(read[i] * st[i][1] for i in range(m) if read[i] != 0) * (1 - 1e-12)
            # both parts are >= 0 per bin, so their bin sums combine per B as two scalars
            # (fmax: a bin whose moments overflowed to NaN still contributes >= 0)
            return jnp.sum(jnp.fmax(lbD, 0.0) * w) + jnp.sum(jnp.fmax(noise_t, 0.0) * w) / batch
        # oscillating modes: Det and Noise bounded separately (shared by all B); real modes
        # z >= 0: the combined coefficient Kd + Kn / B per B (monotone term, exact minimum)
        oscN = jnp.where(
            real_mode, 0.0, _osc_terms(jnp.where(flip, jnp.conj(Kn), Kn), rot, arc, pw, da)
        )
        Krn = jnp.where(real_mode, jnp.real(Kn), 0.0)
        v = Krd[None] + Krn[None] * ib  # (nB, np, nb)
        lb = (
            oscD[None]
            + (jnp.sum(oscN, 0) + const_n)[None] * ib[:, 0]
            + jnp.sum(jnp.minimum(v, v * pw[None]), 1)
        )
        mag = magD + jnp.sum(jnp.abs(Kn) * grow, 0) + jnp.abs(const_n)
        lb = jnp.fmax(lb - 1e-10 * mag[None], 0.0)
        return jnp.sum(lb * w, -1)

    def exact(st):
        v = sum(read[i] * st[i] for i in range(m) if read[i] != 0)  # (2, nb)
        return jnp.sum(v * w, -1)

    def apply(st, lvl):
        Mt = tuple(tuple(Ms[i][j][lvl] for j in range(m)) for i in range(m))
        Rt = tuple(Rs[i][lvl] for i in range(m))
        coef = jnp.array([0.0, 1.0])[:, None]
        return tuple(
            sum(Mt[i][j][None] * st[j] for j in range(m)) + Rt[i][None] * coef for i in range(m)
        )

    def cond(c):
        t, lvl, st, Kd, Kn, active, hit, it = c
        return jnp.any(active) & (t <= ell) & (it < max_iter)

    def body(c):
        t, lvl, st, Kd, Kn, active, hit, it = c
        # the exact risk at the next `unit` steps (first hit per batch size)
        s1, hit1, act1 = st, hit, active
        for u in range(unit):
            dn = exact(s1)
            below = act1 & (t + u <= ell) & _below(dn[0] + dn[1] / batch, target)
            hit1 = jnp.where(below, t + u, hit1)
            act1 = act1 & ~below
            if u + 1 < unit:
                s1 = apply(s1, 0)
        # intervals no longer than `unit` are covered by those exact values; longer ones need
        # the lower bound to clear the target for every batch size not yet resolved
        room = jnp.maximum(jnp.min(jnp.where(act1, goal, ell + 1)) - t, 1)
        # right after a batch size is resolved (at its crossing, so at a low level), try the
        # largest interval that ends before the next goal instead of climbing one level
        # per iteration: the descent to that goal then takes one iteration per set bit
        lvl = jnp.where(jnp.any(active & ~act1), K - 1, lvl)
        lvl = jnp.maximum(jnp.minimum(lvl, 63 - jax.lax.clz(room)), UNIT_LVL)
        lb = bounds(Kd, Kn, st, lvl)
        # (a short step may run past ell: its steps beyond ell were not evaluated, and the scan ends)
        ok = (lvl == UNIT_LVL) | ((t + (1 << lvl) - 1 <= ell) & jnp.all(~act1 | (lb >= target)))
        new = apply(st, lvl)
        zp = zp_tab[lvl]
        st = tuple(jnp.where(ok, x, y) for x, y in zip(new, st))
        Kd = jnp.where(ok, Kd * zp, Kd)
        Kn = Kn if fresh_noise else jnp.where(ok, Kn * zp, Kn)
        t = jnp.where(ok, t + (1 << lvl), t)
        lvl = jnp.where(ok, jnp.minimum(lvl + 1, K - 1), jnp.maximum(lvl - 1, UNIT_LVL))
        return t, lvl, st, Kd, Kn, act1, hit1, it + 1

    Kd0 = _modal_coeffs(hs_t, jnp.stack([x[0] for x in two]).astype(jnp.complex128), k)
    Kn0 = (
        jnp.zeros((), jnp.complex128)
        if fresh_noise
        # (unused by the fresh-noise bound)
        else _modal_coeffs(hs_t, (jnp.stack([x[1] for x in two]) - sinf).astype(jnp.complex128), k)
    )
    init = (
        jnp.int64(0),
        jnp.int64(K - 1),
        two,
        Kd0,
        Kn0,
        jnp.ones(nB, bool),
        -jnp.ones(nB, jnp.int64),
        jnp.int64(0),
    )
    t, lvl, st, Kd, Kn, active, hit, it = jax.lax.while_loop(cond, body, init)
    certified = ~active | (t > ell)
    return hit, certified, t, it


def _below(risk, target):
    """risk < target, for a risk that is exact in exact arithmetic.

    The expected risk is a sum of second moments, never negative. An unstable
    configuration's moments overflow, and the matrix powers' mixed-sign entries can then
    give NaN or -inf; neither may count as reaching the target.
    """
    return (risk < target) & (risk >= 0)


@functools.partial(jax.jit, static_argnames=("kind", "ema", "K", "window", "max_iter", "certify"))
def search_steps(
    prob,
    lr,
    beta,
    gamma,
    power,
    batch,
    phases: Phases,
    target,
    max_steps,
    *,
    kind: str,
    ema: bool,
    K: int,
    window: int,
    max_iter: int = 0,
    certify: bool = True,
):
    """Exact first step with expected risk strictly below ``target``, for one configuration,
    with a per-batch-size flag saying whether that first crossing is certified.

    The risk is not assumed monotone (under-damped momentum oscillates; SGD's stiff and flat
    coordinates can move in opposite directions). Per phase (constant LR and B):

    1. Bisection by binary lifting on the exact risk: from the phase start add 2^j steps
       (j = K-1..0) whenever the risk there is still >= target. It ends at ``off`` with
       risk(off) >= target > risk(off + 1): a genuine crossing, not necessarily the first.
       An exact scan of [off, off + window], continuing from the bisection's state at off,
       gives ``settle`` (one plus the last step in it with risk >= target).
    2. Certified scan (``_gallop``), shared by all batch sizes, from the phase start. Within
       a phase the risk is a finite sum of exponentials per bin,
           L(t0 + s; B) = sum_b w_b [c^T A^s X_b A^sT c] + const,   X_b = S_b(t0) - S_inf,b / B,
       i.e. const + sum_ij Re(K_ij z_ij^s) with z_ij = lam_i lam_j over the eigenvalues lam_i
       of the per-bin system matrix A (closed-form roots; Lagrange vectors for the modal
       coefficients K_ij). On [t, t + L) it bounds every term from below: real z >= 0 terms
       are monotone (min(K, K |z|^(L-1))), oscillating ones (complex or negative z) by the
       minimum of |K| |z|^s cos(arg K + s arg z) over the arc swept, and each bin's sum is
       clamped at 0 (a second moment). Oscillating terms of Det and Noise are bounded
       separately (shared by all B), real modes with the combined coefficient
       K_det + K_noise / B for every B. Relative margins (1e-10 of the terms' magnitudes;
       1e-12 plus the tables' angular rounding on the cosines) cover rounding. The modal
       coefficients are computed once per phase and carried (times z^(2^k) per jump). The
       scan keeps a step t and a level k. Every iteration evaluates the exact risk at
       t, t + 1 (``UNIT_LVL``) and records per unresolved B the first step below target;
       if the bound on [t, t + 2^k) is >= target for every batch size not yet resolved, no
       crossing can lie there, so it jumps (state advanced with the exact M^(2^k) table) and
       tries k + 1; otherwise it tries k - 1, down to the two exactly evaluated steps, which
       it then passes. Every step of [0, ell] is thus either excluded by a bound or evaluated
       exactly, in increasing order, so the first recorded step is the first crossing.
    3. If the scan covers the phase (or resolves every B) within ``max_iter`` iterations the
       cell is ``certified`` and its answer is the scan's. Otherwise (iteration budget spent,
       e.g. very slowly decaying oscillations at beta -> 1 whose dips approach the target many
       times, or a diverging cell whose state overflows, where no bound exists) the answer
       is the bisection's crossing off + 1, flagged ``certified = False``: it is the first
       crossing when the risk does not dip below target before it (the reference's
       assumption).
    The flag is the AND over the phases the cell was still searching in.

    Args:
        prob: (h, c, m0, w) per-bin arrays, w the loss weights 1/2 count h.
        lr, beta, gamma, power: the configuration (scalars).
        batch: batch sizes (nB,) float.
        phases: the schedule (Phases of arrays).
        target: the target risk; max_steps: the budget (censoring).
        kind, ema, K, window: static; 2^K > max_steps. max_iter: the certified scan's
            iteration budget (0: 4 K + 2 window, plus 2 K nB for plain SGD). certify: False
            skips the certified scan (every cell uncertified, answers the bisection's
            crossing; about 3x faster on the Fig. 3a momentum grid).

    Returns:
        dict of (nB,) arrays: steps (int, -1 if not reached), settle, best, final, certified,
        lower (no step before it has risk below target: proven by the certified scan; equal to
        steps when certified and reached); and iters, a scalar: the certified scan's
        iterations over all phases (its cost; 0 without certify).
    """
    w = prob[3]
    h, c_noise, _, _ = prob
    start, length = _phase_budget(phases.steps, max_steps)
    pow2 = 2 ** jnp.arange(K, dtype=jnp.int64)
    nB = batch.shape[0]
    # Iteration budget of the certified scan: 4 K + 2 window (the descent to and climb from
    # each crossing plus unit steps); for plain SGD (one moment per bin, iterations are cheap)
    # also 2 K per batch size, since the scan is shared by all batch sizes and must resolve
    # each one's crossing.
    max_iter = max_iter or 4 * K + 2 * window + (2 * K * nB if state_dim(kind, ema) == 1 else 0)
    max_iter = max_iter if certify else 0

    def risk(s):
        return _risk(s, read, w)

    _, _, s0, read = _config_system(kind, ema, prob, lr, beta, gamma, power)
    k = state_dim(kind, ema)
    c_read = np.eye(k)[k - 1 if ema else 0]
    two = jnp.stack([s0, jnp.zeros_like(s0)], 1)
    risk0 = jnp.broadcast_to(risk(s0[:, None]), (nB,))
    init = dict(
        two=two,
        hit=jnp.where(_below(risk0, target), 0, -1).astype(jnp.int64),
        settle=jnp.where(_below(risk0, target), 0, -1).astype(jnp.int64),
        best=risk0,
        cert=jnp.ones(nB, bool),
        lower=jnp.zeros(nB, jnp.int64),
        iters=jnp.int64(0),
    )

    def phase(carry, xs, first_phase=False):
        t0, ell, lr_m, b_m = xs
        inv_b = 1.0 / (batch * b_m)
        M, r, _, _ = _config_system(kind, ema, prob, lr * lr_m, beta, gamma, power)
        Ms, Rs = _tables(M, r, K)
        two, hit, settle, best, cert = (
            carry["two"],
            carry["hit"],
            carry["settle"],
            carry["best"],
            carry["cert"],
        )
        lower = carry["lower"]
        s = two[:, :1] + two[:, 1:] / batch[None, :, None]
        rs = risk(s)
        fresh = (hit < 0) & _below(rs, target)
        hit = jnp.where(fresh, t0, hit)
        settle = jnp.where(fresh, t0, settle)
        active = hit < 0

        Tt = _as_tuple_tables(Ms, Rs)
        M1 = tuple(tuple(x[0] for x in row) for row in Tt[0])
        R1 = tuple(x[0] for x in Tt[1])

        # (1) bisection by binary lifting (per batch size)
        def lift(c, xs):
            cur, off, best = c
            Mt, Rt, p2 = xs
            cand = _apply_t(Mt, Rt, cur, inv_b)
            rc = _risk_t(cand, read, w)
            inside = off + p2 <= ell
            best = jnp.fmin(best, jnp.where(inside, rc, jnp.inf))
            ok = inside & ~_below(rc, target)
            cur = tuple(jnp.where(ok[:, None], a, b) for a, b in zip(cand, cur))
            return (cur, off + ok * p2, best), None

        rev = jax.tree.map(lambda a: a[::-1], (*Tt, pow2))
        (cur, off, best), _ = jax.lax.scan(lift, (tuple(s), jnp.zeros(nB, jnp.int64), best), rev)

        # (2) exact forward scan of [off, off + window] from the bisection's state at off
        # (risk(off) >= target): the answer of uncertified cells (off + 1, the bisection's
        # crossing) and the settle step
        def scan_step(c, i):
            cur, first, last_above, best = c
            t = off + i
            valid = t <= ell
            rc = _risk_t(cur, read, w)
            below = valid & _below(rc, target)
            first = jnp.where((first < 0) & below, t, first)
            last_above = jnp.where(valid & ~_below(rc, target), t, last_above)
            best = jnp.fmin(best, jnp.where(valid, rc, jnp.inf))
            return (_apply_t(M1, R1, cur, inv_b), first, last_above, best), None

        neg = -jnp.ones(nB, jnp.int64)
        (_, first, last_above, best), _ = jax.lax.scan(
            scan_step, (cur, neg, neg, best), jnp.arange(window + 1)
        )

        # (3) certified first crossing: galloping scan with modal lower bounds
        if certify:
            lam, hs = _modes(kind, ema, lr * lr_m * h ** (1.0 - power), beta, gamma, c_read)
            sinf = (
                None
                if first_phase
                else _stationary(kind, ema, lr * lr_m * h ** (1.0 - power), beta, gamma, r) / b_m
            )
            Tpair = (Tt[0], tuple(x / b_m for x in Tt[1]))
            ghit, gcert, gstop, giters = _gallop(
                Tpair,
                tuple(two[i] for i in range(two.shape[0])),
                lam,
                hs,
                sinf,
                read,
                w,
                batch,
                ell,
                target,
                K,
                max_iter,
                jnp.where(off < ell, off + 1, ell + 1),
                first_phase,
            )
        else:
            ghit, gcert, gstop = -jnp.ones(nB, jnp.int64), jnp.zeros(nB, bool), jnp.int64(0)
            giters = jnp.int64(0)
        gfound = active & gcert & (ghit >= 0)
        bfound = active & ~gcert & (first >= 0) & (off < ell)
        hit = jnp.where(gfound, t0 + ghit, jnp.where(bfound, t0 + first, hit))
        found = gfound | bfound
        settle = jnp.where(found, t0 + jnp.maximum(last_above + 1, hit - t0), settle)
        # certified lower bound of the first crossing: extended only while every earlier
        # phase was certified; an unresolved phase leaves [t0, t0 + gstop) proven clear
        lower = jnp.where(
            cert & active,
            jnp.where(gcert, jnp.where(gfound, hit, t0 + ell + 1), t0 + gstop),
            jnp.where(cert & (hit >= 0), hit, lower),
        )
        cert = cert & (~active | gcert)
        two = jnp.stack(
            _expand_t(Tt, tuple(two), jnp.broadcast_to(ell, (2,)), jnp.stack([0.0, 1.0 / b_m]))
        )
        iters = carry["iters"] + giters
        return (
            dict(two=two, hit=hit, settle=settle, best=best, cert=cert, lower=lower, iters=iters),
            None,
        )

    xs = (start, length, jnp.asarray(phases.lr_mult), jnp.asarray(phases.batch_mult))
    # the first phase starts with zero noise moments: its certified scan uses the cheaper
    # fresh-noise bound (static, so the later phases' general bound is not computed for it)
    out, _ = phase(init, jax.tree.map(lambda a: a[0], xs), first_phase=True)
    if len(phases.steps) > 1:
        out, _ = jax.lax.scan(phase, out, jax.tree.map(lambda a: a[1:], xs))
    det, noise = risk(out["two"])
    final = det + noise / batch
    return dict(
        steps=out["hit"],
        settle=out["settle"],
        best=jnp.fmin(out["best"], final),
        final=final,
        certified=out["cert"],
        lower=out["lower"],
        iters=out["iters"],
    )
