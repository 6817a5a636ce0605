"""Scaling: shard balance (hash vs cost) and 1 vs 2 devices / processes.

Full mode (default): for each shipped train config, the per-block times measured by one
single-process run (``--runs DIR`` keeps and reuses those runs) are the ground truth; for
N = 2, 4, 8 shards it reports the makespan imbalance (slowest shard / mean shard time) of

* ``hash``:     the old assignment, CRC32 of the block id mod N (cost-blind);
* ``cost``:     longest-processing-time first on the back end's *estimated* costs (what a
                first run of a config gets, before anything was measured);
* ``measured``: the same on the measured times (what ``--costs-from`` a pilot run gives).

The full-size configs (no ``_cpu``; hours on CPU) are reported with their estimated costs as
ground truth, labelled as such.

``--quick``: one small train sweep on 1 vs 2 CPU devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=2``) and as 1 vs 2 processes of a JAX job
on the loopback address, each a fresh subprocess timed end to end (start-up and compiles
count the same on both sides), then prints
``RESULT speedup_devices=... speedup_processes=... identical=yes|no imbalance=...``
where ``identical`` compares the four results tables (every outcome column) and
``imbalance`` is the slowest process's measured block time over the mean in the 2-process run.

    python benchmarks/scale.py --quick
    python benchmarks/scale.py --runs /tmp/cbs_scale_runs
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
CPU_CONFIGS = ["train_digits_cpu", "train_linreg_cpu", "train_mnist1d_mlp_cpu", "train_tiny_lm_cpu"]
FULL_CONFIGS = ["train_digits", "train_linreg", "train_mnist1d_mlp", "train_tiny_lm"]
OUTCOME = [
    "cell_id",
    "optimizer",
    "batch_size",
    "lr",
    "seed",
    "reached",
    "diverged",
    "censored",
    "steps_to_target",
    "final_metric",
    "best_metric",
    "steps_run",
]
QUICK = [
    "configs/train_linreg_cpu.yaml",
    "grid.batch_sizes=[4,16,64,256]",
    "grid.learning_rates={log10_min: -2, log10_max: -0.5, num: 8}",
    "grid.optimizers=[{kind: sgd}, {kind: adam, learning_rates: [0.003, 0.01, 0.03, 0.1]}]",
    "budget.max_steps=600",
    "budget.eval_every=20",
    "train.noise_scale.enabled=false",
    "train.num_samples=2048",
    "target.value=0.02",
]


def _env(devices: int = 1) -> dict:
    env = {
        **os.environ,
        "CBS_JAX_CACHE": "off",
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f]
    if devices > 1:
        flags.append(f"--xla_force_host_platform_device_count={devices}")
    env["XLA_FLAGS"] = " ".join(flags)
    return env


def _sweep(args: list[str], out: Path, env: dict, extra: list[str] = ()) -> subprocess.Popen:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cbs.sweep",
            *args,
            f"output.dir={out}",
            "--no-progress",
            "--no-analysis",
            *extra,
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait(procs) -> None:
    for p in procs:
        _, err = p.communicate()
        if p.returncode:
            raise SystemExit(f"sweep failed ({p.returncode}):\n{err[-3000:]}")


def _timed(args, out, env, n_procs=1) -> float:
    t0 = time.perf_counter()
    if n_procs == 1:
        _wait([_sweep(args, out, env)])
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        _wait(
            [
                _sweep(
                    args,
                    out,
                    env,
                    [
                        "--coordinator",
                        f"127.0.0.1:{port}",
                        "--num-processes",
                        str(n_procs),
                        "--process-id",
                        str(i),
                    ],
                )
                for i in range(n_procs)
            ]
        )
    return time.perf_counter() - t0


def _outcomes(out: Path) -> pd.DataFrame:
    df = pd.read_parquet(out / "results.parquet")
    return df[OUTCOME].sort_values("cell_id").reset_index(drop=True)


def quick() -> str:
    from cbs.store import read_sessions

    with tempfile.TemporaryDirectory(prefix="cbs_scale_") as tmp:
        tmp = Path(tmp)
        t1 = _timed(QUICK, tmp / "d1", _env(1))
        t2 = _timed(QUICK, tmp / "d2", _env(2))
        p2 = _timed(QUICK, tmp / "p2", _env(1), n_procs=2)
        tables = [_outcomes(tmp / d) for d in ("d1", "d2", "p2")]
        identical = all(t.equals(tables[0]) for t in tables[1:])
        loads = [
            sum(v[0] for v in (s.get("block_seconds") or {}).values())
            for s in read_sessions(tmp / "p2")
        ]
        imb = max(loads) / (sum(loads) / len(loads)) if loads and sum(loads) > 0 else float("nan")
    load = os.getloadavg()[0]
    print(
        f"1 device {t1:.1f} s, 2 devices {t2:.1f} s, 2 processes {p2:.1f} s (wall, each a fresh "
        f"process; load average {load:.1f} on {os.cpu_count()} cores)"
    )
    return (
        f"RESULT speedup_devices={t1 / t2:.2f} speedup_processes={t1 / p2:.2f} "
        f"identical={'yes' if identical else 'no'} imbalance={imb:.2f}"
    )


def _measured(name: str, runs: Path) -> dict[str, float]:
    """Per-block seconds of one single-process run of configs/NAME.yaml (run if absent)."""
    from cbs.store import read_sessions

    out = runs / name
    if not (out / "results.parquet").exists():
        print(f"running {name} once to measure its blocks ...", flush=True)
        _wait([_sweep([f"configs/{name}.yaml"], out, _env(1))])
    seconds: dict[str, float] = {}
    for s in read_sessions(out):
        for b, (sec, _) in (s.get("block_seconds") or {}).items():
            # An adaptive LR round (block id BASE__aK) runs in its base block's shard.
            base = b.split("__a")[0]
            seconds[base] = seconds.get(base, 0.0) + float(sec)
    return seconds


def _estimates(name: str) -> dict[str, float]:
    from cbs.sweep.backend import get_backend
    from cbs.sweep.config import load_config
    from cbs.sweep.runner import block_costs, plan

    cfg = load_config(ROOT / "configs" / f"{name}.yaml")
    return block_costs(cfg, plan(cfg), get_backend(cfg.backend)(cfg))


def full(runs: Path, configs: list[str]) -> list[str]:
    from cbs.sweep.shards import cost_assignment, hash_assignment, imbalance

    lines = [
        "| config | blocks | truth | N | hash | cost (estimate) | cost (measured) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    worst = 0.0
    for name in configs:
        est = _estimates(name)
        full_size = not name.endswith("_cpu")
        truth = est if full_size else _measured(name, runs)
        for n in (2, 4, 8):
            h = imbalance(hash_assignment(list(truth), n), truth, n)
            c = imbalance(cost_assignment({b: est[b] for b in truth}, n), truth, n)
            m = imbalance(cost_assignment(truth, n), truth, n)
            if not full_size:
                worst = max(worst, c)
            lines.append(
                f"| {name} | {len(truth)} | {'estimate' if full_size else 'measured'} | {n} | "
                f"{h:.2f} | {c:.2f} | {m:.2f} |"
            )
    lines.append(f"worst estimated-cost imbalance over measured configs: {worst:.2f} (goal <= 1.2)")
    return lines


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--quick", action="store_true", help="1 vs 2 devices and processes on a small sweep"
    )
    p.add_argument("--runs", default=None, help="folder for (and reuse of) the measuring runs")
    p.add_argument("--configs", nargs="*", default=CPU_CONFIGS + FULL_CONFIGS)
    args = p.parse_args()
    if args.quick:
        print(quick())
        return 0
    runs = Path(args.runs or tempfile.mkdtemp(prefix="cbs_scale_runs_"))
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; runs in {runs}")
    print("\n".join(full(runs, args.configs)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
