"""Runs a sweep: expands the grid, skips finished blocks, drives the back end, stores rows.

State and I/O live here and in :mod:`cbs.store`; back ends are pure evaluators.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
import platform
import socket
import time
import uuid
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path

import numpy as np
import pandas as pd

import cbs
from cbs.errors import RunFolderError, was_interrupted
from cbs.store import (
    PART_INTEGRITY_KEY,
    RESULTS,
    DamagedParts,
    LockBusy,
    RunStore,
    read_config,
    read_sessions,
    read_table,
)
from cbs.sweep.backend import Backend, Block, BlockResult, get_backend
from cbs.sweep.config import (
    SweepConfig,
    config_dict,
    config_differences,
    config_hash,
    identity_dict,
)
from cbs.sweep.grid import cell_id, expand_blocks
from cbs.sweep.memory import memory_budget, run_with_memory
from cbs.sweep.shards import cost_assignment, hash_assignment, refine_costs

__all__ = [
    "RunFolderError",
    "RunFolderConflict",
    "check_output_dir",
    "SweepSummary",
    "run_sweep",
    "plan",
    "plan_estimate",
    "provenance",
    "shard_blocks",
    "block_costs",
    "merge_plan",
    "merge_run",
]


# The old name of RunFolderError, kept for callers that import it from here.
RunFolderConflict = RunFolderError


def check_output_dir(path: Path, key: str = "output.dir") -> None:
    """Raises RunFolderError unless ``path`` is, or can be created as, a writable folder.

    Run before anything is computed or written, so a bad output.dir costs nothing.
    ``key``: how the message names the setting (``--out`` for cbs.predict).
    """
    import os

    path = Path(path)
    if path.exists() and not path.is_dir():
        raise RunFolderError(
            f"{key} {str(path)!r} is a file; allowed: a folder, or a path where one can be created"
        )
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe != path and not probe.is_dir():
        raise RunFolderError(
            f"{key} {str(path)!r} cannot be created: {str(probe)!r} is a file, not a folder"
        )
    if not os.access(probe, os.W_OK | os.X_OK):
        what = "write in" if probe == path else f"create {str(path)!r} in"
        raise RunFolderError(f"{key}: no permission to {what} {str(probe)!r}")


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
    merged: bool = False  # this process wrote the merged tables (and ran ``finalize``)

    def line(self) -> str:
        state = "" if self.complete else " (this shard's blocks only; other shards pending)"
        resumed = f", {self.skipped_cells} resumed from disk" if self.skipped_cells else ""
        return (
            f"sweep {self.name}: {self.cells} cells ({self.reached} reached target, {self.censored} censored, "
            f"{self.diverged} diverged{resumed}) in {self.seconds:.1f} s on {self.device}{state} "
            f"-> {self.out_dir}"
        )


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


def block_costs(
    cfg: SweepConfig,
    blocks: Sequence[Block],
    backend: Backend,
    costs_from: Sequence[str | Path] = (),
) -> dict[str, float]:
    """Per-block cost for shard balancing: the back end's estimate, refined by the measured
    block seconds of earlier runs (``costs_from`` run folders), see :mod:`cbs.sweep.shards`."""
    estimates = {b.block_id: float(backend.block_cost(b)) for b in blocks}
    measured: dict[str, tuple[float, int]] = {}
    for run_dir in costs_from:
        for sess in read_sessions(run_dir):
            for block_id, rec in (sess.get("block_seconds") or {}).items():
                measured.setdefault(block_id, (float(rec[0]), int(rec[1])))
    return refine_costs(
        estimates,
        {b.block_id: len(b.cells) for b in blocks},
        {b.block_id: b.kind for b in blocks},
        measured,
    )


def shard_blocks(
    blocks: Sequence[Block], shard: tuple[int, int], costs: dict[str, float] | None = None
) -> list[Block]:
    """The blocks shard ``(index, count)`` owns, in sweep order: cost-balanced (longest
    first to the least-loaded shard) when costs are given, else by a stable hash."""
    index, count = shard
    if count <= 1:
        return list(blocks)
    ids = [b.block_id for b in blocks]
    if costs is None or any(i not in costs for i in ids):
        assignment = hash_assignment(ids, count)
    else:
        assignment = cost_assignment({i: costs[i] for i in ids}, count)
    return [b for b in blocks if assignment[b.block_id] == index]


def plan(cfg: SweepConfig) -> list[Block]:
    return expand_blocks(cfg, get_backend(cfg.backend))


def plan_estimate(cfg: SweepConfig, blocks: Sequence[Block], backend: Backend | None = None):
    """What --dry-run promises: the first pass's cells and blocks, the most the adaptive
    rounds can add (:func:`cbs.sweep.adaptive.max_adaptive_cells`), and, where the back
    end's cost model is in seconds (``block_cost_unit``), the time of each at the full step
    budget per cell at the cost model's nominal speed (no early stop; compiles and machine
    load come on top, so it is a guide, not a bound).
    Returns a dict; ``seconds_*`` are None without a time model."""
    from cbs.sweep.adaptive import max_adaptive_cells

    backend_cls = get_backend(cfg.backend)
    a = cfg.grid.adaptive
    on = a.enabled if a.enabled is not None else backend_cls.adaptive_default
    extra = {
        b.block_id: max_adaptive_cells(b, max_extend=a.max_extend, points=a.points, zoom=a.zoom)
        if on
        else 0
        for b in blocks
    }
    out = dict(
        cells=sum(len(b.cells) for b in blocks),
        blocks=len(blocks),
        adaptive=bool(on),
        max_adaptive_cells=sum(extra.values()),
        max_adaptive_blocks=(a.max_extend + int(a.zoom)) * len(blocks) if on else 0,
        seconds_first_pass=None,
        seconds_adaptive=None,
    )
    if backend is not None and getattr(backend, "block_cost_unit", "") == "seconds":
        costs = {b.block_id: float(backend.block_cost(b)) for b in blocks}
        out["seconds_first_pass"] = sum(costs.values())
        out["seconds_adaptive"] = sum(
            costs[b.block_id] * extra[b.block_id] / max(1, len(b.cells)) for b in blocks
        )
    return out


def _block_tables(
    cfg: SweepConfig, block: Block, result: BlockResult, stamp: dict
) -> dict[str, pd.DataFrame]:
    if len(result.cells) != len(block.cells):
        raise RuntimeError(
            f"back end returned {len(result.cells)} records for {len(block.cells)} cells "
            f"in block {block.block_id}"
        )
    for cell, rec in zip(block.cells, result.cells):
        if rec.cell_id != cell.cell_id:
            raise RuntimeError(f"back end returned records out of order in block {block.block_id}")
    columns = _result_columns(cfg, block, result, stamp)
    tables = {
        RESULTS: pd.DataFrame(
            columns if columns is not None else _result_rows(cfg, block, result, stamp)
        )
    }
    if result.curves is not None and cfg.output.curves and len(result.curves):
        tables["curves"] = result.curves.assign(block_id=block.block_id)
    for name, df in result.tables.items():
        if df is not None:
            tables[name] = df.assign(block_id=block.block_id)
    return tables


def _result_columns(cfg: SweepConfig, block: Block, result: BlockResult, stamp: dict):
    """The rows of :func:`_result_rows` as columns (same names, order and values), built
    column by column; None when the cells' hyperparameters or the records' extras do not
    all have the same names (then only the row form fills the gaps as pandas does)."""
    cells, recs = block.cells, result.cells
    if not cells:
        return None
    hp_names, extra_names = list(cells[0].hparams), list(recs[0].extra)
    if any(list(c.hparams) != hp_names for c in cells) or any(
        list(r.extra) != extra_names for r in recs
    ):
        return None
    n = len(cells)
    reached = [bool(r.reached) for r in recs]
    diverged = [bool(r.diverged) for r in recs]
    # assignment order = the row dict's key order; a repeated name keeps its first position
    # and takes the last value, as in the row dict
    cols: dict[str, list] = {}
    cols["sweep"] = [cfg.name] * n
    cols["config_hash"] = [stamp["config_hash"]] * n
    cols["backend"] = [cfg.backend] * n
    cols["block_id"] = [block.block_id] * n
    cols["cell_id"] = [c.cell_id for c in cells]
    cols["optimizer"] = [c.optimizer for c in cells]
    cols["kind"] = [c.kind for c in cells]
    cols["batch_size"] = [c.batch_size for c in cells]
    cols["tokens_per_example"] = [cfg.analysis.tokens_per_example] * n
    cols["lr"] = [c.lr for c in cells]
    cols["seed"] = [c.seed for c in cells]
    for k in hp_names:
        cols[f"hp_{k}"] = [float(c.hparams[k]) for c in cells]
    cols["metric"] = [cfg.target.metric] * n
    cols["target"] = [cfg.target.value] * n
    cols["max_steps"] = [cfg.budget.max_steps] * n
    cols["reached"] = reached
    cols["diverged"] = diverged
    cols["censored"] = [not (r or d) for r, d in zip(reached, diverged)]
    cols["steps_to_target"] = [
        float(rec.steps_to_target) if r else float("nan") for rec, r in zip(recs, reached)
    ]
    cols["samples_to_target"] = [
        _samples_to_target(rec, c.batch_size) for rec, c in zip(recs, cells)
    ]
    cols["final_metric"] = [float(r.final_metric) for r in recs]
    cols["best_metric"] = [float(r.best_metric) for r in recs]
    cols["steps_run"] = [int(r.steps_run) for r in recs]
    for k in extra_names:
        cols[k] = [float(r.extra[k]) for r in recs]
    for k, v in stamp.items():
        if k != "config_hash":
            cols[k] = [v] * n
    return cols


def _samples_to_target(rec, batch_size: int) -> float:
    """Examples consumed up to the crossing: the back end's count (a batch ramp's sum over
    its phases) where it gives one, else steps x the batch size (NaN when not reached)."""
    if not rec.reached:
        return float("nan")
    if "samples_to_target" in rec.extra:
        return float(rec.extra["samples_to_target"])
    return float(rec.steps_to_target) * batch_size


def _result_rows(cfg: SweepConfig, block: Block, result: BlockResult, stamp: dict) -> list[dict]:
    """One results row per cell: coordinates, outcome, the back end's extras, provenance."""
    rows = []
    for cell, rec in zip(block.cells, result.cells):
        steps = float(rec.steps_to_target) if rec.reached else float("nan")
        row = {
            "sweep": cfg.name,
            "config_hash": stamp["config_hash"],
            "backend": cfg.backend,
            "block_id": block.block_id,
            "cell_id": cell.cell_id,
            "optimizer": cell.optimizer,
            "kind": cell.kind,
            "batch_size": cell.batch_size,
            "tokens_per_example": cfg.analysis.tokens_per_example,
            "lr": cell.lr,
            "seed": cell.seed,
            **{f"hp_{k}": float(v) for k, v in cell.hparams.items()},
            "metric": cfg.target.metric,
            "target": cfg.target.value,
            "max_steps": cfg.budget.max_steps,
            "reached": bool(rec.reached),
            "diverged": bool(rec.diverged),
            "censored": bool(not rec.reached and not rec.diverged),
            "steps_to_target": steps,
            "samples_to_target": _samples_to_target(rec, cell.batch_size),
            "final_metric": float(rec.final_metric),
            "best_metric": float(rec.best_metric),
            "steps_run": int(rec.steps_run),
            **{k: float(v) for k, v in rec.extra.items()},
        }
        row.update({k: v for k, v in stamp.items() if k != "config_hash"})
        rows.append(row)
    return rows


def _calls(
    blocks: Sequence[Block], per_call: int, span_optimizers: bool = False
) -> list[list[Block]]:
    """Groups pending blocks into back-end calls: never more than ``per_call`` blocks, and
    (unless the back end batches work across optimizer entries) never two optimizer entries
    in one call, so finished work reaches disk (and the progress bar) at least once per
    optimizer even for back ends that take everything."""
    calls: list[list[Block]] = []
    for block in blocks:
        if (
            calls
            and len(calls[-1]) < per_call
            and (span_optimizers or calls[-1][-1].optimizer == block.optimizer)
        ):
            calls[-1].append(block)
        else:
            calls.append([block])
    return calls


def merge_plan(
    store: RunStore, cfg: SweepConfig, all_blocks: Sequence[Block], backend_cls
) -> tuple[bool, list[str], dict]:
    """Whether the sweep is complete, its blocks in merge order (adaptive rounds after their
    base block) and the manifest entries the merge records (adaptive status); all derived
    from the stored parts, so every process computes the same."""
    complete = store.finished_blocks() >= {b.block_id for b in all_blocks}
    order = [b.block_id for b in all_blocks]
    extra: dict = {}
    adaptive = cfg.grid.adaptive
    lr_rounds = adaptive.enabled if adaptive.enabled is not None else backend_cls.adaptive_default
    if lr_rounds or any(b.search is not None for b in all_blocks):
        status, rounds = _adaptive_state(store, all_blocks, adaptive, lr_rounds)
        complete = complete and all(r is None for r in rounds)
        order = [
            bid
            for b in all_blocks
            for bid in [b.block_id] + status.get(b.block_id, {}).get("block_ids", [])
        ]
        extra["adaptive"] = dict(
            max_extend=adaptive.max_extend,
            points=adaptive.points,
            zoom=adaptive.zoom,
            families=status,
            flagged=sorted(k for k, v in status.items() if v.get("edge")),
        )
    return complete, order, extra


def merge_run(
    store: RunStore,
    order: Sequence[str],
    finalize: Callable[[], None] | None = None,
    force_finalize: bool = False,
    wait_s: float = 0.0,
    extra: dict | None = None,
) -> bool:
    """Merges the tables of a complete sweep exactly once; returns True when this call merged.

    Runs under the folder's merge lock: the merged files and the manifest are rewritten
    only when they do not already reflect exactly the current parts, and ``finalize`` (the
    analysis) runs in the process that merged, or, with ``force_finalize``, also when the
    merge was already current (a re-run of a finished sweep). A concurrent merger makes
    this call return False without waiting (unless ``wait_s``): that process finishes the job.
    """
    from cbs.store import read_manifest

    try:
        with store.lock("merge", wait_s=wait_s):
            manifest = read_manifest(store.dir)
            merged = False
            if not store.merged_is_current(manifest):
                try:
                    store.merge(order=list(order))
                except DamagedParts as e:  # quarantined just now: the next run recomputes
                    store.log(f"warning: merge of {store.dir} skipped: {e}")
                    return False
                manifest.update(extra or {})
                sessions = read_sessions(store.dir)
                manifest["sessions"] = [
                    {k: v for k, v in r.items() if k != "block_seconds"} for r in sessions
                ]
                manifest["block_seconds"] = {
                    b: v for r in sessions for b, v in (r.get("block_seconds") or {}).items()
                }
                manifest["finished"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
                manifest["merged"] = {"parts": store.parts_signature()}
                store.write_manifest(manifest)
                merged = True
            if finalize is not None and (merged or force_finalize):
                finalize()
            return merged
    except LockBusy:
        return False


def _adaptive_state(
    store: RunStore, bases: Sequence[Block], adaptive, lr_rounds: bool = True
) -> tuple[dict, list]:
    """Per base block: its adaptive status (rounds run, edges left) and the next round to
    run (None when finished or waiting), both recomputed from the stored results. Without
    ``lr_rounds`` only the search families (cbs.sweep.search) have rounds."""
    from cbs.store import RESULTS
    from cbs.sweep.adaptive import adaptive_rounds

    finished = store.finished_blocks()
    status, nxt = {}, []
    for base in bases:
        if not lr_rounds and base.search is None:
            continue
        stored = {
            bid: pd.read_parquet(store.dir / "parts" / RESULTS / f"{bid}.parquet")
            for bid in finished
            if bid == base.block_id or bid.startswith(base.block_id + "__a")
        }
        done, pending, st = adaptive_rounds(
            base,
            stored,
            max_extend=adaptive.max_extend,
            points=adaptive.points,
            zoom=adaptive.zoom,
            cell_id=cell_id,
        )
        st["block_ids"] = [r.block.block_id for r in done]
        st["history"] = [r.record() for r in done]
        status[base.block_id] = st
        nxt.append(pending)
    return status, nxt


def run_sweep(
    cfg: SweepConfig,
    *,
    progress: bool = True,
    shard: tuple[int, int] = (0, 1),
    log: Callable[[str], None] = print,
    finalize: Callable[[], None] | None = None,
    costs_from: Sequence[str | Path] = (),
    merge: bool = True,
    before_merge: Callable[[], None] | None = None,
    only: Callable[[Block], bool] | None = None,
) -> SweepSummary:
    """Runs (or resumes) the sweep described by ``cfg``, or shard ``shard`` of it.

    Any number of processes may run this on one folder at once (shards, or identical
    copies); see :mod:`cbs.store`. When the last block is done, the tables are merged once
    (under a lock) and ``finalize`` runs in the merging process.

    Args:
      finalize: called after this process merged (e.g. the analysis), under the merge lock.
      costs_from: earlier run folders whose measured block times refine shard balancing
        (used only by the process that creates the folder's manifest).
      merge: False leaves the merge to a separate step (a Slurm array's merge task).
      before_merge: called when this process's blocks are done, before the merge (a
        multi-process job's barrier).
      only: run just the blocks it accepts (and their adaptive rounds), like a shard: the
        others stay pending for a later run on the folder (cbs.predict's anchor blocks).

    Raises:
      RunFolderError: the output folder holds a sweep with a different config hash.

    A config with ``target.rule`` first runs (or resumes) its pilot and sets
    ``target.value`` from it (:mod:`cbs.sweep.target_rule`).
    """
    from cbs.sweep.progress import SweepProgress, progress_mode

    mode = progress_mode(progress)
    if cfg.output.tensorboard:  # a missing writer fails before anything is written
        from cbs.sweep.events import require_writer

        require_writer()
    backend_cls = get_backend(cfg.backend)
    check_output_dir(cfg.out_dir)
    if cfg.target.rule is not None and cfg.target.value is None:
        from cbs.sweep.target_rule import resolve_target

        # the pilot (<run folder>/pilot) sets target.value; target_rule.json records it
        cfg = resolve_target(cfg, progress=progress, log=log)
    all_blocks = expand_blocks(cfg, backend_cls)
    chash = config_hash(cfg)
    store = RunStore(cfg.out_dir, config_hash=chash)
    _check_identity(store, cfg, chash)
    stamp = {"config_hash": chash, **provenance()}
    started = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    # Everything that can still fail on the config (data, model, schedules) fails here,
    # before the first file is written: a refused config leaves the folder as it was.
    backend = backend_cls(cfg)
    details = backend.manifest()
    resolved = config_dict(cfg)
    try:
        _initialise(
            store, cfg, all_blocks, backend, costs_from, chash, stamp, started, details, resolved
        )
    except OSError as e:
        raise RunFolderError(
            f"cannot write into output.dir {str(store.dir)!r}: {e.strerror or e}"
        ) from None
    from cbs.store import read_manifest

    manifest = read_manifest(store.dir)
    frozen = {b.get("block_id"): b.get("cost") for b in manifest.get("blocks", [])}
    costs = frozen if all(frozen.get(b.block_id) is not None for b in all_blocks) else None
    blocks = shard_blocks(all_blocks, shard, costs)
    if only is not None:
        blocks = [b for b in blocks if only(b)]

    session_id = (
        f"{started.replace(':', '')}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    )
    session = {
        "session_id": session_id,
        "started": started,
        "shard": list(shard),
        "pid": os.getpid(),
        "blocks": len(blocks),
        "block_seconds": {},
        **stamp,
        **{
            k.lower(): os.environ[k]
            for k in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID")
            if k in os.environ
        },
    }
    store.write_session(session_id, session)
    done = store.finished_blocks()
    pending = [b for b in blocks if b.block_id not in done]
    skipped = sum(len(b.cells) for b in blocks if b.block_id in done)

    import jax

    budget = memory_budget() if backend.splittable else None
    t0 = time.perf_counter()
    total = sum(len(b.cells) for b in blocks)
    # the bound over this process's families (a resumed run's stored rounds make it loose,
    # never wrong)
    may_add = plan_estimate(cfg, blocks)["max_adaptive_cells"] if mode != "off" else 0
    bar = SweepProgress(cfg.name, total, skipped, len(pending), mode, may_add=may_add)
    events = None
    if cfg.output.tensorboard:
        from cbs.sweep.events import EventLog

        events = EventLog(store.dir / "tensorboard", cfg, log=log)
    # the back end's in-block reports (cbs.sweep.backend.Backend.progress)
    backend.progress = bar.in_block if mode != "off" else None

    def run(pending_blocks):
        for chunk in _calls(
            pending_blocks,
            max(1, int(backend.blocks_per_call)),
            bool(backend.calls_span_optimizers),
        ):
            t_call = time.perf_counter()
            results = run_with_memory(
                backend.run_blocks,
                chunk,
                splittable=backend.splittable,
                cell_bytes=backend.cell_memory_bytes,
                budget=budget,
                devices=jax.local_device_count(),
                log=log,
            )
            if len(results) != len(chunk):
                raise RuntimeError(
                    f"back end returned {len(results)} results for {len(chunk)} blocks"
                )
            # A call's time is shared among its blocks by cell count (the measured cost basis).
            seconds = time.perf_counter() - t_call
            cells_in_call = sum(len(b.cells) for b in chunk)
            for block, result in zip(chunk, results):
                tables = _block_tables(cfg, block, result, stamp)
                store.write_block(block.block_id, tables)
                block_s = seconds * len(block.cells) / cells_in_call
                session["block_seconds"][block.block_id] = [block_s, len(block.cells)]
                bar.block_done(block, block_s)
                if events is not None:
                    events.block(block, tables, block_s)
            store.write_session(session_id, session)
            if was_interrupted():
                # Ctrl-C whose KeyboardInterrupt a callback swallowed (Python ignores an
                # exception raised in a gc callback, e.g. XLA's): stop at this block boundary
                raise KeyboardInterrupt

    adaptive = cfg.grid.adaptive
    lr_rounds = adaptive.enabled if adaptive.enabled is not None else backend_cls.adaptive_default
    adaptive_on = lr_rounds or any(b.search is not None for b in blocks)
    try:
        run(pending)
        # Adaptive LR rounds, one round of every family at a time; each round's blocks
        # follow from the stored rows, so the loop ends after at most max_extend + 1 rounds
        # (search families: max_rounds).
        while adaptive_on:
            _, rounds = _adaptive_state(store, blocks, adaptive, lr_rounds)
            todo = [r for r in rounds if r is not None]
            if not todo:
                break
            kinds = sorted({r.kind for r in todo})
            bar.grow(
                sum(len(r.block.cells) for r in todo),
                len(todo),
                f"adaptive round ({'/'.join(kinds)})",
            )
            run([r.block for r in todo])
    finally:
        bar.close()
        if events is not None:
            events.close()
    seconds = time.perf_counter() - t0

    bs = np.array(sorted(cfg.grid.batch_size_values()), dtype=np.float64)
    refs = backend.reference_curves(bs)
    if refs:  # deterministic: concurrent processes write identical bytes, atomically
        store.write_table(
            "reference",
            pd.DataFrame(
                [
                    {"name": k, "batch_size": int(b), "steps": float(s)}
                    for k, v in refs.items()
                    for b, s in zip(bs, v)
                ]
            ),
        )
    if before_merge is not None:
        before_merge()
    complete, order, extra = merge_plan(store, cfg, all_blocks, backend_cls)
    merged = False
    if complete and merge:
        merged = merge_run(store, order, finalize, force_finalize=not pending, extra=extra)
    session["ended"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    session["merged"] = merged
    store.write_session(session_id, session)
    counted = ["block_id", "reached", "diverged", "censored"]
    rows = read_table(store.dir, RESULTS, columns=counted)
    ids = {b.block_id for b in blocks}
    if rows is not None:
        # this process's blocks and their adaptive rounds (<block>__a<k>); the test runs
        # once per distinct block id, not once per row
        block_ids = rows["block_id"].unique()
        keep = [b for b in block_ids if str(b).split("__a")[0] in ids]
        mine = rows[rows["block_id"].isin(keep)]
    else:
        mine = pd.DataFrame(columns=counted)
    total = int(bar.total)  # adaptive rounds add cells as they go
    return SweepSummary(
        cfg.name,
        store.dir,
        chash,
        total,
        total - skipped,
        skipped,
        int(mine["reached"].sum()),
        int(mine["diverged"].sum()),
        int(mine["censored"].sum()),
        seconds,
        stamp["device_kind"],
        complete,
        merged,
    )


def _check_identity(store: RunStore, cfg: SweepConfig, chash: str) -> None:
    """Refuses a folder that holds another sweep, naming the keys that differ; analysis
    options (and the other NON_IDENTITY_KEYS) may differ."""
    existing = store.existing_hash()
    if existing is None:
        return
    stored = read_config(store.dir)
    # no config.yaml (moved aside when damaged): the manifest's hash alone decides
    changed = (
        config_differences(identity_dict(stored), identity_dict(config_dict(cfg))) if stored else []
    )
    if changed or existing != chash:
        what = "; ".join(changed[:6]) + (
            f"; and {len(changed) - 6} more" if len(changed) > 6 else ""
        )
        raise RunFolderError(
            f"output folder {store.dir} holds a different sweep ({what or f'config hash {existing} vs {chash}'}); "
            "refusing to mix results (only analysis options may change on an existing folder). Choose another "
            "folder (output.dir=PATH), undo the change, or delete that folder."
        )


def _initialise(
    store, cfg, all_blocks, backend, costs_from, chash, stamp, started, details, resolved
) -> None:
    if not (store.dir / "manifest.json").exists():
        costs = block_costs(cfg, all_blocks, backend, costs_from)
        manifest = {
            "config_hash": chash,
            "sweep": cfg.name,
            "backend": cfg.backend,
            "started": started,
            "python": platform.python_version(),
            **stamp,
            "blocks": [
                {"block_id": b.block_id, "cells": len(b.cells), "cost": costs[b.block_id]}
                for b in all_blocks
            ],
            "cost_basis": "measured" if costs_from else "estimate",
            PART_INTEGRITY_KEY: 1,  # every part of this folder carries its integrity record
            "cells": sum(len(b.cells) for b in all_blocks),
            "backend_details": details,
        }
        manifest = store.initialise(resolved, manifest)
        if manifest.get("config_hash") != chash:  # another config won the race to create it
            _check_hash(store, chash)
    elif read_config(store.dir) != resolved:
        # the same sweep with new analysis options: config.yaml records the ones last used
        store.write_config(resolved)


def _check_hash(store: RunStore, chash: str) -> None:
    existing = store.existing_hash()
    if existing is not None and existing != chash:
        raise RunFolderError(
            f"output folder {store.dir} holds sweep {existing}, but this config hashes to {chash}; "
            f"refusing to mix results. Choose another folder (output.dir=PATH) or delete that one."
        )
