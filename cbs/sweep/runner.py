"""Runs a sweep: expands the grid, skips finished blocks, drives the back end, stores rows.

State and I/O live here and in :mod:`cbs.store`; back ends are pure evaluators.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import platform
import socket
import time
import zlib
from importlib import metadata
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd

import cbs
from cbs.errors import RunFolderError
from cbs.store import RESULTS, RunStore
from cbs.sweep.backend import Block, BlockResult, get_backend
from cbs.sweep.config import SweepConfig, config_dict, config_hash
from cbs.sweep.grid import cell_id, expand_blocks

__all__ = ["RunFolderError", "RunFolderConflict", "SweepSummary", "run_sweep", "plan", "provenance", "shard_blocks"]


# The old name of RunFolderError, kept for callers that import it from here.
RunFolderConflict = RunFolderError


@dataclasses.dataclass
class SweepSummary:
    name: str
    out_dir: Path
    config_hash: str
    cells: int
    computed_cells: int
    skipped_cells: int
    reached: int
    diverged: int
    censored: int
    seconds: float
    device: str
    complete: bool

    def line(self) -> str:
        state = "" if self.complete else " (this shard's blocks only; other shards pending)"
        resumed = f", {self.skipped_cells} resumed from disk" if self.skipped_cells else ""
        return (f"sweep {self.name}: {self.cells} cells ({self.reached} reached target, {self.censored} censored, "
                f"{self.diverged} diverged{resumed}) in {self.seconds:.1f} s on {self.device}{state} "
                f"-> {self.out_dir}")


def _version(pkg: str) -> str:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return "absent"


def provenance() -> dict[str, object]:
    """Versions and device facts stamped on every result row and into the manifest."""
    import jax
    devices = jax.devices()
    return {
        "cbs_version": cbs.__version__,
        "jax_version": _version("jax"),
        "jaxlib_version": _version("jaxlib"),
        "flax_version": _version("flax"),
        "optax_version": _version("optax"),
        "device_kind": f"{devices[0].platform}:{devices[0].device_kind}",
        "device_count": len(devices),
        "process_count": jax.process_count(),
        "host": socket.gethostname(),
    }


def shard_blocks(blocks: Sequence[Block], shard: tuple[int, int]) -> list[Block]:
    """The blocks shard ``(index, count)`` owns; a stable hash spreads batch sizes and
    optimizers evenly and does not change when the shard count stays the same."""
    index, count = shard
    return [b for b in blocks if zlib.crc32(b.block_id.encode()) % count == index]


def plan(cfg: SweepConfig) -> list[Block]:
    return expand_blocks(cfg, get_backend(cfg.backend))


def _block_tables(cfg: SweepConfig, block: Block, result: BlockResult, stamp: dict) -> dict[str, pd.DataFrame]:
    if len(result.cells) != len(block.cells):
        raise RuntimeError(f"back end returned {len(result.cells)} records for {len(block.cells)} cells "
                           f"in block {block.block_id}")
    rows = []
    for cell, rec in zip(block.cells, result.cells):
        if rec.cell_id != cell.cell_id:
            raise RuntimeError(f"back end returned records out of order in block {block.block_id}")
        steps = float(rec.steps_to_target) if rec.reached else float("nan")
        row = {
            "sweep": cfg.name, "config_hash": stamp["config_hash"], "backend": cfg.backend,
            "block_id": block.block_id, "cell_id": cell.cell_id, "optimizer": cell.optimizer,
            "kind": cell.kind, "batch_size": cell.batch_size,
            "tokens_per_example": cfg.analysis.tokens_per_example, "lr": cell.lr, "seed": cell.seed,
            **{f"hp_{k}": float(v) for k, v in cell.hparams.items()},
            "metric": cfg.target.metric, "target": cfg.target.value, "max_steps": cfg.budget.max_steps,
            "reached": bool(rec.reached), "diverged": bool(rec.diverged),
            "censored": bool(not rec.reached and not rec.diverged),
            "steps_to_target": steps, "final_metric": float(rec.final_metric),
            "best_metric": float(rec.best_metric), "steps_run": int(rec.steps_run),
            **{k: float(v) for k, v in rec.extra.items()},
        }
        row.update({k: v for k, v in stamp.items() if k != "config_hash"})
        rows.append(row)
    tables = {RESULTS: pd.DataFrame(rows)}
    if result.curves is not None and cfg.output.curves and len(result.curves):
        tables["curves"] = result.curves.assign(block_id=block.block_id)
    for name, df in result.tables.items():
        if df is not None:
            tables[name] = df.assign(block_id=block.block_id)
    return tables


def _calls(blocks: Sequence[Block], per_call: int, span_optimizers: bool = False) -> list[list[Block]]:
    """Groups pending blocks into back-end calls: never more than ``per_call`` blocks, and
    (unless the back end batches work across optimizer entries) never two optimizer entries
    in one call, so finished work reaches disk (and the progress bar) at least once per
    optimizer even for back ends that take everything."""
    calls: list[list[Block]] = []
    for block in blocks:
        if calls and len(calls[-1]) < per_call and (span_optimizers or calls[-1][-1].optimizer == block.optimizer):
            calls[-1].append(block)
        else:
            calls.append([block])
    return calls


def _adaptive_state(store: RunStore, bases: Sequence[Block], adaptive) -> tuple[dict, list]:
    """Per base block: its adaptive status (rounds run, edges left) and the next round to
    run (None when finished or waiting), both recomputed from the stored results."""
    from cbs.store import RESULTS
    from cbs.sweep.adaptive import adaptive_rounds
    finished = store.finished_blocks()
    status, nxt = {}, []
    for base in bases:
        stored = {bid: pd.read_parquet(store.dir / "parts" / RESULTS / f"{bid}.parquet")
                  for bid in finished if bid == base.block_id or bid.startswith(base.block_id + "__a")}
        done, pending, st = adaptive_rounds(base, stored, max_extend=adaptive.max_extend, points=adaptive.points,
                                            zoom=adaptive.zoom, cell_id=cell_id)
        st["block_ids"] = [r.block.block_id for r in done]
        st["history"] = [r.record() for r in done]
        status[base.block_id] = st
        nxt.append(pending)
    return status, nxt


def run_sweep(cfg: SweepConfig, *, progress: bool = True, shard: tuple[int, int] = (0, 1),
              log: Callable[[str], None] = print) -> SweepSummary:
    """Runs (or resumes) the sweep described by ``cfg``; returns its summary.

    Raises:
      RunFolderError: the output folder holds a sweep with a different config hash.
    """
    from tqdm.auto import tqdm

    backend_cls = get_backend(cfg.backend)
    all_blocks = expand_blocks(cfg, backend_cls)
    blocks = shard_blocks(all_blocks, shard) if shard[1] > 1 else all_blocks
    store = RunStore(cfg.out_dir)
    chash = config_hash(cfg)
    existing = store.existing_hash()
    if existing is not None and existing != chash:
        raise RunFolderError(
            f"output folder {store.dir} holds sweep {existing}, but this config hashes to {chash}; "
            f"refusing to mix results. Choose another folder (output.dir=PATH) or delete that one.")
    stamp = {"config_hash": chash, **provenance()}
    started = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    from cbs.store import read_manifest
    manifest = read_manifest(store.dir) if existing else {
        "config_hash": chash, "sweep": cfg.name, "backend": cfg.backend, "started": started,
        "python": platform.python_version(), **stamp,
        "blocks": [{"block_id": b.block_id, "cells": len(b.cells)} for b in all_blocks],
        "cells": sum(len(b.cells) for b in all_blocks)}
    manifest.setdefault("sessions", []).append({"started": started, "shard": list(shard), **stamp})
    if existing is None:
        store.initialise(config_dict(cfg), manifest)
    done = store.finished_blocks()
    pending = [b for b in blocks if b.block_id not in done]
    skipped = sum(len(b.cells) for b in blocks if b.block_id in done)

    backend = backend_cls(cfg)
    manifest["backend_details"] = backend.manifest()
    store.write_manifest(manifest)
    t0 = time.perf_counter()
    total = sum(len(b.cells) for b in blocks)
    bar = tqdm(total=total, initial=skipped, unit="cell", disable=not progress, desc=cfg.name, dynamic_ncols=True)

    def run(pending_blocks):
        for chunk in _calls(pending_blocks, max(1, int(backend.blocks_per_call)),
                            bool(backend.calls_span_optimizers)):
            results = backend.run_blocks(chunk)
            if len(results) != len(chunk):
                raise RuntimeError(f"back end returned {len(results)} results for {len(chunk)} blocks")
            for block, result in zip(chunk, results):
                store.write_block(block.block_id, _block_tables(cfg, block, result, stamp))
                bar.update(len(block.cells))

    adaptive = cfg.grid.adaptive
    adaptive_on = adaptive.enabled if adaptive.enabled is not None else backend_cls.adaptive_default
    try:
        run(pending)
        # Adaptive LR rounds, one round of every family at a time; each round's blocks
        # follow from the stored rows, so the loop ends after at most max_extend + 1 rounds.
        while adaptive_on:
            _, rounds = _adaptive_state(store, blocks, adaptive)
            todo = [r.block for r in rounds if r is not None]
            if not todo:
                break
            bar.total += sum(len(b.cells) for b in todo)
            run(todo)
    finally:
        bar.close()
    seconds = time.perf_counter() - t0

    complete = store.finished_blocks() >= {b.block_id for b in all_blocks}
    order = [b.block_id for b in all_blocks]
    if adaptive_on:
        status, rounds = _adaptive_state(store, all_blocks, adaptive)
        complete = complete and all(r is None for r in rounds)
        order = [bid for b in all_blocks for bid in [b.block_id] + status[b.block_id].get("block_ids", [])]
        manifest["adaptive"] = dict(max_extend=adaptive.max_extend, points=adaptive.points, zoom=adaptive.zoom,
                                    families=status,
                                    flagged=sorted(k for k, v in status.items() if v.get("edge")))
        store.write_manifest(manifest)
    bs = np.array(sorted(cfg.grid.batch_size_values()), dtype=np.float64)
    refs = backend.reference_curves(bs)
    if refs:
        store.write_table("reference", pd.DataFrame(
            [{"name": k, "batch_size": int(b), "steps": float(s)} for k, v in refs.items() for b, s in zip(bs, v)]))
    if complete:
        store.merge(order=order)
        manifest["finished"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        store.write_manifest(manifest)
    from cbs.store import read_table
    rows = read_table(store.dir, RESULTS)
    ids = {b.block_id for b in blocks}
    mine = rows[rows["block_id"].str.split("__a").str[0].isin(ids)] if rows is not None else pd.DataFrame(
        columns=["reached", "diverged", "censored"])
    total = int(bar.total)      # adaptive rounds add cells as they go
    return SweepSummary(cfg.name, store.dir, chash, total, total - skipped, skipped,
                        int(mine["reached"].sum()), int(mine["diverged"].sum()), int(mine["censored"].sum()),
                        seconds, stamp["device_kind"], complete)
