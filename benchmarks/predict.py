"""Validate cbs.predict: forecast each workload's S(B) and B_crit *before* sweeping it, then
sweep it (>= 3 seeds) and compare.

Workloads (the shipped CPU configs, seeds overridden to 0, 1, 2):
  linreg   configs/train_linreg_cpu.yaml      (noisy linear regression: the NQM's twin)
  digits   configs/train_digits_cpu.yaml      (scikit-learn digits, 1-hidden-layer MLP)
  mnist1d  configs/train_mnist1d_mlp_cpu.yaml (MNIST-1D, 2-hidden-layer MLP)

Per workload and optimizer: forecast B_crit / measured B_crit (the measured one is the
analysis's McCandlish fit over seeds, with its 95% seed-bootstrap interval), and the same
ratio for B_simple and B_noise measured at initialisation. Cost, against the full sweep's wall
time (same run, same machine): marginal = measurement + forecast (the anchor blocks are the
sweep's own: predict trains them in the sweep's folder and the sweep reuses them), and total =
marginal + anchor blocks. The full sweep's time = the sweep run after predict + the anchor blocks.

  python benchmarks/predict.py            # SGD, momentum, Adam; every batch size of the configs
  python benchmarks/predict.py --quick    # SGD only, every other batch size (power of 4), no ablations

Ends with ``RESULT linreg_ratio=... digits_ratio=... mnist1d_ratio=... linreg_inside_ci=yes|no
bsimple_digits_ratio=... bsimple_mnist1d_ratio=...`` (ratios = forecast / measured B_crit, SGD).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WORKLOADS = {
    "linreg": "configs/train_linreg_cpu.yaml",
    "digits": "configs/train_digits_cpu.yaml",
    "mnist1d": "configs/train_mnist1d_mlp_cpu.yaml",
}


def _overrides(quick: bool, cfg_raw: dict) -> list[str]:
    ov = ["grid.seeds=[0,1,2]"]
    opts = cfg_raw["grid"]["optimizers"]
    keep = [o for o in opts if o["kind"] in (("sgd",) if quick else ("sgd", "momentum", "adam"))]
    import yaml

    ov.append("grid.optimizers=" + yaml.safe_dump(keep, default_flow_style=True).strip())
    if quick:
        bs = cfg_raw["grid"]["batch_sizes"]
        ov.append(
            "grid.batch_sizes=" + yaml.safe_dump(dict(bs, step=2), default_flow_style=True).strip()
        )
    return ov


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument(
        "--out", default="runs/bench_predict", help="run folders go here (cleared first)"
    )
    ap.add_argument("--only", default=None, help="comma-separated workloads")
    ap.add_argument(
        "--resume",
        action="store_true",
        help="keep a finished sweep in the folder: forecast over it (anchor read from it, its "
        "block time from the timing table) instead of forecasting first and sweeping",
    )
    ap.add_argument(
        "--ablations",
        choices=("on", "off"),
        default=None,
        help="the two NQM ablations (C, m0 at init; all at init): default on, off with --quick "
        "(they retrain the anchor cell and forecast twice more; the RESULT line needs neither)",
    )
    ap.add_argument(
        "--start",
        choices=("displacement", "loss-drop"),
        default="displacement",
        help="cbs.predict's --start (the NQM's start: measured displacement, or rescaled to the "
        "measured loss drop)",
    )
    args = ap.parse_args()
    ablations = (args.ablations or ("off" if args.quick else "on")) == "on"

    import jax
    import numpy as np

    from cbs.predict import PredictOptions, predict
    from cbs.predict._run import sweep_is_finished
    from cbs.sweep.config import load_config, read_yaml
    from cbs.sweep.runner import run_sweep

    load = os.getloadavg()[0]
    print(
        f"device: {jax.devices()[0].device_kind} x{jax.device_count()} ({jax.default_backend()}), "
        f"jax {jax.__version__}, load {load:.1f} on {os.cpu_count()} cores"
    )
    out_root = Path(args.out) / ("quick" if args.quick else "full")
    results, rows = {}, []
    names = args.only.split(",") if args.only else list(WORKLOADS)
    t_all = time.perf_counter()
    for w in names:
        path = ROOT / WORKLOADS[w]
        out = out_root / w
        cfg = load_config(
            path,
            _overrides(args.quick, read_yaml(path)) + [f"output.dir={out}", "output.plots=false"],
        )
        if args.resume and sweep_is_finished(cfg):
            pre = predict(cfg, PredictOptions(start=args.start), plots=False, log=lambda s: None)
            sweep_s, rest_s = pre.costs["sweep_s"], float("nan")
        else:
            if out.exists():
                shutil.rmtree(out)
            # 1. forecast before the sweep: measurement + the anchor blocks (trained in the
            #    sweep's folder) + NQM.
            t_pre = time.perf_counter()
            pre = predict(cfg, PredictOptions(start=args.start), plots=False, log=lambda s: None)
            pre_wall = time.perf_counter() - t_pre
            # 2. the sweep itself (its anchor blocks are already there: skipped).
            t0 = time.perf_counter()
            run_sweep(cfg, progress=False, log=lambda s: None)
            rest_s = time.perf_counter() - t0
            sweep_s = rest_s + pre.costs["anchor_s"]
        t_post = time.perf_counter()
        # 3. overlay (anchor read from the finished sweep: the same numbers, no training), and
        #    two ablations: curvature and start at init with the noise at the target; all at init.
        post = predict(
            cfg,
            PredictOptions(start=args.start),
            measurement=pre.measurement,
            target_measurement=pre.calibrated_on,
            log=lambda s: None,
        )
        abl = {"init_noise_target": {}, "all_init": {}}
        for label, o in (
            ("init_noise_target", PredictOptions(measure_at="init", start=args.start)),
            ("all_init", PredictOptions(measure_at="init", noise_at="init")),
        )[: 2 if ablations else 0]:
            abl[label] = predict(
                cfg,
                o,
                measurement=pre.measurement,
                plots=False,
                log=lambda s: None,
                out_dir=out / f"ablation_{label}",
            ).summary.set_index("optimizer")["ratio"]
        post_s = time.perf_counter() - t_post
        print(
            f"\n== {w}: {path.relative_to(ROOT)} {' '.join(_overrides(args.quick, read_yaml(path)))}"
        )
        print(post.text.rsplit("\ncost:", 1)[0])
        marginal = pre.costs["measure_s"] + pre.costs["forecast_s"]
        own = marginal + pre.costs["anchor_s"]
        print(
            f"cost: measurement {pre.costs['measure_s']:.1f} s + forecast {pre.costs['forecast_s']:.1f} s "
            f"= {marginal:.1f} s marginal ({100 * marginal / sweep_s:.1f}% of the full sweep); + anchor "
            f"blocks {pre.costs['anchor_s']:.1f} s ({pre.costs['anchor_source']}) = {own:.1f} s total "
            f"({100 * own / sweep_s:.1f}%); full sweep {sweep_s:.1f} s"
            + (
                f" = {rest_s:.1f} s run after predict + the anchor blocks"
                if np.isfinite(rest_s)
                else ""
            )
        )
        if np.isfinite(rest_s):
            print(
                f"benchmark wall: predict {pre_wall:.1f} s, rest of the sweep {rest_s:.1f} s, "
                f"overlay + ablations {post_s:.1f} s"
            )
        results[w] = post.summary.set_index("optimizer")
        for r in post.summary.itertuples():
            rows.append(
                (
                    w,
                    r.optimizer,
                    r.b_crit_forecast,
                    r.b_crit_measured,
                    r.b_crit_measured_lo,
                    r.b_crit_measured_hi,
                    r.ratio,
                    r.b_simple_ratio,
                    r.b_noise_ratio,
                    abl["init_noise_target"].get(r.optimizer, np.nan),
                    abl["all_init"].get(r.optimizer, np.nan),
                    r.precond_power,
                    marginal,
                    own,
                    sweep_s,
                )
            )

    print(
        "\n| workload | optimizer | B_crit forecast | measured [95% CI] | forecast/measured | "
        "B_simple/measured | B_noise/measured | ablation: C, m0 at init | ablation: all at init | p | "
        "predict cost marginal / total / full sweep |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    f = lambda x: "-" if x is None or not np.isfinite(x) else f"{x:.3g}"
    for w, o, bf, bm, lo, hi, r, rs, rn, a1, a2, p, marg, own, sw in rows:
        print(
            f"| {w} | {o} | {f(bf)} | {f(bm)} [{f(lo)}, {f(hi)}] | {f(r)} | {f(rs)} | {f(rn)} | {f(a1)} | "
            f"{f(a2)} | {f(p)} | {marg:.0f} s ({100 * marg / sw:.1f}%) / {own:.0f} s ({100 * own / sw:.0f}%) / "
            f"{sw:.0f} s |"
        )

    def get(w, col):
        try:
            return float(results[w].loc["sgd", col])
        except KeyError:
            return float("nan")

    inside = results.get("linreg") is not None and bool(results["linreg"].loc["sgd", "inside_ci"])
    import resource

    ru = resource.getrusage(resource.RUSAGE_SELF)
    print(
        f"\ntotal {time.perf_counter() - t_all:.0f} s wall, {ru.ru_utime + ru.ru_stime:.0f} s CPU "
        f"(this process, all threads); load {load:.1f} at the start, {os.getloadavg()[0]:.1f} at "
        f"the end; git {_git()}"
    )
    print(
        f"RESULT linreg_ratio={get('linreg', 'ratio'):.3g} digits_ratio={get('digits', 'ratio'):.3g} "
        f"mnist1d_ratio={get('mnist1d', 'ratio'):.3g} linreg_inside_ci={'yes' if inside else 'no'} "
        f"bsimple_digits_ratio={get('digits', 'b_simple_ratio'):.3g} "
        f"bsimple_mnist1d_ratio={get('mnist1d', 'b_simple_ratio'):.3g}"
    )
    return 0


def _git() -> str:
    try:
        return subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
    except OSError:
        return "?"


if __name__ == "__main__":
    sys.exit(main())
