"""Synthetic run folders, laid out as the sweep store writes them (tests only).

The steps follow a planted McCandlish curve, so an analysis has a known answer::

    from synthetic_runs import write_synthetic_run     # from tests/
    write_synthetic_run(Path("/tmp/demo"))      # then: python -m cbs.analyze /tmp/demo
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

__all__ = ["PLANTED", "write_synthetic_run"]

PLANTED = {
    "sgd": (800.0, 800.0 * 256),
    "adam": (400.0, 400.0 * 1024),
}  # (S_min, E_min): B_crit 256, 1024


_LRS = tuple(np.logspace(-3, 0, 7))


def write_synthetic_run(
    path: Path,
    *,
    planted=PLANTED,
    batch_sizes=tuple(2**k for k in range(3, 14)),
    lrs=_LRS,
    seeds=(0, 1),
    noise=0.05,
    max_steps=100_000,
    tokens_per_example=1,
    name="synthetic",
    extra_config=None,
    final=True,
    rng_seed=0,
):
    """Writes a run folder as the store does: config.yaml, manifest.json, results.parquet.

    Steps follow S_min (1 + B_crit / B) times an LR penalty exp(0.5 log(lr / lr_opt)^2)
    around an optimum lr_opt = 0.01 sqrt(B / B_smallest), times log-normal noise per
    (B, seed). LRs more than e^2.5 above the optimum diverge; steps above the budget are
    censored.

    Args:
        path: the folder to create.
        planted: optimizer name -> (S_min, E_min).
        batch_sizes, lrs, seeds: the grid.
        noise: standard deviation of log S per (optimizer, B, seed).
        max_steps: the step budget.
        tokens_per_example: written to every row and to config analysis.tokens_per_example.
        name: the sweep name.
        extra_config: keys merged into config.yaml (e.g. a model size for --scale-key).
        final: write results.parquet; otherwise one parts/results/<block>.parquet per block,
            as an unfinished sweep leaves them.
        rng_seed: seed of the noise.

    Returns:
        The folder.
    """
    path = Path(path)
    rng = np.random.default_rng(rng_seed)
    path.mkdir(parents=True, exist_ok=True)
    rows = []
    for opt, (s_min, e_min) in planted.items():
        for b in batch_sizes:
            lr_opt = 0.01 * np.sqrt(b / batch_sizes[0])
            for seed in seeds:
                eps = rng.normal(0.0, noise)
                for lr in lrs:
                    dist = np.log(lr / lr_opt)
                    diverged = dist > 2.5
                    steps = (s_min + e_min / b) * np.exp(0.5 * dist**2 + eps)
                    reached = (not diverged) and steps <= max_steps
                    rows.append(
                        dict(
                            sweep=name,
                            config_hash="abc123",
                            backend="synthetic",
                            block_id=f"{opt}-{b}",
                            cell_id=f"{opt}-{b}-{lr:.3g}-{seed}",
                            optimizer=opt,
                            kind=opt,
                            batch_size=int(b),
                            lr=float(lr),
                            seed=int(seed),
                            hp_momentum=0.9 if opt == "sgd" else 0.0,
                            metric="loss",
                            target=0.1,
                            max_steps=max_steps,
                            reached=bool(reached),
                            diverged=bool(diverged),
                            censored=bool(not reached and not diverged),
                            steps_to_target=float(np.ceil(steps)) if reached else np.nan,
                            final_metric=0.05 if reached else 0.5,
                            best_metric=0.05 if reached else 0.2 + dist**2,
                            steps_run=int(min(np.ceil(steps), max_steps)) if not diverged else 10,
                            tokens_per_example=tokens_per_example,
                            cbs_version="0.1.0",
                        )
                    )
    results = pd.DataFrame(rows)
    config = dict(
        name=name,
        backend="nqm",
        grid=dict(
            batch_sizes=list(batch_sizes),
            learning_rates=[float(x) for x in lrs],
            optimizers=[dict(kind=o, name=o) for o in planted],
            seeds=list(seeds),
        ),
        target=dict(metric="loss", value=0.1),
        budget=dict(max_steps=max_steps),
        analysis=dict(delta=0.2, b0=None, bootstrap=200, tokens_per_example=tokens_per_example),
    )
    config.update(extra_config or {})
    (path / "config.yaml").write_text(yaml.safe_dump(config))
    (path / "manifest.json").write_text(
        json.dumps(dict(config_hash="abc123", versions={}, device="cpu"))
    )
    if final:
        results.to_parquet(path / "results.parquet", index=False)
    else:
        (path / "parts" / "results").mkdir(parents=True)
        from cbs.store import part_bytes

        for block, g in results.groupby("block_id"):
            (path / "parts" / "results" / f"{block}.parquet").write_bytes(
                part_bytes(g, table="results", block_id=str(block), config_hash="abc123")
            )
    return path
