"""Diagnose cbs.predict on an MLP with SGD: the calibrated NQM's ingredients against direct
measurements on the network, at several points of training, and the forecast S(B) against
the measured one point by point.

Needs a finished SGD sweep of the config (e.g. the folder ``benchmarks/predict.py --quick
--only digits`` leaves: ``--sweep /tmp/bpq/quick/digits``); its per-batch-size steps and best
LRs are the measured S(B), and its anchor (smallest batch size) and largest batch size give
the training runs measured along the way.

Points measured (GGN curvature or ``--curvature hessian``, float64, ``--examples`` training examples):
  init          theta_0
  anchor@T/4, anchor@T/2, anchor@T
                the anchor's best cell (smallest B, its best LR) after T/4, T/2, T steps,
                T = its steps to the target (anchor@T is what predict calibrates on)
  large@T       the largest batch size's best cell after its own steps to the target

Per point: loss, top-k eigenvalues (Lanczos) and their power-law fit h_i ~ h_1 i^-s, the
bulk's trace and count from stochastic Lanczos quadrature against that fit's extrapolation,
tr Sigma, B_simple, B_noise, the noise along each top eigenvector c_i = v_i^T Sigma v_i
against the NQM's bulk rule c = kappa h (C proportional to H), the share of the displacement
|theta_0 - theta|^2 that lies in the top directions. Forecasts (same anchor, same code as
cbs.predict): the NQM calibrated at each point, and at anchor@T with the top directions'
measured noise replaced by C = kappa H (the textbook NQM assumption).

  python benchmarks/predict_diagnosis.py --sweep /tmp/bpq/quick/digits
  python benchmarks/predict_diagnosis.py --config configs/train_mnist1d_mlp_cpu.yaml \
      --sweep /tmp/bpq/quick/mnist1d

Writes diagnosis.json, diagnosis_sb.csv and diagnosis.png into --out; ends with a RESULT line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


LR_NOISE = "anchor@T, noise scaled to the anchor's best LR"


def _power_law(top_h):
    """Least-squares fit of log h_i = log a - s log i over the top-k: (a, s)."""
    import numpy as np

    i = np.arange(1, len(top_h) + 1)
    ok = top_h > 0
    s, loga = np.polyfit(np.log(i[ok]), np.log(top_h[ok]), 1)
    return float(np.exp(loga)), float(-s)


def _bulk_vs_fit(meas, a, s):
    """SLQ's eigenvalue count and trace below h_k against the power law's extrapolation
    i = k+1 .. d (the fit says h_i = a i^-s there)."""
    import numpy as np

    k = len(meas.top_h)
    nodes = meas.slq_nodes.ravel()
    mass = meas.dim * meas.slq_weights.ravel() / meas.slq_weights.shape[0]
    below = nodes < meas.top_h[-1] * (1 - 1e-6)
    i = np.arange(k + 1, meas.dim + 1, dtype=np.float64)
    fit_h = a * i**-s
    thresholds = meas.top_h[0] * np.array([1e-2, 1e-3, 1e-4])
    count_slq = [float(mass[below & (nodes > t)].sum()) for t in thresholds]
    count_fit = [float(np.sum(fit_h > t)) for t in thresholds]
    return {
        "bulk_trace_slq": float(np.sum(mass[below] * nodes[below])),
        "bulk_trace_fit": float(fit_h.sum()),
        "thresholds_rel_h1": [1e-2, 1e-3, 1e-4],
        "count_above_slq": count_slq,
        "count_above_fit": count_fit,
        "trace_total_slq": float(np.sum(mass * nodes)),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/train_digits_cpu.yaml")
    ap.add_argument("--sweep", required=True, help="a finished SGD sweep folder of the config")
    ap.add_argument("--out", default="runs/predict_diagnosis")
    ap.add_argument("--examples", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--curvature", choices=("ggn", "hessian"), default="ggn")
    args = ap.parse_args()

    import jax
    import numpy as np
    import pandas as pd

    from cbs.analysis import analyze_run, fit_critical_batch_size
    from cbs.predict import PredictOptions, forecast, nqm_from_measurement
    from cbs.predict._run import _hparams, _measure_settings, _network, _train_to
    from cbs.sweep.config import load_config
    from cbs.train.backend import TrainBackend, train_size
    from cbs.train.spectrum import measure

    load0 = os.getloadavg()[0]
    t_all = time.perf_counter()
    sweep = Path(args.sweep)
    from cbs.analysis._tables import read_run_config

    cfg = load_config(read_run_config(sweep))  # the sweep's own resolved config
    entry = next(e for e in cfg.grid.optimizers if e.kind == "sgd")
    an = analyze_run(sweep, write=False, plots=False)
    pb = an.per_batch[an.per_batch.optimizer == entry.label].set_index("batch_size")
    fit_m = an.fits[entry.label]
    batch_sizes = np.array(sorted(pb.index), np.float64)
    anchor, large = int(batch_sizes[0]), int(batch_sizes[-1])
    a_steps, a_lr = float(pb.loc[anchor, "steps"]), float(pb.loc[anchor, "best_lr"])
    l_steps, l_lr = float(pb.loc[large, "steps"]), float(pb.loc[large, "best_lr"])
    hp = _hparams(entry, pb.loc[anchor])
    backend = TrainBackend(cfg)
    n_train = train_size(cfg.section)
    opts = PredictOptions(examples=args.examples, curvature=args.curvature)
    apply, loss, flatten, x, y = _network(backend, args.seed, opts.examples)
    theta0 = flatten(backend.problem.init_params(args.seed))
    ta = int(np.ceil(a_steps))
    points = {
        "init": None,
        "anchor@T/4": (a_lr, anchor, max(ta // 4, 1)),
        "anchor@T/2": (a_lr, anchor, max(ta // 2, 1)),
        "anchor@T": (a_lr, anchor, ta),
        "large@T": (l_lr, large, int(np.ceil(l_steps))),
    }
    print(
        f"device {jax.devices()[0].device_kind}, load {load0:.1f} on {os.cpu_count()} cores; "
        f"{cfg.name}: anchor B={anchor} lr={a_lr:g} steps={a_steps:g}; large B={large} "
        f"lr={l_lr:g} steps={l_steps:g}; measured B_crit {fit_m.b_crit:.3g} "
        f"[{fit_m.b_crit_ci[0]:.3g}, {fit_m.b_crit_ci[1]:.3g}]"
    )
    meas, rows = {}, {}
    for name, cell in points.items():
        t0 = time.perf_counter()
        if cell is None:
            theta = theta0
            m = measure(apply, loss, theta, x, y, **_measure_settings(opts, args.seed))
        else:
            lr, b, steps = cell
            theta = flatten(_train_to(backend, entry, hp, lr, b, steps, args.seed))
            m = measure(
                apply,
                loss,
                theta,
                x,
                y,
                **_measure_settings(opts, args.seed),
                displacement=np.asarray(theta0 - theta),
            )
        meas[name] = m
        a, s = _power_law(m.top_h)
        cal = nqm_from_measurement(m)
        ratio = m.top_var / m.top_h  # c_i / h_i; C = kappa H says: kappa for every i
        r = {
            "seconds": time.perf_counter() - t0,
            "loss": m.loss,
            "h_max": float(m.top_h[0]),
            "h_k": float(m.top_h[-1]),
            "lr_edge_2_over_hmax": 2.0 / float(m.top_h[0]),
            "power_law_a": a,
            "power_law_s": s,
            **_bulk_vs_fit(m, a, s),
            "trace_sigma": m.trace_sigma,
            "grad_sq": m.grad_sq,
            "b_simple": m.b_simple,
            "b_noise": m.b_noise,
            "kappa_bulk": cal.kappa,
            "c_over_h_top_median": float(np.median(ratio)),
            "c_over_h_top_min": float(ratio.min()),
            "c_over_h_top_max": float(ratio.max()),
            "noise_share_top": float(m.top_var.sum() / m.trace_sigma),
            "top_h": m.top_h.tolist(),
            "top_c": m.top_var.tolist(),
        }
        if m.disp_sq is not None:
            r["disp_sq"] = m.disp_sq
            r["disp_share_top"] = float(np.sum(m.disp_proj**2) / m.disp_sq)
            r["disp_top"] = (m.disp_proj**2).tolist()
            r["nqm_initial_risk"] = float(cal.problem.initial_risk)
        rows[name] = r
        print(
            f"{name:>11}: {r['seconds']:5.1f} s loss {m.loss:.3g} h_max {r['h_max']:.3g} "
            f"(2/h_max {r['lr_edge_2_over_hmax']:.3g}) s {s:.2f} trS {m.trace_sigma:.3g} "
            f"|G|^2 {m.grad_sq:.3g} B_simple {m.b_simple:.3g} B_noise {m.b_noise:.3g} "
            f"c/h top [{r['c_over_h_top_min']:.3g}, {r['c_over_h_top_median']:.3g}, "
            f"{r['c_over_h_top_max']:.3g}] vs kappa_bulk {cal.kappa:.3g}; noise in top "
            f"{100 * r['noise_share_top']:.0f}%"
            + (
                f"; |delta|^2 {m.disp_sq:.3g}, in top {100 * r['disp_share_top']:.1f}%"
                if m.disp_sq is not None
                else ""
            )
        )

    # Forecasts with predict's own calibration and anchor, from each point and variant.
    def one_forecast(m, start_risk=None, anchor_lr=None):
        cal = nqm_from_measurement(m, start_risk=start_risk)
        fc = forecast(
            cal.problem,
            "sgd",
            0.0,
            0.0,
            batch_sizes,
            anchor,
            a_steps,
            num_train=n_train,
            anchor_lr=anchor_lr,
        )
        fit = fit_critical_batch_size(batch_sizes, fc.steps, n_boot=0)
        return fc, fit, cal

    m_t = meas["anchor@T"]
    kappa_all = m_t.trace_sigma / _bulk_vs_fit(m_t, *_power_law(m_t.top_h))["trace_total_slq"]
    variants = {
        "anchor@T (predict's default)": m_t,
        "anchor@T, C = kappa H in the top too": dataclasses.replace(
            m_t, top_var=kappa_all * m_t.top_h
        ),
        "anchor@T/2": meas["anchor@T/2"],
        "large@T": meas["large@T"],
    }
    sb = pd.DataFrame(
        {
            "batch_size": batch_sizes.astype(int),
            "steps_measured": pb.loc[batch_sizes.astype(int), "steps"].to_numpy(),
            "best_lr_measured": pb.loc[batch_sizes.astype(int), "best_lr"].to_numpy(),
        }
    )
    drop = meas["init"].loss - m_t.loss  # the loss the anchor run descended (same examples)
    variants["anchor@T, start = measured loss drop"] = m_t
    variants[LR_NOISE] = m_t
    variants["anchor@T, both"] = m_t
    keys = {
        "anchor@T, C = kappa H in the top too": "anchor@T_C=kH",
        "anchor@T, start = measured loss drop": "anchor@T_drop",
        LR_NOISE: "anchor@T_lrnoise",
        "anchor@T, both": "anchor@T_both",
    }
    fc_rows = {}
    for label, m in variants.items():
        scaled = "loss drop" in label or "both" in label
        lr_match = "best LR" in label or "both" in label
        fc, fit, cal = one_forecast(m, drop if scaled else None, a_lr if lr_match else None)
        key = keys.get(label, label.split(" ")[0])
        sb[f"steps_{key}"] = fc.steps
        sb[f"lr_{key}"] = fc.nqm_lr
        fc_rows[label] = {
            "b_crit": fit.b_crit,
            "s_min": fit.s_min,
            "ratio": fit.b_crit / fit_m.b_crit,
            "nqm_target": fc.target,
            "h_max": float(m.top_h[0]),
            "nqm_initial_risk": float(cal.problem.initial_risk),
            "noise_scale": fc.noise_scale,
        }
        print(
            f"forecast [{label}]: B_crit {fit.b_crit:.3g} (x{fit.b_crit / fit_m.b_crit:.2f}), "
            f"S_min {fit.s_min:.3g}, NQM target {fc.target:.3g}, noise x{fc.noise_scale:.3g}"
        )
    print("\nS(B) point by point (measured vs forecasts; lr = best measured / NQM-tuned LR):")
    with pd.option_context("display.width", 200, "display.max_columns", 30):
        print(sb.round(3).to_string(index=False))

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sb.to_csv(out / "diagnosis_sb.csv", index=False)
    report = {
        "config": cfg.name,
        "examples": args.examples,
        "anchor": {"batch": anchor, "lr": a_lr, "steps": a_steps},
        "large": {"batch": large, "lr": l_lr, "steps": l_steps},
        "measured_b_crit": [fit_m.b_crit, *fit_m.b_crit_ci],
        "measured_s_min": fit_m.s_min,
        "points": rows,
        "forecasts": fc_rows,
        "load": [load0, os.getloadavg()[0]],
    }
    (out / "diagnosis.json").write_text(json.dumps(report, indent=1, default=float))
    _plot(out / "diagnosis.png", rows, sb, fit_m)
    print(
        f"\ntotal {time.perf_counter() - t_all:.0f} s; load {load0:.1f} at the start, "
        f"{os.getloadavg()[0]:.1f} at the end; files in {out}"
    )
    d = fc_rows["anchor@T (predict's default)"]
    print(
        f"RESULT measured_bcrit={fit_m.b_crit:.3g} forecast_ratio={d['ratio']:.3g} "
        f"ratio_C_kH={fc_rows['anchor@T, C = kappa H in the top too']['ratio']:.3g} "
        f"ratio_half={fc_rows['anchor@T/2']['ratio']:.3g} ratio_large={fc_rows['large@T']['ratio']:.3g} "
        f"ratio_start_drop={fc_rows['anchor@T, start = measured loss drop']['ratio']:.3g} "
        f"ratio_lr_noise={fc_rows[LR_NOISE]['ratio']:.3g} "
        f"ratio_both={fc_rows['anchor@T, both']['ratio']:.3g} "
        f"hmax_init={rows['init']['h_max']:.3g} hmax_T={rows['anchor@T']['h_max']:.3g} "
        f"hmax_large={rows['large@T']['h_max']:.3g} best_lr_large={l_lr:.3g}"
    )
    return 0


def _plot(path, rows, sb, fit_m):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(2, 2, figsize=(11, 8))
    for name, r in rows.items():
        h = np.asarray(r["top_h"])
        i = np.arange(1, len(h) + 1)
        (line,) = ax[0, 0].loglog(i, h, "o", ms=3, label=name)
        ax[0, 0].loglog(i, r["power_law_a"] * i ** -r["power_law_s"], "-", color=line.get_color())
        ax[0, 1].loglog(
            h, np.asarray(r["top_c"]) / h, "o-", ms=3, color=line.get_color(), label=name
        )
        ax[0, 1].axhline(r["kappa_bulk"], ls=":", color=line.get_color())
    ax[0, 0].set(
        xlabel="index i", ylabel="GGN eigenvalue h_i", title="top-k (dots) and power-law fit"
    )
    ax[0, 1].set(
        xlabel="h_i",
        ylabel="c_i / h_i",
        title="noise along top eigenvectors / h (dotted: bulk kappa)",
    )
    ax[0, 0].legend(fontsize=7)
    b = sb["batch_size"]
    ax[1, 0].loglog(b, sb["steps_measured"], "ko-", lw=2, label="measured")
    for col in [c for c in sb.columns if c.startswith("steps_") and c != "steps_measured"]:
        ax[1, 0].loglog(b, sb[col], ".--", label=col[6:])
    ax[1, 0].set(xlabel="batch size", ylabel="steps to target", title="S(B) measured vs forecasts")
    ax[1, 0].legend(fontsize=7)
    ax[1, 1].loglog(b, sb["best_lr_measured"], "ko-", lw=2, label="measured best LR")
    for col in [c for c in sb.columns if c.startswith("lr_")]:
        ax[1, 1].loglog(b, sb[col], ".--", label=col[3:])
    for r in rows.values():
        ax[1, 1].axhline(r["lr_edge_2_over_hmax"], ls=":", lw=0.8, color="gray")
    ax[1, 1].set(xlabel="batch size", ylabel="LR", title="best LR (dotted: 2/h_max at each point)")
    ax[1, 1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
