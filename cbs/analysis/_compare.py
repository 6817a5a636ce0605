"""Several run folders side by side, with optional CBS scaling laws across them."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from cbs.analysis._format import (
    format_number,
    jsonable_deep,
    md_table,
    row_cells,
    text_table,
)
from cbs.analysis._power_law import PowerLawFit, fit_power_law
from cbs.analysis._render import _bounded, extrapolation_notes
from cbs.analysis._report import RunAnalysis, analyze_run
from cbs.analysis._tables import check_run_dir, read_run_config, read_run_manifest
from cbs.errors import AnalysisError

__all__ = ["Comparison", "run_scale", "compare_runs"]


@dataclasses.dataclass
class Comparison:
    """Several runs side by side (and, with a scale key, CBS scaling laws)."""

    runs: list[RunAnalysis]
    table: pd.DataFrame  # summary rows of every run (+ scale)
    text: str
    scaling: dict[str, PowerLawFit] = dataclasses.field(default_factory=dict)  # B_crit vs scale
    scaling_b_star: dict[str, PowerLawFit] = dataclasses.field(default_factory=dict)  # B* vs scale
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
    for source, data in (
        ("config.yaml", read_run_config(run_dir)),
        ("manifest.json", read_run_manifest(run_dir)),
    ):
        value = _lookup(data, scale_key)
        if value is not None:
            try:
                value = float(value)
            except (TypeError, ValueError):
                raise AnalysisError(
                    f"{scale_key!r} in {run_dir}/{source} is {value!r}, not a number"
                ) from None
            if not value > 0:
                raise AnalysisError(
                    f"{scale_key!r} in {run_dir}/{source} is {value}; a scale must be positive"
                )
            return value
    raise AnalysisError(
        f"run {str(run_dir)!r} has no key {scale_key!r} in config.yaml or manifest.json"
    )


def run_labels(names: Sequence[str], dirs: Sequence[Path]) -> list[str]:
    """A label per run: its sweep name when the names are unique, else its folder (the
    shortest path tail that tells the folders apart), so two runs of one config read as
    `qs` and `qs_small`, not `name` and `name#2`.

    >>> run_labels(["a", "b"], [Path("x/r1"), Path("y/r2")])
    ['a', 'b']
    >>> run_labels(["q", "q"], [Path("runs/big"), Path("runs/small")])
    ['big', 'small']
    >>> run_labels(["q", "q"], [Path("a/run"), Path("b/run")])
    ['a/run', 'b/run']
    """
    if len(set(names)) == len(names):
        return list(names)
    parts = [Path(d).parts for d in dirs]
    for k in range(1, max(len(p) for p in parts) + 1):
        tails = ["/".join(p[-k:]) for p in parts]
        if len(set(tails)) == len(tails):
            return tails
    return [f"{n}#{i + 1}" for i, n in enumerate(names)]  # the same folder twice


def compare_runs(
    run_dirs: Sequence,
    *,
    out: str | Path | None = None,
    scale_key: str | None = None,
    scale_values: Sequence[float] | None = None,
    plots: bool | None = None,
    **options,
) -> Comparison:
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
    write = options.pop("write", True)
    # The input runs are read, never rewritten: their own cbs.json, plots and report.md stay
    # what their sweep (or their own `cbs.analyze RUN`) wrote; the comparison's files go to out.
    analyses = [analyze_run(d, plots=False, write=False, **options) for d in dirs]
    labels = run_labels([a.label for a in analyses], dirs)
    units = {a.unit for a in analyses}
    table = pd.concat(
        [a.summary.assign(run=lbl) for a, lbl in zip(analyses, labels)], ignore_index=True
    )
    if scales is not None:
        table["scale"] = np.repeat(scales, [len(a.summary) for a in analyses])
    header = (
        ["optimizer", "run"]
        + (["scale"] if scales is not None else [])
        + ["B_crit (headline)", "B_crit CI", "S_min", "B* (secondary)", "knee", "points"]
    )
    rows = []
    for name in dict.fromkeys(table["optimizer"]):
        for r in table[table["optimizer"] == name].itertuples(index=False):
            rows.append(
                [name, r.run]
                + ([format_number(r.scale)] if scales is not None else [])
                + [_bounded(r, "b_crit")]
                + row_cells(r, ("b_crit_ci", "s_min"))
                + [_bounded(r, "b_star")]
                + row_cells(r, ("knee", "n_points"))
            )
    notes = extrapolation_notes(
        table.assign(optimizer=table["optimizer"] + " (" + table["run"] + ")")
    )
    unit = units.pop() if len(units) == 1 else "mixed units"
    lines = [
        f"CBS comparison of {len(analyses)} runs (batch sizes in {unit})",
        text_table(header, rows),
        *[f"  {n}" for n in notes],
    ]
    md = [
        f"# CBS comparison ({len(analyses)} runs)",
        "",
        f"Batch sizes in {unit}. Runs: "
        + "; ".join(f"{lbl} = `{d}`" for lbl, d in zip(labels, dirs))
        + ".",
        "",
        md_table(header, rows),
        "",
        *[f"- {n}" for n in notes],
        *([""] if notes else []),
    ]
    scaling, scaling_b_star = {}, {}
    if scales is not None:
        what = scale_key or "scale"
        lines += ["", f"power law B_crit = c * ({what})^beta, fitted in log space per optimizer:"]
        md += [f"## B_crit vs {what}", ""]
        n_boot = analyses[0].options["n_boot"]
        for name in dict.fromkeys(table["optimizer"]):
            g = table[table["optimizer"] == name]

            def power_law(column, g=g, name=name):
                # bootstrap the power law from every run's bootstrap samples when all have them
                samples = [
                    getattr(a.fits[name], f"{column}_samples") for a in analyses if name in a.fits
                ]
                use = samples if all(s is not None and len(s) for s in samples) else None
                return fit_power_law(
                    g["scale"],
                    g[column],
                    y_samples=use,
                    n_boot=n_boot,
                    seed=options.get("seed", 0),
                    ci_level=options.get("ci_level", 0.95),
                )

            scaling[name] = pl = power_law("b_crit")
            scaling_b_star[name] = power_law("b_star")
            lines.append(f"  {name}: B_crit: {pl}")
            lines.append(f"  {name}: B*:     {scaling_b_star[name]}")
            md.append(f"- **{name}**, B_crit: `{pl}`")
            md.append(f"- **{name}**, B*: `{scaling_b_star[name]}`")
        md.append("")
    text = "\n".join(lines) + "\n"
    comp = Comparison(
        runs=analyses, table=table, text=text, scaling=scaling, scaling_b_star=scaling_b_star
    )
    if out is None and not write:
        return comp  # write=False: nothing goes into the run folders, the comparison included
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
        comp.files.append(
            _plots.plot_compare(out_dir / "compare_steps_vs_batch.png", runs_fits, unit_label)
        )
        md[4:4] = [
            "![steps vs batch size, all runs](compare_steps_vs_batch.png)",
            "",
        ]  # after the runs line
        if scaling:
            comp.files.append(
                _plots.plot_scaling(
                    out_dir / "scaling_b_crit.png", table, scaling, scale_key or "scale", unit_label
                )
            )
            md += ["![B_crit vs scale](scaling_b_crit.png)", ""]
    from cbs.store import atomic_write_bytes, atomic_write_text

    atomic_write_bytes(out_dir / "compare.parquet", table.to_parquet(index=False))
    atomic_write_text(
        out_dir / "compare.json",
        json.dumps(
            jsonable_deep(
                dict(
                    runs=[str(d) for d in dirs],
                    labels=labels,
                    scale_key=scale_key,
                    summary=table.to_dict(orient="records"),
                    scaling_b_crit={k: v.to_dict() for k, v in scaling.items()},
                    scaling_b_star={k: v.to_dict() for k, v in scaling_b_star.items()},
                )
            ),
            indent=1,
            allow_nan=False,
        ),
    )
    atomic_write_text(out_dir / "compare.md", "\n".join(md))
    comp.files += [out_dir / "compare.parquet", out_dir / "compare.json", out_dir / "compare.md"]
    return comp
