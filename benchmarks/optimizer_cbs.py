"""How the optimizer moves the critical batch size: SGD vs momentum vs Adam(-like) vs K-FAC(-like).

Two lenses, one run:

* **NQM** (``configs/compare_nqm_optimizers.yaml``): the paper's default problem (h_i = 1/i,
  d = 10^4, C = H, binned), target risk 0.01, B = 2^2 .. 2^20: plain SGD (p = 0), heavy-ball
  momentum (p = 0, beta tuned over 1 - logspace(-5, 0, 20)), an Adam-like preconditioner
  P = H^0.5 and K-FAC-like preconditioners P = H^0.75 (the headline ``kfaclike``) and P = H^1.
  p = 1 runs fine in cbs.nqm, but on this problem it is degenerate: with C = H, P = H makes
  every direction's effective LR equal (condition number 1), so at large B one step of LR 1
  lands on the optimum; S(B) halves with every doubling until S = 1 step and the fitted
  B_crit is infinite (no saturation inside the swept range). p = 0.75 is the largest of the
  paper's powers with a finite, measurable CBS, so it is the K-FAC-like figure in RESULT;
  p = 1 is kept as the limit (``nqm_bcrit_kfaclike_p1``).
* **Real network** (``configs/train_mnist1d_mlp_cpu.yaml``): MNIST-1D, 2-layer MLP of width 64,
  target val_error < 0.5, with sgd, momentum (0.9), adam and kfac (kfac-jax), each with its own
  LR grid, B = 2^5 .. 2^10, 400 steps, eval_every 20.

Each run folder is analysed with :func:`cbs.analysis.compare_runs` (McCandlish fit
S(B) = S_min + E_min/B, bootstrap 95% intervals, B* with delta = 0.2 anchored at the smallest
swept B). Prints, per lens and optimizer, B_crit [95% CI], S_min, B* and whether the interval
overlaps SGD's; the device; the wall time of each lens (sweep + analysis, compilation
included); and last one line ``RESULT name=value ...``.

``--quick`` shrinks both lenses (NQM: every third batch size, every other momentum and momentum
LR, no golden-section LR refinement; MNIST-1D: 4 batch sizes, 3 LRs per optimizer (kfac 2),
800 steps). On 2 shared CPU cores that takes about 100 s. It is compile-bound, so
shrinking the grids further barely helps.

``--search`` runs the protocol of issue 20 instead: the ``configs/train_*_search_cpu.yaml``
workloads (``--workloads``), every tuned hyperparameter searched per batch size by
quasi-random trials (grid.search), the target set by a pilot (target.rule), training sets
sized so the largest batch size sees few epochs. Per workload it prints B_crit [95% CI] per
optimizer, the pilot's target, epochs to target at the largest batch size, the tuned values at
the smallest and largest batch size, search edges left flagged, and the ordering verdict
against Zhang et al. 2019 (SGD < momentum < Adam < K-FAC): "holds" when every B_crit rises
along that order with the intervals of neighbours disjoint, "holds (intervals overlap)" when
the point estimates rise but some neighbouring intervals overlap, else "does not hold" naming
the pairs that fall.

Usage: python benchmarks/optimizer_cbs.py [--quick] [--out DIR] [--skip-train] [--skip-nqm]
       python benchmarks/optimizer_cbs.py --search [--workloads linreg,mnist1d] [--out DIR]
           [--override KEY=VALUE ...]
Last line: RESULT nqm_bcrit_sgd=... nqm_bcrit_momentum=... nqm_bcrit_adamlike=... nqm_bcrit_kfaclike=...
  nqm_bcrit_kfaclike_p1=... mnist1d_bcrit_sgd=... mnist1d_bcrit_momentum=... mnist1d_bcrit_adam=...
  mnist1d_bcrit_kfac=... nqm_s=... train_s=... total_s=...
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NQM_CONFIG = ROOT / "configs" / "compare_nqm_optimizers.yaml"
TRAIN_CONFIG = ROOT / "configs" / "train_mnist1d_mlp_cpu.yaml"

# optimizer name in the run -> RESULT key
NQM_KEYS = {
    "sgd": "nqm_bcrit_sgd",
    "momentum": "nqm_bcrit_momentum",
    "adamlike_p0.5": "nqm_bcrit_adamlike",
    "kfaclike_p0.75": "nqm_bcrit_kfaclike",
    "kfaclike_p1": "nqm_bcrit_kfaclike_p1",
}
TRAIN_KEYS = {
    "sgd": "mnist1d_bcrit_sgd",
    "momentum": "mnist1d_bcrit_momentum",
    "adam": "mnist1d_bcrit_adam",
    "kfac": "mnist1d_bcrit_kfac",
}

NQM_QUICK = [
    "grid.batch_sizes={log2_min: 2, log2_max: 20, step: 3}",
    # every other beta and every other momentum LR of the full grid (a subset, so quick cells are full-run cells)
    "grid.optimizers.1.hparams.momentum={log10_min: -5, log10_max: -0.2631578947368421, num: 10, one_minus: true}",
    "grid.optimizers.1.learning_rates={log10_min: -8, log10_max: 0.9090909090909091, num: 50}",
    "nqm.refine=false",  # grid-optimal LRs only (the full run refines them; B_crit moves by < 3%)
]
TRAIN_QUICK = [
    "grid.batch_sizes=[16, 64, 256, 1024]",
    "grid.learning_rates={log10_min: -1.5, log10_max: 0.5, num: 3}",
    "grid.optimizers.1.learning_rates={log10_min: -2.5, log10_max: -0.5, num: 3}",
    "grid.optimizers.2.learning_rates={log10_min: -3.5, log10_max: -1.5, num: 3}",
    "grid.optimizers.3.learning_rates=[0.03, 0.1]",
    "budget.max_steps=800",
]


def fmt(x) -> str:
    from cbs.analysis import format_number

    return format_number(x)


def run_lens(label: str, config: Path, overrides: list[str], run_dir: Path):
    """Runs (or resumes) one sweep into run_dir; returns (run_dir, sweep summary, seconds)."""
    from cbs.sweep import load_config, run_sweep

    cfg = load_config(config, [*overrides, f"output.dir={run_dir}"])
    t0 = time.perf_counter()
    summary = run_sweep(cfg, progress=False, log=lambda s: None)
    dt = time.perf_counter() - t0
    import pandas as pd

    res = pd.read_parquet(Path(run_dir) / "results.parquet", columns=["reached", "final_metric"])
    odd = int((res["reached"] & res["final_metric"].isna()).sum())
    if odd:  # a cell whose iterate blew up should not count as having reached the target
        print(
            f"[{label}] WARNING: {odd} cells are recorded as reached but end with a NaN/inf metric "
            f"(overflowing unstable cells); their steps may be spurious",
            flush=True,
        )
    note = (
        f" ({summary.skipped_cells} cells already in the folder, skipped)"
        if summary.skipped_cells
        else ""
    )
    print(
        f"[{label}] {summary.cells} cells ({summary.reached} reached, {summary.censored} censored, "
        f"{summary.diverged} diverged) in {dt:.1f} s on {summary.device}{note} -> {run_dir}",
        flush=True,
    )
    return summary, dt


SEARCH_CONFIGS = {
    "linreg": ROOT / "configs" / "train_linreg_search_cpu.yaml",
    "mnist1d": ROOT / "configs" / "train_mnist1d_mlp_search_cpu.yaml",
}
# Zhang et al. 2019: critical batch size grows SGD < momentum < Adam < K-FAC
ZHANG_ORDER = ["sgd", "momentum", "adam", "kfac"]


def ordering_verdict(summary) -> tuple[str, list[str]]:
    """(verdict, evidence lines) of Zhang 2019's ordering on one workload's summary table
    (index: optimizer), over the optimizers it has, in ZHANG_ORDER."""
    names = [n for n in ZHANG_ORDER if n in summary.index]
    falls, overlap, lines = [], [], []
    for lo, hi in zip(names, names[1:]):
        a, b = summary.loc[lo], summary.loc[hi]
        rises = float(b.b_crit) > float(a.b_crit)
        ov = overlaps(a, b)
        lines.append(
            f"{lo} {fmt(a.b_crit)} [{fmt(a.b_crit_ci_low)}, {fmt(a.b_crit_ci_high)}] "
            f"{'<' if rises else '>='} {hi} {fmt(b.b_crit)} [{fmt(b.b_crit_ci_low)}, "
            f"{fmt(b.b_crit_ci_high)}]{' (intervals overlap)' if ov else ''}"
        )
        if not rises:
            falls.append(f"{hi} below {lo}")
        elif ov:
            overlap.append(f"{lo}/{hi}")
    if falls:
        return "does not hold: " + ", ".join(falls), lines
    if overlap:
        return "holds in the point estimates (intervals overlap: " + ", ".join(overlap) + ")", lines
    return "holds (neighbouring intervals disjoint)", lines


def run_search(args) -> int:
    """The --search protocol: one search sweep per workload, analysed and judged."""
    import json

    import pandas as pd

    from cbs.analysis import compare_runs

    base = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="optimizer_cbs_search_"))
    base.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    result = {}
    try:
        for w in args.workloads.split(","):
            if w not in SEARCH_CONFIGS:
                print(f"unknown workload {w!r}; allowed: {', '.join(SEARCH_CONFIGS)}")
                return 2
            d = base / f"{w}_search"
            _, dt = run_lens(w, SEARCH_CONFIGS[w], list(args.override), d)
            cmp = compare_runs([d], out=d)
            a = cmp.runs[0]
            s = a.summary.set_index("optimizer")
            rule = json.loads((d / "target_rule.json").read_text())
            res = pd.read_parquet(d / "results.parquet")
            print()
            print(
                f"== {w}: target {rule['metric']} < {rule['value']:.4g} (pilot best "
                f"{rule['best']:.4g} by {rule['best_optimizer']} at B = {rule['pilot_batch_size']}, "
                f"{rule['pilot_max_steps']} steps; margin {rule['rule']['margin']} "
                f"{rule['rule']['margin_kind']}); {len(res)} cells, sweep {dt:.0f} s =="
            )
            print(
                "  pilot best per optimizer: "
                + ", ".join(f"{k} {v:.4g}" for k, v in rule["best_by_optimizer"].items())
            )
            pb = a.per_batch
            for name, r in s.iterrows():
                g = pb[pb["optimizer"] == name].sort_values("batch_size")
                hp = [c for c in g.columns if c.startswith("best_hp_") and g[c].nunique() > 1]
                ends = []
                for _, row in g.iloc[[0, -1]].iterrows():
                    vals = ", ".join(
                        [f"lr {fmt(row.best_lr)}", f"lr_eff {fmt(row.best_effective_lr)}"]
                        + [f"{c[8:]} {row[c]:.4g}" for c in hp]
                    )
                    ep = (
                        f", {row.epochs:.2f} epochs"
                        if "epochs" in row and pd.notna(row.epochs)
                        else ""
                    )
                    ends.append(f"B={int(row.batch_size)}: S {fmt(row.steps)}{ep}; {vals}")
                flagged = (
                    ", ".join(
                        f"B={int(x.batch_size)} {x.search_edge}"
                        for x in g.itertuples()
                        if getattr(x, "search_edge", "")
                    )
                    if "search_edge" in g
                    else ""
                )
                print(
                    f"  {name:9s} B_crit {fmt(r.b_crit)} [{fmt(r.b_crit_ci_low)}, {fmt(r.b_crit_ci_high)}]"
                    f"  S_min {fmt(r.s_min)}  B* {fmt(r.b_star)}  points {int(r.n_points)}"
                    f"  censored/unproven/edge {int(r.get('n_censored_points', 0))}/"
                    f"{int(r.get('n_inexact_points', 0))}/{int(r.get('n_edge_points', 0))}"
                )
                print("            " + " | ".join(ends))
                if flagged:
                    print(f"            search edges flagged: {flagged}")
                result[f"{w}_bcrit_{name}"] = r.b_crit
            verdict, lines = ordering_verdict(s)
            print(f"  ordering (Zhang 2019, SGD < momentum < Adam < K-FAC): {verdict}")
            for line in lines:
                print(f"    {line}")
            result[f"{w}_target"] = rule["value"]
            result[f"{w}_s"] = dt
        total = time.perf_counter() - t_all
        print(f"run folders: {base}" + ("" if args.out else " (temporary, deleted)"))
        print(
            "RESULT "
            + " ".join(f"{k}={fmt(v).replace(' ', '')}" for k, v in result.items())
            + f" total_s={total:.1f}"
        )
    finally:
        if not args.out:
            shutil.rmtree(base, ignore_errors=True)
    return 0


def overlaps(a, b) -> bool:
    lo1, hi1, lo2, hi2 = (
        float(v) for v in (a.b_crit_ci_low, a.b_crit_ci_high, b.b_crit_ci_low, b.b_crit_ci_high)
    )
    if any(math.isnan(v) for v in (lo1, hi1, lo2, hi2)):
        return True
    return lo1 <= hi2 and lo2 <= hi1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Configs: configs/compare_nqm_optimizers.yaml (NQM), "
        "configs/train_mnist1d_mlp_cpu.yaml (MNIST-1D).",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="smaller grids on both lenses (about 1.5-2 min on 2 shared CPU cores; compile-bound)",
    )
    p.add_argument(
        "--out",
        metavar="DIR",
        help="keep the run folders under DIR (default: a temporary "
        "folder, deleted at the end); re-running into the same DIR resumes/reuses finished blocks",
    )
    p.add_argument("--skip-train", action="store_true", help="skip the MNIST-1D lens")
    p.add_argument("--skip-nqm", action="store_true", help="skip the NQM lens")
    p.add_argument(
        "--search",
        action="store_true",
        help="the search protocol (configs/train_*_search_cpu.yaml): hyperparameters searched "
        "per batch size, pilot target, ordering verdict per workload",
    )
    p.add_argument(
        "--workloads", default="linreg,mnist1d", help="--search: comma-separated workloads"
    )
    p.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="--search: a config override for every workload (repeatable), e.g. grid.seeds=[0,1,2]",
    )
    args = p.parse_args(argv)
    if args.search:
        return run_search(args)
    if args.skip_train and args.skip_nqm:
        p.error("--skip-train and --skip-nqm together leave nothing to run")

    import jax

    from cbs.analysis import compare_runs

    dev = jax.devices()[0]
    print(
        f"device: {dev.platform} ({dev.device_kind}) x {jax.device_count()}, jax {jax.__version__}, "
        f"{os.cpu_count()} CPU cores visible, python {platform.python_version()}, host {platform.node()}"
    )
    mode = "quick" if args.quick else "full"
    base = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="optimizer_cbs_"))
    base.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    lenses = []  # (lens, run_dir, result keys, seconds)
    try:
        if not args.skip_nqm:
            d = base / f"nqm_{mode}"
            _, dt = run_lens("nqm", NQM_CONFIG, NQM_QUICK if args.quick else [], d)
            lenses.append(("nqm", d, NQM_KEYS, dt))
        if not args.skip_train:
            d = base / f"mnist1d_{mode}"
            _, dt = run_lens("mnist1d", TRAIN_CONFIG, TRAIN_QUICK if args.quick else [], d)
            lenses.append(("mnist1d", d, TRAIN_KEYS, dt))

        # Analysis: each run folder gets its own cbs.json / report.md; the side-by-side table
        # goes to the base folder. Timed separately and added to each lens's wall time.
        t0 = time.perf_counter()
        cmp = compare_runs([d for _, d, _, _ in lenses], out=base)
        t_analysis = time.perf_counter() - t0
        print(f"analysis (bootstrap fits + files for {len(lenses)} runs) in {t_analysis:.1f} s")

        result, times = {}, {}
        for (lens, _d, keys, dt), a in zip(lenses, cmp.runs):
            t_lens = time.perf_counter()
            print()
            print(
                f"== {lens} lens: {a.label} ({a.unit}; McCandlish fit, {a.options.get('n_boot')} bootstrap "
                f"resamples, B* with delta={a.summary['delta'].iloc[0]:g}, B0={fmt(a.summary['b0'].iloc[0])}) =="
            )
            s = a.summary.set_index("optimizer")
            ref = s.loc["sgd"] if "sgd" in s.index else None
            header = [
                "optimizer",
                "B_crit",
                "B_crit 95% CI",
                "S_min",
                "S_min 95% CI",
                "B*",
                "knee",
                "CI overlaps SGD's",
                "seeds",
                "bootstrap",
                "unproven pts",
                "edge B",
                "warnings",
            ]
            rows = []
            for name, r in s.iterrows():
                ov = "-" if ref is None or name == "sgd" else ("yes" if overlaps(r, ref) else "no")
                rows.append(
                    [
                        name,
                        fmt(r.b_crit),
                        f"[{fmt(r.b_crit_ci_low)}, {fmt(r.b_crit_ci_high)}]",
                        fmt(r.s_min),
                        f"[{fmt(r.s_min_ci_low)}, {fmt(r.s_min_ci_high)}]",
                        fmt(r.b_star),
                        fmt(r.knee),
                        ov,
                        str(int(r.n_seeds)),
                        str(r.bootstrap),
                        str(int(r.get("n_inexact_points", 0))),
                        str(int(r.get("n_edge_points", 0))),
                        str(int(r.n_warnings)),
                    ]
                )
                if name in keys:
                    result[keys[name]] = r.b_crit
            widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
            for row in [header, ["-" * w for w in widths], *rows]:
                print("  ".join(c.rjust(w) for c, w in zip(row, widths)))
            for name, fit in a.fits.items():
                for w in fit.warnings:
                    print(f"  note {name}: {w}")
            if (
                lens == "nqm"
                and "kfaclike_p1" in s.index
                and not math.isfinite(float(s.loc["kfaclike_p1"].b_crit))
            ):
                print(
                    "  note kfaclike_p1: P = H with C = H is perfectly conditioned: S halves with every doubling "
                    "of B down to 1 step, so there is no finite CBS; kfaclike_p0.75 is the K-FAC-like figure."
                )
            timing = Path(d) / "timing.parquet"
            if timing.exists():
                import pandas as pd

                tm = pd.read_parquet(timing)
                frac = tm["replay_seconds"].sum() / tm["seconds"].sum()
                result[f"{lens}_replay_frac"] = frac
                print(
                    f"  exact-crossing replays: {int(tm['replayed_cells'].sum())} cells, "
                    f"{tm['replay_seconds'].sum():.1f} s of {tm['seconds'].sum():.1f} s block time ({frac:.1%})"
                )
            times[lens] = dt + t_analysis / len(lenses) + (time.perf_counter() - t_lens)
            print(
                f"{lens} wall time: {times[lens]:.1f} s (sweep {dt:.1f} s incl. compilation + share of analysis)"
            )
        total = time.perf_counter() - t_all
        print()
        print(
            f"run folders: {base}"
            + ("" if args.out else " (temporary, deleted; pass --out DIR to keep)")
        )
        print(f"total wall time {total:.1f} s ({mode})")
        parts = [f"{k}={fmt(v).replace(' ', '')}" for k, v in result.items()]
        if "nqm" in times:
            parts.append(f"nqm_s={times['nqm']:.1f}")
        if "mnist1d" in times:
            parts.append(f"train_s={times['mnist1d']:.1f}")
        parts.append(f"total_s={total:.1f}")
        print("RESULT " + " ".join(parts))
    finally:
        if not args.out:
            shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
