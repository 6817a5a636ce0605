"""Streamed training set vs device-resident training set: same cells, same steps.

A synthetic classification set is written as a folder of ``.npy`` files (opened
memory-mapped, like a researcher's data that does not fit on the device) and the same
block (momentum SGD, LR x seed cells vmapped) is trained three ways:

- **in-memory**: the training set copied to the device once; each step gathers its batch
  there (``train.device_budget_mb`` unset, the default on CPU);
- **streamed**: ``device_budget_mb: 0``: each compiled call's examples gathered on the
  host from the memory map and ``device_put``, the next call's chunk prepared in a
  background thread while the device computes (double buffering);
- **streamed, no prefetch**: the same, chunks prepared on demand (what double buffering
  saves).

Each is run twice on one back end; the first run includes compilation, the second (same
compiled programs) is reported as steady state. The target is unreachable so every cell runs the full budget.
The script checks that the streamed curves equal the in-memory ones bit for bit.

    python benchmarks/streaming.py            # 20000 x 512 float32 (35 MB), 8 cells x 400 steps
    python benchmarks/streaming.py --quick    # 8000 x 256, 4 cells x 300 steps
Last line: ``RESULT streamed_over_in_memory=... in_memory_ex_s=... streamed_ex_s=...``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from pathlib import Path

import jax
import numpy as np

from cbs.train import streaming
from cbs.train.backend import TrainBackend
from cbs.train.direct import make_block, make_config

warnings.filterwarnings("ignore", message="Some donated buffers were not usable")


def write_data(folder: Path, n: int, dim: int, classes: int = 10) -> None:
    """Gaussian class clusters, float32 inputs, int64 labels, 10% held out."""
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((classes, dim)).astype(np.float32)
    y = rng.integers(0, classes, n)
    x = centers[y] * 0.3 + rng.standard_normal((n, dim)).astype(np.float32)
    n_val = n // 10
    folder.mkdir(parents=True, exist_ok=True)
    for name, a in (
        ("x_train", x[n_val:]),
        ("y_train", y[n_val:]),
        ("x_val", x[:n_val]),
        ("y_val", y[:n_val]),
    ):
        np.save(folder / f"{name}.npy", a)


def run(data: Path, budget, cells: int, steps: int, batch: int, width: int, prefetch: bool = True):
    streaming.ChunkFeeder.prefetch = prefetch
    cfg = make_config(
        {
            "dataset": str(data),
            "model": "mlp",
            "width": width,
            "depth": 1,
            "device_budget_mb": budget,
            "steps_per_call": 100,
        },
        metric="val_loss",
        value=1e-9,
        max_steps=steps,
        eval_every=50,
    )
    lrs = list(np.geomspace(1e-3, 1e-1, cells // 2))
    block = make_block("momentum", batch, lrs, seeds=(0, 1))
    times = []
    be = TrainBackend(cfg)
    assert be.problem.streaming == (budget == 0)
    for _ in range(2):  # the second run reuses the compiled programs: steady state
        t = time.perf_counter()
        res = be.run_blocks([block])[0]
        times.append(time.perf_counter() - t)
    streaming.ChunkFeeder.prefetch = True
    return times, res.curves.sort_values(["cell_id", "step"])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    n, dim, cells, steps, batch, width = (
        (8000, 256, 4, 300, 128, 128) if args.quick else (20000, 512, 8, 400, 128, 128)
    )
    dev = jax.devices()[0]
    print(f"device: {dev.platform}:{dev.device_kind} x{len(jax.devices())}, jax {jax.__version__}")
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        write_data(data, n, dim)
        mb = sum(f.stat().st_size for f in data.glob("x_train.npy")) / 2**20
        print(
            f"data: {n} x {dim} float32 ({mb:.0f} MB training inputs), {cells} cells x {steps} steps, B={batch}, "
            f"MLP width {width}"
        )
        t_mem, c_mem = run(data, None, cells, steps, batch, width)
        t_st, c_st = run(data, 0, cells, steps, batch, width)
        t_sync, _ = run(data, 0, cells, steps, batch, width, prefetch=False)
    num = ["step", "val_loss", "val_error", "train_loss"]
    same = list(c_mem.cell_id) == list(c_st.cell_id) and np.array_equal(
        c_mem[num].to_numpy(float), c_st[num].to_numpy(float), equal_nan=True
    )
    examples = cells * steps * batch
    for name, t in (("in-memory", t_mem), ("streamed", t_st), ("streamed, no prefetch", t_sync)):
        print(
            f"{name:>22}: first run (with compile) {t[0]:.2f} s, steady {t[1]:.2f} s = "
            f"{examples / t[1]:,.0f} examples/s"
        )
    print(f"streamed curves identical to in-memory: {same}")
    ratio = t_mem[1] / t_st[1]
    print(
        f"RESULT streamed_over_in_memory={ratio:.3f} in_memory_ex_s={examples / t_mem[1]:.0f} "
        f"streamed_ex_s={examples / t_st[1]:.0f} no_prefetch_ex_s={examples / t_sync[1]:.0f} identical={same}"
    )


if __name__ == "__main__":
    main()
