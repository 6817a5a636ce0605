"""The closed-form NQM risk against the step-by-step recurrence and a Monte-Carlo simulation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from nqm_reference import risk_by_recurrence

from cbs import nqm
from cbs.nqm._schedules import schedule_phases
from cbs.sweep.config import RampPhase, Schedule

# Eigenvalues chosen to hit the delicate cases: with lr 0.25 and beta 0.25, h = 1 gives
# a = 0.25 = (1 - sqrt(beta))^2 exactly (critical damping, a double root); small h are
# under-damped (complex roots), large ones over-damped; with gamma = 0.75, h = 1 also
# gives gamma = 1 - a (EMA double root).
H = np.array([1.0, 0.5, 0.1, 0.01, 1e-3, 3.0])
PROBLEM = nqm.custom_problem(
    H, c=H * np.array([1, 2, 1, 0.5, 1, 1]), m0=np.array([1, 2, 0.5, 1, 1, 3])
)

CASES = [  # kind, lr, momentum, ema, power
    ("sgd", 0.25, 0.0, 0.0, 0.0),
    ("sgd", 0.25, 0.0, 0.75, 0.0),
    ("sgd", 0.05, 0.0, 0.99, 0.5),
    ("momentum", 0.25, 0.25, 0.0, 0.0),
    ("momentum", 0.05, 0.95, 0.0, 0.25),
    ("momentum", 0.1, 0.9, 0.75, 0.5),
    ("nesterov", 0.25, 0.25, 0.0, 0.0),
    ("nesterov", 0.05, 0.95, 0.0, 0.25),
    ("nesterov", 0.1, 0.9, 0.9, 0.0),
]

SCHEDULES = {
    "constant": Schedule(),
    # a ramp counted in samples (B = 8): 40 steps at B, 25 at 2B, then 8B
    "step_ramp": Schedule(
        kind="step",
        boundaries=[40, 90],
        decay_factor=0.3,
        ramp=[RampPhase(320, 1.0, 1), RampPhase(400, 1.0, 2), RampPhase(None, 1.0, 8)],
    ),
    "warmup_cosine": Schedule(kind="cosine", warmup_steps=15, horizon=120, final_lr_fraction=0.1),
    "linear_decay": Schedule(kind="linear_decay", horizon=100),
    "piecewise": Schedule(
        kind="piecewise",
        pieces=[[30, 1.0], [20, 0.5], [1, 0.2]],
        ramp=[RampPhase(240, 1.0, 1), RampPhase(640, 1.0, 4), RampPhase(None, 1.0, 16)],
    ),
    "seesaw_step": Schedule(kind="step", boundaries=[50, 100], decay_factor=0.5, seesaw=True),
    "seesaw_cosine": Schedule(kind="cosine", horizon=150, seesaw=True),
}


def _per_step(phases: nqm.Phases, T: int):
    lengths = phases.steps.copy()
    lengths[-1] = max(T - lengths[:-1].sum(), 0)
    return (np.repeat(phases.lr_mult, lengths)[:T], np.repeat(phases.batch_mult, lengths)[:T])


# Every optimizer case under a constant LR, and every schedule under three cases (one per kind,
# each with EMA or momentum in its delicate regime), keeps the compile count and runtime low.
PAIRS = [(c, "constant") for c in CASES] + [
    (c, s) for s in SCHEDULES if s != "constant" for c in (CASES[5], CASES[7])
]


@pytest.mark.parametrize(
    "case,sched", PAIRS, ids=lambda x: x if isinstance(x, str) else f"{x[0]}-b{x[2]}-g{x[3]}"
)
def test_closed_form_matches_recurrence(case, sched):
    kind, lr, beta, gamma, power = case
    T, B = 200, 8.0
    phases, exact = schedule_phases(SCHEDULES[sched], T, batch_size=int(B), optimizer_kind=kind)
    assert exact
    lr_m, b_m = _per_step(phases, T)
    ref = risk_by_recurrence(
        PROBLEM.h, PROBLEM.c, PROBLEM.m0, PROBLEM.count, kind, lr, beta, gamma, power, B * b_m, lr_m
    )
    steps = np.array([0, 1, 2, 3, 7, 14, 15, 16, 40, 41, 63, 64, 89, 90, 91, 127, 150, 199, 200])
    got = nqm.expected_risk(
        PROBLEM, kind, lr, beta, gamma, power, batch_sizes=[B], steps=steps, phases=phases
    )[0, 0]
    np.testing.assert_allclose(got, ref[steps], rtol=1e-9, atol=0)


def test_det_plus_noise_over_b():
    """L(t; B) = Det(t) + Noise(t) / B exactly."""
    steps = np.array([0, 5, 50, 500])
    r = nqm.expected_risk(
        PROBLEM, "momentum", 0.05, 0.9, 0.0, 0.25, batch_sizes=[np.inf, 1.0, 7.0], steps=steps
    )[0]
    np.testing.assert_allclose(r[2], r[0] + (r[1] - r[0]) / 7.0, rtol=1e-12)


def test_long_horizon_matches_stationary_risk():
    """At t -> infinity the SGD risk tends to sum_i w_i alpha c_i h^-p / (B (2 - a_i)) / h ..."""
    lr, B, p = 0.3, 4.0, 0.5
    lam = H ** (1 - p)
    a = lr * lam
    m_inf = lr**2 * H ** (-2 * p) * PROBLEM.c / B / (a * (2 - a))
    want = np.sum(PROBLEM.loss_weights * m_inf)
    got = nqm.expected_risk(PROBLEM, "sgd", lr, 0.0, 0.0, p, batch_sizes=[B], steps=[10**9])[
        0, 0, 0
    ]
    np.testing.assert_allclose(got, want, rtol=1e-9)


def _optax_opt(kind, lr, beta):
    if kind == "sgd":
        return optax.sgd(lr)
    return optax.sgd(lr, momentum=beta, nesterov=kind == "nesterov")


@pytest.mark.parametrize(
    "case",
    [
        ("sgd", 0.3, 0.0, 0.8, 0.5),
        ("nesterov", 0.1, 0.8, 0.0, 0.5),
        ("momentum", 0.05, 0.95, 0.9, 0.25),
    ],
    ids=lambda c: c[0],
)
def test_exact_risk_matches_monte_carlo(case):
    """Sampled Gaussian-noise training with optax (many runs, vmapped) vs the exact risk."""
    kind, lr, beta, gamma, power = case
    h = np.array([1.0, 0.3, 0.1, 0.03])
    problem = nqm.custom_problem(h)
    B, runs, T = 4.0, 10_000, 60
    checks = np.array([1, 5, 20, 60])
    exact = nqm.expected_risk(problem, kind, lr, beta, gamma, power, batch_sizes=[B], steps=checks)[
        0, 0
    ]
    opt = _optax_opt(kind, lr, beta)
    prec = h ** (-power)

    def run(key):
        k0, key = jax.random.split(key)
        theta = jax.random.normal(k0, h.shape)
        state = opt.init(theta)

        def step(carry, k):
            theta, avg, state = carry
            noise = jax.random.normal(k, h.shape) * jnp.sqrt(h / B)
            grad = prec * (h * theta + noise)  # P^-1 g with P = H^p
            upd, state = opt.update(grad, state, theta)
            theta = optax.apply_updates(theta, upd)
            avg = gamma * avg + (1 - gamma) * theta
            loss = 0.5 * jnp.sum(h * (avg if gamma > 0 else theta) ** 2)
            return (theta, avg, state), loss

        _, losses = jax.lax.scan(step, (theta, theta, state), jax.random.split(key, T))
        return losses[checks - 1]

    with jax.enable_x64(True):
        losses = np.asarray(jax.jit(jax.vmap(run))(jax.random.split(jax.random.key(0), runs)))
    mean, se = losses.mean(0), losses.std(0, ddof=1) / np.sqrt(runs)
    assert np.all(np.abs(mean - exact) < 4 * se), (mean, exact, se)


def test_binned_default_problem_matches_reference_constants():
    p = nqm.bin_problem(nqm.harmonic_problem())
    assert len(p.h) == 84
    assert abs(p.initial_risk - 4.702) < 1e-3
    assert abs(nqm.harmonic_problem().initial_risk - 4.894) < 1e-3


def test_x64_is_not_left_enabled():
    nqm.expected_risk(PROBLEM, "sgd", 0.1, batch_sizes=[1.0], steps=[3])
    assert jnp.zeros(1).dtype == jnp.float32
