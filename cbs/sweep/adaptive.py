"""Adaptive learning-rate grids: extend an edge optimum outward, then zoom in once.

After a block's first pass, each (optimizer, batch size, hyperparameters) group of its
cells is checked: if, for any seed, the group's best LR is the smallest or largest LR the
group has tried, the grid is extended on that side by ``points`` LRs with the spacing of
the two outermost LRs on that side (log-uniform), and the new cells run as a new block.
At most ``max_extend`` such rounds; then (``zoom``) one round adds the geometric
midpoints between each seed's best LR and its two neighbours (half the spacing), so the
optimum is resolved more finely. A group whose best LR is still on an edge after the last
extension round is *flagged* (recorded in the manifest; the analysis warns on it): the
procedure always ends, never loops.

"Best" follows the analysis (:func:`cbs.analysis.steps_table`): the fewest steps to
target among the group's cells of one seed, or, if none reached the target, the lowest
``best_metric`` among the cells that did not diverge; a seed whose cells all diverged
counts as a best LR at the low edge (smaller LRs are needed).

Rounds are pure functions of the stored results: round r's block exists only once the
rounds before it are on disk, and its id (``<base id>__a<r>``) and cells follow from
them, so an interrupted sweep resumes with the same blocks and never duplicates rows.

A family whose entry runs a quasi-random search (``grid.search``) has rounds of its own
that extend any searched range, not only the LR's (:mod:`cbs.sweep.search`); they run
whether or not the LR grid's adaptive rounds are enabled.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pandas as pd

from cbs.sweep.backend import Block, Cell

__all__ = ["Round", "adaptive_rounds", "group_edges", "max_adaptive_cells", "round_block_id"]

_REL = 1e-9


def max_adaptive_cells(base: Block, *, max_extend: int, points: int, zoom: bool) -> int:
    """The most cells the adaptive rounds of ``base`` can add (what --dry-run promises).

    Per hyperparameter group and extension round at most ``points`` LRs on each side (the
    seeds' best LRs may sit on both edges), each for every seed; the zoom round at most the
    two midpoints around each seed's best LR, for every seed.

    >>> from cbs.sweep.backend import Cell
    >>> cells = tuple(Cell(str(i), "o", "sgd", 8, lr, {}, s) for i, (lr, s) in
    ...               enumerate([(0.1, 0), (1.0, 0), (0.1, 1), (1.0, 1)]))
    >>> max_adaptive_cells(Block("b", "o", "sgd", 8, cells), max_extend=2, points=2, zoom=True)
    24
    """
    groups = len({_hp_key(c.hparams) for c in base.cells})
    seeds = len({c.seed for c in base.cells})
    per_group_lrs = 2 * points * max_extend + (2 * seeds if zoom else 0)
    return groups * seeds * per_group_lrs


def round_block_id(base_id: str, r: int) -> str:
    return f"{base_id}__a{r}"


@dataclasses.dataclass(frozen=True)
class Round:
    """One adaptive round of a block family: what it added and why."""

    round: int
    kind: str  # "extend" or "zoom"
    block: Block
    reasons: tuple[str, ...]  # e.g. "momentum=0.9: high edge (seed 0)"

    def record(self) -> dict:
        return dict(
            round=self.round,
            kind=self.kind,
            block_id=self.block.block_id,
            cells=len(self.block.cells),
            lrs=sorted({c.lr for c in self.block.cells}),
            reasons=list(self.reasons),
        )


def _hp_key(hparams) -> tuple:
    return tuple(sorted((k, float(v)) for k, v in hparams.items()))


def best_cell(cells: pd.DataFrame) -> pd.Series | None:
    """The best cell (a results row) of one group and seed, by the analysis's rule: the
    fewest steps to target among the cells that reached it (ties: the lower final metric),
    else the lowest best metric among those that did not diverge (ties: the lower LR);
    None when every cell diverged. The LR rounds and the search's rounds both use it."""
    div = cells["diverged"].astype(bool).to_numpy()
    steps = cells["steps_to_target"].to_numpy(np.float64)
    reached = cells["reached"].astype(bool).to_numpy() & ~div & np.isfinite(steps)
    if reached.any():
        sub = cells[reached].assign(_s=steps[reached])
        order = ["_s"] + (["final_metric"] if "final_metric" in sub else [])
        return sub.sort_values(order, kind="stable").iloc[0].drop("_s")
    ok = cells[~div]
    if not len(ok):
        return None
    key = "best_metric" if "best_metric" in ok else "final_metric"
    return ok.sort_values([key, "lr"], kind="stable").iloc[0]


def _best_lr(cells: pd.DataFrame) -> float | None:
    """The best LR of one group and seed (None when every cell diverged)."""
    best = best_cell(cells)
    return None if best is None else float(best["lr"])


def group_edges(rows: pd.DataFrame) -> dict[tuple, dict]:
    """Per hyperparameter group (a sorted tuple of (name, value)): its LRs, the per-seed
    best LRs and the edges they sit on ({"low", "high"} subset)."""
    hp_cols = sorted(c for c in rows.columns if c.startswith("hp_"))
    out = {}
    groups = rows.groupby(hp_cols, sort=True) if hp_cols else [((), rows)]
    for key, g in groups:
        key = key if isinstance(key, tuple) else (key,)
        hk = tuple(sorted((c[3:], float(v)) for c, v in zip(hp_cols, key)))
        lrs = np.sort(g["lr"].unique())
        best, edges = {}, set()
        for seed, gs in g.groupby("seed", sort=True):
            b = _best_lr(gs)
            best[int(seed)] = b
            if len(lrs) < 2:
                continue
            if b is None or b <= lrs[0] * (1 + _REL):
                edges.add("low")
            elif b >= lrs[-1] * (1 - _REL):
                edges.add("high")
        out[hk] = dict(lrs=lrs, best=best, edges=edges)
    return out


def _extension(lrs: np.ndarray, side: str, points: int) -> list[float]:
    if side == "high":
        ratio = lrs[-1] / lrs[-2]
        return [float(lrs[-1] * ratio**j) for j in range(1, points + 1)]
    ratio = lrs[1] / lrs[0]
    return [float(lrs[0] / ratio**j) for j in range(1, points + 1)]


def _zoom(lrs: np.ndarray, best: dict) -> list[float]:
    new = set()
    for b in best.values():
        if b is None:
            continue
        i = int(np.argmin(np.abs(np.log(lrs) - math.log(b))))
        for j in (i - 1, i + 1):
            if 0 <= j < len(lrs):
                new.add(float(math.sqrt(lrs[i] * lrs[j])))
    return sorted(new)


def _make_block(
    base: Block, r: int, lrs_by_group: dict[tuple, list[float]], seeds, cell_id
) -> Block:
    proto = {_hp_key(c.hparams): c.hparams for c in base.cells}
    cells = []
    for hk, lrs in lrs_by_group.items():
        hp = dict(proto.get(hk, dict(hk)))
        for lr in lrs:
            for seed in seeds:
                cells.append(
                    Cell(
                        cell_id(base.optimizer, base.batch_size, lr, hp, seed),
                        base.optimizer,
                        base.kind,
                        base.batch_size,
                        float(lr),
                        hp,
                        int(seed),
                    )
                )
    return dataclasses.replace(base, block_id=round_block_id(base.block_id, r), cells=tuple(cells))


def adaptive_rounds(
    base: Block,
    results: dict[str, pd.DataFrame],
    *,
    max_extend: int,
    points: int,
    zoom: bool,
    cell_id,
) -> tuple[list[Round], Round | None, dict]:
    """Replays the adaptive rounds of one block family from stored results.

    Args:
        base: the family's first-pass block (from the config's grid).
        results: stored results rows by block id (rounds not yet run are absent).
        max_extend: most extension rounds; points: LRs added per side and round;
        zoom: whether one zoom round follows.
        cell_id: the grid's cell-id function (stable ids for the new cells).

    Returns:
        (done, pending, status): rounds whose rows are stored; the next round to run (None
        when the family is finished or waits for its base block); and the family's status
        ({"rounds": n, "edge": {group: [sides]}, "finished": bool}).
    """
    if base.search is not None:  # a quasi-random search family: its own rounds
        from cbs.sweep.search import search_rounds

        return search_rounds(base, results, cell_id=cell_id)
    seeds = sorted({c.seed for c in base.cells})
    done: list[Round] = []
    if base.block_id not in results:
        return done, None, dict(rounds=0, finished=False, edge={})
    rows = [results[base.block_id]]
    n_extend, zoomed, r = 0, False, 0
    while True:
        table = pd.concat(rows, ignore_index=True)
        groups = group_edges(table)
        edge = {hk: g["edges"] for hk, g in groups.items() if g["edges"]}
        nxt = None
        if edge and n_extend < max_extend:
            add = {
                hk: sorted(
                    x for side in sorted(sides) for x in _extension(groups[hk]["lrs"], side, points)
                )
                for hk, sides in edge.items()
            }
            reasons = tuple(f"{_fmt_hp(hk)}: {'/'.join(sorted(s))} edge" for hk, s in edge.items())
            nxt = Round(r + 1, "extend", _make_block(base, r + 1, add, seeds, cell_id), reasons)
            n_extend += 1
        elif zoom and not zoomed:
            # Groups still on an edge after the last extension are flagged, not zoomed.
            add = {
                hk: [
                    x
                    for x in _zoom(g["lrs"], g["best"])
                    if not np.isclose(g["lrs"], x, rtol=1e-9).any()
                ]
                for hk, g in groups.items()
                if hk not in edge
            }
            add = {hk: v for hk, v in add.items() if v}
            zoomed = True
            if add:
                nxt = Round(
                    r + 1,
                    "zoom",
                    _make_block(base, r + 1, add, seeds, cell_id),
                    ("refine the optimum",),
                )
        if nxt is None:
            status = dict(
                rounds=r, finished=True, edge={_fmt_hp(hk): sorted(s) for hk, s in edge.items()}
            )
            return done, None, status
        if nxt.block.block_id not in results:
            return done, nxt, dict(rounds=r, finished=False, edge={})
        done.append(nxt)
        rows.append(results[nxt.block.block_id])
        r += 1


def _fmt_hp(hk: tuple) -> str:
    return ",".join(f"{k}={v:g}" for k, v in hk) or "-"
