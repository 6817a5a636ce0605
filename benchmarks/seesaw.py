"""Batch ramps at equal samples: Seesaw against the LR decay it replaces, in both lenses.

* **NQM** (exact expected risk, the paper's default problem: h_i = 1/i, d = 10^4, C = H,
  B0 = 64, LR 0.25, a step decay halving the LR every 2,000 steps four times, 10,000
  steps): the decay against its Seesaw ramp with q = 0 (the SGD rule: the LR stays, the
  batch doubles) and q = 1/2 (the 1/sqrt(2) rule), with plain SGD (p = 0) and with the
  preconditioned update P = H^0.5 (p = 0.5). Risk ratio ramp / decay at the end of every
  base phase at equal samples; exact serial steps to the target (the decay's final risk
  x 1.05).
* **Linear regression, SGD** (``configs/seesaw_linreg_cpu.yaml``): the decay and its Seesaw
  ramp, 3 seeds, evaluated every step; final validation loss at equal samples (mean and the
  seeds' range), serial steps to the target (1.01 x the worst final loss of either schedule,
  so that every run reaches it).
* **Tiny LM, Adam** (full mode only, ``configs/seesaw_tiny_lm_cpu.yaml``): cosine decay and
  its Seesaw ramp (q = 1/2), capped at max_batch_size, the same measures.

The comparisons are at equal samples: the ramp's loss is read at the step at which it has
consumed as many examples as the decay run at its end (``cbs.ramps.RampPlan``).

Usage: python benchmarks/seesaw.py [--quick]
Last line: RESULT nqm_sgd_risk_ratio=... linreg_loss_rel=... linreg_step_saving=...
  [lm_loss_rel=... lm_step_saving=...] (loss_rel: ramp final loss / decay final loss at equal
  samples - 1, seed means; step_saving: 1 - ramp serial steps / decay serial steps to the
  target; nqm_sgd_risk_ratio: the largest ramp / decay risk ratio over the phase ends, SGD,
  q = 0).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
import warnings

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cbs import nqm  # noqa: E402
from cbs.nqm._schedules import schedule_phases  # noqa: E402
from cbs.nqm.backend import NQMSection, problem_from_section  # noqa: E402
from cbs.ramps import ramp_plan  # noqa: E402
from cbs.sweep.config import Schedule, load_config  # noqa: E402

warnings.filterwarnings("ignore", message="Some donated buffers were not usable")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def equal_samples_step(plan, samples: float) -> int:
    """The first step at which the ramp has consumed ``samples`` examples."""
    t = np.arange(int(plan.steps.sum()) + 1)
    return int(np.searchsorted(plan.samples_after(t), samples - 1e-9))


def nqm_lens() -> tuple[list[dict], float]:
    prob = problem_from_section(NQMSection(dim=10_000))
    B, lr, T = 64, 0.25, 10_000
    bounds = [2000, 4000, 6000, 8000]
    dec = Schedule(kind="step", boundaries=bounds, decay_factor=0.5)
    ends = np.array(bounds + [T])
    p_dec, _ = schedule_phases(dec, T)
    rows, sgd_ratio = [], np.nan
    for power in (0.0, 0.5):
        r_dec = nqm.expected_risk(
            prob, "sgd", lr, 0.0, 0.0, power, batch_sizes=[B], steps=ends, phases=p_dec
        )[0, 0]
        target = 1.05 * r_dec[-1]
        s_dec = nqm.steps_to_target(
            prob,
            "sgd",
            lr,
            0.0,
            0.0,
            power,
            batch_size=B,
            target=target,
            max_steps=T,
            phases=p_dec,
        )[0, 0]
        for q in (0.0, 0.5):
            see = dataclasses.replace(dec, seesaw=True, seesaw_q=q)
            plan = ramp_plan(see, B, T, kind="sgd")
            p_see, _ = schedule_phases(see, T, batch_size=B)
            at = np.array([equal_samples_step(plan, e * B) for e in ends])
            r_see = nqm.expected_risk(
                prob, "sgd", lr, 0.0, 0.0, power, batch_sizes=[B], steps=at, phases=p_see
            )[0, 0]
            s_see = nqm.steps_to_target(
                prob,
                "sgd",
                lr,
                0.0,
                0.0,
                power,
                batch_size=B,
                target=target,
                max_steps=T,
                phases=p_see,
            )[0, 0]
            ratio = r_see / r_dec
            if power == 0 and q == 0:
                sgd_ratio = float(ratio.max())
            rows.append(
                dict(
                    p=power,
                    q=q,
                    ratios=ratio,
                    steps_equal=int(at[-1]),
                    steps_dec_target=s_dec,
                    steps_see_target=s_see,
                    target=target,
                )
            )
    return rows, sgd_ratio


def train_lens(path: str, eval_every: int | None = None) -> dict:
    """Runs the config's two entries (decay first, ramp second) on the train back end."""
    from cbs.sweep.grid import expand_blocks
    from cbs.train.backend import TrainBackend

    raw = __import__("yaml").safe_load(open(path))
    raw["budget"]["eval_every"] = eval_every or raw["budget"]["eval_every"]
    cfg = load_config(raw)
    # a target no cell reaches, so that every curve runs to the budget (a finite validation
    # set can fall below the Bayes risk, which the config's check would not allow)
    cfg = dataclasses.replace(cfg, target=dataclasses.replace(cfg.target, value=-1.0))
    blocks = expand_blocks(cfg, TrainBackend)
    T = cfg.budget.max_steps
    B = blocks[0].batch_size
    out = {}
    for i, block in enumerate(blocks):
        plan = ramp_plan(
            block.schedule,
            block.batch_size,
            T,
            kind=block.kind,
            tokens_per_example=cfg.analysis.tokens_per_example,
        )
        # the ramp runs until it has consumed the decay's examples (its plan up to there is
        # the same as with the whole budget), so that the wall-clock times compare equal data
        steps = T if i == 0 else equal_samples_step(plan, T * B)
        run_cfg = dataclasses.replace(cfg, budget=dataclasses.replace(cfg.budget, max_steps=steps))
        t0 = time.perf_counter()
        res = TrainBackend(run_cfg).run_blocks([block])[0]
        wall = time.perf_counter() - t0
        out[block.optimizer] = dict(curves=res.curves, plan=plan, wall=wall, block=block)
    dec, see = list(out)
    t_eq = equal_samples_step(out[see]["plan"], T * B)

    def loss_at(name, step):  # per cell, in seed order (the blocks' cells: one LR)
        c = out[name]["curves"]
        v = c[c.step == step].groupby("cell_id").val_loss.first()
        return np.array([v[cell.cell_id] for cell in out[name]["block"].cells])

    l_dec, l_see = loss_at(dec, T), loss_at(see, t_eq)
    # a target every run reaches: 1% above the worst final loss of either schedule
    target = 1.01 * max(l_dec.max(), l_see.max())

    def steps_to(name):
        c = out[name]["curves"]
        s = []
        for cell in out[name]["block"].cells:
            g = c[(c.cell_id == cell.cell_id) & (c.step > 0)]
            s.append(
                float(g[g.val_loss < target].step.min()) if (g.val_loss < target).any() else np.nan
            )
        return np.array(s)

    s_dec, s_see = steps_to(dec), steps_to(see)
    return dict(
        decay=dec,
        ramp=see,
        B=B,
        T=T,
        t_eq=t_eq,
        l_dec=l_dec,
        l_see=l_see,
        target=target,
        s_dec=s_dec,
        s_see=s_see,
        wall_dec=out[dec]["wall"],
        wall_see=out[see]["wall"],
        phases=out[see]["plan"].batch_phases(),
    )


def noise_ramp_lens(path: str, eval_every: int, cap: int) -> dict:
    """A ramp that follows the measured gradient noise scale, from a pilot run.

    The pilot trains the decay entry's cells at a constant LR and batch B0 with
    ``train.noise_scale`` on (B_simple = tr(Sigma) / |G|^2, EMA 0.9, every evaluation). The
    ramp doubles the batch at the first sample count where the seeds' mean B_simple exceeds
    the current batch, up to ``cap``; the LR follows the Seesaw rule of the kind (q = 0 for
    SGD: unchanged). It is then trained (an explicit ``schedule.ramp``) to the pilot's
    samples and compared at equal samples. A pilot-then-ramp design, not an online rule: the
    ramp's doublings come from the pilot's measurement, so the ramp is one fixed schedule
    for every seed and the cells still share one vmapped block.
    """
    from cbs.ramps import seesaw_exponent
    from cbs.sweep.config import RampPhase
    from cbs.sweep.grid import expand_blocks
    from cbs.train.backend import TrainBackend

    raw = __import__("yaml").safe_load(open(path))
    raw["budget"]["eval_every"] = eval_every
    raw["train"]["noise_scale"] = dict(enabled=True, micro_batch=16, num_micro=8, ema=0.9)
    raw["grid"]["optimizers"] = [dict(raw["grid"]["optimizers"][0], name="pilot")]
    raw["grid"]["optimizers"][0]["schedule"] = {"kind": "constant"}
    cfg = load_config(raw)
    cfg = dataclasses.replace(cfg, target=dataclasses.replace(cfg.target, value=-1.0))
    T = cfg.budget.max_steps
    (block,) = expand_blocks(cfg, TrainBackend)
    B = block.batch_size
    t0 = time.perf_counter()
    res = TrainBackend(cfg).run_blocks([block])[0]
    wall_pilot = time.perf_counter() - t0
    nt = res.tables["noise_scale"]
    b_mean = nt.groupby("step").b_simple.mean()
    phases, at, k = [], 0, 0
    for step, b in b_mean.items():
        if B * 2 ** (k + 1) > cap:
            break
        if b > B * 2**k:  # the noise scale passed the current batch: double it
            samples = step * B  # the pilot's examples at that step (constant batch B)
            if samples > at:
                phases.append(
                    RampPhase(samples - at, 2.0 ** (-seesaw_exponent(block.kind) * k), 2**k)
                )
                at = samples
            k += 1
    phases.append(RampPhase(None, 2.0 ** (-seesaw_exponent(block.kind) * k), 2**k))
    sch = Schedule(ramp=phases)
    plan = ramp_plan(sch, B, T, kind=block.kind)
    steps = equal_samples_step(plan, T * B)
    ramp_block = dataclasses.replace(block, optimizer="noise_ramp", schedule=sch)
    run_cfg = dataclasses.replace(cfg, budget=dataclasses.replace(cfg.budget, max_steps=steps))
    run_cfg = dataclasses.replace(
        run_cfg,
        section=dataclasses.replace(
            run_cfg.section,
            noise_scale=dataclasses.replace(run_cfg.section.noise_scale, enabled=False),
        ),
    )
    t0 = time.perf_counter()
    r2 = TrainBackend(run_cfg).run_blocks([ramp_block])[0]
    wall = time.perf_counter() - t0
    c = r2.curves
    loss = np.array(
        [
            c[(c.cell_id == cell.cell_id) & (c.step == steps)].val_loss.iloc[0]
            for cell in block.cells
        ]
    )
    return dict(
        phases=plan.batch_phases(),
        steps=steps,
        loss=loss,
        curves=c,
        cells=block.cells,
        wall=wall,
        wall_pilot=wall_pilot,
        b_first=float(b_mean.iloc[0]),
        b_last=float(b_mean.iloc[-1]),
    )


def _mm(x):
    return f"{np.mean(x):.5g} [{np.min(x):.5g}, {np.max(x):.5g}]"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="NQM checks and the linreg study only")
    args = ap.parse_args()
    import jax

    print(
        f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), "
        f"load {os.getloadavg()[0]:.1f}"
    )
    t_all = time.perf_counter()
    t0 = time.perf_counter()
    rows, sgd_ratio = nqm_lens()
    print(
        f"\nNQM (d = 10^4, C = H, B0 = 64, LR 0.25, 4 halvings every 2,000 steps), "
        f"{time.perf_counter() - t0:.1f} s"
    )
    print(
        "| p | q | risk ratio ramp/decay at the 5 phase ends (equal samples) | serial steps "
        "for the decay's samples (decay: 10000) | steps to target decay | ramp |"
    )
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['p']} | {r['q']} | {', '.join(f'{x:.4f}' for x in r['ratios'])} | "
            f"{r['steps_equal']} | {r['steps_dec_target']:.0f} | {r['steps_see_target']:.0f} |"
        )
    result = dict(nqm_sgd_risk_ratio=sgd_ratio)
    lenses = [("linreg", "configs/seesaw_linreg_cpu.yaml", 1)]
    if not args.quick:
        lenses.append(("lm", "configs/seesaw_tiny_lm_cpu.yaml", None))
    for key, path, every in lenses:
        t0 = time.perf_counter()
        r = train_lens(os.path.join(ROOT, path), every)
        print(
            f"\n{path} ({time.perf_counter() - t0:.1f} s): B0 = {r['B']}, ramp phases "
            f"(start, end, batch) = {r['phases']}"
        )
        print(
            "| schedule | final val loss at equal samples, mean [min, max] over seeds | "
            "serial steps for the samples | steps to target (mean) | wall s (incl. compile) |"
        )
        print("|---|---|---|---|---|")
        print(
            f"| {r['decay']} | {_mm(r['l_dec'])} | {r['T']} | {np.mean(r['s_dec']):.1f} | "
            f"{r['wall_dec']:.1f} |"
        )
        print(
            f"| {r['ramp']} | {_mm(r['l_see'])} | {r['t_eq']} | {np.mean(r['s_see']):.1f} | "
            f"{r['wall_see']:.1f} |"
        )
        print(
            f"target = 1.01 x the worst final loss of either schedule = {r['target']:.5g}; "
            f"per seed, ramp / decay final loss - 1: {np.round(r['l_see'] / r['l_dec'] - 1, 5).tolist()}"
        )
        if key == "linreg":
            t0 = time.perf_counter()
            nr = noise_ramp_lens(os.path.join(ROOT, path), every, cap=256)
            s_nr = []
            for cell in nr["cells"]:
                g = nr["curves"][(nr["curves"].cell_id == cell.cell_id) & (nr["curves"].step > 0)]
                hit = g[g.val_loss < r["target"]].step
                s_nr.append(float(hit.min()) if len(hit) else np.nan)
            print(
                f"noise-scale ramp ({time.perf_counter() - t0:.1f} s; pilot B_simple "
                f"{nr['b_first']:.3g} -> {nr['b_last']:.3g}): phases {nr['phases']}"
            )
            print(
                f"| noise-scale ramp (q = 0) | {_mm(nr['loss'])} | {nr['steps']} | "
                f"{np.mean(s_nr):.1f} | {nr['wall']:.1f} (+ pilot {nr['wall_pilot']:.1f}) |"
            )
        result[f"{key}_loss_rel"] = float(r["l_see"].mean() / r["l_dec"].mean() - 1)
        result[f"{key}_step_saving"] = float(1 - np.mean(r["s_see"]) / np.mean(r["s_dec"]))
    print(f"\ntotal {time.perf_counter() - t_all:.1f} s, load {os.getloadavg()[0]:.1f}")
    print("RESULT " + " ".join(f"{k}={v:.6g}" for k, v in result.items()))


if __name__ == "__main__":
    main()
