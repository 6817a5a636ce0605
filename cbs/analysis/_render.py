"""Text and Markdown rendering of a run's analysis (terminal report, report.md, short summary)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from cbs.analysis._fit import CriticalBatchSizeFit
from cbs.analysis._format import ci_text, format_number, md_table, row_cells, text_table

if TYPE_CHECKING:
    from cbs.analysis._report import RunAnalysis

__all__ = [
    "per_b_text",
    "summary_text",
    "units_line",
    "run_text",
    "report_markdown",
    "short_summary",
    "best_steps_text",
    "COLUMNS",
    "TUNED",
]


def per_b_text(
    name,
    fit: CriticalBatchSizeFit,
    pb: pd.DataFrame,
    scale,
    unit,
    markdown=False,
    swept_hps: Sequence[str] = (),
) -> str:
    tuned = "source" in pb and bool((pb["source"] == "tuned").any()) and "grid_steps" in pb
    epochs = "epochs" in pb
    header = (
        [f"B ({unit})", "steps"]
        + (["epochs"] if epochs else [])
        + ["seeds reached", "best LR", "effective LR"]
        + (["grid steps @ LR"] if tuned else [])
        + [f"best {hp}" for hp in swept_hps]
        + ["diverged", "efficiency/doubling", "B*S/(B0*S0)", "fit", "note"]
    )
    rows = []
    pred = (
        fit.predict(fit.batch_sizes) if fit.n_points >= 2 else np.full(fit.batch_sizes.size, np.nan)
    )
    for j, r in enumerate(pb.sort_values("batch_size").itertuples(index=False)):
        note = []
        if r.censored:
            note.append("censored")
        if r.lr_at_edge:
            note.append(f"LR at {r.lr_at_edge} edge")
        if r.source == "tuned":
            note.append("tuned")
        if getattr(r, "search_edge", ""):
            note.append(f"search edge: {r.search_edge}")
        rows.append(
            [
                format_number(r.batch_size * scale),
                format_number(r.steps),
            ]
            + ([format_number(r.epochs, 3)] if epochs else [])
            + [
                f"{r.n_seeds - r.n_censored_seeds}/{r.n_seeds}",
                format_number(r.best_lr),
                format_number(r.best_effective_lr),
            ]
            + (
                [f"{format_number(r.grid_steps)} @ {format_number(r.grid_best_lr)}"]
                if tuned
                else []
            )
            + [format_number(getattr(r, f"best_hp_{hp}", np.nan)) for hp in swept_hps]
            + [
                str(r.n_diverged),
                format_number(fit.efficiencies[j], 3),
                format_number(fit.cumulative_efficiency[j], 3),
                format_number(pred[j]),
                ", ".join(note),
            ]
        )
    return (md_table if markdown else text_table)(header, rows)


COLUMNS = (
    "Per batch size: steps = median over seeds of the min over configs of the first step below the "
    "target; effective LR = lr/(1-momentum); efficiency/doubling = (S_prev/S)/(B/B_prev) per doubling "
    "(1 perfect, 0.5 no gain); B*S/(B0*S0) = cumulative data overhead; fit = fitted S(B)."
)

# Said once wherever both numbers can appear (terminal header, report.md).
TUNED = (
    "grid = the best swept cell; tuned = the NQM back end's optimum with the LR refined "
    "continuously between grid points (golden-section search on log LR, tuned.parquet), used "
    "wherever it needs fewer steps than the grid's best (report.md's 'grid steps @ LR' column "
    "shows the grid's)."
)


def best_steps_text(a: RunAnalysis, scale=1) -> str:
    """The terminal's per-batch-size table: the numbers of report.md (and cbs.json), each
    cell labelled tuned where the refined optimum was used."""
    pb = a.per_batch
    if pb is None or not len(pb):
        return ""
    names = list(a.fits) or list(dict.fromkeys(pb["optimizer"]))
    sizes = sorted(pb["batch_size"].unique())
    cell = {}
    any_tuned = False
    for r in pb.itertuples(index=False):
        if not np.isfinite(r.steps):
            cell[(r.optimizer, r.batch_size)] = "-"
            continue
        tuned = getattr(r, "source", "") == "tuned"
        any_tuned |= tuned
        cell[(r.optimizer, r.batch_size)] = (
            f"{format_number(r.steps)} @ {format_number(r.best_lr)}" + (" tuned" if tuned else "")
        )
    rows = [[format_number(b * scale)] + [cell.get((o, b), "-") for o in names] for b in sizes]
    head = (
        "best steps to target @ learning rate per batch size (median over seeds of the min over "
        "configs; '-' = censored; the numbers of report.md)"
    )
    if any_tuned:
        head += "\n  " + TUNED
    else:
        head += "; grid optima (the best swept cell)"
    return head + "\n" + text_table([f"batch size ({a.unit})", *names], rows)


def summary_text(summary: pd.DataFrame, markdown=False) -> str:
    if summary.empty:
        return "(no optimizer had data)"
    level = summary["ci_level"].iloc[0]
    header = [
        "optimizer",
        "B_crit (headline)",
        f"B_crit {level:.0%} CI",
        "S_min",
        "E_min",
        "B* (secondary)",
        f"B* {level:.0%} CI",
        "knee (diagnostic)",
        "points",
        "seeds",
    ]
    rows = []
    for r in summary.itertuples(index=False):
        crit, star = _bounded(r, "b_crit"), _bounded(r, "b_star")
        rows.append(
            [
                r.optimizer,
                crit,
                *row_cells(r, ("b_crit_ci", "s_min", "e_min")),
                star,
                *row_cells(r, ("b_star_ci", "knee", "n_points", "n_seeds")),
            ]
        )
    if "b_simple" in summary and np.isfinite(summary["b_simple"].to_numpy(float)).any():
        header.append("B_simple (measured)")
        for row, v in zip(rows, summary["b_simple"]):
            row.append(format_number(v))
    out = (md_table if markdown else text_table)(header, rows)
    notes = extrapolation_notes(summary)
    return out + (
        "\n" + "\n".join(("- " if markdown else "  ") + n for n in notes) if notes else ""
    )


def _bounded(r, name: str) -> str:
    """The table cell of a CBS: the number, or the bound when it lies outside the swept
    batch sizes (marked *, explained under the table by :func:`extrapolation_notes`)."""
    text = getattr(r, f"{name}_text", None)
    if text is None:  # a summary from before these columns: the plain number
        return format_number(getattr(r, name))
    return f"{text} *" if getattr(r, f"{name}_outside", "") else text


def extrapolation_notes(summary: pd.DataFrame) -> list[str]:
    """One line per optimizer whose B_crit or B* lies outside the swept batch sizes."""
    notes = []
    for r in summary.itertuples(index=False):
        for name, label in (("b_crit", "B_crit"), ("b_star", "B*")):
            side = getattr(r, f"{name}_outside", "")
            if side:
                notes.append(
                    f"* {r.optimizer}: {label} {getattr(r, f'{name}_text')} is extrapolated {side} "
                    f"the swept batch sizes ({format_number(r.swept_b_min)}..{format_number(r.swept_b_max)}); "
                    f"the fit's {format_number(getattr(r, name))} is not a measurement: sweep "
                    + ("larger" if side == "above" else "smaller")
                    + " batch sizes to measure it"
                )
    return notes


def units_line(unit, tpe, delta, b0_text, form):
    what = f"tokens (examples x {tpe} tokens per example)" if unit == "tokens" else "examples"
    return (
        f"Batch sizes, B_crit, B* and knee in {what}; S_min in steps; E_min in {unit} to reach the target. "
        f"Fit: {form}, least squares in log S. B* = (1+delta) B0 + delta B_crit with delta={delta:g}, "
        f"B0={b0_text}."
    )


def run_text(a: RunAnalysis, target: dict, scale) -> str:
    """The terminal report of one run: units, summary table, per-optimizer tables, warnings."""
    label, run_dir, unit, tpe = a.label, a.run_dir, a.unit, a.tokens_per_example
    delta, b0, form = a.options["delta"], a.options["b0_examples"], a.options["form"]
    summary, fits, per_b, swept, run_warnings = (
        a.summary,
        a.fits,
        a.per_batch,
        a.swept_hparams,
        a.warnings,
    )
    target_text = f"target: {target.get('metric')} < {target.get('value')}" if target else ""
    b0_text = "smallest swept B" if b0 is None else format_number(b0 * scale)
    lines = [
        f"CBS analysis of {label} ({run_dir})",
        (target_text + "; " if target_text else "") + units_line(unit, tpe, delta, b0_text, form),
        "",
    ]
    lines += [summary_text(summary), "", COLUMNS, ""]
    for name, fit in fits.items():
        lines += [
            f"{name}: best steps and best LR per batch size",
            per_b_text(
                name, fit, per_b[per_b["optimizer"] == name], scale, unit, swept_hps=swept[name]
            ),
        ]
        pb = per_b[per_b["optimizer"] == name]
        n_div = int(pb["n_diverged"].sum())
        if n_div:
            lines.append(
                f"  note: {n_div} diverged cell(s) excluded from the min over configs (column 'diverged')"
            )
        lines += [f"  warning: {w}" for w in fit.warnings] + [""]
    lines += [f"warning: {w}" for w in run_warnings]
    return "\n".join(lines).rstrip() + "\n"


def exclusion_notes(summary: pd.DataFrame) -> list[str]:
    """One line per optimizer with points left out as unproven or flagged on an LR-grid edge."""
    notes = []
    for r in summary.itertuples(index=False):
        parts = []
        if getattr(r, "n_inexact_points", 0):
            parts.append(
                f"{r.n_inexact_points} (B, seed) point(s) without a proven first crossing (excluded)"
            )
        if getattr(r, "n_edge_points", 0):
            parts.append(
                f"{r.n_edge_points} batch size(s) with the best LR on an LR-grid edge (flagged)"
            )
        if parts:
            notes.append(f"{r.optimizer}: " + "; ".join(parts))
    return notes


def report_markdown(a: RunAnalysis, scale) -> str:
    """report.md of one run: definitions, summary, the plots, per-optimizer fits and tables."""
    md = [
        f"# Critical batch size: {a.label}",
        "",
        units_line(
            a.unit,
            a.tokens_per_example,
            a.options["delta"],
            "smallest swept B"
            if a.options["b0_examples"] is None
            else format_number(a.options["b0_examples"] * scale),
            a.options["form"],
        ),
        "",
        "**Headline: B_crit** = E_min / S_min (McCandlish et al. 2018): S = 2 S_min and "
        "E = 2 E_min there; it does not depend on the smallest swept batch size. "
        "Secondary: B* is the batch size needing (1+delta) times the steps of perfect linear "
        "scaling from B0 (Zhang et al. 2024; it moves with B0). The knee is a model-free "
        "diagnostic on the raw table. A value outside the swept batch sizes is shown as a bound "
        "(`> B_max`, marked *) and drawn dashed: the fit extrapolates it. "
        f"Intervals: percentile bootstrap ({a.summary['ci_level'].iloc[0]:.0%})."
        if len(a.summary)
        else "",
        "",
        "## Summary",
        "",
        summary_text(a.summary, markdown=True),
        "",
        COLUMNS,
        "",
        *(
            [TUNED, ""]
            if "source" in a.per_batch and (a.per_batch["source"] == "tuned").any()
            else []
        ),
        "## Points left out or flagged",
        "",
        *(
            [f"- {n}" for n in exclusion_notes(a.summary)]
            or ["- none: every point is a proven first crossing with an interior best LR"]
        ),
        "",
        "## All optimizers",
        "",
        "![all optimizers](steps_all_optimizers.png)",
        "",
        "## Steps to target vs batch size",
        "",
        "![steps vs batch size](steps_vs_batch.png)",
        "",
        "## Best learning rate",
        "",
        "![best LR](best_lr.png)",
        "",
        "## Data efficiency",
        "",
        "![data efficiency](data_efficiency.png)",
        "",
    ]
    for name, fit in a.fits.items():
        md += [
            f"## {name}",
            "",
            "```",
            str(fit),
            "```",
            "",
            per_b_text(
                name,
                fit,
                a.per_batch[a.per_batch["optimizer"] == name],
                scale,
                a.unit,
                markdown=True,
                swept_hps=a.swept_hparams.get(name, ()),
            ),
            "",
        ]
    md += noise_markdown(a, scale)
    if a.warnings:
        md += ["## Run warnings", ""] + [f"- {w}" for w in a.warnings] + [""]
    return "\n".join(md)


def noise_markdown(a: RunAnalysis, scale) -> list[str]:
    """report.md's noise-scale section: B_simple per batch size beside each B_crit."""
    if a.noise is None or not len(a.noise):
        return []
    names = [n for n in a.fits if (a.noise["optimizer"] == n).any()]
    sizes = sorted(a.noise["batch_size"].unique())
    val = {
        (r.optimizer, r.batch_size): format_number(r.b_simple * scale)
        + ("" if r.at == "target" else " (no cell reached the target)")
        for r in a.noise.itertuples(index=False)
    }
    rows = [[format_number(b * scale)] + [val.get((n, b), "-") for n in names] for b in sizes]
    crit = {r.optimizer: r for r in a.summary.itertuples(index=False)}
    rows.append(
        ["B_crit (fit)"] + [_bounded(crit[n], "b_crit") if n in crit else "-" for n in names]
    )
    return [
        "## Gradient noise scale",
        "",
        f"B_simple = tr(Σ) / |G|² ({a.unit}), measured during training (EMA over "
        "micro-batch estimates) at each cell's last evaluation, where it reached the target; "
        "median over the cells of a batch size that reached it. McCandlish et al. (2018) "
        "predict B_crit ≈ B_noise, and B_simple estimates B_noise (B_noise itself needs "
        "Hessian products and is not measured).",
        "",
        md_table([f"B ({a.unit})", *names], rows),
        "",
        "![noise scale](noise_scale.png)",
        "",
    ]


def settings_line(analysis: RunAnalysis) -> str:
    """The CBS definition settings an analysis used, in one line (so a reader of the
    terminal knows which delta, B0 and interval method the numbers belong to)."""
    o = analysis.options
    scale = analysis.tokens_per_example if analysis.unit == "tokens" else 1
    if o.get("b0_examples") is None:
        used = sorted({float(f.b0) for f in analysis.fits.values() if np.isfinite(f.b0)})
        b0 = "smallest swept B" + (
            f" ({', '.join(format_number(b) for b in used)})" if used else ""
        )
    else:
        b0 = format_number(o["b0_examples"] * scale)
    methods = sorted({f.bootstrap for f in analysis.fits.values()}) or ["none"]
    boot = (
        "no intervals (bootstrap 0)"
        if not o.get("n_boot")
        else f"{o.get('ci_level', 0.95):.0%} percentile bootstrap intervals, {o['n_boot']} resamples over "
        + "/".join(methods)
    )
    return (
        f"settings: delta = {format_number(o['delta'])}, B0 = {b0}, form {o.get('form')}, {boot}, "
        f"steps from {o.get('steps_column')}"
    )


def short_summary(analysis: RunAnalysis) -> str:
    """A few lines for the end of a sweep: the settings used, then B_crit with interval
    and B* per optimizer."""
    lines = [
        f"critical batch size ({analysis.unit}), {analysis.label} (headline: B_crit = E_min/S_min; "
        "B* and the knee secondary, see docs/cbs.md):",
        "  " + settings_line(analysis),
    ]
    for r in analysis.summary.itertuples(index=False):
        flag = (
            f"  ({r.n_warnings} warning{'s' if r.n_warnings != 1 else ''})" if r.n_warnings else ""
        )
        ci = ci_text(r.b_crit_ci_low, r.b_crit_ci_high)
        if r.b_crit_outside:
            crit = (
                f"B_crit {r.b_crit_text} (extrapolated {r.b_crit_outside} the swept batch sizes; "
                f"fit {format_number(r.b_crit)} {ci})"
            )
        else:
            crit = f"B_crit = {r.b_crit_text} {ci}"
        star = f"B* {r.b_star_text}" if r.b_star_outside else f"B* = {r.b_star_text}"
        noise = getattr(r, "b_simple", np.nan)
        noise = (
            f"; measured B_simple ~ {format_number(noise)} (median over B)"
            if np.isfinite(noise)
            else ""
        )
        lines.append(
            f"  {r.optimizer}: {crit}; secondary: {star}, knee = {format_number(r.knee)}; "
            f"S_min = {format_number(r.s_min)}{noise}{flag}"
        )
    lines += [f"  warning: {w}" for w in analysis.warnings]
    if analysis.files:
        report = [f for f in analysis.files if f.name == "report.md"]
        lines.append(f"  details: {report[0] if report else analysis.files[0]}")
    return "\n".join(lines)
