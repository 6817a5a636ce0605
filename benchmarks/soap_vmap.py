"""SOAP inside a vmapped block: basis refresh on refresh steps only vs on every step.

Same block, same cells, same steps, measured in the same run on the tiny LM config
(configs/train_tiny_lm_cpu.yaml's model: byte-level Transformer, width 32, 2 blocks,
4 heads, 32-byte context). Ours: the engine passes the block's shared step to SOAP, so
the ``lax.switch`` on "refresh now?" stays a conditional under ``vmap`` and the refresh
(``eigh``/QR of every Shampoo factor) runs every ``precondition_frequency`` (10) steps.
Baseline (the previous engine): SOAP branches on each cell's own counter, which ``vmap``
batches, so the switch becomes a select that computes every branch on every step. The
baseline is obtained by withholding the block step (``STEP_AWARE`` emptied) before its
program is traced; the two produce the same numbers (tests/test_train_soap.py).

Both sides run ``TrainBackend.run_blocks`` on one block with an unreachable target, so every
cell runs the full budget; wall times include compilation on both sides, and the
steady-state time per step is the fastest of the calls after the first.

    python benchmarks/soap_vmap.py [--steps 300] [--cells 4] [--batch 32]
Last line: ``RESULT speedup=... ours_s=... baseline_s=...``.
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import jax
import yaml

import cbs.train.optimizers as optimizers
from cbs.sweep.config import load_config
from cbs.train.backend import TrainBackend
from cbs.train.direct import make_block

warnings.filterwarnings("ignore", message="Some donated buffers were not usable")

ROOT = Path(__file__).resolve().parent.parent
# the tiny LM config's train section (model, data, validation set), read from the shipped file
TINY_LM = yaml.safe_load((ROOT / "configs" / "train_tiny_lm_cpu.yaml").read_text())["train"]


def timed_block(args, step_aware: bool) -> tuple[float, float]:
    """(wall seconds of the whole block incl. compile, steady-state seconds per step)."""
    saved = optimizers.STEP_AWARE
    optimizers.STEP_AWARE = frozenset({"soap"}) if step_aware else frozenset()
    try:
        cfg = load_config(
            dict(
                name="soap_vmap",
                backend="train",
                grid=dict(
                    batch_sizes=[args.batch], learning_rates=[1e-3], optimizers=[dict(kind="soap")]
                ),
                target=dict(metric="val_loss", value=1e-6),
                budget=dict(max_steps=args.steps, eval_every=args.eval_every),
                analysis=dict(tokens_per_example=TINY_LM["seq_len"]),
                train=dict(TINY_LM, steps_per_call=args.steps_per_call),
            )
        )
        be = TrainBackend(cfg)
        _ = be.problem  # data and model outside the timing (same on both sides)
        lrs = [1e-3 * 2**i for i in range(args.cells)]
        block = make_block("soap", args.batch, lrs, seeds=(0,))
        from cbs.train import loop

        times = []
        real_call = None

        def wrap(run):
            nonlocal real_call
            real_call = run.call

            def call(*a):
                t = time.perf_counter()
                out = real_call(*a)
                jax.block_until_ready(out)
                times.append(time.perf_counter() - t)
                return out

            run.call = call
            return run

        run = wrap(be._run_for("soap", block.schedule))
        t0 = time.perf_counter()
        loop.run_vmapped_block(
            be.problem, block, be.options(), run, list(optimizers.OPTIMIZERS["soap"].hparams)
        )
        wall = time.perf_counter() - t0
        per_step = min(times[1:]) / args.steps_per_call if len(times) > 1 else float("nan")
        return wall, per_step
    finally:
        optimizers.STEP_AWARE = saved


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--steps-per-call", type=int, default=100)
    ap.add_argument("--eval-every", type=int, default=20)
    ap.add_argument("--cells", type=int, default=4)
    ap.add_argument("--batch", type=int, default=32)
    args = ap.parse_args(argv)
    dev = jax.devices()[0]
    print(
        f"device: {dev.platform} {dev.device_kind}; {args.cells} SOAP cells vmapped, batch {args.batch}, "
        f"{args.steps} steps, refresh every 10 steps"
    )
    ours_wall, ours_step = timed_block(args, True)
    base_wall, base_step = timed_block(args, False)
    print(
        f"ours (refresh on refresh steps): block {ours_wall:.2f} s incl. compile, {ours_step * 1e3:.2f} ms/step"
    )
    print(
        f"baseline (every branch every step): block {base_wall:.2f} s incl. compile, "
        f"{base_step * 1e3:.2f} ms/step"
    )
    print(
        f"RESULT speedup={base_wall / ours_wall:.2f} step_speedup={base_step / ours_step:.2f} "
        f"ours_s={ours_wall:.2f} baseline_s={base_wall:.2f}"
    )


if __name__ == "__main__":
    main()
