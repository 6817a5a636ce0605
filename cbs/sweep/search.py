"""Quasi-random search of the learning rate and hyperparameters per batch size.

``grid.search`` (or an optimizer entry's ``search``) replaces the LR grid of an entry by
``trials`` points of a scrambled low-discrepancy sequence (Halton or Sobol, from
``scipy.stats.qmc``) in a box: each searched quantity has a range, uniform in log10 or
linearly. The same unit points serve every batch size (common random numbers: the
batch sizes differ only in B, and in the LR scaling rule's factor when one is set), and a
batch size's trials x seeds are the cells of one vmapped block, so N trials cost one
compile.

Searched quantities are named by the optimizer kind's declared hyperparameters (its
:class:`~cbs.sweep.backend.OptimizerSpec`): ``lr``, ``<name>``, or ``one_minus_<name>``
(the range is of 1 - value, e.g. ``one_minus_momentum`` in [1e-3, 1e-1] on a log scale,
as Shallue et al. 2019 searched momentum). Nothing here lists optimizers or
hyperparameters, so any kind a back end registers is searchable.

Edges, extension and flags (the search's adaptive rounds). After a block's trials are
stored, each seed's best trial is found with the analysis's rule (fewest steps to target;
none reached: lowest best metric among cells that did not diverge; every cell diverged:
the LR's low side). A best trial closer than ``edge_fraction`` of a range's width to one
of its sides is *on that edge*. Each edge side that can move moves outward by
``extend_fraction`` of the range's width (in the range's own scale, never past what the
hyperparameter admits), and a new round of ``round_trials`` trials is drawn in the
extended box: the next points of the same scrambled sequence, so a round is a pure
function of the config and the rounds before it. After ``max_rounds`` rounds, or where a
side cannot move (a bound such as b2 < 1), an edge is *flagged* in the manifest
(``adaptive.families[<block>].edge``, per searched quantity) and the analysis reports it.
Rounds follow from the stored rows alone, with ids ``<block>__a<r>``, so an interrupted
sweep resumes with the same blocks and never duplicates rows.
"""

from __future__ import annotations

import dataclasses
import math
import warnings

import numpy as np
import pandas as pd

from cbs.sweep.backend import Block, Cell

__all__ = [
    "ONE_MINUS",
    "SearchDim",
    "SearchPlan",
    "resolve_name",
    "unit_points",
    "search_plan",
    "search_cells",
    "search_rounds",
    "best_trials",
]

ONE_MINUS = "one_minus_"


def resolve_name(key: str) -> tuple[str, bool]:
    """(hyperparameter or "lr", whether the range is of 1 - value) of a space key."""
    if key.startswith(ONE_MINUS) and len(key) > len(ONE_MINUS):
        return key[len(ONE_MINUS) :], True
    return key, False


@dataclasses.dataclass(frozen=True)
class SearchDim:
    """One searched quantity, in its own coordinate ``t`` (log10 of the range's quantity on
    a log scale, the quantity itself on a linear one)."""

    key: str  # the space key: "lr", "<hp>" or "one_minus_<hp>"
    target: str  # "lr" or the hyperparameter's name
    one_minus: bool
    log: bool
    lo: float  # the first pass's range, in t
    hi: float
    t_min: float  # how far the range may grow, in t (what the hyperparameter admits)
    t_max: float
    min_closed: bool = False  # whether t_min itself is admitted (else only approached)
    max_closed: bool = False

    def value(self, t: np.ndarray) -> np.ndarray:
        q = np.power(10.0, t) if self.log else np.asarray(t, np.float64)
        return 1.0 - q if self.one_minus else q

    def coordinate(self, value: float) -> float:
        q = 1.0 - value if self.one_minus else value
        if self.log:
            return math.log10(q) if q > 0 else -math.inf
        return float(q)


@dataclasses.dataclass(frozen=True)
class SearchPlan:
    """A block family's search, resolved: what the first pass and every round draw from."""

    dims: tuple[SearchDim, ...]  # sorted by key: the config's key order is not identity
    sequence: str
    seed: int
    trials: int
    round_trials: int
    max_rounds: int
    edge_fraction: float
    extend_fraction: float
    lr_factor: float  # the lr_scaling rule's factor at this batch size
    combos: tuple[tuple[tuple[str, float], ...], ...]  # the other hyperparameters' values
    seeds: tuple[int, ...]


def unit_points(sequence: str, dim: int, seed: int, start: int, n: int) -> np.ndarray:
    """Points ``start .. start + n - 1`` of the scrambled ``sequence`` in [0, 1)^dim."""
    from scipy.stats import qmc

    rng = np.random.default_rng(seed)
    engine = (
        qmc.Halton(dim, scramble=True, seed=rng)
        if sequence == "halton"
        else qmc.Sobol(dim, scramble=True, seed=rng)
    )
    if start:
        engine.fast_forward(start)
    with warnings.catch_warnings():
        # Sobol's balance holds for powers of two; other counts are still low-discrepancy
        warnings.filterwarnings("ignore", message=".*balance properties.*")
        return engine.random(n)


def _admissible_t(spec, one_minus: bool, log: bool) -> tuple[float, float, bool, bool]:
    """The widest t interval whose values the hyperparameter admits, and whether each end
    is itself admitted (ge / le) or only a limit (gt / lt, or zero on a log scale)."""
    lo, lo_closed = (spec.ge, True) if spec.ge is not None else (spec.gt, False)
    hi, hi_closed = (spec.le, True) if spec.le is not None else (spec.lt, False)
    lo = -math.inf if lo is None else float(lo)
    hi = math.inf if hi is None else float(hi)
    if one_minus:
        lo, hi, lo_closed, hi_closed = 1.0 - hi, 1.0 - lo, hi_closed, lo_closed
    if log:
        lo_t = math.log10(lo) if lo > 0 else -math.inf
        hi_t = math.log10(hi) if hi > 0 else -math.inf
        return lo_t, hi_t, lo_closed and lo > 0, hi_closed
    return lo, hi, lo_closed, hi_closed


def search_plan(search, spec, lr_factor: float, combos, seeds) -> SearchPlan:
    """The :class:`SearchPlan` of a ``Search`` config for an optimizer kind's ``spec``."""
    dims = []
    for key in sorted(search.space):
        rng = search.space[key]
        target, one_minus = resolve_name(key)
        log = rng.scale == "log"
        lo, hi = (math.log10(rng.min), math.log10(rng.max)) if log else (rng.min, rng.max)
        t_min, t_max, min_closed, max_closed = -math.inf, math.inf, False, False
        if target == "lr" and not log:
            t_min = 0.0
        if target != "lr":
            t_min, t_max, min_closed, max_closed = _admissible_t(
                spec.hparams[target], one_minus, log
            )
        dims.append(
            SearchDim(key, target, one_minus, log, lo, hi, t_min, t_max, min_closed, max_closed)
        )
    return SearchPlan(
        tuple(dims),
        search.sequence,
        int(search.seed),
        int(search.trials),
        int(search.round_trials or search.trials),
        int(search.max_rounds),
        float(search.edge_fraction),
        float(search.extend_fraction),
        float(lr_factor),
        tuple(tuple(sorted(c.items())) for c in combos),
        tuple(int(s) for s in seeds),
    )


def _box(plan: SearchPlan) -> dict[str, tuple[float, float]]:
    return {d.key: (d.lo, d.hi) for d in plan.dims}


def search_cells(
    plan: SearchPlan,
    box: dict[str, tuple[float, float]],
    start: int,
    n: int,
    *,
    optimizer: str,
    kind: str,
    batch_size: int,
    defaults: dict,
    cell_id,
) -> list[Cell]:
    """Cells of trials ``start .. start + n - 1`` in ``box``: trial (outer), the other
    hyperparameters' combination, seed (inner)."""
    u = unit_points(plan.sequence, len(plan.dims), plan.seed, start, n)
    values = {}
    for j, d in enumerate(plan.dims):
        lo, hi = box[d.key]
        values[d.target] = d.value(lo + u[:, j] * (hi - lo))
    cells = []
    for i in range(n):
        lr = float(values["lr"][i]) * plan.lr_factor
        for combo in plan.combos:
            hp = dict(defaults)
            hp.update(dict(combo))
            hp.update({k: float(v[i]) for k, v in values.items() if k != "lr"})
            for seed in plan.seeds:
                cells.append(
                    Cell(
                        cell_id(optimizer, batch_size, lr, hp, seed),
                        optimizer,
                        kind,
                        batch_size,
                        lr,
                        hp,
                        int(seed),
                    )
                )
    return cells


def best_trials(rows: pd.DataFrame) -> dict[int, pd.Series | None]:
    """Per seed, the best cell (a results row), by the analysis's rule
    (:func:`cbs.sweep.adaptive.best_cell`); None when every cell of that seed diverged."""
    from cbs.sweep.adaptive import best_cell

    return {int(seed): best_cell(cells) for seed, cells in rows.groupby("seed", sort=True)}


def _edges(plan: SearchPlan, box: dict, rows: pd.DataFrame) -> tuple[dict, dict]:
    """({key: {sides}} where a seed's best trial sits on a side of the current box, and
    {seed: {key: value}} of the best trials)."""
    edges: dict[str, set] = {}
    best_points = {}
    for seed, best in best_trials(rows).items():
        if best is None:  # every trial diverged: smaller learning rates are needed
            edges.setdefault("lr", set()).add("low")
            best_points[seed] = None
            continue
        point = {}
        for d in plan.dims:
            value = (
                float(best["lr"]) / plan.lr_factor
                if d.target == "lr"
                else float(best[f"hp_{d.target}"])
            )
            point[d.key] = 1.0 - value if d.one_minus else value  # the range's quantity
            lo, hi = box[d.key]
            t = d.coordinate(value)
            margin = plan.edge_fraction * (hi - lo)
            if t - lo < margin:
                edges.setdefault(d.key, set()).add("low")
            if hi - t < margin:
                edges.setdefault(d.key, set()).add("high")
        best_points[seed] = point
    return edges, best_points


def _extend(plan: SearchPlan, box: dict, edges: dict) -> tuple[dict, dict]:
    """(the extended box, {key: sides that could not move}). A side moves by
    extend_fraction of the range's width, to a bound of the hyperparameter at most (halfway
    to a bound it admits only as a limit, such as b2 < 1), and counts as stuck when it
    would gain less than a hundredth of the width."""
    new = dict(box)
    stuck: dict[str, set] = {}
    dims = {d.key: d for d in plan.dims}
    for key, sides in edges.items():
        d = dims[key]
        lo, hi = new[key]
        width = hi - lo
        for side in sorted(sides):
            if side == "low":
                got = lo - plan.extend_fraction * width
                if got <= d.t_min:
                    got = d.t_min if d.min_closed else (lo + d.t_min) / 2
                if lo - got < 0.01 * width:
                    stuck.setdefault(key, set()).add(side)
                else:
                    lo = got
            else:
                got = hi + plan.extend_fraction * width
                if got >= d.t_max:
                    got = d.t_max if d.max_closed else (hi + d.t_max) / 2
                if got - hi < 0.01 * width:
                    stuck.setdefault(key, set()).add(side)
                else:
                    hi = got
        new[key] = (lo, hi)
    return new, stuck


@dataclasses.dataclass(frozen=True)
class SearchRound:
    """One extension round of a search family."""

    round: int
    kind: str
    block: Block
    reasons: tuple[str, ...]
    box: dict

    def record(self) -> dict:
        return dict(
            round=self.round,
            kind=self.kind,
            block_id=self.block.block_id,
            cells=len(self.block.cells),
            box=self.box,
            reasons=list(self.reasons),
        )


def box_values(plan: SearchPlan, box: dict) -> dict[str, list[float]]:
    """The box as [min, max] of each range's own quantity (lr before the scaling factor)."""
    out = {}
    for d in plan.dims:
        lo, hi = box[d.key]
        q = [10.0**lo, 10.0**hi] if d.log else [lo, hi]
        out[d.key] = [float(q[0]), float(q[1])]
    return out


def search_rounds(base: Block, results: dict[str, pd.DataFrame], *, cell_id):
    """Replays the search rounds of one block family from stored results.

    Returns (done, pending, status) as :func:`cbs.sweep.adaptive.adaptive_rounds`; the
    status adds ``box`` (the final ranges, per key [min, max] of its quantity), ``best``
    (per seed, the best trial's searched values) and ``edge`` ({key: [sides]} still on an
    edge: flagged).
    """
    from cbs.sweep.adaptive import round_block_id

    plan: SearchPlan = base.search
    done: list[SearchRound] = []
    if base.block_id not in results:
        return done, None, dict(rounds=0, finished=False, edge={}, search=True)
    defaults = dict(base.cells[0].hparams) if base.cells else {}
    rows = [results[base.block_id]]
    box = _box(plan)
    start = plan.trials
    r = 0
    while True:
        table = pd.concat(rows, ignore_index=True)
        edges, best = _edges(plan, box, table)
        extended, stuck = _extend(plan, box, edges) if edges else (box, {})
        movable = {k: s - stuck.get(k, set()) for k, s in edges.items()}
        movable = {k: s for k, s in movable.items() if s}
        if not movable or r >= plan.max_rounds:
            status = dict(
                rounds=r,
                finished=True,
                search=True,
                edge={k: sorted(s) for k, s in sorted(edges.items())},
                box=box_values(plan, box),
                best={str(s): p for s, p in best.items()},
            )
            return done, None, status
        cells = search_cells(
            plan,
            extended,
            start,
            plan.round_trials,
            optimizer=base.optimizer,
            kind=base.kind,
            batch_size=base.batch_size,
            defaults=defaults,
            cell_id=cell_id,
        )
        reasons = tuple(f"{k}: {'/'.join(sorted(s))} edge" for k, s in sorted(movable.items()))
        nxt = SearchRound(
            r + 1,
            "extend",
            dataclasses.replace(
                base, block_id=round_block_id(base.block_id, r + 1), cells=tuple(cells)
            ),
            reasons,
            box_values(plan, extended),
        )
        if nxt.block.block_id not in results:
            return done, nxt, dict(rounds=r, finished=False, edge={}, search=True)
        done.append(nxt)
        rows.append(results[nxt.block.block_id])
        box = extended
        start += plan.round_trials
        r += 1
