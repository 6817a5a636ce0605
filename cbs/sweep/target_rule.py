"""The target from a pilot run: near the best any optimizer reaches, by a stated rule.

An easy target measures S_min, not the optimizer (a network that reaches 0.32 error
crosses 0.5 in a handful of steps whatever its hyperparameters). Shallue et al. 2019 put
each workload's target near the best validation error it reaches; ``target.rule`` makes
that a rule instead of a number picked by hand:

1. The *pilot*: every optimizer entry's first-pass cells (its LR grid or its search's
   trials, every seed) at the pilot batch size (default: the largest swept), run for the
   pilot budget (default: ``budget.max_steps``, the largest budget of the sweep) with a
   target no cell can reach, so every cell trains the whole budget. No adaptive rounds.
   It is an ordinary sweep in ``<run folder>/pilot`` (resumable, hashed).
2. ``best`` = the lowest ``best_metric`` of any cell that did not diverge, over every
   optimizer.
3. The target is ``best * (1 + margin)`` (``margin_kind: relative``) or ``best + margin``
   (``absolute``).

The rule, the pilot's folder and config hash, each optimizer's best and the value are
written to ``<run folder>/target_rule.json``; the sweep then runs with ``target.value``
set to that value (the rule stays in the config, so the run's identity names both).
The same config and seeds give the same pilot, hence the same value.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd

from cbs.errors import ConfigError
from cbs.sweep.config import SweepConfig

__all__ = ["pilot_config", "target_from_pilot", "resolve_target", "RULE_FILE"]

RULE_FILE = "target_rule.json"
# No metric of these back ends is below this (losses and error rates are >= 0, in float32
# 1e-300 is 0 and "strictly below 0" never happens), so every pilot cell runs its budget.
_UNREACHABLE = 1e-300


def pilot_config(cfg: SweepConfig) -> SweepConfig:
    """The pilot sweep of a config with ``target.rule`` (see the module docstring)."""
    rule = cfg.target.rule
    b = rule.batch_size or max(cfg.grid.batch_size_values())
    steps = rule.max_steps or cfg.budget.max_steps

    def no_rounds(search):
        return None if search is None else dataclasses.replace(search, max_rounds=0)

    grid = dataclasses.replace(
        cfg.grid,
        batch_sizes=[int(b)],
        adaptive=dataclasses.replace(cfg.grid.adaptive, enabled=False),
        search=no_rounds(cfg.grid.search),
        optimizers=[
            dataclasses.replace(o, search=no_rounds(o.search)) for o in cfg.grid.optimizers
        ],
    )
    return dataclasses.replace(
        cfg,
        name=f"{cfg.name}.pilot",
        grid=grid,
        target=dataclasses.replace(cfg.target, value=_UNREACHABLE, rule=None),
        budget=dataclasses.replace(
            cfg.budget, max_steps=int(steps), eval_every=min(cfg.budget.eval_every, int(steps))
        ),
        output=dataclasses.replace(cfg.output, dir=str(cfg.out_dir / "pilot"), plots=False),
    )


def target_from_pilot(results: pd.DataFrame, rule) -> dict:
    """The rule's value from the pilot's results rows (a pure function: the same rows give
    the same value). Returns the record written to target_rule.json, without paths."""
    ok = results[~results["diverged"].astype(bool)]
    metric = ok["best_metric"].to_numpy(np.float64)
    ok = ok[np.isfinite(metric)]
    if not len(ok):
        raise ConfigError(
            "target.rule",
            "pilot",
            "every pilot cell diverged or has no finite metric; allowed: a pilot grid with "
            "stable learning rates (lower grid.learning_rates / the search's lr range)",
        )
    by_opt = {
        str(k): float(v) for k, v in ok.groupby("optimizer", sort=True)["best_metric"].min().items()
    }
    best = float(min(by_opt.values()))
    value = best * (1.0 + rule.margin) if rule.margin_kind == "relative" else best + rule.margin
    if not value > 0:
        raise ConfigError(
            "target.rule.margin",
            rule.margin,
            f"the pilot's best metric is {best:g}, so this margin gives target {value:g}; "
            "allowed: a margin that gives a target > 0 (margin_kind: absolute with margin > 0)",
        )
    return dict(
        rule=dataclasses.asdict(rule),
        best=best,
        best_by_optimizer=by_opt,
        best_optimizer=min(by_opt, key=by_opt.get),
        value=float(value),
        pilot_cells=int(len(results)),
        pilot_diverged=int(results["diverged"].astype(bool).sum()),
    )


def resolve_target(cfg: SweepConfig, *, progress: bool = False, log=print) -> SweepConfig:
    """``cfg`` with ``target.value`` set by its rule: runs (or resumes) the pilot in
    ``<run folder>/pilot``, writes target_rule.json into the run folder, re-checks the
    value with the back end's own target checks. Configs without a rule come back as they are."""
    if cfg.target.rule is None or cfg.target.value is not None:
        return cfg
    from cbs.store import read_table
    from cbs.sweep.backend import get_backend
    from cbs.sweep.config import config_hash
    from cbs.sweep.runner import run_sweep

    pilot = pilot_config(cfg)
    log(
        f"target.rule: pilot at B = {pilot.grid.batch_size_values()[0]}, "
        f"{pilot.budget.max_steps} steps, in {pilot.out_dir}"
    )
    run_sweep(pilot, progress=progress, log=log)
    rows = read_table(pilot.out_dir, "results")
    record = target_from_pilot(rows, cfg.target.rule)
    record.update(
        pilot_dir=str(Path(pilot.out_dir)),
        pilot_config_hash=config_hash(pilot),
        pilot_batch_size=int(pilot.grid.batch_size_values()[0]),
        pilot_max_steps=int(pilot.budget.max_steps),
        metric=cfg.target.metric,
    )
    resolved = dataclasses.replace(
        cfg, target=dataclasses.replace(cfg.target, value=record["value"])
    )
    get_backend(cfg.backend).check(resolved)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / (RULE_FILE + ".tmp")
    tmp.write_text(json.dumps(record, indent=1, sort_keys=True))
    tmp.replace(out / RULE_FILE)
    log(
        f"target.rule: best {cfg.target.metric} {record['best']:.6g} ({record['best_optimizer']}); "
        f"target {record['value']:.6g}"
    )
    return resolved
