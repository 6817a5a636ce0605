"""Build blocks and configs by hand, to drive the train back end directly (public utility).

Used by benchmarks, notebooks and the tests. Example::

    from cbs.train.backend import TrainBackend
    from cbs.train.direct import make_block, make_config
    cfg = make_config(dict(dataset="digits", model="mlp", width=16, depth=1), max_steps=40)
    result = TrainBackend(cfg).run_blocks([make_block("sgd", 32, [0.1, 0.3])])[0]
    result.cells          # one CellResult per (LR, seed)

The sweep runner builds blocks from a config (cbs.sweep.grid); these helpers build the
same objects directly so the back end can be driven without the runner.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Mapping, Sequence

from cbs.sweep.backend import Block, Cell
from cbs.sweep.config import load_config
from cbs.train.optimizers import OPTIMIZERS

__all__ = ["make_block", "make_config"]


def make_block(
    kind: str,
    batch_size: int,
    lrs: Sequence[float],
    hparams: Mapping[str, Sequence[float]] | None = None,
    seeds: Sequence[int] = (0,),
    schedule=None,
    name: str | None = None,
) -> Block:
    """A block of the LR x hyperparameter x seed product; unset hyperparameters get defaults."""
    specs = OPTIMIZERS[kind].hparams
    grid = {k: list((hparams or {}).get(k, [s.default])) for k, s in specs.items()}
    names = list(grid)
    cells = []
    for lr, combo, seed in itertools.product(lrs, itertools.product(*grid.values()), seeds):
        hp = dict(zip(names, combo))
        key = f"{name or kind}|{batch_size}|{lr!r}|{sorted(hp.items())!r}|{seed}"
        cid = hashlib.sha256(key.encode()).hexdigest()[:12]
        cells.append(Cell(cid, name or kind, kind, batch_size, float(lr), hp, int(seed)))
    return Block(
        f"{name or kind}-b{batch_size}", name or kind, kind, batch_size, tuple(cells), schedule
    )


def make_config(
    train: Mapping | None = None,
    *,
    metric: str = "val_loss",
    value: float = 1.0,
    max_steps: int = 100,
    eval_every: int = 10,
    interpolate: bool = False,
    batch_sizes: Sequence[int] = (32,),
    kinds: Sequence[str] = ("sgd",),
    name: str = "t",
):
    """A validated SweepConfig with a train section (grid fields are only placeholders)."""
    raw = dict(
        name=name,
        backend="train",
        grid=dict(
            batch_sizes=list(batch_sizes),
            learning_rates=[0.1],
            optimizers=[dict(kind=k) for k in kinds],
        ),
        target=dict(metric=metric, value=value, interpolate=interpolate),
        budget=dict(max_steps=max_steps, eval_every=eval_every),
        train=dict(train or {}),
    )
    return load_config(raw)
