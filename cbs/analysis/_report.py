"""Analysis of run folders: tables, fits per optimizer, files (json, parquet, PNG, report.md).

Reads only the store's tables (results, tuned, reference) and config.yaml / manifest.json;
never a back end.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from cbs.analysis._fit import (CriticalBatchSizeFit, PowerLawFit, _jsonable, fit_critical_batch_size,
                               fit_power_law)
from cbs.analysis._tables import (AnalysisError, check_run_dir, per_batch_table, read_run_config,
                                  read_run_manifest, read_run_table, steps_table)

__all__ = ["RunAnalysis", "Comparison", "analyze_run", "compare_runs", "short_summary", "run_scale",
           "print_summary", "format_number"]

_UNITS = ("auto", "examples", "tokens")


def format_number(x, digits: int = 4) -> str:
    """Compact text for a number: 4 significant digits, 'inf', or '-' for NaN/None."""
    if x is None:
        return "-"
    try:
        x = float(x)
    except (TypeError, ValueError):
        return str(x)
    if math.isnan(x):
        return "-"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    if x != 0 and (abs(x) >= 1e6 or abs(x) < 1e-3):
        return f"{x:.{digits - 1}e}"
    return f"{x:.{digits}g}"


def _ci_text(lo, hi) -> str:
    if lo is None or hi is None or (isinstance(lo, float) and math.isnan(lo)):
        return "-"
    return f"[{format_number(lo)}, {format_number(hi)}]"


def _text_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) if rows else len(str(h))
              for i, h in enumerate(header)]
    line = "  ".join(str(h).rjust(w) for h, w in zip(header, widths))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(str(c).rjust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(out)


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    out = ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c).replace("|", "\\|") for c in r) + " |" for r in rows]
    return "\n".join(out)


@dataclasses.dataclass
class RunAnalysis:
    """The analysis of one run folder.

    Unpacks as ``summary, text = analyze_run(...)``.
    """
    run_dir: Path
    label: str
    unit: str
    tokens_per_example: int
    summary: pd.DataFrame                   # one row per optimizer, every scalar
    text: str                               # the terminal report
    fits: dict[str, CriticalBatchSizeFit]   # per optimizer
    steps: pd.DataFrame                     # per (optimizer, batch size, seed)
    per_batch: pd.DataFrame                 # per (optimizer, batch size), seeds combined
    options: dict
    swept_hparams: dict[str, list[str]] = dataclasses.field(default_factory=dict)   # per optimizer
    files: list[Path] = dataclasses.field(default_factory=list)
    warnings: list[str] = dataclasses.field(default_factory=list)   # run-level

    def __iter__(self):
        return iter((self.summary, self.text))

    def __str__(self) -> str:
        return self.text


def _resolve_options(cfg: dict, results: pd.DataFrame, *, delta, b0, n_boot, tokens_per_example, unit):
    section = cfg.get("analysis") or {}
    if not isinstance(section, dict):
        raise AnalysisError(f"config.yaml 'analysis' must be a mapping; got {section!r}")
    try:
        delta = float(section.get("delta", 0.2) if delta is None else delta)
        b0 = section.get("b0") if b0 is None else b0
        b0 = None if b0 is None else float(b0)
        n_boot = int(section.get("bootstrap", 1000) if n_boot is None else n_boot)
        if tokens_per_example is None:
            col = results["tokens_per_example"].dropna().unique() if "tokens_per_example" in results else []
            if len(col) > 1:
                raise AnalysisError(f"results mix tokens_per_example values {sorted(col)}; pass one explicitly")
            tokens_per_example = int(col[0]) if len(col) else int(section.get("tokens_per_example", 1) or 1)
        tokens_per_example = int(tokens_per_example)
    except (TypeError, ValueError) as e:
        if isinstance(e, AnalysisError):
            raise
        raise AnalysisError(f"invalid analysis option in config.yaml or arguments: {e}") from None
    if unit not in _UNITS:
        raise AnalysisError(f"unit must be one of {', '.join(_UNITS)}; got {unit!r}")
    if unit == "auto":
        unit = "tokens" if tokens_per_example > 1 else "examples"
    if delta <= 0:
        raise AnalysisError(f"delta must be positive; got {delta}")
    if b0 is not None and not float(b0) > 0:
        raise AnalysisError(f"b0 must be a positive batch size (in examples); got {b0}")
    if n_boot < 0:
        raise AnalysisError(f"bootstrap must be >= 0; got {n_boot}")
    if tokens_per_example < 1:
        raise AnalysisError(f"tokens_per_example must be >= 1; got {tokens_per_example}")
    return delta, (None if b0 is None else float(b0)), n_boot, tokens_per_example, unit


def _lr_edge_warnings(g: pd.DataFrame, unit_scale: float) -> list[str]:
    out = []
    for side in ("low", "high"):
        bs = g.loc[g["lr_at_edge"] == side, "batch_size"].to_numpy(float) * unit_scale
        if bs.size:
            out.append(f"best LR at the {side} edge of the LR grid at B = "
                       + ", ".join(format_number(b) for b in bs) + " (widen the LR grid there)")
    return out


def _fit_optimizer(name, steps_df, per_b, *, scale, unit, delta, b0, n_boot, seed, form, ci_level, eval_every=1):
    g = steps_df[steps_df["optimizer"] == name]
    bs = np.sort(g["batch_size"].unique())
    seeds = np.sort(g["seed"].unique())
    mat = np.full((seeds.size, bs.size), np.nan)
    present = np.zeros_like(mat, dtype=bool)
    si = {s: i for i, s in enumerate(seeds)}
    bi = {b: j for j, b in enumerate(bs)}
    for row in g.itertuples(index=False):
        i, j = si[row.seed], bi[row.batch_size]
        present[i, j] = True
        mat[i, j] = np.nan if row.censored else row.steps
    pb = per_b[per_b["optimizer"] == name]
    warnings = _lr_edge_warnings(pb, scale)
    all_div = pb[pb["n_diverged"] >= pb["n_cells"]]
    if len(all_div):
        where = ", ".join(format_number(b * scale) for b in all_div["batch_size"])
        warnings.append(f"every cell diverged at B = {where} (lower the LR grid there)")
    partial = pb[(pb["n_censored_seeds"] > 0) & ~pb["censored"]]
    for r in partial.itertuples(index=False):
        warnings.append(f"{r.n_censored_seeds} of {r.n_seeds} seeds censored at "
                        f"B = {format_number(r.batch_size * scale)} (kept: the median seed reached the target)")
    most = pb[pb["censored"]]
    if len(most):
        warnings.append("most seeds censored (target not reached within the budget) at B = "
                        + ", ".join(format_number(b * scale) for b in most["batch_size"]))
    if eval_every > 1:
        # S is quantized to evaluation steps: up to one interval too high, which matters most
        # at large B where S is small (docs/cbs.md 1.3).
        s = pb["steps"].to_numpy(float)
        coarse = pb.loc[np.isfinite(s) & (eval_every / np.where(np.isfinite(s), s, 1.0) > 0.1), "batch_size"]
        if len(coarse):
            warnings.append(f"steps are quantized to eval_every={eval_every}, more than 10% of S at B = "
                            + ", ".join(format_number(b * scale) for b in coarse)
                            + " (evaluate more often there, or use interpolated steps)")
    if (pb["n_seeds"] < pb["n_seeds"].max()).any():
        warnings.append("unequal number of seeds across batch sizes (incomplete sweep?)")
    if np.any(mat[np.isfinite(mat)] <= 0):
        raise AnalysisError(f"optimizer {name!r} reached the target at step 0 at B = "
                            + ", ".join(format_number(b * scale) for b in bs[np.any(mat <= 0, axis=0)])
                            + ": the target is met at initialisation; choose a lower target")
    try:
        fit = fit_critical_batch_size(bs * scale, mat, delta=delta, b0=None if b0 is None else b0 * scale,
                                      n_boot=n_boot, seed=seed, form=form, ci_level=ci_level, present=present,
                                      unit=unit, extra_warnings=warnings)
    except ValueError as e:   # an invalid option (form, ci_level, ...) phrased by the fitter
        raise AnalysisError(f"optimizer {name!r}: {e}") from None
    # The fitter's own "censored at B" note repeats the table's; keep the table's wording.
    fit.warnings = [w for w in fit.warnings if not w.startswith("censored (excluded from the fit)")] \
        if len(most) else fit.warnings
    return fit


def _summary_row(label, name, fit: CriticalBatchSizeFit, scale, tpe, unit, pb):
    row = dict(run=label, optimizer=name, unit=unit, tokens_per_example=tpe, form=fit.form,
               n_batch_sizes=int(fit.batch_sizes.size), n_points=fit.n_points, n_seeds=fit.n_seeds,
               s_min=fit.s_min, s_min_ci_low=fit.s_min_ci[0], s_min_ci_high=fit.s_min_ci[1],
               e_min=fit.e_min, e_min_ci_low=fit.e_min_ci[0], e_min_ci_high=fit.e_min_ci[1],
               b_crit=fit.b_crit, b_crit_ci_low=fit.b_crit_ci[0], b_crit_ci_high=fit.b_crit_ci[1],
               b_star=fit.b_star, b_star_ci_low=fit.b_star_ci[0], b_star_ci_high=fit.b_star_ci[1],
               delta=fit.delta, b0=fit.b0, knee=fit.knee, alpha=fit.alpha,
               alpha_ci_low=fit.alpha_ci[0], alpha_ci_high=fit.alpha_ci[1],
               b_crit_loo_low=fit.b_crit_loo[0], b_crit_loo_high=fit.b_crit_loo[1],
               rms_log_residual=fit.rms_log_residual, ci_level=fit.ci_level, bootstrap=fit.bootstrap,
               n_boot=fit.n_boot, b_crit_examples=fit.b_crit / scale, b_crit_tokens=fit.b_crit / scale * tpe,
               b_star_examples=fit.b_star / scale, b_star_tokens=fit.b_star / scale * tpe,
               n_diverged=int(pb["n_diverged"].sum()), n_warnings=len(fit.warnings),
               warnings="; ".join(fit.warnings))
    return row


def _per_b_text(name, fit: CriticalBatchSizeFit, pb: pd.DataFrame, scale, unit, markdown=False,
                swept_hps: Sequence[str] = ()) -> str:
    header = [f"B ({unit})", "steps", "seeds reached", "best LR", "effective LR"] + \
        [f"best {hp}" for hp in swept_hps] + ["diverged", "efficiency/doubling", "B*S/(B0*S0)", "fit", "note"]
    rows = []
    pred = fit.predict(fit.batch_sizes) if fit.n_points >= 2 else np.full(fit.batch_sizes.size, np.nan)
    for j, r in enumerate(pb.sort_values("batch_size").itertuples(index=False)):
        note = []
        if r.censored:
            note.append("censored")
        if r.lr_at_edge:
            note.append(f"LR at {r.lr_at_edge} edge")
        if r.source == "tuned":
            note.append("tuned")
        rows.append([format_number(r.batch_size * scale), format_number(r.steps),
                     f"{r.n_seeds - r.n_censored_seeds}/{r.n_seeds}", format_number(r.best_lr),
                     format_number(r.best_effective_lr)]
                    + [format_number(getattr(r, f"best_hp_{hp}", np.nan)) for hp in swept_hps]
                    + [str(r.n_diverged),
                     format_number(fit.efficiencies[j], 3), format_number(fit.cumulative_efficiency[j], 3),
                     format_number(pred[j]), ", ".join(note)])
    return (_md_table if markdown else _text_table)(header, rows)


_COLUMNS = ("Per batch size: steps = median over seeds of the min over configs of the first step below the "
            "target; effective LR = lr/(1-momentum); efficiency/doubling = (S_prev/S)/(B/B_prev) per doubling "
            "(1 perfect, 0.5 no gain); B*S/(B0*S0) = cumulative data overhead; fit = fitted S(B).")


def _summary_text(summary: pd.DataFrame, markdown=False) -> str:
    if summary.empty:
        return "(no optimizer had data)"
    level = summary["ci_level"].iloc[0]
    header = ["optimizer", "S_min", "E_min", "B_crit", f"B_crit {level:.0%} CI", "B*", f"B* {level:.0%} CI",
              "knee", "points", "seeds"]
    rows = []
    for r in summary.itertuples(index=False):
        rows.append([r.optimizer, format_number(r.s_min), format_number(r.e_min), format_number(r.b_crit),
                     _ci_text(r.b_crit_ci_low, r.b_crit_ci_high), format_number(r.b_star),
                     _ci_text(r.b_star_ci_low, r.b_star_ci_high), format_number(r.knee),
                     str(r.n_points), str(r.n_seeds)])
    return (_md_table if markdown else _text_table)(header, rows)


def _units_line(unit, tpe, delta, b0_text, form):
    what = f"tokens (examples x {tpe} tokens per example)" if unit == "tokens" else "examples"
    return (f"Batch sizes, B_crit, B* and knee in {what}; S_min in steps; E_min in {unit} to reach the target. "
            f"Fit: {form}, least squares in log S. B* = (1+delta) B0 + delta B_crit with delta={delta:g}, "
            f"B0={b0_text}.")


def analyze_run(run_dir, *, delta: float | None = None, b0: float | None = None, n_boot: int | None = None,
                tokens_per_example: int | None = None, unit: str = "auto", form: str = "mcCandlish",
                use_tuned: bool = True, interpolated: bool = False, ci_level: float = 0.95, seed: int = 0,
                plots: bool | None = None, write: bool = True) -> RunAnalysis:
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
    except (OSError, ValueError) as e:   # pyarrow raises ArrowInvalid (a ValueError) on bad files
        raise AnalysisError(f"cannot read the tables of {str(run_dir)!r}: {str(e).splitlines()[0]}") from None
    if results is None or results.empty:
        raise AnalysisError(f"{str(run_dir)!r} has an empty results table (no cell finished yet)")
    delta, b0, n_boot, tpe, unit = _resolve_options(cfg, results, delta=delta, b0=b0, n_boot=n_boot,
                                                    tokens_per_example=tokens_per_example, unit=unit)
    scale = tpe if unit == "tokens" else 1
    if plots is None:
        plots = bool((cfg.get("output") or {}).get("plots", True))
    steps_column = "steps_interpolated" if interpolated else "steps_to_target"
    if interpolated and "steps_interpolated" not in results:
        raise AnalysisError("--interpolated: the results have no steps_interpolated column "
                            "(the sweep ran without target.interpolate)")
    label = str(cfg.get("name") or run_dir.name)
    run_warnings = []
    planned = {b.get("block_id") for b in manifest.get("blocks") or [] if isinstance(b, dict)}
    if planned and "block_id" in results:
        done = planned & set(results["block_id"])
        if len(done) < len(planned):
            run_warnings.append(f"the run is unfinished: {len(done)} of {len(planned)} blocks done; "
                                f"analysed what exists so far")
    elif not (run_dir / "results.parquet").exists():
        run_warnings.append("the run is unfinished (no results.parquet yet): analysed the parts written so far")

    try:
        eval_every = int((cfg.get("budget") or {}).get("eval_every", 1) or 1)
    except (TypeError, ValueError):
        eval_every = 1
    steps = steps_table(results, tuned, use_tuned=use_tuned, steps_column=steps_column)
    per_b = per_batch_table(steps)
    # Keep the config's optimizer order when there is one.
    order = [o.get("name") or o.get("kind") for o in ((cfg.get("grid") or {}).get("optimizers") or [])
             if isinstance(o, dict)]
    names = [n for n in order if n in set(steps["optimizer"])]
    names += [n for n in dict.fromkeys(steps["optimizer"]) if n not in names]

    # Hyperparameters besides the LR that the grid sweeps get a "best" column in the tables.
    hp_cols = [c for c in results.columns if c.startswith("hp_")]
    swept = {name: [c[3:] for c in hp_cols
                    if results.loc[results["optimizer"] == name, c].dropna().nunique() > 1] for name in names}
    fits, rows = {}, []
    for name in names:
        fit = _fit_optimizer(name, steps, per_b, scale=scale, unit=unit, delta=delta, b0=b0, n_boot=n_boot,
                             seed=seed, form=form, ci_level=ci_level,
                             eval_every=1 if interpolated else eval_every)
        fits[name] = fit
        rows.append(_summary_row(label, name, fit, scale, tpe, unit, per_b[per_b["optimizer"] == name]))
    summary = pd.DataFrame(rows)

    target = cfg.get("target") or {}
    target_text = (f"target: {target.get('metric')} < {target.get('value')}" if target else "")
    b0_text = "smallest swept B" if b0 is None else format_number(b0 * scale)
    lines = [f"CBS analysis of {label} ({run_dir})",
             (target_text + "; " if target_text else "") + _units_line(unit, tpe, delta, b0_text, form), ""]
    lines += [_summary_text(summary), "", _COLUMNS, ""]
    for name, fit in fits.items():
        lines += [f"{name}: best steps and best LR per batch size",
                  _per_b_text(name, fit, per_b[per_b["optimizer"] == name], scale, unit, swept_hps=swept[name])]
        pb = per_b[per_b["optimizer"] == name]
        n_div = int(pb["n_diverged"].sum())
        if n_div:
            lines.append(f"  note: {n_div} diverged cell(s) excluded from the min over configs (column 'diverged')")
        lines += [f"  warning: {w}" for w in fit.warnings] + [""]
    lines += [f"warning: {w}" for w in run_warnings]
    options = dict(delta=delta, b0_examples=b0, n_boot=n_boot, tokens_per_example=tpe, unit=unit, form=form,
                   use_tuned=use_tuned, steps_column=steps_column, ci_level=ci_level, seed=seed)
    analysis = RunAnalysis(run_dir=run_dir, label=label, unit=unit, tokens_per_example=tpe, summary=summary,
                           text="\n".join(lines).rstrip() + "\n", fits=fits, steps=steps, per_batch=per_b,
                           options=options, swept_hparams=swept, warnings=run_warnings)
    if write:
        try:
            _write_run_files(analysis, cfg, manifest, reference, scale, plots)
        except OSError as e:
            raise AnalysisError(f"cannot write the analysis files into {str(run_dir)!r}: {e}") from None
    return analysis


def _write_run_files(a: RunAnalysis, cfg, manifest, reference, scale, plots):
    from cbs.analysis import _plots
    run_dir = a.run_dir
    payload = dict(
        run=a.label, run_dir=str(run_dir), config_hash=manifest.get("config_hash"), options=a.options,
        target=cfg.get("target"), unit=a.unit, tokens_per_example=a.tokens_per_example,
        warnings=a.warnings, summary=a.summary.to_dict(orient="records"),
        optimizers={name: dict(fit=fit.to_dict(),
                               b_crit_samples=fit.b_crit_samples,
                               per_batch_size=a.per_batch[a.per_batch["optimizer"] == name].to_dict(orient="records"))
                    for name, fit in a.fits.items()},
        steps=a.steps.to_dict(orient="records"))
    (run_dir / "cbs.json").write_text(json.dumps(_jsonable_deep(payload), indent=1, allow_nan=False))
    a.files.append(run_dir / "cbs.json")
    a.summary.to_parquet(run_dir / "cbs.parquet", index=False)
    a.files.append(run_dir / "cbs.parquet")
    if not plots:
        return
    title = a.label
    png = [_plots.plot_steps_vs_batch(run_dir / "steps_vs_batch.png", a.fits, a.steps, a.unit, scale,
                                      reference=reference, title=title),
           _plots.plot_best_lr(run_dir / "best_lr.png", a.per_batch, a.unit, scale, title=f"{title}: best LR"),
           _plots.plot_data_efficiency(run_dir / "data_efficiency.png", a.fits, a.unit,
                                       title=f"{title}: data efficiency")]
    a.files += png
    md = [f"# Critical batch size: {a.label}", "",
          _units_line(a.unit, a.tokens_per_example, a.options["delta"],
                      "smallest swept B" if a.options["b0_examples"] is None else
                      format_number(a.options["b0_examples"] * scale), a.options["form"]), "",
          "B_crit = E_min / S_min (McCandlish et al. 2018): S = 2 S_min and E = 2 E_min there. "
          "B* is the batch size needing (1+delta) times the steps of perfect linear scaling from B0 "
          "(Zhang et al. 2024). The knee is a model-free diagnostic on the raw table. "
          f"Intervals: percentile bootstrap ({a.summary['ci_level'].iloc[0]:.0%})." if len(a.summary) else "", "",
          "## Summary", "", _summary_text(a.summary, markdown=True), "", _COLUMNS, "",
          "## Steps to target vs batch size", "", "![steps vs batch size](steps_vs_batch.png)", "",
          "## Best learning rate", "", "![best LR](best_lr.png)", "",
          "## Data efficiency", "", "![data efficiency](data_efficiency.png)", ""]
    for name, fit in a.fits.items():
        md += [f"## {name}", "", "```", str(fit), "```", "",
               _per_b_text(name, fit, a.per_batch[a.per_batch["optimizer"] == name], scale, a.unit, markdown=True,
                           swept_hps=a.swept_hparams.get(name, ())), ""]
    if a.warnings:
        md += ["## Run warnings", ""] + [f"- {w}" for w in a.warnings] + [""]
    (run_dir / "report.md").write_text("\n".join(md))
    a.files.append(run_dir / "report.md")


def _jsonable_deep(x):
    if isinstance(x, dict):
        return {str(k): _jsonable_deep(v) for k, v in x.items()}
    if isinstance(x, (list, tuple, np.ndarray)):
        return [_jsonable_deep(v) for v in (x.tolist() if isinstance(x, np.ndarray) else x)]
    if isinstance(x, Path):
        return str(x)
    if isinstance(x, (pd.Timestamp,)):
        return x.isoformat()
    return _jsonable(x)


def settings_line(analysis: RunAnalysis) -> str:
    """The CBS definition settings an analysis used, in one line (so a reader of the
    terminal knows which delta, B0 and interval method the numbers belong to)."""
    o = analysis.options
    scale = analysis.tokens_per_example if analysis.unit == "tokens" else 1
    if o.get("b0_examples") is None:
        used = sorted({float(f.b0) for f in analysis.fits.values() if np.isfinite(f.b0)})
        b0 = "smallest swept B" + (f" ({', '.join(format_number(b) for b in used)})" if used else "")
    else:
        b0 = format_number(o["b0_examples"] * scale)
    methods = sorted({f.bootstrap for f in analysis.fits.values()}) or ["none"]
    boot = ("no intervals (bootstrap 0)" if not o.get("n_boot") else
            f"{o.get('ci_level', 0.95):.0%} percentile bootstrap intervals, {o['n_boot']} resamples over "
            + "/".join(methods))
    return (f"settings: delta = {format_number(o['delta'])}, B0 = {b0}, form {o.get('form')}, {boot}, "
            f"steps from {o.get('steps_column')}")


def short_summary(analysis: RunAnalysis) -> str:
    """A few lines for the end of a sweep: B_crit with interval and B* per optimizer."""
    lines = [f"critical batch size ({analysis.unit}), {analysis.label}:", "  " + settings_line(analysis)]
    for r in analysis.summary.itertuples(index=False):
        flag = f"  ({r.n_warnings} warning{'s' if r.n_warnings != 1 else ''})" if r.n_warnings else ""
        ci = _ci_text(r.b_crit_ci_low, r.b_crit_ci_high)
        lines.append(f"  {r.optimizer}: B_crit = {format_number(r.b_crit)} {ci}, B* = {format_number(r.b_star)}, "
                     f"S_min = {format_number(r.s_min)}{flag}")
    lines += [f"  warning: {w}" for w in analysis.warnings]
    if analysis.files:
        report = [f for f in analysis.files if f.name == "report.md"]
        lines.append(f"  details: {report[0] if report else analysis.files[0]}")
    return "\n".join(lines)


def print_summary(run_dir, *, file=None, **options) -> RunAnalysis:
    """Runs :func:`analyze_run` (writing its files) and prints :func:`short_summary`.

    Meant for the sweep runner's last step; returns the analysis.
    """
    analysis = analyze_run(run_dir, **options)
    print(short_summary(analysis), file=file or sys.stdout)
    return analysis


# ----------------------------------------------------------------------------------------
# Several runs.


@dataclasses.dataclass
class Comparison:
    """Several runs side by side (and, with a scale key, CBS scaling laws)."""
    runs: list[RunAnalysis]
    table: pd.DataFrame                          # summary rows of every run (+ scale)
    text: str
    scaling: dict[str, PowerLawFit] = dataclasses.field(default_factory=dict)          # B_crit vs scale
    scaling_b_star: dict[str, PowerLawFit] = dataclasses.field(default_factory=dict)   # B* vs scale
    files: list[Path] = dataclasses.field(default_factory=list)

    def __str__(self) -> str:
        return self.text


def _lookup(mapping: dict, dotted: str):
    node = mapping
    for part in dotted.split("."):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return None
    return node


def run_scale(run_dir, scale_key: str) -> float:
    """The numeric value at dotted ``scale_key`` in config.yaml, else manifest.json."""
    for source, data in (("config.yaml", read_run_config(run_dir)), ("manifest.json", read_run_manifest(run_dir))):
        value = _lookup(data, scale_key)
        if value is not None:
            try:
                value = float(value)
            except (TypeError, ValueError):
                raise AnalysisError(f"{scale_key!r} in {run_dir}/{source} is {value!r}, not a number") from None
            if not value > 0:
                raise AnalysisError(f"{scale_key!r} in {run_dir}/{source} is {value}; a scale must be positive")
            return value
    raise AnalysisError(f"run {str(run_dir)!r} has no key {scale_key!r} in config.yaml or manifest.json")


def compare_runs(run_dirs: Sequence, *, out: str | Path | None = None, scale_key: str | None = None,
                 scale_values: Sequence[float] | None = None, plots: bool | None = None,
                 **options) -> Comparison:
    """Analyzes several runs and tabulates their CBS side by side.

    Each run gets its own files (as :func:`analyze_run`); the comparison (compare.md,
    compare.parquet, compare.json, compare_steps_vs_batch.png and, with a scale,
    scaling_b_crit.png) goes into ``out`` or the first run folder.

    Args:
        run_dirs: run folders.
        out: where the comparison files go (default: the first run folder; nothing is written
            there when ``write=False`` is among the options).
        scale_key: dotted key in each run's config.yaml (or manifest.json) holding its model
            or data size; B_crit vs that scale is then fitted as a power law per optimizer.
        scale_values: explicit scales, one per run (instead of ``scale_key``).
        plots: write PNGs.
        **options: passed to :func:`analyze_run`.
    """
    if not run_dirs:
        raise AnalysisError("no run folders given")
    dirs = [check_run_dir(d) for d in run_dirs]
    scales = None
    if scale_values is not None:
        if len(scale_values) != len(dirs):
            raise AnalysisError(f"{len(scale_values)} scale values for {len(dirs)} runs")
        scales = [float(v) for v in scale_values]
    elif scale_key:
        scales = [run_scale(d, scale_key) for d in dirs]
    analyses = [analyze_run(d, plots=plots, **options) for d in dirs]
    labels, seen = [], {}
    for a in analyses:
        name = a.label
        seen[name] = seen.get(name, 0) + 1
        labels.append(name if seen[name] == 1 else f"{name}#{seen[name]}")
    units = {a.unit for a in analyses}
    table = pd.concat([a.summary.assign(run=lbl) for a, lbl in zip(analyses, labels)], ignore_index=True)
    if scales is not None:
        table["scale"] = np.repeat(scales, [len(a.summary) for a in analyses])
    header = ["optimizer", "run"] + (["scale"] if scales is not None else []) + \
        ["S_min", "B_crit", "B_crit CI", "B*", "knee", "points"]
    rows = []
    for name in dict.fromkeys(table["optimizer"]):
        for r in table[table["optimizer"] == name].itertuples(index=False):
            rows.append([name, r.run] + ([format_number(r.scale)] if scales is not None else [])
                        + [format_number(r.s_min), format_number(r.b_crit), _ci_text(r.b_crit_ci_low, r.b_crit_ci_high),
                           format_number(r.b_star), format_number(r.knee), str(r.n_points)])
    unit = units.pop() if len(units) == 1 else "mixed units"
    lines = [f"CBS comparison of {len(analyses)} runs (batch sizes in {unit})", _text_table(header, rows)]
    md = [f"# CBS comparison ({len(analyses)} runs)", "", f"Batch sizes in {unit}.", "", _md_table(header, rows), ""]
    scaling, scaling_b_star = {}, {}
    if scales is not None:
        what = scale_key or "scale"
        lines += ["", f"power law B_crit = c * ({what})^beta, fitted in log space per optimizer:"]
        md += [f"## B_crit vs {what}", ""]
        n_boot = analyses[0].options["n_boot"]
        for name in dict.fromkeys(table["optimizer"]):
            g = table[table["optimizer"] == name]
            samples = [a.fits[name].b_crit_samples for a in analyses if name in a.fits]
            use = samples if all(s is not None and len(s) for s in samples) else None
            pl = fit_power_law(g["scale"], g["b_crit"], y_samples=use, n_boot=n_boot,
                               seed=options.get("seed", 0), ci_level=options.get("ci_level", 0.95))
            scaling[name] = pl
            star_samples = [a.fits[name].b_star_samples for a in analyses if name in a.fits]
            use = star_samples if all(s is not None and len(s) for s in star_samples) else None
            scaling_b_star[name] = fit_power_law(g["scale"], g["b_star"], y_samples=use, n_boot=n_boot,
                                                 seed=options.get("seed", 0),
                                                 ci_level=options.get("ci_level", 0.95))
            lines.append(f"  {name}: B_crit: {pl}")
            lines.append(f"  {name}: B*:     {scaling_b_star[name]}")
            md.append(f"- **{name}**, B_crit: `{pl}`")
            md.append(f"- **{name}**, B*: `{scaling_b_star[name]}`")
        md.append("")
    text = "\n".join(lines) + "\n"
    comp = Comparison(runs=analyses, table=table, text=text, scaling=scaling, scaling_b_star=scaling_b_star)
    if out is None and not options.get("write", True):
        return comp      # write=False: nothing goes into the run folders, the comparison included
    out_dir = Path(out) if out is not None else dirs[0]
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise AnalysisError(f"cannot create output folder {str(out_dir)!r}: {e}") from None
    do_plots = plots if plots is not None else True
    if do_plots:
        from cbs.analysis import _plots
        unit_label = unit if len({a.unit for a in analyses}) == 1 else "mixed"
        runs_fits = {lbl: a.fits for a, lbl in zip(analyses, labels)}
        comp.files.append(_plots.plot_compare(out_dir / "compare_steps_vs_batch.png", runs_fits, unit_label))
        md[4:4] = ["![steps vs batch size, all runs](compare_steps_vs_batch.png)", ""]
        if scaling:
            comp.files.append(_plots.plot_scaling(out_dir / "scaling_b_crit.png", table, scaling,
                                                  scale_key or "scale", unit_label))
            md += ["![B_crit vs scale](scaling_b_crit.png)", ""]
    table.to_parquet(out_dir / "compare.parquet", index=False)
    (out_dir / "compare.json").write_text(json.dumps(_jsonable_deep(dict(
        runs=[str(d) for d in dirs], labels=labels, scale_key=scale_key, summary=table.to_dict(orient="records"),
        scaling_b_crit={k: v.to_dict() for k, v in scaling.items()},
        scaling_b_star={k: v.to_dict() for k, v in scaling_b_star.items()})), indent=1, allow_nan=False))
    (out_dir / "compare.md").write_text("\n".join(md))
    comp.files += [out_dir / "compare.parquet", out_dir / "compare.json", out_dir / "compare.md"]
    return comp
