"""Exact noisy quadratic model (Zhang et al. 2019): closed-form risk, steps to target, tuning.

Quick use::

    from cbs import nqm
    problem = nqm.harmonic_problem()              # h_i = 1/i, d = 10^4, C = H, m0 = 1
    out = nqm.evaluate_grid(problem, "sgd", np.logspace(-5, 0.5, 100),
                            batch_sizes=2.0 ** np.arange(2, 21, 2), target=0.01, max_steps=10**9)

See docs/nqm.md for the model and the exact recurrences; ``cbs.nqm.backend.NQMBackend``
plugs the engine into the sweep runner.
"""

from cbs.nqm._grid import evaluate_grid, expected_risk, steps_to_target
from cbs.nqm._moments import KINDS, Phases, constant_phases, moment_system
from cbs.nqm._problem import (
    NQMProblem,
    bin_problem,
    custom_problem,
    harmonic_problem,
    power_law_problem,
)
from cbs.nqm._schedules import merge_phases, schedule_phases
from cbs.nqm._tuning import best_on_grid, lower_bound_steps, optimize_pwc, pwc_lr_cap, refine_lr

__all__ = [
    "KINDS",
    "Phases",
    "constant_phases",
    "moment_system",
    "evaluate_grid",
    "expected_risk",
    "steps_to_target",
    "NQMProblem",
    "bin_problem",
    "custom_problem",
    "harmonic_problem",
    "power_law_problem",
    "merge_phases",
    "schedule_phases",
    "best_on_grid",
    "lower_bound_steps",
    "optimize_pwc",
    "pwc_lr_cap",
    "refine_lr",
]
