"""Analysis of one run folder: options, per-optimizer fits and warnings, the summary table.

Reads only the store's tables (results, tuned, reference) and config.yaml / manifest.json;
never a back end. Rendering is in ``_render``, the written files in ``_write``, several runs
side by side in ``_compare``.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from cbs.analysis._fit import CriticalBatchSizeFit, fit_critical_batch_size
from cbs.analysis._format import format_number
from cbs.analysis._noise import noise_per_batch
from cbs.analysis._options import resolve_options
from cbs.analysis._render import best_steps_text, run_text, short_summary
from cbs.analysis._tables import (
    check_run_dir,
    per_batch_table,
    read_run_config,
    read_run_manifest,
    read_run_table,
    steps_table,
)
from cbs.analysis._write import write_run_files
from cbs.errors import AnalysisError

__all__ = ["RunAnalysis", "analyze_run", "print_summary", "search_edge_flags"]


def search_edge_flags(manifest: dict) -> dict[tuple[str, int], str]:
    """Per (optimizer, batch size) of a quasi-random search whose best trial ended on a
    side of a searched range (manifest ``adaptive.families``; cbs.sweep.search): which
    ranges and sides, e.g. "one_minus_momentum low, b2 high"."""
    fams = ((manifest or {}).get("adaptive") or {}).get("families") or {}
    out = {}
    for block_id, st in fams.items():
        if not isinstance(st, dict) or not st.get("search") or not st.get("edge"):
            continue
        opt, _, b = str(block_id).rpartition("__B")
        if not b.isdigit():
            continue
        out[(opt, int(b))] = ", ".join(f"{k} {'/'.join(v)}" for k, v in sorted(st["edge"].items()))
    return out


@dataclasses.dataclass
class RunAnalysis:
    """The analysis of one run folder.

    Unpacks as ``summary, text = analyze_run(...)``.
    """

    run_dir: Path
    label: str
    unit: str
    tokens_per_example: int
    summary: pd.DataFrame  # one row per optimizer, every scalar
    text: str  # the terminal report
    fits: dict[str, CriticalBatchSizeFit]  # per optimizer
    steps: pd.DataFrame  # per (optimizer, batch size, seed)
    per_batch: pd.DataFrame  # per (optimizer, batch size), seeds combined
    options: dict
    swept_hparams: dict[str, list[str]] = dataclasses.field(default_factory=dict)  # per optimizer
    # the measured gradient noise scale per (optimizer, batch size), cbs.analysis._noise
    noise: pd.DataFrame | None = None
    files: list[Path] = dataclasses.field(default_factory=list)
    warnings: list[str] = dataclasses.field(default_factory=list)  # run-level

    def __iter__(self):
        return iter((self.summary, self.text))

    def __str__(self) -> str:
        return self.text


# Best step counts below this cannot separate batch sizes (one step is >10% of S).
FEW_STEPS = 10


def _lr_edge_warnings(g: pd.DataFrame, unit_scale: float) -> list[str]:
    out = []
    for side in ("low", "high"):
        bs = g.loc[g["lr_at_edge"] == side, "batch_size"].to_numpy(float) * unit_scale
        if bs.size:
            out.append(
                f"best LR at the {side} edge of the LR grid at B = "
                + ", ".join(format_number(b) for b in bs)
                + " (widen the LR grid there)"
            )
    return out


def fit_optimizers(label, names, steps, per_b, *, tpe, **fit_options):
    """Each optimizer's fit and summary row (the run report and the per-target table).

    ``fit_options``: the keyword arguments of :func:`_fit_optimizer` (``scale`` and
    ``unit`` also label the row). Returns ({name: fit}, [row, ...]).
    """
    fits, rows = {}, []
    for name in names:
        fits[name] = fit = _fit_optimizer(name, steps, per_b, **fit_options)
        mine = per_b[per_b["optimizer"] == name]
        rows.append(
            _summary_row(label, name, fit, fit_options["scale"], tpe, fit_options["unit"], mine)
        )
    return fits, rows


def _fit_optimizer(
    name,
    steps_df,
    per_b,
    *,
    scale,
    unit,
    delta,
    b0,
    n_boot,
    seed,
    form,
    ci_level,
    eval_every=1,
    uncertified=False,
):
    g = steps_df[steps_df["optimizer"] == name]
    # Points whose first crossing is not proven (exact replay / certified scan) are left
    # out of the fit unless asked for; they are counted and named in the warnings.
    inexact = ~g["exact"].astype(bool) if "exact" in g else pd.Series(False, index=g.index)
    bs = np.sort(g["batch_size"].unique())
    seeds = np.sort(g["seed"].unique())
    mat = np.full((seeds.size, bs.size), np.nan)
    present = np.zeros_like(mat, dtype=bool)
    si = {s: i for i, s in enumerate(seeds)}
    bi = {b: j for j, b in enumerate(bs)}
    for row, bad in zip(g.itertuples(index=False), inexact.to_numpy()):
        if bad and not uncertified:
            continue
        i, j = si[row.seed], bi[row.batch_size]
        present[i, j] = True
        mat[i, j] = np.nan if row.censored else row.steps
    pb = per_b[per_b["optimizer"] == name]
    warnings = _lr_edge_warnings(pb, scale)
    if inexact.any():
        where = ", ".join(format_number(b * scale) for b in np.unique(g.loc[inexact, "batch_size"]))
        warnings.append(
            f"{int(inexact.sum())} (batch size, seed) point(s) without a proven first crossing at "
            f"B = {where}: "
            + ("kept in the fit (uncertified=True)" if uncertified else "excluded from the fit")
        )
    all_div = pb[pb["n_diverged"] >= pb["n_cells"]]
    if len(all_div):
        where = ", ".join(format_number(b * scale) for b in all_div["batch_size"])
        warnings.append(f"every cell diverged at B = {where} (lower the LR grid there)")
    partial = pb[(pb["n_censored_seeds"] > 0) & ~pb["censored"]]
    for r in partial.itertuples(index=False):
        warnings.append(
            f"{r.n_censored_seeds} of {r.n_seeds} seeds censored at "
            f"B = {format_number(r.batch_size * scale)} (kept: the median seed reached the target)"
        )
    most = pb[pb["censored"]]
    if len(most):
        warnings.append(
            "most seeds censored (target not reached within the budget) at B = "
            + ", ".join(format_number(b * scale) for b in most["batch_size"])
        )
    proven = (
        "proof" in g
        and (g["proof"] != "").all()
        and g["exact"].astype(bool).all()
        and (g["n_uncertified"] == 0).all()
    )
    if eval_every > 1 and not proven:
        # S is quantized to evaluation steps: up to one interval too high, which matters most
        # at large B where S is small (docs/cbs.md section 1, item 4).
        s = pb["steps"].to_numpy(float)
        coarse = pb.loc[
            np.isfinite(s) & (eval_every / np.where(np.isfinite(s), s, 1.0) > 0.1), "batch_size"
        ]
        if len(coarse):
            warnings.append(
                f"steps are quantized to eval_every={eval_every}, more than 10% of S at B = "
                + ", ".join(format_number(b * scale) for b in coarse)
                + " (evaluate more often there, or use interpolated steps)"
            )
    s_all = pb["steps"].to_numpy(float)
    few = pb.loc[np.isfinite(s_all) & (s_all < FEW_STEPS), "batch_size"]
    if len(few):
        # a step or two of difference is then a large part of S: the curve cannot separate
        # these batch sizes, and the target is probably too easy for the problem
        warnings.append(
            f"best steps to target below {FEW_STEPS} at B = "
            + ", ".join(format_number(b * scale) for b in few)
            + ": too few steps to separate batch sizes (choose a harder target)"
        )
    if (pb["n_seeds"] < pb["n_seeds"].max()).any():
        warnings.append("unequal number of seeds across batch sizes (incomplete sweep?)")
    if np.any(mat[np.isfinite(mat)] <= 0):
        raise AnalysisError(
            f"optimizer {name!r} reached the target at step 0 at B = "
            + ", ".join(format_number(b * scale) for b in bs[np.any(mat <= 0, axis=0)])
            + ": the target is met at initialisation; choose a lower target"
        )
    try:
        fit = fit_critical_batch_size(
            bs * scale,
            mat,
            delta=delta,
            b0=None if b0 is None else b0 * scale,
            n_boot=n_boot,
            seed=seed,
            form=form,
            ci_level=ci_level,
            present=present,
            unit=unit,
            extra_warnings=warnings,
        )
    except ValueError as e:  # an invalid option (form, ci_level, ...) phrased by the fitter
        raise AnalysisError(f"optimizer {name!r}: {e}") from None
    # The fitter's own "censored at B" note repeats the table's; keep the table's wording.
    fit.warnings = (
        [w for w in fit.warnings if not w.startswith("censored (excluded from the fit)")]
        if len(most)
        else fit.warnings
    )
    return fit


def _with_ci(fit: CriticalBatchSizeFit, name: str) -> dict:
    """``name``, ``name_ci_low``, ``name_ci_high`` of a fit, in the tables' column order."""
    lo, hi = getattr(fit, name + "_ci")
    return {name: getattr(fit, name), f"{name}_ci_low": lo, f"{name}_ci_high": hi}


def _summary_row(label, name, fit: CriticalBatchSizeFit, scale, tpe, unit, pb):
    row = dict(
        run=label,
        optimizer=name,
        unit=unit,
        tokens_per_example=tpe,
        form=fit.form,
        n_batch_sizes=int(fit.batch_sizes.size),
        n_points=fit.n_points,
        n_seeds=fit.n_seeds,
        **_with_ci(fit, "s_min"),
        **_with_ci(fit, "e_min"),
        **_with_ci(fit, "b_crit"),
        **_with_ci(fit, "b_star"),
        delta=fit.delta,
        b0=fit.b0,
        knee=fit.knee,
        **_with_ci(fit, "alpha"),
        b_crit_loo_low=fit.b_crit_loo[0],
        b_crit_loo_high=fit.b_crit_loo[1],
        rms_log_residual=fit.rms_log_residual,
        ci_level=fit.ci_level,
        bootstrap=fit.bootstrap,
        n_boot=fit.n_boot,
        b_crit_examples=fit.b_crit / scale,
        b_crit_tokens=fit.b_crit / scale * tpe,
        b_star_examples=fit.b_star / scale,
        b_star_tokens=fit.b_star / scale * tpe,
        n_diverged=int(pb["n_diverged"].sum()),
        n_inexact_points=int(pb["n_inexact_seeds"].sum()) if "n_inexact_seeds" in pb else 0,
        n_edge_points=int((pb["lr_at_edge"] != "").sum()) if "lr_at_edge" in pb else 0,
        n_warnings=len(fit.warnings),
        warnings="; ".join(fit.warnings),
        # The headline CBS (docs/cbs.md, "Which CBS to report") and, for it and B*, where the
        # fitted value lies against the swept batch sizes: outside them it is shown as a bound
        headline="b_crit",
        swept_b_min=fit.swept_range[0],
        swept_b_max=fit.swept_range[1],
        b_crit_text=fit.bound_text("b_crit"),
        b_crit_outside=fit.outside("b_crit"),
        b_star_text=fit.bound_text("b_star"),
        b_star_outside=fit.outside("b_star"),
    )
    return row


def analyze_run(
    run_dir,
    *,
    delta: float | None = None,
    b0: float | None = None,
    n_boot: int | None = None,
    tokens_per_example: int | None = None,
    unit: str = "auto",
    form: str = "mcCandlish",
    use_tuned: bool = True,
    interpolated: bool = False,
    ci_level: float = 0.95,
    seed: int = 0,
    plots: bool | None = None,
    write: bool = True,
    uncertified: bool = False,
) -> RunAnalysis:
    """Analyzes one run folder: steps table, S(B) fit per optimizer, CBS, files.

    Options left as None come from config.yaml's ``analysis:`` section (delta 0.2, b0 null =
    smallest swept B, bootstrap 1000, tokens_per_example 1).

    Args:
        run_dir: the run folder (results.parquet, or parts/results/*.parquet while running).
        delta: overhead over linear scaling defining B* and the knee.
        b0: anchor batch size of B*, in examples (converted when the unit is tokens).
        n_boot: bootstrap replicates.
        tokens_per_example: overrides the results' tokens_per_example column.
        unit: "examples", "tokens" or "auto" (tokens when tokens_per_example > 1).
        form: "mcCandlish" or "general".
        use_tuned: prefer tuned.parquet's refined steps when present.
        interpolated: use steps_interpolated (between evaluations) instead of the first
            evaluated crossing.
        ci_level: level of the percentile intervals.
        seed: bootstrap seed.
        plots: write PNGs and report.md (default: config output.plots, else True).
        write: write cbs.json, cbs.parquet (and plots) into the run folder.
        uncertified: also fit (batch size, seed) points whose first crossing is not proven
            (``exact`` False in the steps table: no exact replay, an uncertified NQM scan);
            by default they are excluded, counted and named in the warnings.

    Returns:
        A :class:`RunAnalysis` (``summary, text = analyze_run(...)`` works).

    Raises:
        AnalysisError: missing or invalid run folder, or invalid options.
    """
    run_dir = check_run_dir(run_dir)
    cfg = read_run_config(run_dir)
    manifest = read_run_manifest(run_dir)
    try:
        results = read_run_table(run_dir, "results")
        tuned = read_run_table(run_dir, "tuned") if use_tuned else None
        reference = read_run_table(run_dir, "reference")
    except (OSError, ValueError) as e:  # pyarrow raises ArrowInvalid (a ValueError) on bad files
        raise AnalysisError(
            f"cannot read the tables of {str(run_dir)!r}: {str(e).splitlines()[0]}"
        ) from None
    if results is None or results.empty:
        raise AnalysisError(f"{str(run_dir)!r} has an empty results table (no cell finished yet)")
    delta, b0, n_boot, tpe, unit = resolve_options(
        cfg,
        results,
        delta=delta,
        b0=b0,
        n_boot=n_boot,
        tokens_per_example=tokens_per_example,
        unit=unit,
    )
    scale = tpe if unit == "tokens" else 1
    if plots is None:
        plots = bool((cfg.get("output") or {}).get("plots", True))
    steps_column = "steps_interpolated" if interpolated else "steps_to_target"
    if interpolated and "steps_interpolated" not in results:
        raise AnalysisError(
            "--interpolated: the results have no steps_interpolated column "
            "(the sweep ran without target.interpolate)"
        )
    label = str(cfg.get("name") or run_dir.name)
    run_warnings = []
    planned = {b.get("block_id") for b in manifest.get("blocks") or [] if isinstance(b, dict)}
    if planned and "block_id" in results:
        done = planned & set(results["block_id"])
        if len(done) < len(planned):
            run_warnings.append(
                f"the run is unfinished: {len(done)} of {len(planned)} blocks done; "
                f"analysed what exists so far"
            )
    elif not (run_dir / "results.parquet").exists():
        run_warnings.append(
            "the run is unfinished (no results.parquet yet): analysed the parts written so far"
        )

    try:
        eval_every = int((cfg.get("budget") or {}).get("eval_every", 1) or 1)
    except (TypeError, ValueError):
        eval_every = 1
    steps = steps_table(results, tuned, use_tuned=use_tuned, steps_column=steps_column)
    per_b = per_batch_table(steps)
    search_flags = search_edge_flags(manifest)
    if search_flags:
        per_b["search_edge"] = [
            search_flags.get((o, int(b)), "")
            for o, b in zip(per_b["optimizer"], per_b["batch_size"])
        ]
        run_warnings += [
            f"{o} at B = {b}: the best trial of the search is on the edge of {what} after the "
            "last extension round (flagged: widen that range or allow more rounds)"
            for (o, b), what in sorted(search_flags.items())
        ]
    # Keep the config's optimizer order when there is one.
    order = [
        o.get("name") or o.get("kind")
        for o in ((cfg.get("grid") or {}).get("optimizers") or [])
        if isinstance(o, dict)
    ]
    names = [n for n in order if n in set(steps["optimizer"])]
    names += [n for n in dict.fromkeys(steps["optimizer"]) if n not in names]

    # Hyperparameters besides the LR that the grid sweeps get a "best" column in the tables.
    hp_cols = [c for c in results.columns if c.startswith("hp_")]
    swept = {
        name: [
            c[3:]
            for c in hp_cols
            if results.loc[results["optimizer"] == name, c].dropna().nunique() > 1
        ]
        for name in names
    }
    fits, rows = fit_optimizers(
        label,
        names,
        steps,
        per_b,
        tpe=tpe,
        scale=scale,
        unit=unit,
        delta=delta,
        b0=b0,
        n_boot=n_boot,
        seed=seed,
        form=form,
        ci_level=ci_level,
        eval_every=1 if interpolated else eval_every,
        uncertified=uncertified,
    )
    summary = pd.DataFrame(rows)
    noise = None
    try:
        noise = noise_per_batch(results, read_run_table(run_dir, "noise_scale"))
    except (OSError, ValueError):  # an unreadable optional table: the CBS stands without it
        noise = None
    if len(summary):
        # one number per optimizer beside B_crit: the median over batch sizes (scaled units)
        summary["b_simple"] = [
            float(np.median(noise.loc[noise["optimizer"] == n, "b_simple"])) * scale
            if noise is not None and (noise["optimizer"] == n).any()
            else np.nan
            for n in summary["optimizer"]
        ]

    options = dict(
        delta=delta,
        b0_examples=b0,
        n_boot=n_boot,
        tokens_per_example=tpe,
        unit=unit,
        form=form,
        use_tuned=use_tuned,
        steps_column=steps_column,
        ci_level=ci_level,
        seed=seed,
        uncertified=uncertified,
    )
    analysis = RunAnalysis(
        run_dir=run_dir,
        label=label,
        unit=unit,
        tokens_per_example=tpe,
        summary=summary,
        text="",
        fits=fits,
        steps=steps,
        per_batch=per_b,
        options=options,
        swept_hparams=swept,
        warnings=run_warnings,
        noise=noise,
    )
    analysis.text = run_text(analysis, cfg.get("target") or {}, scale)
    if write:
        try:
            write_run_files(analysis, cfg, manifest, reference, scale, plots)
        except OSError as e:
            raise AnalysisError(
                f"cannot write the analysis files into {str(run_dir)!r}: {e}"
            ) from None
    return analysis


def print_summary(run_dir, *, file=None, steps: bool = False, **options) -> RunAnalysis:
    """Runs :func:`analyze_run` (writing its files) and prints :func:`short_summary`, after
    the per-batch-size best-steps table when ``steps`` (the same numbers as report.md).

    Meant for the sweep runner's last step; returns the analysis.
    """
    analysis = analyze_run(run_dir, **options)
    if steps:
        scale = analysis.tokens_per_example if analysis.unit == "tokens" else 1
        print(best_steps_text(analysis, scale), file=file or sys.stdout)
    print(short_summary(analysis), file=file or sys.stdout)
    return analysis
