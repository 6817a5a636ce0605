"""NQM grid evaluation: cbs.nqm (JAX, exact, vectorized) vs the reference notebook's method
and a vectorized per-step simulation.

Grid (paper Fig. 3a, docs/nqm.md section 6): binned default problem, target 0.01, 4 powers p x 10
batch sizes x (100 SGD LRs + 100 LRs x 20 momenta). Ours (``cbs.nqm.evaluate_grid``, one
compiled program per kind) is timed

* cold: in a fresh Python process, end to end (import, problem, compile, both kinds), and
* warm: in this process after compilation (best of two).

Baselines, both NumPy float64:

* ``notebook``: the reference's procedure, per cell an integer bisection on t in [0, T_max)
  (T_max = 1e9 SGD, 1e7 momentum), each risk evaluation a batched per-bin 3x3 eigen-
  decomposition of the moment matrix + inverse + matmuls (SGD: the scalar closed form,
  with the reference's 1e-8 regulariser in the steady state, which shifts its step counts
  at tiny LRs by up to ~1e-4 relative; the script reports agreement to 0.1%). Timed on a
  random subset of cells, extrapolated linearly to the grid (no compile on this side).
* ``per-step``: the moment recurrence simulated one step at a time for ALL cells of the grid
  at once (one array update per step), the risk checked at every step; a cell drops out of
  the arrays when it crosses the target, or provably cannot reach it (non-finite or 1e12 x
  the initial risk, i.e. diverged; for SGD also when sum_b w_b min(m_b(t), m_b(inf)) >= target,
  since each stable bin's moment moves monotonically from m_b(t) to m_b(inf)). It runs the
  first ``--sim-steps`` steps for real (its first crossings are checked against ours); the
  rest is extrapolated: measured seconds per cell-step x the steps that the cells still
  running need to reach the target by our exact answer, counting nothing for cells that never
  reach it (however long such a simulation would need to give up on them). That count is a
  lower bound; the cost per cell-step is the measured average over the simulated steps (a
  smaller array later may run somewhat faster per cell in cache, or slower per step overhead).

The RESULT line's ``speedup`` is the strongest (fastest) baseline over ours, end to end: ours
cold (compile included) vs the notebook extrapolation or the per-step lower bound, whichever
is smaller. Ours is timed with the certified first-crossing scan (the default) and, warm,
without it (``certify=False``: the exact bisection crossing, the reference's semantics).

Usage: python benchmarks/nqm_speed.py [--quick]
Last line: RESULT speedup=<strongest baseline / ours cold> ours_cold_s=... ours_warm_s=...
           strongest=<name> notebook_s=... per_step_s=<lower bound> uncertified_warm_s=...
           certified_fraction=... load=...
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

import jax
import numpy as np

from cbs import nqm

TARGET = 0.01


def notebook_risk(problem, kind, lr, beta, power, B, t):
    """The reference's evaluation at step t: per-bin eig of the 3x3 moment matrix."""
    h, w = problem.h, problem.loss_weights
    a = lr * h ** (1 - power)
    n = lr**2 * h ** (-2 * power) * problem.c / B
    if kind == "sgd":
        q = (1 - a) ** 2
        m_inf = n / (1 - q + 1e-8)
        return float(np.sum(w * (m_inf + q**t * (problem.m0 - m_inf))))
    M = np.zeros((len(h), 3, 3))
    M[:, 0] = np.stack([(1 - a) ** 2, np.full_like(a, beta**2), 2 * beta * (1 - a)], 1)
    M[:, 1] = np.stack([a**2, np.full_like(a, beta**2), -2 * a * beta], 1)
    M[:, 2] = np.stack([-a * (1 - a), np.full_like(a, beta**2), beta * (1 - 2 * a)], 1)
    e, V = np.linalg.eig(M)
    Vi = np.linalg.inv(V)
    s0 = np.zeros((len(h), 3))
    s0[:, 0] = problem.m0
    s_inf = np.linalg.solve(np.eye(3)[None] - M, n[:, None, None] * np.ones((len(h), 3, 1)))[..., 0]
    Mt = (V * (e**t)[:, None, :]) @ Vi
    s = np.real(np.einsum("bij,bj->bi", Mt, s0 - s_inf)) + s_inf
    return float(np.sum(w * s[:, 0]))


def notebook_steps(problem, kind, lr, beta, power, B):
    t_max = 10**9 if kind == "sgd" else 10**7
    lo, hi = 0, t_max
    with np.errstate(all="ignore"):
        try:
            # like the reference: always the full bisection, censored cells included
            while hi - lo > 1:
                mid = (lo + hi) // 2
                if notebook_risk(problem, kind, lr, beta, power, B, mid) < TARGET:
                    hi = mid
                else:
                    lo = mid
        except (
            np.linalg.LinAlgError
        ):  # singular eigenvectors (e.g. beta = 0): the reference fails too
            return np.nan
    return hi if hi < t_max else np.nan


def per_step_simulation(problem, kind, lr, beta, power, bs, sim_steps):
    """All cells (configuration x batch size) stepped together in NumPy; see the module doc.

    Returns (seconds, cell_steps, first_crossing (C, nB) with NaN where not crossed within
    sim_steps, still_running (C, nB) bool).
    """
    h, w, c, m0 = problem.h, problem.loss_weights, problem.c, problem.m0
    C, nB = len(lr), len(bs)
    t0 = time.perf_counter()
    a = np.repeat(lr[:, None] * h[None] ** (1 - power[:, None]), nB, 0)  # (N, nb)
    n = (
        np.repeat(lr[:, None] ** 2 * h[None] ** (-2 * power[:, None]) * c[None], nB, 0)
        / np.tile(bs, C)[:, None]
    )
    bet = np.repeat(beta, nB)[:, None]
    ids = np.arange(C * nB)
    m = np.broadcast_to(m0, a.shape).copy()
    v, x = np.zeros_like(m), np.zeros_like(m)
    first = np.full(C * nB, np.nan)
    limit = 1e12 * float(w @ m0)
    if kind == "sgd":
        q = (1 - a) ** 2
        stable = np.all(q < 1, axis=1)
        m_inf = np.where(q < 1, n / np.where(q < 1, 1 - q, 1.0), np.inf)
    cell_steps = 0
    with np.errstate(all="ignore"):
        for t in range(1, sim_steps + 1):
            if kind == "sgd":
                m = (1 - a) ** 2 * m + n
            else:
                m, v, x = (
                    (1 - a) ** 2 * m + bet**2 * v + 2 * bet * (1 - a) * x + n,
                    a**2 * m + bet**2 * v - 2 * a * bet * x + n,
                    -a * (1 - a) * m + bet**2 * v + bet * (1 - 2 * a) * x + n,
                )
            risk = m @ w
            cell_steps += len(ids)
            crossed = risk < TARGET
            drop = crossed | ~np.isfinite(risk) | (risk > limit)
            if kind == "sgd":
                drop |= stable & (np.minimum(m, m_inf) @ w >= TARGET)
            first[ids[crossed]] = t
            if drop.any():
                keep = ~drop
                ids, a, n, m = ids[keep], a[keep], n[keep], m[keep]
                if kind == "sgd":
                    stable, m_inf = stable[keep], m_inf[keep]
                else:
                    bet, v, x = bet[keep], v[keep], x[keep]
                if not len(ids):
                    break
    running = np.zeros(C * nB, bool)
    running[ids] = True
    return time.perf_counter() - t0, cell_steps, first.reshape(C, nB), running.reshape(C, nB)


_COLD = """
import sys, time, json
t0 = time.perf_counter()
import numpy as np
from cbs import nqm
quick = sys.argv[1] == "1"
problem = nqm.bin_problem(nqm.harmonic_problem())
powers = [0.0] if quick else [0.0, 0.25, 0.5, 0.75]
bs = 2.0 ** (np.arange(2, 21, 6) if quick else np.arange(2, 21, 2))
betas = 1 - np.logspace(-5, 0, 10 if quick else 20)
sgd_lrs, mom_lrs = np.logspace(-5, 0.5, 100), np.logspace(-8, 1, 100)
for kind, lrs, bet, t_max in (("sgd", sgd_lrs, np.zeros(100), 10**9),
                              ("momentum", np.repeat(mom_lrs, len(betas)), np.tile(betas, 100), 10**7)):
    nqm.evaluate_grid(problem, kind, np.tile(lrs, len(powers)), np.tile(bet, len(powers)), 0.0,
                      np.repeat(powers, len(lrs)), batch_sizes=bs, target=0.01, max_steps=t_max - 1)
print(json.dumps({"in_process_s": time.perf_counter() - t0}))
"""


def ours_cold(quick: bool) -> tuple[float, float]:
    """Wall seconds of a fresh process that imports cbs, compiles and evaluates both kinds
    (no persistent compilation cache), and the part after its Python start-up."""
    env = dict(os.environ, CBS_JAX_CACHE="off")
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    t0 = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-c", _COLD, "1" if quick else "0"],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    wall = time.perf_counter() - t0
    return wall, json.loads(out.strip().splitlines()[-1])["in_process_s"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="p = 0 only, 4 batch sizes, 10 momenta")
    ap.add_argument(
        "--sample", type=int, default=None, help="notebook-baseline cells timed per kind"
    )
    ap.add_argument(
        "--sim-steps",
        type=int,
        default=None,
        help="steps the per-step baseline simulates for real (default 2000 SGD, 100 momentum)",
    )
    ap.add_argument(
        "--skip-cold",
        action="store_true",
        help="no cold fresh-process run (ours_cold_s = nan): a smoke run of the script itself",
    )
    args = ap.parse_args()
    problem = nqm.bin_problem(nqm.harmonic_problem())
    powers = [0.0] if args.quick else [0.0, 0.25, 0.5, 0.75]
    bs = 2.0 ** (np.arange(2, 21, 6) if args.quick else np.arange(2, 21, 2))
    sgd_lrs = np.logspace(-5, 0.5, 100)
    mom_lrs = np.logspace(-8, 1, 100)
    betas = 1 - np.logspace(-5, 0, 10 if args.quick else 20)
    sample = args.sample or (4 if args.quick else 8)
    grids = {
        "sgd": (sgd_lrs, np.zeros(len(sgd_lrs)), 10**9, args.sim_steps or 2000),
        "momentum": (
            np.repeat(mom_lrs, len(betas)),
            np.tile(betas, len(mom_lrs)),
            10**7,
            args.sim_steps or 100,
        ),
    }
    load = os.getloadavg()
    print(
        f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores; load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
    )
    print(
        f"grid: {len(powers)} powers x {len(bs)} batch sizes x ({len(sgd_lrs)} SGD LRs + "
        f"{len(mom_lrs)} LRs x {len(betas)} momenta)"
    )
    cold_wall, cold_inner = (np.nan, np.nan) if args.skip_cold else ours_cold(args.quick)
    print(
        f"ours cold (fresh process, no compilation cache, both kinds, certified): {cold_wall:.2f} s wall "
        f"({cold_inner:.2f} s after Python start-up: import, compile, run)"
    )
    ours, ours_fast, results, certified = 0.0, 0.0, {}, []
    for kind, (lrs, bet, t_max, _) in grids.items():
        lr = np.tile(lrs, len(powers))
        beta = np.tile(bet, len(powers))
        pw = np.repeat(powers, len(lrs))
        for certify in (True, False):
            # default arguments bind this iteration's values (the lambda is called right away)
            def run(kind=kind, lr=lr, beta=beta, pw=pw, t_max=t_max, certify=certify):
                return nqm.evaluate_grid(
                    problem,
                    kind,
                    lr,
                    beta,
                    0.0,
                    pw,
                    batch_sizes=bs,
                    target=TARGET,
                    max_steps=t_max - 1,
                    certify=certify,
                )

            t0 = time.perf_counter()
            run()
            first = time.perf_counter() - t0
            dt = np.inf
            for _ in range(2):  # best of two: the machine may be shared
                t0 = time.perf_counter()
                out = run()
                dt = min(dt, time.perf_counter() - t0)
            if certify:
                results[kind] = out
                ours += dt
                certified.append(out["crossing_certified"].ravel())
                frac = f"{out['crossing_certified'].mean():.1%} of cells certified"
            else:
                ours_fast += dt
                same = np.mean(
                    (out["steps"] == results[kind]["steps"])
                    | (np.isnan(out["steps"]) & np.isnan(results[kind]["steps"]))
                )
                frac = f"same steps as certified mode in {same:.2%} of cells"
            print(
                f"ours warm {kind:8s} certify={certify!s:5s}: {lr.size * len(bs):7d} cells in {dt:.3f} s after "
                f"compilation (first call in this process {first:.1f} s); {frac}"
            )
    # Notebook baseline on a random subset, extrapolated to the whole grid; per-step
    # baseline on the whole grid for its first sim_steps, then a lower bound.
    rng = np.random.default_rng(0)
    nb_total, ps_total = 0.0, 0.0
    for kind, (lrs, bet, t_max, sim_steps) in grids.items():
        cells = len(powers) * len(lrs) * len(bs)
        idx = rng.choice(cells, size=sample, replace=False)
        spent, mismatches = 0.0, 0
        for k in idx:
            pi, rest = divmod(k, len(lrs) * len(bs))
            ci, bi = divmod(rest, len(bs))
            t0 = time.perf_counter()
            s_nb = notebook_steps(problem, kind, lrs[ci], bet[ci], powers[pi], bs[bi])
            spent += time.perf_counter() - t0
            s_ours = results[kind]["steps"][pi * len(lrs) + ci, bi]
            mismatches += not (
                np.isnan(s_nb) and np.isnan(s_ours) or abs(s_nb - s_ours) <= max(5, 1e-3 * s_ours)
            )
        nb = spent / sample * cells
        nb_total += nb
        print(
            f"notebook {kind:8s}: {spent / sample * 1e3:.1f} ms/cell on {sample} random cells -> "
            f"{nb:.0f} s extrapolated to {cells} cells ({mismatches} of {sample} differ from ours by > max(5 steps, 0.1%)"
        )
        sec, cell_steps, first, running = per_step_simulation(
            problem,
            kind,
            np.tile(lrs, len(powers)),
            np.tile(bet, len(powers)),
            np.repeat(powers, len(lrs)),
            bs,
            sim_steps,
        )
        ref = np.where(
            np.asarray(results[kind]["steps"]) <= t_max - 1, results[kind]["steps"], np.nan
        )
        crossed = np.isfinite(first)
        agree = np.mean(first[crossed] == ref[crossed]) if crossed.any() else np.nan
        per_cell_step = sec / max(cell_steps, 1)
        rest = np.nansum(np.where(running & np.isfinite(ref), ref - sim_steps, 0.0))
        bound = sec + per_cell_step * rest
        ps_total += bound
        print(
            f"per-step {kind:8s}: simulated {sim_steps} steps of all {cells} cells in {sec:.1f} s "
            f"({per_cell_step * 1e9:.0f} ns per cell-step; {crossed.sum()} crossed, same first step as ours in "
            f"{agree:.2%}); {running.sum()} still running, {int(np.sum(running & np.isfinite(ref)))} of which "
            f"reach the target after {rest:.3g} more cell-steps -> >= {bound:.3g} s"
        )
    cert = np.concatenate(certified).mean()
    strongest, base = min((("notebook", nb_total), ("per_step", ps_total)), key=lambda x: x[1])
    print(
        f"ours: cold {cold_wall:.2f} s end to end; warm {ours:.3f} s certified ({cert:.1%} of cells certified), "
        f"{ours_fast:.3f} s uncertified"
    )
    print(
        f"baselines: notebook {nb_total:.0f} s (extrapolated), vectorized per-step >= {ps_total:.3g} s "
        f"(lower bound); strongest: {strongest}"
    )
    print(
        f"speedup vs {strongest}: {base / cold_wall:.1f}x cold end to end, {base / ours:.0f}x warm "
        f"(notebook {nb_total / cold_wall:.1f}x / {nb_total / ours:.0f}x; per-step >= {ps_total / cold_wall:.3g}x / "
        f">= {ps_total / ours:.3g}x)"
    )
    print(
        f"RESULT speedup={base / cold_wall:.1f} ours_cold_s={cold_wall:.2f} ours_warm_s={ours:.3f} "
        f"strongest={strongest} notebook_s={nb_total:.1f} per_step_s={ps_total:.4g} "
        f"speedup_warm={base / ours:.0f} uncertified_warm_s={ours_fast:.3f} certified_fraction={cert:.3f} "
        f"load={load[0]:.2f}"
    )


if __name__ == "__main__":
    main()
