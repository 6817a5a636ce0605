"""Expands a config into cells, grouped into blocks (one batch size x one optimizer entry)."""

from __future__ import annotations

import hashlib
import itertools
import json

from cbs.sweep.backend import Block, Cell
from cbs.sweep.config import HParamRange, LogRange, OptimizerEntry, SweepConfig, search_of

__all__ = ["expand_blocks", "cell_id", "learning_rates_at"]


def cell_id(optimizer: str, batch_size: int, lr: float, hparams: dict, seed: int) -> str:
    """A stable id for a cell's coordinates (same coordinates -> same id, across runs): the
    first 16 hex digits of the SHA-1 of the JSON text
    ``[optimizer, batch_size, lr.hex(), sorted [name, value.hex()] pairs, seed]``."""
    return _cell_id(
        json.dumps(optimizer), int(batch_size), _lr_json(lr), _hparams_json(hparams), int(seed)
    )


def _lr_json(lr: float) -> str:
    return json.dumps(float(lr).hex())


def _hparams_json(hparams: dict) -> str:
    return json.dumps(sorted((k, float(v).hex()) for k, v in hparams.items()))


def _cell_id(optimizer_json: str, batch_size: int, lr_json: str, hp_json: str, seed: int) -> str:
    # json.dumps of the list, assembled from its encoded items (json.dumps([a, b]) is
    # "[" + json.dumps(a) + ", " + json.dumps(b) + "]"), so a sweep's many cells encode
    # each LR and hyperparameter tuple once instead of once per cell
    key = f"[{optimizer_json}, {batch_size}, {lr_json}, {hp_json}, {seed}]"
    return hashlib.sha1(key.encode()).hexdigest()[:16]


def _values(v) -> list[float]:
    if isinstance(v, HParamRange):
        return v.values()
    return [float(x) for x in v] if isinstance(v, list) else [float(v)]


def _grid_lrs(cfg: SweepConfig, opt: OptimizerEntry) -> list[float]:
    source = opt.learning_rates if opt.learning_rates is not None else cfg.grid.learning_rates
    return source.values() if isinstance(source, LogRange) else [float(x) for x in source]


def lr_factor_at(cfg: SweepConfig, opt: OptimizerEntry, batch_size: int) -> float:
    """The ``lr_scaling`` factor of entry ``opt`` at ``batch_size`` (the entry's own rule,
    else ``grid.lr_scaling``; 1 when neither scales)."""
    rule = opt.lr_scaling if opt.lr_scaling is not None else cfg.grid.lr_scaling
    return rule.factor(batch_size, min(cfg.grid.batch_size_values()))


def learning_rates_at(cfg: SweepConfig, opt: OptimizerEntry, batch_size: int) -> list[float]:
    """The first-pass LRs of optimizer entry ``opt`` at ``batch_size``: its grid (the
    entry's own or ``grid.learning_rates``) times the ``lr_scaling`` factor at that batch
    size (the entry's own rule, else ``grid.lr_scaling``; 1 when neither scales); for an
    entry with a search, its first-pass trials' LRs."""
    f = lr_factor_at(cfg, opt, batch_size)
    if search_of(cfg, opt) is not None:
        return sorted({c.lr for c in _search_block(cfg, opt, batch_size, _backend_of(cfg)).cells})
    # x * 1.0 == x exactly: at the reference batch size (and without scaling) the LRs, and
    # so the cell ids, are the listed ones bit for bit
    return [lr * f for lr in _grid_lrs(cfg, opt)]


def expand_blocks(cfg: SweepConfig, backend) -> list[Block]:
    """All blocks of the sweep, in a deterministic order (optimizer, then batch size).

    Within a block the cell order is LR (outer), hyperparameters (in the kind's declared
    order), seed (inner).
    """
    blocks = []
    for opt in cfg.grid.optimizers:
        if search_of(cfg, opt) is not None:
            blocks += [
                _search_block(cfg, opt, int(b), backend) for b in cfg.grid.batch_size_values()
            ]
            continue
        specs = backend.optimizers[opt.kind].hparams
        names = list(specs)
        axes = [
            _values(opt.hparams[n]) if n in opt.hparams else [float(specs[n].default)]
            for n in names
        ]
        combos = [dict(zip(names, combo)) for combo in itertools.product(*axes)]
        combos_json = [_hparams_json(hp) for hp in combos]
        label_json = json.dumps(opt.label)
        for batch_size in cfg.grid.batch_size_values():
            lrs = learning_rates_at(cfg, opt, batch_size)
            lrs_json = [_lr_json(lr) for lr in lrs]
            cells = []
            for lr, lr_json in zip(lrs, lrs_json):
                for hp, hp_json in zip(combos, combos_json):
                    for seed in cfg.grid.seeds:
                        cells.append(
                            Cell(
                                _cell_id(label_json, int(batch_size), lr_json, hp_json, int(seed)),
                                opt.label,
                                opt.kind,
                                int(batch_size),
                                float(lr),
                                dict(hp),
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


def _backend_of(cfg: SweepConfig):
    from cbs.sweep.backend import get_backend

    return get_backend(cfg.backend)


def _search_block(cfg: SweepConfig, opt: OptimizerEntry, batch_size: int, backend) -> Block:
    """The first-pass block of a searched entry at one batch size: its trials x the other
    hyperparameters' grid x seeds (cbs.sweep.search)."""
    from cbs.sweep.search import search_cells, search_plan

    spec = backend.optimizers[opt.kind]
    search = search_of(cfg, opt)
    searched = {k for k in (_target(key) for key in search.space)}
    names = [n for n in spec.hparams if n not in searched]
    axes = [
        _values(opt.hparams[n]) if n in opt.hparams else [float(spec.hparams[n].default)]
        for n in names
    ]
    combos = [dict(zip(names, combo)) for combo in itertools.product(*axes)]
    plan = search_plan(
        search, spec, lr_factor_at(cfg, opt, batch_size), combos, list(cfg.grid.seeds)
    )
    defaults = {n: float(spec.hparams[n].default) for n in spec.hparams}
    box = {d.key: (d.lo, d.hi) for d in plan.dims}
    cells = search_cells(
        plan,
        box,
        0,
        plan.trials,
        optimizer=opt.label,
        kind=opt.kind,
        batch_size=batch_size,
        defaults=defaults,
        cell_id=cell_id,
    )
    return Block(
        f"{opt.label}__B{batch_size}",
        opt.label,
        opt.kind,
        batch_size,
        tuple(cells),
        opt.schedule,
        plan,
    )


def _target(key: str) -> str:
    from cbs.sweep.search import resolve_name

    return resolve_name(key)[0]
