"""Critical-batch-size analysis: steps-to-target tables, S(B) fits, CBS definitions, plots.

Reads only the store's tables (never a back end). The pieces:

* :func:`fit_critical_batch_size` -- from a (batch size, steps) table, or (seeds x batch
  sizes), to S_min, E_min, B_crit = E_min / S_min, B*_delta(B0), the raw-table knee and
  local efficiencies, with bootstrap intervals and warnings. No run folder needed.
* :func:`fit_power_law` -- CBS vs model or data size across sweeps, in log space.
* :func:`steps_table` / :func:`per_batch_table` -- results.parquet (and tuned.parquet) to
  min-over-configs steps per (optimizer, B, seed) and per (optimizer, B).
* :func:`analyze_run` -- one run folder to a summary, terminal text, cbs.json,
  cbs.parquet, PNG plots and report.md; :func:`print_summary` for the sweep runner.
* :func:`compare_runs` -- several run folders side by side, with optional scaling laws.
* :func:`analyze_targets` -- the CBS at other targets, from the stored metric curves.

The definitions and their sources are in docs/cbs.md (sections 1 to 5).
"""

from cbs.analysis._compare import Comparison, compare_runs, run_scale
from cbs.analysis._diagnostics import local_efficiencies, raw_knee
from cbs.analysis._fit import CriticalBatchSizeFit, fit_critical_batch_size, fit_steps_curve
from cbs.analysis._format import format_number
from cbs.analysis._model import FORMS, b_star_closed_form, steps_model
from cbs.analysis._power_law import PowerLawFit, fit_power_law
from cbs.analysis._render import short_summary
from cbs.analysis._report import RunAnalysis, analyze_run, print_summary
from cbs.analysis._seeds import aggregate_seeds
from cbs.analysis._tables import per_batch_table, read_run_table, steps_table
from cbs.analysis._targets import TargetSweep, analyze_targets, steps_from_curves
from cbs.errors import AnalysisError

__all__ = [
    "FORMS",
    "CriticalBatchSizeFit",
    "PowerLawFit",
    "aggregate_seeds",
    "b_star_closed_form",
    "fit_critical_batch_size",
    "fit_power_law",
    "fit_steps_curve",
    "local_efficiencies",
    "raw_knee",
    "steps_model",
    "Comparison",
    "RunAnalysis",
    "analyze_run",
    "compare_runs",
    "print_summary",
    "run_scale",
    "short_summary",
    "AnalysisError",
    "per_batch_table",
    "read_run_table",
    "steps_table",
    "TargetSweep",
    "analyze_targets",
    "steps_from_curves",
    "format_number",
]
