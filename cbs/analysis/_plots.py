"""PNG plots of a CBS analysis (matplotlib, Agg back end: no display needed)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from cbs.analysis._format import format_number  # noqa: E402

__all__ = [
    "plot_steps_vs_batch",
    "plot_best_lr",
    "plot_data_efficiency",
    "plot_compare",
    "plot_scaling",
]

_DPI = 100  # 520x420 px per panel: legible, and encoding costs half of 120 dpi


def _colors(n):
    cmap = plt.get_cmap("tab10")
    return [cmap(i % 10) for i in range(n)]


def _grid(n):
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 4.2 * rows), squeeze=False)
    for ax in axes.ravel()[n:]:
        ax.set_visible(False)
    return fig, axes.ravel()[:n]


def _log_axes(ax, xbase=2) -> None:
    """Log-log axes, or a "no data" note when nothing positive was drawn (an all-censored
    sweep), since matplotlib cannot place log ticks on an empty axis."""
    has_data = False
    for line in ax.get_lines():
        x, y = np.asarray(line.get_xdata(), float), np.asarray(line.get_ydata(), float)
        if x.size and np.any(np.isfinite(x) & np.isfinite(y) & (x > 0) & (y > 0)):
            has_data = True
            break
    if has_data:
        ax.set_xscale("log", base=xbase)
        ax.set_yscale("log")
        # a few unlabelled minor ticks: laying out matplotlib's default minor tick labels on
        # log axes dominated the plotting time
        ax.yaxis.set_minor_locator(matplotlib.ticker.LogLocator(subs=(2.0, 5.0), numticks=12))
        ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    else:
        ax.text(0.5, 0.5, "no uncensored data", ha="center", va="center", transform=ax.transAxes)


def _legend(ax, **kwargs) -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, **kwargs)


def _fmt(x):
    return format_number(x, 3, missing="n/a")  # legends: 3 digits


# An extrapolated CBS (outside the swept batch sizes) is always drawn dashed, never in the
# style of a measured one (and labelled with its bound, cbs.analysis._format.bound_text).
_EXTRAPOLATED = (0, (4, 2.5))


def _crit_style(fit) -> tuple[object, str]:
    """(line style, legend text) of a fit's B_crit marker line."""
    side = fit.outside("b_crit")
    if side:
        return _EXTRAPOLATED, f"B_crit {fit.bound_text()} (extrapolated; fit {_fmt(fit.b_crit)})"
    return "-.", f"B_crit={_fmt(fit.b_crit)}"


def _draw_measured(ax, fit, color, size, label):
    """A fit's measured S(B) points (seeds combined), black-edged."""
    good = np.isfinite(fit.steps)
    ax.plot(
        fit.batch_sizes[good],
        fit.steps[good],
        "o",
        color=color,
        ms=size,
        markeredgecolor="k",
        label=label,
    )


def _draw_fit(ax, fit, color, label_prefix="", band=True, show_lines=True):
    b = fit.batch_sizes
    if fit.n_points >= 2 and np.isfinite(fit.s_min):
        lo, hi = b.min() / 1.5, b.max() * 1.5
        bb = np.geomspace(lo, hi, 200)
        ax.plot(
            bb,
            fit.predict(bb),
            "-",
            color=color,
            lw=1.8,
            label=f"{label_prefix}fit: S_min={_fmt(fit.s_min)}, {_crit_style(fit)[1]}",
        )
        if show_lines:
            s0 = float(fit.predict([fit.b0])[0])
            ax.plot(
                bb,
                s0 * fit.b0 / bb,
                ":",
                color="gray",
                lw=1.2,
                label=f"perfect scaling from B0={_fmt(fit.b0)}",
            )
            if np.isfinite(fit.s_min) and fit.s_min > 0:
                ax.axhline(fit.s_min, color=color, ls="--", lw=0.8, alpha=0.6, label="S_min")
        if np.isfinite(fit.b_crit) and fit.b_crit > 0:
            style, text = _crit_style(fit)
            ax.axvline(
                fit.b_crit,
                color=color,
                ls=style,
                lw=1.2,
                label=(text if fit.outside("b_crit") else "B_crit (S = 2 S_min)")
                if show_lines
                else None,
            )
            if band and all(np.isfinite(v) for v in fit.b_crit_ci):
                ax.axvspan(
                    max(fit.b_crit_ci[0], 1e-300),
                    fit.b_crit_ci[1],
                    color=color,
                    alpha=0.12,
                    label=f"B_crit {fit.ci_level:.0%} CI" if show_lines else None,
                )
        if show_lines and np.isfinite(fit.b_star):
            out = fit.outside("b_star")
            ax.plot(
                [fit.b_star],
                [float(fit.predict([fit.b_star])[0])],
                marker="*",
                ms=13,
                color=color,
                ls="none",
                markeredgecolor="k",
                markerfacecolor="none" if out else color,
                label=f"B* (δ={fit.delta:g}, secondary) "
                + (
                    f"{fit.bound_text('b_star')} (extrapolated)" if out else f"= {_fmt(fit.b_star)}"
                ),
            )


def _label(ax, xlabel: str, ylabel: str, title: str, **legend) -> None:
    """Axis labels, title, log grid and legend of one panel."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.25)
    _legend(ax, **legend)


def _readable_log_y(fig) -> None:
    """On log-y panels spanning less than two decades matplotlib labels one decade or none;
    label 1-2-5 steps there so counts can be read off the axis."""
    for ax in fig.axes:
        if ax.get_yscale() != "log" or not ax.get_visible():
            continue
        lo, hi = ax.get_ylim()
        if lo > 0 and hi > lo and np.log10(hi / lo) < 2:
            ax.yaxis.set_major_locator(
                matplotlib.ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0), numticks=12)
            )
            ax.yaxis.set_major_formatter(
                matplotlib.ticker.FuncFormatter(lambda v, _pos: format_number(v, 3))
            )


def _save(fig, path: Path, tight: bool = True) -> Path:
    """Saves ``fig`` atomically (a full disk or a kill never leaves a torn PNG) and closes it."""
    from cbs.store import atomic_writer

    _readable_log_y(fig)
    if tight:
        fig.tight_layout()
    try:
        with atomic_writer(path) as tmp:
            fig.savefig(tmp, dpi=_DPI, format=Path(path).suffix.lstrip(".") or "png")
    finally:
        plt.close(fig)
    return path


def _finish_single(fig, ax, path: Path, unit: str, ylabel: str, title: str) -> Path:
    """Finishes a one-panel batch-size plot (log axes) and saves it."""
    _log_axes(ax)
    _label(ax, f"batch size ({unit})", ylabel, title)
    return _save(fig, path)


def plot_steps_vs_batch(
    path: Path,
    fits: dict,
    per_seed: pd.DataFrame,
    unit: str,
    scale: float,
    reference: pd.DataFrame | None = None,
    title: str = "",
) -> Path:
    """Steps to target vs batch size, log-log, one panel per optimizer.

    Measured points (per seed, faint; combined, solid), censored batch sizes as up-pointing
    triangles at the step budget, the fitted curve, the perfect-scaling line anchored at the
    fitted curve's B0, B_crit with its bootstrap band, B*, and reference curves.
    """
    names = list(fits)
    fig, axes = _grid(max(len(names), 1))
    for ax, name, color in zip(axes, names, _colors(len(names))):
        fit = fits[name]
        g = per_seed[per_seed["optimizer"] == name]
        ok = ~g["censored"].to_numpy(bool)
        bx = g["batch_size"].to_numpy(float) * scale
        ax.plot(
            bx[ok],
            g["steps"].to_numpy(float)[ok],
            "o",
            color=color,
            alpha=0.3,
            ms=4,
            label="per seed" if fit.n_seeds > 1 else None,
        )
        label = "measured" + (" (median over seeds)" if fit.n_seeds > 1 else "")
        _draw_measured(ax, fit, color, 7, label)
        if fit.censored.any():
            budget = g["max_steps"].max() if "max_steps" in g else np.nan
            if np.isfinite(budget):
                ax.plot(
                    fit.batch_sizes[fit.censored],
                    np.full(fit.censored.sum(), budget),
                    "^",
                    color=color,
                    ms=8,
                    markerfacecolor="none",
                    label="censored (at step budget)",
                )
        _draw_fit(ax, fit, color)
        # Keep the y range on the data: the perfect-scaling line and a lower bound can fall
        # orders of magnitude below S_min at the largest batch sizes.
        floor = [
            v
            for v in (np.nanmin(fit.steps) if np.isfinite(fit.steps).any() else np.nan, fit.s_min)
            if np.isfinite(v) and v > 0
        ]
        _plot_reference(ax, reference, scale, "-", alpha=0.45, lw=1.0, prefix="reference: ")
        _log_axes(ax)
        if floor and ax.get_yscale() == "log":
            ax.set_ylim(bottom=0.5 * min(floor))
        _label(ax, f"batch size ({unit})", "steps to target", f"{name}", loc="best")
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def plot_all_optimizers(
    path: Path, fits: dict, unit: str, title: str = "", notes: Sequence[str] = ()
) -> Path:
    """Every optimizer's steps-vs-batch-size curve on one log-log axes (as in the NQM
    paper's figures): measured points (seeds combined), the fitted S(B), and B_crit marked
    on each curve (where S = 2 S_min) with its bootstrap interval as a horizontal bar.
    ``notes`` (e.g. how many points were excluded as unproven or on an LR-grid edge) are
    printed under the axes."""
    fig, ax = plt.subplots(figsize=(7.5, 5.5))
    for (name, fit), color in zip(fits.items(), _colors(len(fits))):
        _draw_measured(ax, fit, color, 6, name)
        if fit.n_points >= 2 and np.isfinite(fit.s_min):
            bb = np.geomspace(fit.batch_sizes.min() / 1.5, fit.batch_sizes.max() * 1.5, 200)
            ax.plot(bb, fit.predict(bb), "-", color=color, lw=1.5)
            if np.isfinite(fit.b_crit) and fit.b_crit > 0:
                y = float(fit.predict([fit.b_crit])[0])
                lo, hi = fit.b_crit_ci
                if np.isfinite(lo) and np.isfinite(hi) and hi > lo > 0:
                    ax.plot(
                        [lo, hi], [y, y], "-", color=color, lw=4, alpha=0.35, solid_capstyle="butt"
                    )
                side = fit.outside("b_crit")
                if side:  # the fit's continuation to the extrapolated B_crit, dashed
                    edge = fit.swept_range[1] if side == "above" else fit.swept_range[0]
                    bx = np.geomspace(min(edge, fit.b_crit), max(edge, fit.b_crit), 50)
                    ax.plot(bx, fit.predict(bx), ls=_EXTRAPOLATED, color=color, lw=1.2)
                interval = (
                    f" [{_fmt(lo)}, {_fmt(hi)}]" if np.isfinite(lo) and np.isfinite(hi) else ""
                )
                ax.plot(
                    [fit.b_crit],
                    [y],
                    marker="D",
                    ms=9,
                    color=color,
                    markeredgecolor=color if side else "k",
                    markerfacecolor="none" if side else color,
                    markeredgewidth=1.8 if side else 1.0,
                    ls="none",
                    label=f"{name}: B_crit {fit.bound_text()} (extrapolated; fit {_fmt(fit.b_crit)})"
                    if side
                    else f"{name}: B_crit = {_fmt(fit.b_crit)}{interval}",
                )
    _log_axes(ax)
    _label(
        ax,
        f"batch size ({unit})",
        "steps to target",
        title or "steps to target, all optimizers",
        loc="best",
    )
    if notes:
        fig.text(0.01, 0.005, "\n".join(notes), fontsize=7, va="bottom", ha="left")
        fig.subplots_adjust(bottom=0.12 + 0.03 * len(notes))
    _readable_log_y(fig)
    fig.tight_layout(rect=(0, 0.03 * len(notes), 1, 1))
    return _save(fig, path, tight=False)


def plot_best_lr(path: Path, per_b: pd.DataFrame, unit: str, scale: float, title: str = "") -> Path:
    """Best LR (solid) and effective LR lr/(1-momentum) (dashed) vs batch size, with linear and
    square-root scaling heuristics anchored at the smallest batch size (Shallue et al.)."""
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    names = list(dict.fromkeys(per_b["optimizer"]))
    for name, color in zip(names, _colors(len(names))):
        g = per_b[per_b["optimizer"] == name].sort_values("batch_size")
        bx = g["batch_size"].to_numpy(float) * scale
        lr = g["best_lr"].to_numpy(float)
        elr = g["best_effective_lr"].to_numpy(float)
        ok = np.isfinite(lr)
        ax.plot(bx[ok], lr[ok], "o-", color=color, label=f"{name}: best LR")
        edge = g["lr_at_edge"].to_numpy() != ""
        if (edge & ok).any():
            ax.plot(bx[edge & ok], lr[edge & ok], "x", color="red", ms=10, mew=2)
        if np.any(np.abs(elr[ok] - lr[ok]) > 1e-12 * np.abs(lr[ok])):
            ax.plot(
                bx[ok],
                elr[ok],
                "s--",
                color=color,
                ms=4,
                label=f"{name}: effective LR lr/(1-momentum)",
            )
        if ok.sum() >= 2:
            b0, l0 = bx[ok][0], lr[ok][0]
            ax.plot(bx[ok], l0 * bx[ok] / b0, ":", color=color, alpha=0.5, lw=1)
            ax.plot(bx[ok], l0 * np.sqrt(bx[ok] / b0), "-.", color=color, alpha=0.5, lw=1)
    ax.plot([], [], "k:", alpha=0.5, label="linear scaling (from smallest B)")
    ax.plot([], [], "k-.", alpha=0.5, label="square-root scaling")
    ax.plot([], [], "rx", label="best LR at the edge of the LR grid")
    return _finish_single(
        fig, ax, path, unit, "learning rate", title or "best learning rate per batch size"
    )


def plot_data_efficiency(path: Path, fits: dict, unit: str, title: str = "") -> Path:
    """Examples (or tokens) to target, E = B S, vs batch size, with the fitted
    E_min (1 + B / B_crit) and the E_min floor."""
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    for (name, fit), color in zip(fits.items(), _colors(len(fits))):
        good = np.isfinite(fit.steps)
        b = fit.batch_sizes
        ax.plot(
            b[good],
            b[good] * fit.steps[good],
            "o",
            color=color,
            markeredgecolor="k",
            label=f"{name}: measured",
        )
        if fit.n_points >= 2 and np.isfinite(fit.s_min):
            bb = np.geomspace(b.min() / 1.5, b.max() * 1.5, 200)
            ax.plot(bb, bb * fit.predict(bb), "-", color=color, label=f"{name}: fit")
            if np.isfinite(fit.e_min) and fit.e_min > 0:
                ax.axhline(fit.e_min, color=color, ls="--", lw=0.8, alpha=0.6)
            if np.isfinite(fit.b_crit) and fit.b_crit > 0:
                ax.axvline(fit.b_crit, color=color, ls=_crit_style(fit)[0], lw=1)
    ax.plot([], [], "k--", alpha=0.6, label="E_min (fit)")
    ax.plot([], [], "k-.", label="B_crit (E = 2 E_min)")
    return _finish_single(
        fig, ax, path, unit, f"{unit} to target (B x S)", title or "data efficiency"
    )


def plot_noise_scale(
    path: Path, noise: pd.DataFrame, fits: dict, unit: str, scale: float, title: str = ""
) -> Path:
    """The measured B_simple per batch size (points, one colour per optimizer) with each
    optimizer's B_crit as a horizontal line (dashed when extrapolated)."""
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    names = [n for n in fits if (noise["optimizer"] == n).any()]
    for name, color in zip(names, _colors(len(names))):
        g = noise[noise["optimizer"] == name].sort_values("batch_size")
        ax.plot(
            g["batch_size"].to_numpy(float) * scale,
            g["b_simple"].to_numpy(float) * scale,
            "o-",
            color=color,
            markeredgecolor="k",
            label=f"{name}: B_simple (measured)",
        )
        fit = fits[name]
        if np.isfinite(fit.b_crit) and fit.b_crit > 0:
            style, text = _crit_style(fit)
            ax.axhline(fit.b_crit, color=color, ls=style, lw=1.2, label=f"{name}: {text}")
    return _finish_single(
        fig, ax, path, unit, f"noise scale ({unit})", f"{title}: gradient noise scale"
    )


def plot_compare(path: Path, runs: dict, unit: str) -> Path:
    """Several runs overlaid: one panel per optimizer name, one colour per run."""
    names = list(dict.fromkeys(n for fits in runs.values() for n in fits))
    fig, axes = _grid(max(len(names), 1))
    colors = _colors(len(runs))
    for ax, name in zip(axes, names):
        for (run, fits), color in zip(runs.items(), colors):
            if name not in fits:
                continue
            fit = fits[name]
            _draw_measured(ax, fit, color, 5, None)
            _draw_fit(ax, fit, color, label_prefix=f"{run} ", band=True, show_lines=False)
        _log_axes(ax)
        _label(ax, f"batch size ({unit})", "steps to target", name)
    return _save(fig, path)


def plot_scaling(path: Path, table: pd.DataFrame, fits: dict, scale_key: str, unit: str) -> Path:
    """CBS vs scale (model or data size) across runs, log-log, with the power-law fits."""
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    names = list(dict.fromkeys(table["optimizer"]))
    for name, color in zip(names, _colors(len(names))):
        g = table[table["optimizer"] == name].sort_values("scale")
        x, y = g["scale"].to_numpy(float), g["b_crit"].to_numpy(float)
        lo, hi = g["b_crit_ci_low"].to_numpy(float), g["b_crit_ci_high"].to_numpy(float)
        ok = np.isfinite(y) & np.isfinite(lo) & np.isfinite(hi)
        # A percentile interval need not contain the point estimate; clip so the bar is drawn.
        yerr = [np.maximum(y[ok] - lo[ok], 0.0), np.maximum(hi[ok] - y[ok], 0.0)]
        ax.errorbar(x[ok], y[ok], yerr=yerr, fmt="o", color=color, capsize=3)
        ax.plot(x[~ok & np.isfinite(y)], y[~ok & np.isfinite(y)], "o", color=color)
        pl = fits.get(name)
        if pl is not None and np.isfinite(pl.coef):
            xx = np.geomspace(x.min(), x.max(), 50)
            ax.plot(
                xx,
                pl.predict(xx),
                "-",
                color=color,
                label=f"{name}: B_crit = {pl.coef:.3g} x^{pl.exponent:.3f}",
            )
    _log_axes(ax, xbase=10)
    _label(ax, scale_key, f"B_crit ({unit})", "critical batch size vs scale")
    return _save(fig, path)


def plot_targets(path: Path, table: pd.DataFrame, unit: str, metric: str = "target") -> Path:
    """B_crit vs target (left) and the Pareto front S_min vs E_min, one point per target (right)."""
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.4))
    names = list(dict.fromkeys(table["optimizer"]))
    for name, color in zip(names, _colors(len(names))):
        g = table[table["optimizer"] == name].sort_values("target")
        x, y = g["target"].to_numpy(float), g["b_crit"].to_numpy(float)
        lo, hi = g["b_crit_ci_low"].to_numpy(float), g["b_crit_ci_high"].to_numpy(float)
        ok = np.isfinite(y) & (y > 0)
        band = ok & np.isfinite(lo) & np.isfinite(hi)
        ax1.plot(x[ok], y[ok], "o-", color=color, label=name)
        if band.any():
            ax1.fill_between(x[band], lo[band], hi[band], color=color, alpha=0.15)
        s, e = g["s_min"].to_numpy(float), g["e_min"].to_numpy(float)
        ok2 = np.isfinite(s) & np.isfinite(e) & (s > 0) & (e > 0)
        ax2.plot(e[ok2], s[ok2], "o-", color=color, label=name)
        for xi, si, ei in zip(x[ok2], s[ok2], e[ok2]):
            ax2.annotate(
                f"{xi:.3g}", (ei, si), fontsize=6, xytext=(3, 3), textcoords="offset points"
            )
    for ax in (ax1, ax2):
        _log_axes(ax, xbase=10)
    _label(
        ax1,
        f"target {metric}",
        f"B_crit ({unit})",
        "critical batch size vs target (band: bootstrap CI)",
    )
    _label(
        ax2,
        f"E_min ({unit} to target)",
        "S_min (steps to target)",
        "Pareto front, one point per target (labels)",
    )
    return _save(fig, path)


def schedule_pairs(cfg: dict) -> list[tuple[str, str, str]]:
    """(label, constant optimizer, optimized_pwc optimizer) pairs of a config: entries of the
    same kind and hyperparameters, one with an ``optimized_pwc`` schedule and one without."""
    entries = (cfg or {}).get("grid", {}).get("optimizers", []) or []

    def key(e):
        return e.get("kind"), repr(sorted((e.get("hparams") or {}).items()))

    const = {
        key(e): e.get("name") or e.get("kind")
        for e in entries
        if ((e.get("schedule") or {}).get("kind") or "constant") == "constant"
    }
    pairs = []
    for e in entries:
        if (e.get("schedule") or {}).get("kind") == "optimized_pwc" and key(e) in const:
            hp = ", ".join(f"{k}={v}" for k, v in sorted((e.get("hparams") or {}).items()))
            pairs.append(
                (
                    f"{e.get('kind')}" + (f" ({hp})" if hp else ""),
                    const[key(e)],
                    e.get("name") or e.get("kind"),
                )
            )
    return pairs


def plot_schedules(
    path: Path,
    fits: dict,
    pairs: list,
    unit: str,
    reference: pd.DataFrame | None = None,
    scale: float = 1.0,
    title: str = "",
) -> Path:
    """Constant LR vs optimized piecewise-constant schedule on one log-log axes (the NQM
    paper's Fig. 3b): one colour per pair, constant LR solid with circles, the optimized
    schedule dashed with squares, reference curves (the lower bound) in black."""
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    for (label, cname, pname), color in zip(pairs, _colors(len(pairs))):
        for name, style, marker, what in (
            (cname, "-", "o", "constant LR"),
            (pname, "--", "s", "optimized"),
        ):
            fit = fits.get(name)
            if fit is None:
                continue
            good = np.isfinite(fit.steps)
            ax.plot(
                fit.batch_sizes[good],
                fit.steps[good],
                style,
                marker=marker,
                color=color,
                ms=4,
                label=f"{label}: {what}",
            )
    _plot_reference(ax, reference, scale, ":", lw=1.2)
    return _finish_single(
        fig, ax, path, unit, "steps to target", title or "constant LR vs optimized schedule"
    )


def _plot_reference(ax, reference, scale, style, prefix="", **kwargs) -> None:
    """Reference curves (e.g. the NQM lower bound), one black line per ``name``."""
    if reference is None or not len(reference):
        return
    for rname, rg in reference.groupby("name"):
        rg = rg.sort_values("batch_size")
        ax.plot(
            rg["batch_size"].to_numpy(float) * scale,
            rg["steps"],
            style,
            color="k",
            label=f"{prefix}{rname}",
            **kwargs,
        )
