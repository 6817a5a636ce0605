"""Which shard runs which block: cost-balanced, deterministic.

A block's cost is first *estimated* by its back end (:meth:`Backend.block_cost`; the train
back end: per cell a fixed overhead for compiles and evaluations plus steps budget x examples
touched per step x model FLOPs at a nominal throughput) and, when measured block times of
an earlier run are given, *refined*: a block measured before costs its measured seconds
(scaled by its cell count), any other its estimate times the median measured/estimated
ratio of its optimizer kind (of all blocks when the kind was never measured). The costs
are frozen into the run folder's manifest by the first process that creates it, so every
shard of a sweep, started at any time, computes the same assignment.

Assignment is longest-processing-time first: blocks by decreasing cost (ties by block id)
each to the currently least-loaded shard (ties by the lower index), whose makespan is
within 4/3 of the optimum and in practice close to the mean load.
"""

from __future__ import annotations

import zlib
from collections import defaultdict
from collections.abc import Mapping, Sequence

import numpy as np

__all__ = ["hash_assignment", "cost_assignment", "imbalance", "refine_costs", "shard_of"]


def hash_assignment(block_ids: Sequence[str], count: int) -> dict[str, int]:
    """The cost-blind baseline: a stable CRC32 of the block id modulo the shard count."""
    return {b: zlib.crc32(b.encode()) % count for b in block_ids}


def cost_assignment(costs: Mapping[str, float], count: int) -> dict[str, int]:
    """Block id -> shard index by longest-processing-time-first; deterministic."""
    loads = np.zeros(count)
    out = {}
    for block_id in sorted(costs, key=lambda b: (-float(costs[b]), b)):
        shard = int(np.argmin(loads))  # argmin returns the lowest index among ties
        out[block_id] = shard
        loads[shard] += float(costs[block_id])
    return out


def shard_of(assignment: Mapping[str, int], index: int) -> set[str]:
    return {b for b, s in assignment.items() if s == index}


def imbalance(assignment: Mapping[str, int], seconds: Mapping[str, float], count: int) -> float:
    """Makespan imbalance: the slowest shard's total time over the mean shard time."""
    loads = np.zeros(count)
    for block_id, shard in assignment.items():
        loads[shard] += float(seconds[block_id])
    mean = loads.mean()
    return float(loads.max() / mean) if mean > 0 else 1.0


def refine_costs(
    estimates: Mapping[str, float],
    cells: Mapping[str, int],
    kinds: Mapping[str, str],
    measured: Mapping[str, tuple[float, int]],
) -> dict[str, float]:
    """Costs in seconds from measured block times where available.

    Args:
      estimates: block id -> estimated cost (arbitrary units).
      cells: block id -> number of cells now.
      kinds: block id -> optimizer kind.
      measured: block id -> (seconds, cells when measured), from an earlier run.

    Returns:
      block id -> cost. Without any usable measurement, the estimates unchanged.
    """
    ratios: dict[str, list[float]] = defaultdict(list)
    for b, (sec, n) in measured.items():
        if b in estimates and estimates[b] > 0 and n > 0 and sec > 0:
            ratios[kinds[b]].append(sec / n * cells[b] / estimates[b])
    if not ratios:
        return dict(estimates)
    overall = float(np.median([r for rs in ratios.values() for r in rs]))
    out = {}
    for b, est in estimates.items():
        if b in measured and measured[b][1] > 0 and measured[b][0] > 0:
            sec, n = measured[b]
            out[b] = sec / n * cells[b]
        else:
            out[b] = est * (float(np.median(ratios[kinds[b]])) if ratios.get(kinds[b]) else overall)
    return out
