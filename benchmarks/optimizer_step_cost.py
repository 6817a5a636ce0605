"""Cost of one vmapped train step per optimizer kind, relative to SGD, in the same run.

For each kind: a block of ``--cells`` cells (LRs spread by factors of 2, default
hyperparameters) vmapped over cells, ``--steps`` steps per compiled call (one ``lax.scan``,
exactly the engine's ``train_interval``), batch ``--batch``. Reported per kind: compile time
of that program (first call minus a steady call) and the steady-state time per step (the
fastest of ``--repeats`` calls after the first, divided by ``--steps``; each call holds the
same number of refresh steps when ``--steps`` is a multiple of 10), and the ratio of the
latter to SGD's. The block's shared step is passed as the engine passes it. Both problems are the shipped CPU configs' models: the MNIST-1D MLP
(configs/train_mnist1d_mlp_cpu.yaml: width 64, depth 2) and the tiny LM
(configs/train_tiny_lm_cpu.yaml: byte-level Transformer).

    python benchmarks/optimizer_step_cost.py [--problem mnist1d|tiny_lm] [--kinds sgd,adam,...]

A kind may be listed twice (the default lists SGD first and last, since the first program
measured in a process ran slower in some runs); the faster measurement is kept.

Last line: ``RESULT problem=... kind=ratio ...``.
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import yaml

from cbs.sweep.config import load_config
from cbs.train.backend import TrainBackend
from cbs.train.engine import make_block_fns
from cbs.train.optimizers import OPTIMIZERS

warnings.filterwarnings("ignore", message="Some donated buffers were not usable")

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = {
    "mnist1d": ROOT / "configs" / "train_mnist1d_mlp_cpu.yaml",
    "tiny_lm": ROOT / "configs" / "train_tiny_lm_cpu.yaml",
}
DEFAULT_KINDS = (
    "sgd,adam,shampoo,adalayer,ademamix,simplified_ademamix,sophia,schedule_free_adamw,sgd"
)


def problem_of(name: str):
    raw = yaml.safe_load(CONFIGS[name].read_text())
    cfg = load_config(
        dict(
            name="step_cost",
            backend="train",
            grid=dict(batch_sizes=[32], learning_rates=[1e-3], optimizers=[dict(kind="sgd")]),
            target=dict(metric="val_loss", value=1e-6),
            budget=dict(max_steps=1000, eval_every=10),
            analysis=raw.get("analysis", {}),
            train=raw["train"],
        )
    )
    return TrainBackend(cfg).problem


def time_kind(problem, kind: str, args) -> tuple[float, float]:
    """(compile seconds, steady seconds per step) of one vmapped block of this kind."""
    _, train_interval, _, _ = make_block_fns(problem, kind, lambda c: 1.0, 10**9)
    init = make_block_fns(problem, kind, lambda c: 1.0, 10**9)[0]
    specs = OPTIMIZERS[kind].hparams
    w = args.cells
    hp = {k: jnp.full((w,), s.default, jnp.float32) for k, s in specs.items()}
    lr = jnp.asarray([1e-3 * 2**i for i in range(w)], jnp.float32)
    params = problem.init_params(0)
    stacked = jax.tree.map(lambda x: jnp.stack([x] * w), params)
    state = jax.jit(jax.vmap(init))(stacked, hp)
    rng = np.random.default_rng(0)
    idx = jnp.asarray(rng.integers(0, problem.num_train, (w, args.steps, args.batch)), jnp.int32)
    # The block's shared step of each step, unbatched, as the engine passes it: kinds that
    # branch on it (SOAP's basis refresh, Shampoo's roots) then branch for real.
    fn = jax.jit(
        jax.vmap(
            lambda s, lr, hp, i, ts: train_interval(s, lr, hp, i, None, ts),
            in_axes=(0, 0, 0, 0, None),
        )
    )
    steps = jnp.arange(args.steps, dtype=jnp.int32)
    t = time.perf_counter()
    out = fn(state, lr, hp, idx, steps)
    jax.block_until_ready(out)
    first = time.perf_counter() - t
    times = []
    for r in range(args.repeats):
        t = time.perf_counter()
        out = fn(out[0], lr, hp, idx, steps + (r + 1) * args.steps)
        jax.block_until_ready(out)
        times.append(time.perf_counter() - t)
    steady = min(times)
    return first - steady, steady / args.steps


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--problem", choices=sorted(CONFIGS), default="mnist1d")
    ap.add_argument("--kinds", default=DEFAULT_KINDS)
    ap.add_argument("--cells", type=int, default=8)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    problem = problem_of(args.problem)
    dev = jax.devices()[0]
    print(
        f"device: {dev.platform} {dev.device_kind}; {args.problem}, {problem.num_params} "
        f"params; {args.cells} cells vmapped, batch {args.batch}, {args.steps} steps per call"
    )
    rows = {}
    for kind in args.kinds.split(","):
        comp, step = time_kind(problem, kind, args)
        # A kind listed twice (e.g. sgd first and last, against order effects) keeps its
        # faster measurement.
        rows[kind] = min(rows.get(kind, (comp, step)), (comp, step), key=lambda r: r[1])
        print(f"{kind:22s} compile {comp:7.2f} s   step {step * 1e3:8.3f} ms", flush=True)
    base = rows.get("sgd", (None, None))[1]
    if base:
        print("ratio of the step time to SGD's:")
        for kind, (_, step) in rows.items():
            print(f"  {kind:22s} {step / base:6.2f}x")
        print(
            f"RESULT problem={args.problem} "
            + " ".join(f"{k}={s / base:.2f}" for k, (_, s) in rows.items())
        )


if __name__ == "__main__":
    main()
