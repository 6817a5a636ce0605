"""What a user waits for: the sweep CLI end to end, cold and warm, vs the reference notebook.

Runs, each in a fresh subprocess with a fresh output folder and wall-clock timed from outside:

* ``python -m cbs.sweep configs/nqm_fig3a.yaml``, cold (an empty compilation cache) and then
  warm (the persistent cache the cold run filled; see ``cbs.compile_cache``);
* ``python -m cbs.sweep configs/nqm_quickstart.yaml``, cold and warm the same way.

Every run includes Python start-up, imports, the sweep, the LR refinement, the risk curves,
the analysis, plots and report. ``reference_notebook_s`` is the reference notebook's
procedure for the Fig. 3a grid (per cell an integer bisection with per-bin 3x3 eigen-
decompositions; ``benchmarks/nqm_speed.py``), timed on random cells and extrapolated to the
grid's 84,000 cells; it covers the grid search only (no refinement, curves or plots).

``--quick`` runs the same commands on a smaller Fig. 3a (p = 0 only: sgd_p0 and
momentum_p0, batch sizes 2^2, 2^8, 2^14, 2^20) and times 2 notebook cells per kind; it is
meant to finish in under two minutes on 2 CPU cores.

    python benchmarks/cli_speed.py [--quick]
Last line: ``RESULT fig3a_cold_s=... fig3a_warm_s=... quickstart_cold_s=... quickstart_warm_s=...
<same>_cpu_s=... reference_notebook_s=... load=...`` (wall seconds; ``_cpu_s``: user + system).
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

_QUICK_FIG3A = [
    "grid.batch_sizes=[4, 256, 16384, 1048576]",
    (
        "grid.optimizers=[{kind: sgd, name: sgd_p0, hparams: {precond_power: 0.0}}, "
        "{kind: momentum, name: momentum_p0, hparams: {precond_power: 0.0, momentum: {log10_min: -5, "
        "log10_max: 0, num: 20, one_minus: true}}, learning_rates: {log10_min: -8, log10_max: 1, num: 100}}]"
    ),
]


def timed_sweep(config: str, overrides: list[str], cache: Path, out: Path) -> tuple[float, float]:
    """Wall and CPU (user + system) seconds of one CLI run in a fresh process (raises if it
    fails). On a shared machine the CPU seconds move less with load than the wall time."""
    env = dict(os.environ, CBS_JAX_CACHE=str(cache), PYTHONPATH=str(ROOT))
    cmd = [
        sys.executable,
        "-m",
        "cbs.sweep",
        config,
        *overrides,
        f"output.dir={out}",
        "--no-progress",
    ]
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return wall, (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)


def notebook_fig3a_seconds(per_kind: int) -> float:
    """The reference notebook's procedure on the full Fig. 3a grid, extrapolated from
    ``per_kind`` random cells per kind (see benchmarks/nqm_speed.py)."""
    from nqm_speed import notebook_steps

    from cbs import nqm

    problem = nqm.bin_problem(nqm.harmonic_problem())
    powers, bs = [0.0, 0.25, 0.5, 0.75], 2.0 ** np.arange(2, 21, 2)
    betas = 1 - np.logspace(-5, 0, 20)
    grids = {
        "sgd": (np.logspace(-5, 0.5, 100), np.zeros(100)),
        "momentum": (np.repeat(np.logspace(-8, 1, 100), 20), np.tile(betas, 100)),
    }
    rng = np.random.default_rng(0)
    total = 0.0
    for kind, (lrs, bet) in grids.items():
        cells = len(powers) * len(lrs) * len(bs)
        spent = 0.0
        for k in rng.choice(cells, size=per_kind, replace=False):
            pi, rest = divmod(k, len(lrs) * len(bs))
            ci, bi = divmod(rest, len(bs))
            t0 = time.perf_counter()
            notebook_steps(problem, kind, lrs[ci], bet[ci], powers[pi], bs[bi])
            spent += time.perf_counter() - t0
        total += spent / per_kind * cells
    return total


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--quick", action="store_true", help="smaller Fig. 3a (p = 0, 4 batch sizes); < 2 min"
    )
    ap.add_argument(
        "--notebook-cells", type=int, default=None, help="notebook cells timed per kind"
    )
    args = ap.parse_args()
    fig3a = _QUICK_FIG3A if args.quick else []
    load0 = os.getloadavg()
    print(
        f"{os.cpu_count()} CPU cores; load average at start {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}"
    )
    times, cpu_times = {}, {}
    with tempfile.TemporaryDirectory(prefix="cbs_cli_speed_") as tmp:
        tmp = Path(tmp)
        for name, config, overrides in (
            ("fig3a", "configs/nqm_fig3a.yaml", fig3a),
            ("quickstart", "configs/nqm_quickstart.yaml", []),
        ):
            cache = tmp / f"cache_{name}"  # empty: the first run compiles everything
            for state in ("cold", "warm"):
                t, cpu = timed_sweep(config, overrides, cache, tmp / f"{name}_{state}")
                times[f"{name}_{state}_s"], cpu_times[f"{name}_{state}_cpu_s"] = t, cpu
                print(
                    f"{name:10s} {state}: {t:6.2f} s wall, {cpu:6.2f} s CPU  "
                    f"(python -m cbs.sweep {config} {' '.join(overrides)})",
                    flush=True,
                )
    nb = notebook_fig3a_seconds(args.notebook_cells or (2 if args.quick else 8))
    print(f"reference notebook's procedure, full Fig. 3a grid search (extrapolated): {nb:.0f} s")
    load1 = os.getloadavg()
    print(f"load average at end {load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f}")
    print(
        "RESULT "
        + " ".join(f"{k}={v:.2f}" for k, v in {**times, **cpu_times}.items())
        + f" reference_notebook_s={nb:.0f} load={(load0[0] + load1[0]) / 2:.2f}"
        + (" quick=1" if args.quick else "")
    )


if __name__ == "__main__":
    main()
