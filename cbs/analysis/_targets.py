"""The critical batch size as a function of the target, from the stored metric curves.

McCandlish et al. and Kaplan et al. fit S_min and E_min separately for each target loss
and trace how B_crit grows as the target tightens (docs/cbs.md section 2.4). A sweep
stores one target in results.parquet but the whole metric curve of every cell in
curves.parquet, so steps to any other target can be read off the curves and refitted.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from cbs.analysis._fit import CriticalBatchSizeFit
from cbs.analysis._tables import (
    AnalysisError,
    check_run_dir,
    per_batch_table,
    read_run_config,
    read_run_table,
    steps_table,
)

__all__ = ["TargetSweep", "steps_from_curves", "analyze_targets"]


def steps_from_curves(
    results: pd.DataFrame, curves: pd.DataFrame, target: float, *, interpolate: bool = True
) -> pd.DataFrame:
    """``results`` with reached / censored / steps_to_target recomputed for another target.

    A cell reaches ``target`` at the first stored curve point with metric strictly below it.
    With ``interpolate``, the crossing is placed between that point and the one before it,
    linearly in (log step, log metric), because stored curves can be sparse (the NQM back end
    stores log-spaced points). Diverged cells stay diverged. A cell whose curve never goes
    below ``target`` is censored, also when its curve ends before the step budget (a back
    end that stops at the sweep's own target): such cells are counted in the column
    ``curve_ended_early``.

    Args:
        results: results.parquet (cell_id, diverged, max_steps, ...).
        curves: curves.parquet (cell_id, step, metric).
        target: the new target; lower metric is better.
        interpolate: interpolate the crossing between stored points.
    """
    need = {"cell_id", "step", "metric"}
    if not need <= set(curves.columns):
        raise AnalysisError(
            "curves table lacks column(s) " + ", ".join(sorted(need - set(curves.columns)))
        )
    c = (
        curves[["cell_id", "step", "metric"]]
        .sort_values(["cell_id", "step"], kind="stable")
        .reset_index(drop=True)
    )
    metric = c["metric"].to_numpy(np.float64)
    step = c["step"].to_numpy(np.float64)
    cell = c["cell_id"].to_numpy()
    below = np.isfinite(metric) & (metric < target)
    hit = c[below].groupby("cell_id", sort=False).head(1).index.to_numpy()
    crossing = step[hit].copy()
    if interpolate and hit.size:
        prev = hit - 1
        ok = (
            (prev >= 0)
            & (cell[np.maximum(prev, 0)] == cell[hit])
            & np.isfinite(metric[np.maximum(prev, 0)])
        )
        p, h = prev[ok], hit[ok]
        m0, m1, s0, s1 = metric[p], metric[h], step[p], step[h]
        positive = (m0 > 0) & (m1 > 0)
        with np.errstate(divide="ignore", invalid="ignore"):
            frac = np.where(
                positive,
                (np.log(m0) - np.log(target)) / (np.log(m0) - np.log(m1)),
                (m0 - target) / (m0 - m1),
            )
            frac = np.clip(np.nan_to_num(frac, nan=1.0), 0.0, 1.0)
            log_s0 = np.log(np.where(s0 > 0, s0, 1.0))
            at = np.where(
                s0 > 0, np.exp(log_s0 + frac * (np.log(s1) - log_s0)), s0 + frac * (s1 - s0)
            )
        crossing[ok] = at
    first = pd.Series(crossing, index=cell[hit])
    best = c.groupby("cell_id")["metric"].min()
    last_step = c.groupby("cell_id")["step"].max()

    out = results.copy()
    diverged = out["diverged"].astype(bool).to_numpy()
    steps = out["cell_id"].map(first).to_numpy(np.float64)
    has_curve = out["cell_id"].isin(last_step.index).to_numpy()
    reached = np.isfinite(steps) & ~diverged
    out["reached"] = reached
    out["censored"] = ~reached & ~diverged
    out["steps_to_target"] = np.where(reached, steps, np.nan)
    out["target"] = float(target)
    out["best_metric"] = out["cell_id"].map(best).fillna(np.inf).to_numpy(np.float64)
    budget = (
        out["max_steps"].to_numpy(np.float64) if "max_steps" in out else np.full(len(out), np.inf)
    )
    ended = out["cell_id"].map(last_step).to_numpy(np.float64)
    out["curve_ended_early"] = out["censored"].to_numpy() & has_curve & (ended < budget)
    out["has_curve"] = has_curve
    if "steps_interpolated" in out:
        out = out.drop(columns="steps_interpolated")
    return out


def _curve_spacing(curves: pd.DataFrame) -> float:
    """Median ratio between consecutive stored steps (> 0) of a cell's curve."""
    c = curves[curves["step"] > 0].sort_values(["cell_id", "step"], kind="stable")
    s = c["step"].to_numpy(np.float64)
    same = c["cell_id"].to_numpy()[1:] == c["cell_id"].to_numpy()[:-1]
    ratios = s[1:][same] / s[:-1][same]
    return float(np.median(ratios)) if ratios.size else 1.0


@dataclasses.dataclass
class TargetSweep:
    """CBS per target for one run."""

    run_dir: Path
    table: pd.DataFrame  # one row per (target, optimizer)
    fits: dict[float, dict[str, CriticalBatchSizeFit]]
    text: str
    warnings: list[str] = dataclasses.field(default_factory=list)
    files: list[Path] = dataclasses.field(default_factory=list)

    def __str__(self) -> str:
        return self.text


def analyze_targets(
    run_dir,
    targets: Sequence[float],
    *,
    interpolate: bool = True,
    delta: float | None = None,
    b0: float | None = None,
    n_boot: int | None = None,
    tokens_per_example: int | None = None,
    unit: str = "auto",
    form: str = "mcCandlish",
    ci_level: float = 0.95,
    seed: int = 0,
    plots: bool = True,
    write: bool = True,
) -> TargetSweep:
    """Fits S(B) and the CBS at each target, with steps read off curves.parquet.

    Writes cbs_targets.parquet, cbs_targets.json and (with ``plots``) cbs_vs_target.png:
    B_crit vs target, and the McCandlish Pareto front S_min vs E_min, one point per target.
    Other arguments as :func:`cbs.analysis.analyze_run`; tuned.parquet is not used (it
    belongs to the sweep's own target).
    """
    from cbs.analysis._format import format_number, jsonable_deep, row_cells, text_table
    from cbs.analysis._options import resolve_options
    from cbs.analysis._report import fit_optimizers

    run_dir = check_run_dir(run_dir)
    if not targets:
        raise AnalysisError("no targets given")
    cfg = read_run_config(run_dir)
    try:
        results = read_run_table(run_dir, "results")
        curves = read_run_table(run_dir, "curves")
    except (OSError, ValueError) as e:
        raise AnalysisError(
            f"cannot read the tables of {str(run_dir)!r}: {str(e).splitlines()[0]}"
        ) from None
    if results is None or results.empty:
        raise AnalysisError(f"{str(run_dir)!r} has an empty results table (no cell finished yet)")
    if curves is None or curves.empty:
        raise AnalysisError(
            f"{str(run_dir)!r} has no curves table (the sweep ran with output.curves: false, "
            f"or its back end stores no curves); per-target analysis needs it"
        )
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
    label = str(cfg.get("name") or run_dir.name)
    rows, fits = [], {}
    for target in sorted(float(t) for t in targets):
        res = steps_from_curves(results, curves, target, interpolate=interpolate)
        res = res[res["has_curve"] | res["diverged"].astype(bool)]
        if res.empty:
            raise AnalysisError("no cell of the results has a stored curve")
        steps = steps_table(res, None, use_tuned=False)
        per_b = per_batch_table(steps)
        early = res.groupby("optimizer")["curve_ended_early"].sum()
        # (the same fit options analyze_run forwards: both are public functions that take
        # them by name, so the keyword list is written in each)
        fits[target], target_rows = fit_optimizers(
            label,
            dict.fromkeys(steps["optimizer"]),
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
        )
        for name, fit in fits[target].items():
            if early.get(name, 0):
                fit.warnings.append(
                    f"{int(early[name])} cell(s) censored because their curve ends before the "
                    f"budget (the back end stopped at the sweep's own target?)"
                )
        rows += [{"target": target, **row} for row in target_rows]
    table = pd.DataFrame(rows)
    header = ["target", "optimizer", "S_min", "E_min", "B_crit", "B_crit CI", "B*", "points"]
    body = [
        [
            format_number(r.target),
            r.optimizer,
            *row_cells(r, ("s_min", "e_min", "b_crit", "b_crit_ci", "b_star", "n_points")),
        ]
        for r in table.itertuples(index=False)
    ]
    how = (
        "interpolated in (log step, log metric)"
        if interpolate
        else "first stored point below the target"
    )
    text = (
        f"CBS vs target for {label} (steps from curves.parquet, {how}; batch sizes in {unit})\n"
        + text_table(header, body)
        + "\n"
    )
    spacing = _curve_spacing(curves)
    warnings = []
    if spacing > 1.3:
        warnings.append(
            f"curves are stored sparsely (median ratio x{spacing:.2f} between stored steps): per-target "
            f"steps are {'interpolated, hence approximate' if interpolate else 'coarse (up to that ratio)'}; "
            f"at the sweep's own target, results.parquet is exact"
        )
    text += "".join(f"warning: {w}\n" for w in warnings)
    sweep = TargetSweep(run_dir=run_dir, table=table, fits=fits, text=text, warnings=warnings)
    if write:
        try:
            from cbs.store import atomic_write_bytes, atomic_write_text

            atomic_write_bytes(run_dir / "cbs_targets.parquet", table.to_parquet(index=False))
            atomic_write_text(
                run_dir / "cbs_targets.json",
                json.dumps(
                    jsonable_deep(
                        dict(
                            run=label,
                            unit=unit,
                            interpolate=interpolate,
                            warnings=warnings,
                            rows=table.to_dict(orient="records"),
                        )
                    ),
                    indent=1,
                    allow_nan=False,
                ),
            )
            sweep.files += [run_dir / "cbs_targets.parquet", run_dir / "cbs_targets.json"]
            if plots:
                from cbs.analysis._plots import plot_targets

                sweep.files.append(
                    plot_targets(
                        run_dir / "cbs_vs_target.png",
                        table,
                        unit,
                        metric=str((cfg.get("target") or {}).get("metric", "target")),
                    )
                )
        except OSError as e:
            raise AnalysisError(
                f"cannot write the per-target files into {str(run_dir)!r}: {e}"
            ) from None
    return sweep
