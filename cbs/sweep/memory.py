"""Memory-aware blocks: split a block whose cells do not fit, retry one that ran out.

A block is one vmapped program over its cells, so its device memory grows with its width.
When a memory budget is known (``CBS_MEMORY_BUDGET``, else 80 % of the first local
device's ``bytes_limit`` as XLA reports it; CPUs report none, so nothing is split there
unless asked), a block of a splittable back end whose cells need more than the budget runs
as sub-blocks of as many cells as fit (per device). Independently, a block that fails with
an out-of-memory error is retried as two halves, recursively down to single cells, instead
of ending the sweep. Sub-block results are concatenated in cell order, so the stored block
is the same as an unsplit one (cells are independent; only XLA's summation order within a
vmapped batch can differ, as for any change of width).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence

import pandas as pd

from cbs.sweep.backend import Block, BlockResult

__all__ = [
    "memory_budget",
    "parse_bytes",
    "is_out_of_memory",
    "split_block",
    "concat_results",
    "run_with_memory",
]

_UNITS = {
    "": 1,
    "b": 1,
    "k": 2**10,
    "kb": 2**10,
    "kib": 2**10,
    "m": 2**20,
    "mb": 2**20,
    "mib": 2**20,
    "g": 2**30,
    "gb": 2**30,
    "gib": 2**30,
    "t": 2**40,
    "tb": 2**40,
    "tib": 2**40,
}


def parse_bytes(text: str, name: str = "CBS_MEMORY_BUDGET") -> int:
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS or float(m.group(1)) <= 0:
        raise ValueError(
            f"{name}: got {text!r}; allowed: a positive size such as 500MB, 2GiB or 123456"
        )
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def memory_budget() -> int | None:
    """Bytes a block may use per device: ``CBS_MEMORY_BUDGET``, else 80 % of XLA's limit for
    the first local device, else None (no limit known: CPU)."""
    text = os.environ.get("CBS_MEMORY_BUDGET")
    if text:
        return parse_bytes(text)
    import jax

    try:
        stats = jax.local_devices()[0].memory_stats()
    except Exception:  # noqa: BLE001 - some PJRT plugins raise instead of returning None
        stats = None
    limit = (stats or {}).get("bytes_limit")
    return int(0.8 * limit) if limit else None


def is_out_of_memory(exc: BaseException) -> bool:
    """XLA's out-of-memory failures (RESOURCE_EXHAUSTED from allocation or compilation)."""
    text = f"{type(exc).__name__}: {exc}"
    return (
        "RESOURCE_EXHAUSTED" in text
        or "Out of memory" in text
        or "out of memory" in text
        or isinstance(exc, MemoryError)
    )


def split_block(block: Block, size: int) -> list[Block]:
    """Consecutive sub-blocks of at most ``size`` cells (same block id: they are one block)."""
    size = max(1, int(size))
    return [
        Block(
            block.block_id,
            block.optimizer,
            block.kind,
            block.batch_size,
            block.cells[i : i + size],
            block.schedule,
        )
        for i in range(0, len(block.cells), size)
    ]


def concat_results(results: Sequence[BlockResult]) -> BlockResult:
    if len(results) == 1:
        return results[0]
    cells = [c for r in results for c in r.cells]
    curves = [r.curves for r in results if r.curves is not None and len(r.curves)]
    tables: dict[str, list] = {}
    for r in results:
        for name, df in r.tables.items():
            if df is not None:
                tables.setdefault(name, []).append(df)
    return BlockResult(
        cells=cells,
        curves=pd.concat(curves, ignore_index=True) if curves else None,
        tables={k: pd.concat(v, ignore_index=True) for k, v in tables.items()},
    )


def run_with_memory(
    run: Callable[[list[Block]], list[BlockResult]],
    blocks: list[Block],
    *,
    splittable: bool,
    cell_bytes: Callable[[Block], int | None] | None = None,
    budget: int | None = None,
    devices: int = 1,
    log: Callable[[str], None] | None = None,
) -> list[BlockResult]:
    """``run(blocks)`` with pre-splitting by the budget and halving on out-of-memory.

    Args:
      run: the back end's ``run_blocks``.
      blocks: one back-end call's blocks.
      splittable: whether the back end allows sub-blocks (else only a multi-block call is
        retried block by block).
      cell_bytes: per-cell memory estimate of a block (None: unknown).
      budget: bytes per device (None: no pre-splitting).
      devices: local devices a block's cells are sharded over.
    """
    if splittable and budget is not None and cell_bytes is not None:
        out = []
        for block in blocks:
            per_cell = cell_bytes(block)
            fit = len(block.cells) if not per_cell else max(1, budget // per_cell) * max(1, devices)
            if fit < len(block.cells):
                if log:
                    log(
                        f"block {block.block_id}: {len(block.cells)} cells x {per_cell} B/cell exceed the "
                        f"memory budget {budget} B; running sub-blocks of {fit} cells"
                    )
                out.append(
                    concat_results(
                        [
                            _attempt(run, [sub], splittable, log)[0]
                            for sub in split_block(block, fit)
                        ]
                    )
                )
            else:
                out.append(_attempt(run, [block], splittable, log)[0])
        return out
    return _attempt(run, blocks, splittable, log)


def _attempt(run, blocks: list[Block], splittable: bool, log) -> list[BlockResult]:
    try:
        return run(blocks)
    except Exception as e:  # noqa: BLE001 - only out-of-memory errors are handled, others re-raised
        if not is_out_of_memory(e):
            raise
        if len(blocks) > 1:
            if log:
                log(f"out of memory on {len(blocks)} blocks at once; retrying one block at a time")
            return [r for b in blocks for r in _attempt(run, [b], splittable, log)]
        block = blocks[0]
        if not splittable or len(block.cells) < 2:
            raise
        half = -(-len(block.cells) // 2)
        if log:
            log(
                f"block {block.block_id}: out of memory with {len(block.cells)} cells; retrying as two "
                f"sub-blocks of <= {half}"
            )
        return [
            concat_results(
                [_attempt(run, [sub], splittable, log)[0] for sub in split_block(block, half)]
            )
        ]
