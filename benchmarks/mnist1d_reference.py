"""MNIST-1D reference points: the paper's models trained by our engine.

Greydanus (2020) reports test accuracy of about 32% (logistic regression), 68% (MLP) and
94% (CNN) on MNIST-1D, training with Adam (LR 1e-2, batch 100, no weight decay) for 6000
steps. This trains the same three models with the same recipe through the train back end
(one vmapped block per model: LR x seed) and prints, per model, the best and final
validation accuracy (best over LRs and evaluations; mean and spread over seeds).

    python benchmarks/mnist1d_reference.py [--steps 6000] [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np

from cbs.train.backend import TrainBackend
from cbs.train.direct import make_block, make_config

warnings.filterwarnings("ignore", message="Some donated buffers were not usable")

MODELS = {
    "logistic regression (mlp, depth 0)": dict(model="mlp", width=1, depth=0),
    "MLP (mlp, 100 x 2)": dict(model="mlp", width=100, depth=2),
    "CNN (mnist1d_cnn, 25 x 3)": dict(model="mnist1d_cnn", width=25, depth=3),
}
PAPER = {
    "logistic regression (mlp, depth 0)": 0.32,
    "MLP (mlp, 100 x 2)": 0.68,
    "CNN (mnist1d_cnn, 25 x 3)": 0.94,
}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=6000)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--lrs", type=float, nargs="+", default=[3e-3, 1e-2])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument(
        "--only", choices=["logistic", "mlp", "cnn"], nargs="+", help="models to run (default all)"
    )
    args = ap.parse_args(argv)
    print(
        "| model | paper test acc. | best val. acc. (best LR, seed mean +- sd) | final val. acc. | "
        "best LR | wall s |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    keys = dict(zip(("logistic", "mlp", "cnn"), MODELS))
    for label, arch in MODELS.items():
        if args.only and label not in [keys[k] for k in args.only]:
            continue
        cfg = make_config(
            dict(dataset="mnist1d", **arch),
            metric="val_error",
            value=1e-6,
            max_steps=args.steps,
            eval_every=args.eval_every,
            batch_sizes=[args.batch],
        )
        block = make_block("adam", args.batch, args.lrs, seeds=args.seeds)
        t0 = time.perf_counter()
        res = TrainBackend(cfg).run_blocks([block])[0]
        wall = time.perf_counter() - t0
        best = {}
        final = {}
        for cell, rec in zip(block.cells, res.cells):
            best.setdefault(cell.lr, []).append(1 - rec.best_metric)
            final.setdefault(cell.lr, []).append(1 - rec.final_metric)
        lr = max(best, key=lambda k: np.mean(best[k]))
        b, f = np.array(best[lr]), np.array(final[lr])
        print(
            f"| {label} | {PAPER[label]:.0%} | {b.mean():.1%} +- {b.std(ddof=1) if len(b) > 1 else 0:.1%} | "
            f"{f.mean():.1%} | {lr:g} | {wall:.0f} |"
        )


if __name__ == "__main__":
    main()
