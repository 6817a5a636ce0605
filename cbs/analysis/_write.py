"""The files an analysis writes into its run folder (cbs.json, cbs.parquet, PNGs, report.md)."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from cbs.analysis._format import jsonable_deep
from cbs.analysis._render import exclusion_notes, report_markdown
from cbs.store import atomic_write_bytes, atomic_write_text

if TYPE_CHECKING:
    from cbs.analysis._report import RunAnalysis

__all__ = ["write_run_files"]


def write_run_files(a: RunAnalysis, cfg, manifest, reference, scale, plots):
    """cbs.json, cbs.parquet and (with plots) the PNGs and report.md into the run folder;
    appends each path to ``a.files``."""
    from cbs.analysis import _plots

    run_dir = a.run_dir
    payload = dict(
        run=a.label,
        run_dir=str(run_dir),
        config_hash=manifest.get("config_hash"),
        options=a.options,
        target=cfg.get("target"),
        unit=a.unit,
        tokens_per_example=a.tokens_per_example,
        warnings=a.warnings,
        summary=a.summary.to_dict(orient="records"),
        optimizers={
            name: dict(
                fit=fit.to_dict(),
                b_crit_samples=fit.b_crit_samples,
                per_batch_size=a.per_batch[a.per_batch["optimizer"] == name].to_dict(
                    orient="records"
                ),
            )
            for name, fit in a.fits.items()
        },
        steps=a.steps.to_dict(orient="records"),
        noise_scale=None if a.noise is None else a.noise.to_dict(orient="records"),
    )
    # every file atomically (temporary file, fsync, rename): a full disk or a kill leaves
    # each one the old complete version or the new one, never a torn file
    atomic_write_text(
        run_dir / "cbs.json", json.dumps(jsonable_deep(payload), indent=1, allow_nan=False)
    )
    a.files.append(run_dir / "cbs.json")
    atomic_write_bytes(run_dir / "cbs.parquet", a.summary.to_parquet(index=False))
    a.files.append(run_dir / "cbs.parquet")
    if not plots:
        return
    title = a.label
    png = [
        _plots.plot_steps_vs_batch(
            run_dir / "steps_vs_batch.png",
            a.fits,
            a.steps,
            a.unit,
            scale,
            reference=reference,
            title=title,
        ),
        _plots.plot_best_lr(
            run_dir / "best_lr.png", a.per_batch, a.unit, scale, title=f"{title}: best LR"
        ),
        _plots.plot_data_efficiency(
            run_dir / "data_efficiency.png", a.fits, a.unit, title=f"{title}: data efficiency"
        ),
    ]
    png.insert(
        0,
        _plots.plot_all_optimizers(
            run_dir / "steps_all_optimizers.png",
            a.fits,
            a.unit,
            title=f"{title}: all optimizers",
            notes=exclusion_notes(a.summary),
        ),
    )
    pairs = _plots.schedule_pairs(cfg)  # NQM Fig. 3b: constant LR vs optimized schedule
    if pairs:
        png.append(
            _plots.plot_schedules(
                run_dir / "schedules.png",
                a.fits,
                pairs,
                a.unit,
                reference,
                scale,
                title=f"{title}: constant LR vs optimized schedule",
            )
        )
    if a.noise is not None and len(a.noise):  # the measured noise scale beside B_crit
        png.append(
            _plots.plot_noise_scale(
                run_dir / "noise_scale.png", a.noise, a.fits, a.unit, scale, title=title
            )
        )
    a.files += png
    atomic_write_text(run_dir / "report.md", report_markdown(a, scale))
    a.files.append(run_dir / "report.md")
