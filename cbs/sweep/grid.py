"""Expands a config into cells, grouped into blocks (one batch size x one optimizer entry)."""

from __future__ import annotations

import hashlib
import itertools
import json

from cbs.sweep.backend import Block, Cell
from cbs.sweep.config import HParamRange, LogRange, SweepConfig

__all__ = ["expand_blocks", "cell_id"]


def cell_id(optimizer: str, batch_size: int, lr: float, hparams: dict, seed: int) -> str:
    """A stable id for a cell's coordinates (same coordinates -> same id, across runs)."""
    key = json.dumps(
        [
            optimizer,
            int(batch_size),
            float(lr).hex(),
            sorted((k, float(v).hex()) for k, v in hparams.items()),
            int(seed),
        ]
    )
    return hashlib.sha1(key.encode()).hexdigest()[:16]


def _values(v) -> list[float]:
    if isinstance(v, HParamRange):
        return v.values()
    return [float(x) for x in v] if isinstance(v, list) else [float(v)]


def expand_blocks(cfg: SweepConfig, backend) -> list[Block]:
    """All blocks of the sweep, in a deterministic order (optimizer, then batch size).

    Within a block the cell order is LR (outer), hyperparameters (in the kind's declared
    order), seed (inner).
    """
    blocks = []
    for opt in cfg.grid.optimizers:
        lr_source = (
            opt.learning_rates if opt.learning_rates is not None else cfg.grid.learning_rates
        )
        lrs = (
            lr_source.values() if isinstance(lr_source, LogRange) else [float(x) for x in lr_source]
        )
        specs = backend.optimizers[opt.kind].hparams
        names = list(specs)
        axes = [
            _values(opt.hparams[n]) if n in opt.hparams else [float(specs[n].default)]
            for n in names
        ]
        for batch_size in cfg.grid.batch_size_values():
            cells = []
            for lr in lrs:
                for combo in itertools.product(*axes):
                    hp = dict(zip(names, combo))
                    for seed in cfg.grid.seeds:
                        cells.append(
                            Cell(
                                cell_id(opt.label, batch_size, lr, hp, seed),
                                opt.label,
                                opt.kind,
                                int(batch_size),
                                float(lr),
                                hp,
                                int(seed),
                            )
                        )
            blocks.append(
                Block(
                    f"{opt.label}__B{batch_size}",
                    opt.label,
                    opt.kind,
                    int(batch_size),
                    tuple(cells),
                    opt.schedule,
                )
            )
    return blocks
