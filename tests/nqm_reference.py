"""Step-by-step reference for the NQM's expected risk (tests only).

Propagates E[x x^T] one step at a time with numpy, independently of the binary-powering
tables and the certified search in ``cbs.nqm``; the closed forms are tested against it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from cbs.nqm._moments import linear_system


def risk_by_recurrence(
    h, c_noise, m0, count, kind: str, lr, beta, gamma, power, batch_per_step, lr_per_step=None
) -> np.ndarray:
    """Step-by-step reference: propagates E[x x^T] with numpy, one step at a time.

    Args:
        batch_per_step: batch size at each step, shape (T,) (the schedule's B).
        lr_per_step: LR multiplier at each step (T,), default 1.

    Returns:
        the expected risk at steps 0..T, shape (T + 1,).
    """
    h, c_noise, m0, count = (np.asarray(x, np.float64) for x in (h, c_noise, m0, count))
    T = len(batch_per_step)
    lr_per_step = np.ones(T) if lr_per_step is None else np.asarray(lr_per_step, np.float64)
    ema = gamma > 0
    with jax.enable_x64(True):
        _, _, c, d = linear_system(kind, ema, jnp.zeros(1), beta, gamma)
    S = m0[:, None, None] * np.outer(d, d)[None]
    w = 0.5 * count * h
    out = [np.sum(w * np.einsum("i,bij,j->b", c, S, c))]
    systems = {}
    for t in range(T):
        alpha = lr * lr_per_step[t]
        if alpha not in systems:
            with jax.enable_x64(True):
                A, b, _, _ = linear_system(
                    kind, ema, jnp.asarray(alpha * h ** (1 - power)), beta, gamma
                )
            systems[alpha] = (np.asarray(A), np.asarray(b))
        A, b = systems[alpha]
        n = alpha**2 * h ** (-2 * power) * c_noise / batch_per_step[t]
        S = A @ S @ np.swapaxes(A, 1, 2) + n[:, None, None] * b[:, :, None] * b[:, None, :]
        out.append(np.sum(w * np.einsum("i,bij,j->b", c, S, c)))
    return np.array(out)


def problem_risk(problem, kind, lr, beta, gamma, power, batch_per_step, lr_per_step=None):
    """:func:`risk_by_recurrence` on an NQMProblem's spectrum, noise, start and multiplicities."""
    return risk_by_recurrence(
        problem.h,
        problem.c,
        problem.m0,
        problem.count,
        kind,
        lr,
        beta,
        gamma,
        power,
        batch_per_step,
        lr_per_step,
    )


def constant_batch_risk(problem, kind, lr, beta, gamma, power, B, T):
    """:func:`problem_risk` at batch size B for T steps: the risk at steps 0..T."""
    return problem_risk(problem, kind, lr, beta, gamma, power, np.full(T, float(B)))
