"""Host-side driver of a block: stopping rule, steps-to-target, curves, noise-scale table.

Shared by the vmapped path (:func:`run_vmapped_block`) and the K-FAC path
(:mod:`cbs.train.kfac`), which both produce evaluations and hand them to
:class:`Tracker`, so every cell gets the same records whatever its optimizer.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

from cbs.parallel import padded_size, shard_cells
from cbs.sweep.backend import Block, BlockResult, CellResult
from cbs.train import optimizers
from cbs.train.engine import BlockRun, TrainProblem
from cbs.train.streaming import ChunkFeeder

__all__ = ["RunOptions", "Tracker", "run_vmapped_block"]


@dataclasses.dataclass(frozen=True)
class RunOptions:
    """Per-sweep options of the training loop (from the config's budget/target/section)."""

    max_steps: int
    eval_every: int
    metric: str = "val_loss"  # "val_loss" or "val_error"
    target: float = 0.0
    interpolate: bool = False
    steps_per_call: int = 100  # steps between host-side stop checks (vmapped path)
    noise_scale: bool = False
    noise_micro_batch: int | None = None  # default: the block's batch size
    noise_num_micro: int = 4
    noise_ema: float = 0.0  # EMA of the two estimates across evaluations (0 = none)
    diverge_factor: float = 10.0  # val_loss above this times its step-0 value = diverged
    compact: str = "auto"  # drop finished cells from the vmap: "auto", "always", "never"
    exact: bool = True  # replay each crossing interval step by step (exact first crossing)

    @property
    def evals_per_call(self) -> int:
        per = max(1, round(self.steps_per_call / self.eval_every))
        return int(min(per, math.ceil(self.max_steps / self.eval_every)))


class Tracker:
    """Steps-to-target bookkeeping of a block's cells, evaluation by evaluation.

    Shallue's rule: ``steps_to_target`` is the first step with the metric strictly below
    the target. The cadence finds the first *evaluation* below it (t1, previous evaluation
    t0); with ``exact`` the caller then replays (t0, t1] with an evaluation after every step
    and calls :meth:`set_exact` with the first step below target, so the count does not
    depend on ``eval_every`` (``crossing_exact`` = 1; 0 when no replay ran or the replay
    found no step below the target, in which case t1 stands). Exact means: the first step
    below target after the last evaluation above it; a dip below the target that is over
    by the next evaluation is not seen (``eval_every: 1`` sees everything).
    With ``interpolate``, ``steps_interpolated`` is the step at which the straight line
    between that evaluation and the previous one crosses it.
    A cell is done when it reached the target or diverged. Diverged means a non-finite
    step (frozen in the device program) or an evaluated val_loss that is not finite or
    above ``diverge_factor`` times the cell's step-0 val_loss.

    A cell's record ends at the evaluation where it is done (or at the budget): later
    evaluations are ignored, because how long a finished cell keeps riding along depends
    on the other cells of its block and on compaction, not on the cell. So
    ``final_metric`` is the metric at that evaluation (the first one below target, the
    divergence, or the budget), ``best_metric`` the minimum up to it, ``steps_run`` the
    updates applied up to it, and the curve stops there.
    """

    def __init__(self, block: Block, opts: RunOptions):
        n = len(block.cells)
        self.block, self.opts = block, opts
        self.reached = np.zeros(n, bool)
        self.diverged = np.zeros(n, bool)  # diverged before reaching the target
        self.s_target = np.full(n, np.nan)
        self.s_interp = np.full(n, np.nan)
        self.exact = np.zeros(n, bool)
        self.t_before = np.full(n, -1, np.int64)  # evaluation step before the crossing one
        self.replay_seconds = 0.0
        self.n_replayed = 0
        self.t_start = time.perf_counter()
        self.final = np.full(n, np.nan)
        self.best = np.full(n, np.inf)
        self.steps_run = np.zeros(n, np.int64)
        self.end_step = np.full(n, -1, np.int64)  # evaluation at which the cell was done
        self.prev = np.full((n, 2), np.nan)  # (step, metric) of the previous evaluation
        self.init_loss = np.full(n, np.inf)
        self.rows: list[dict] = []
        self.noise_rows: list[dict] = []
        self.ema_g = np.zeros(n)
        self.ema_t = np.zeros(n)
        self.n_noise = 0

    @property
    def done(self) -> np.ndarray:
        return self.reached | self.diverged

    def record(self, i: int, step: int, metrics: dict, diverged: bool, applied: int) -> None:
        """One evaluation of cell ``i`` after ``step`` block steps (``applied`` updates)."""
        if self.done[i]:
            return
        m = float(metrics[self.opts.metric])
        vl = float(metrics["val_loss"])
        if step == 0:
            self.init_loss[i] = vl
        # A loss that is not finite or has blown up far above its starting value is a
        # divergence even while the weights are still finite (e.g. dead ReLUs at huge LRs).
        diverged = (
            diverged or not np.isfinite(vl) or vl > self.opts.diverge_factor * self.init_loss[i]
        )
        self.rows.append(
            dict(
                cell_id=self.block.cells[i].cell_id,
                step=step,
                metric=m,
                **{k: float(v) for k, v in metrics.items()},
                diverged=bool(diverged),
            )
        )
        self.steps_run[i] = applied
        if diverged:
            self.diverged[i] = True
        elif m < self.opts.target:
            self.reached[i] = True
            self.s_target[i] = step
            s0, m0 = self.prev[i]
            self.t_before[i] = int(s0) if np.isfinite(s0) else -1
            self.exact[i] = step == 0 or (np.isfinite(s0) and step - s0 == 1)
            if np.isfinite(m0) and m0 > m:
                self.s_interp[i] = s0 + (m0 - self.opts.target) / (m0 - m) * (step - s0)
            else:
                self.s_interp[i] = step
        if self.done[i]:
            self.end_step[i] = step
        self.final[i] = m
        if np.isfinite(m):
            self.best[i] = min(self.best[i], m)
        self.prev[i] = (step, m)

    def set_exact(self, i: int, step: int | None) -> None:
        """The replay's answer for cell ``i``: the first step below target in
        (t0, t1], or None when the replay saw none (rounding; t1 then stands, not exact)."""
        self.n_replayed += 1
        if step is not None:
            self.s_target[i] = step
            self.exact[i] = True

    def record_noise(self, i: int, step: int, grad_sq: float, trace_sigma: float) -> None:
        """Noise-scale estimates of cell ``i``; B_simple = EMA(trΣ) / EMA(|G|²)."""
        if 0 <= self.end_step[i] < step:
            return
        beta = self.opts.noise_ema
        self.ema_g[i] = beta * self.ema_g[i] + (1 - beta) * grad_sq
        self.ema_t[i] = beta * self.ema_t[i] + (1 - beta) * trace_sigma
        b = self.ema_t[i] / self.ema_g[i] if self.ema_g[i] != 0 else np.nan
        self.noise_rows.append(
            dict(
                cell_id=self.block.cells[i].cell_id,
                step=step,
                b_simple=float(b),
                trace_sigma=float(trace_sigma),
                grad_sq=float(grad_sq),
            )
        )

    def result(self) -> BlockResult:
        cells = []
        for i, c in enumerate(self.block.cells):
            extra = dict(crossing_exact=float(self.exact[i]) if self.reached[i] else np.nan)
            if self.opts.interpolate:
                extra["steps_interpolated"] = float(self.s_interp[i])
            best = self.best[i] if np.isfinite(self.best[i]) else np.nan
            cells.append(
                CellResult(
                    c.cell_id,
                    bool(self.reached[i]),
                    bool(self.diverged[i]),
                    float(self.s_target[i]),
                    float(self.final[i]),
                    float(best),
                    int(self.steps_run[i]),
                    extra,
                )
            )
        # Wall time of the block and of its exact-crossing replays (the replay's cost).
        tables = {
            "timing": pd.DataFrame(
                [
                    dict(
                        seconds=time.perf_counter() - self.t_start,
                        replay_seconds=self.replay_seconds,
                        replayed_cells=int(self.n_replayed),
                    )
                ]
            )
        }
        if self.opts.noise_scale:
            tables["noise_scale"] = pd.DataFrame(
                self.noise_rows, columns=["cell_id", "step", "b_simple", "trace_sigma", "grad_sq"]
            )
        return BlockResult(cells, pd.DataFrame(self.rows), tables)


# What compiling one narrower block program costs, in FLOPs of training it displaces: a
# compile of these small programs takes ~1-3 s on a CPU core that does ~10-20 GFLOP/s.
# A fixed constant (not a measurement) keeps the decision, and so every recorded value,
# a function of the config.
COMPILE_COST_FLOPS = 3e10


def compaction_pays(
    lanes_dropped: int,
    calls_left: int,
    train_examples_per_call: int,
    eval_examples_per_call: int,
    num_params: int,
) -> bool:
    """Whether dropping ``lanes_dropped`` finished lanes saves more than a compile costs,
    estimating 6 FLOPs per parameter per training example (forward and backward) and 2
    per evaluation example."""
    per_lane = (
        6.0 * num_params * train_examples_per_call + 2.0 * num_params * eval_examples_per_call
    )
    return lanes_dropped * calls_left * per_lane > COMPILE_COST_FLOPS


def noise_indices(
    seed: int, step: int, n: int, num_micro: int, micro: int, tag: int = 0x6E5
) -> np.ndarray:
    """Micro-batches for the noise-scale estimate at ``step``: a fresh draw without
    replacement that depends only on (seed, step, tag), not on the training order."""
    rng = np.random.default_rng([seed, step, tag])
    return rng.permutation(n)[: num_micro * micro].reshape(num_micro, micro).astype(np.int32)


def program_target(target: float) -> jax.Array:
    """The target as the program's float32, rounded up: a metric below the (float64)
    target on the host is then below it in the program too."""
    t = np.float32(target)
    if t < target:
        t = np.nextafter(t, np.float32(np.inf))
    return jnp.asarray(t, jnp.float32)


@dataclasses.dataclass
class _Crossing:
    """A cell whose first evaluation below target awaits its replay: it was above at
    block step ``t0`` and below at ``t1``, in the call that started at ``start`` (lane
    ``lane``, training rows ``rows[k * every, B]`` of that call); the replay starts from
    its state kept at block step ``s0`` (start <= s0 <= t0; t0 unless rounding of the
    target in the program made it stop earlier)."""

    lane: int
    cell: int
    start: int
    t0: int
    t1: int
    rows: np.ndarray
    s0: int = -1


class _PendingReplays:
    """Crossings to replay, with each lane's state at its last evaluation above target.

    Replays are deferred: every crossing cell of the current vmap width is replayed in
    one pass of the block's own compiled call (:func:`_replay`), at the end of the block or
    before the width changes, so a block pays at most a few calls for all its replays
    and no compile. The states wait on the host (one copy of the block state at most).
    """

    def __init__(self):
        self.items: list[_Crossing] = []
        self.state = None  # host copy of the block state; crossing lanes hold their snapshot

    def add(self, snap, crossings: list[_Crossing]) -> None:
        lanes = np.array([c.lane for c in crossings])
        steps = np.asarray(snap.step)
        for c in crossings:
            c.s0 = int(steps[c.lane])
        if self.state is None:
            self.state = jax.tree.map(np.array, snap)
        else:
            for dst, src in zip(jax.tree.leaves(self.state), jax.tree.leaves(snap)):
                dst[lanes] = np.asarray(src)[lanes]
        self.items.extend(crossings)


def _replay_schedule(c: _Crossing, every: int) -> list[list[int]]:
    """The intervals of a replay (row positions in the crossing call, an evaluation after
    each interval): the call's intervals from s0 up to t0 unchanged (none, unless the
    program's rounded target stopped the kept state early), then single steps to t1."""
    a = (c.t0 - c.s0) // every
    first = c.s0 - c.start
    return [list(range(first + j * every, first + (j + 1) * every)) for j in range(a)] + [
        [c.t0 - c.start + q] for q in range(c.t1 - c.t0)
    ]


def _replay(
    run: BlockRun,
    pending: _PendingReplays,
    lr,
    hp,
    put,
    data,
    tracker: Tracker,
    opts: RunOptions,
    layout: str = "vmap",
) -> None:
    """Exact first crossings of the pending cells: each is retrained from its state at t0
    (kept by the call) over its crossing call's own data rows (the same trajectory, in the
    same compiled program at the same vmap width, so the same arithmetic), a single step
    and an evaluation per interval until t1; the first evaluation below target is its
    count. Cells that are not replayed are frozen (every step slot skipped). Kinds whose
    optimizer branches on the block's shared step (SOAP) replay one (s0, t0) group per
    pass, so that the shared step table is right for every replayed cell.
    """
    k, every = opts.evals_per_call, opts.eval_every
    width = int(lr.shape[0])
    target = program_target(opts.target)
    items = [c for c in pending.items if c.start <= c.s0 <= c.t0]
    for c in pending.items:
        if c not in items:  # no kept state at or before t0 (not expected): count not exact
            tracker.set_exact(c.cell, None)
    if run.kind in optimizers.STEP_AWARE:
        groups: dict = {}
        for c in items:
            groups.setdefault((c.s0, c.t0), []).append(c)
        passes = list(groups.values())
    else:
        passes = [items] if items else []
    for group in passes:
        scheds = {c.lane: _replay_schedule(c, every) for c in group}
        n_calls = -(-max(len(v) for v in scheds.values()) // k)
        batch = group[0].rows.shape[-1]
        state = put(pending.state)
        found: dict[int, int] = {}
        for call in range(n_calls):
            idx = np.zeros((width, k, every, batch), np.int32)
            live = np.zeros((width, k, every), bool)
            steps = np.full((k, every), -1, np.int32)
            for c in group:
                for j, pos in enumerate(scheds[c.lane][call * k : (call + 1) * k]):
                    idx[c.lane, j, : len(pos)] = c.rows[pos]
                    live[c.lane, j, : len(pos)] = True
                    steps[j, : len(pos)] = c.start + np.asarray(pos)
            ntable = None
            if opts.noise_scale:  # the estimates are not used; the program needs the table
                micro = opts.noise_micro_batch or batch
                ntable = put(np.zeros((width, k, opts.noise_num_micro, micro), np.int32))
            state, out, _ = run.call(
                state,
                lr,
                hp,
                put(idx),
                ntable,
                data,
                jnp.asarray(steps),
                put(live),
                target,
                layout=layout,
            )
            metric = np.asarray(out[opts.metric])
            for c in group:
                a = (c.t0 - c.s0) // every
                for j, pos in enumerate(scheds[c.lane][call * k : (call + 1) * k]):
                    if (
                        call * k + j >= a
                        and c.lane not in found
                        and metric[c.lane, j] < opts.target
                    ):
                        found[c.lane] = c.start + pos[0] + 1
            if len(found) == len(group):
                break
        for c in group:
            tracker.set_exact(c.cell, found.get(c.lane))
    pending.items, pending.state = [], None


def run_vmapped_block(
    problem: TrainProblem,
    block: Block,
    opts: RunOptions,
    run: BlockRun,
    hparam_names: list[str],
    width: int | None = None,
    progress: Callable[[float, str], None] | None = None,
    phases: list[tuple[int, int, int]] | None = None,
    layout: str = "vmap",
) -> BlockResult:
    """Trains every cell of ``block`` in one vmapped program until the stopping rule.

    Args:
      problem: model and data.
      block: the cells (one batch size and optimizer kind).
      opts: loop options.
      run: the compiled functions for this (problem, kind, schedule).
      hparam_names: the kind's hyperparameter names (each becomes a traced (cells,) array).
      width: lanes of the program (default: the cell count); more lanes than cells pad
        the block with copies of its last cell, never recorded, so that blocks of other
        cell counts reuse one compiled program (see ``TrainBackend.program_width``).
      progress: called after every compiled call (every ``steps_per_call`` steps) as
        ``progress(cells_done, detail)``: finished cells count 1, running ones the share of
        the step budget done (the runner's in-block progress bar).
      phases: a batch ramp's ``(start_step, end_step, batch_size)`` runs
        (``cbs.ramps.RampPlan.batch_phases``; default: the block's batch size throughout).
        The cells' state carries across a phase change; evaluations fall every
        ``eval_every`` steps from each phase's start and at its end (so no interval
        mixes two batch sizes), and the data order continues the seed's index stream.
      layout: how the cells are laid out in the program (:mod:`cbs.train.layout`); the
        crossing replays run in the same layout, so in the same arithmetic.
    """
    tracker = Tracker(block, opts)
    B, n = block.batch_size, problem.num_train
    seeds = [int(c.seed) for c in block.cells]
    useeds = sorted(set(seeds))
    seed_idx = np.array([useeds.index(s) for s in seeds], np.int32)
    k, every = opts.evals_per_call, opts.eval_every
    # Batch ramps run phase after phase (see ``phases``); one phase: the block's batch size.
    ramped = phases is not None and len(phases) > 1
    phases = phases if ramped else [(0, opts.max_steps, B)]
    phase, (_, p_end, B) = 0, phases[0]
    micro = opts.noise_micro_batch or B

    # Pad the cell axis to the program width and to a multiple of the device count by
    # repeating the last cell, and spread it over the local devices (a no-op on one
    # device); padded lanes are never recorded (lane_cell below) and ride along like
    # finished cells until a compaction drops them.
    n_cells = len(seeds)
    pad = padded_size(max(n_cells, width or 0)) - n_cells

    def padded(values: np.ndarray) -> jax.Array:  # on the host: no eager program per width
        return jnp.asarray(np.concatenate([values, np.repeat(values[-1:], pad)]), jnp.float32)

    lr = padded(block.lrs)
    hp = {k: padded(block.hparam(k)) for k in hparam_names}
    state = run.init(jnp.array(seeds + seeds[-1:] * pad, jnp.int32), hp)
    seed_idx = np.concatenate([seed_idx, np.repeat(seed_idx[-1:], pad)])
    if jax.local_device_count() > 1:
        lr, hp = shard_cells((lr, hp), n_cells + pad)
        state = jax.device_put(state, lr.sharding)

    def put(x):
        """Per-lane arrays placed like the cells (sharded along the lanes on >1 device)."""
        if jax.local_device_count() > 1:
            return jax.device_put(x, lr.sharding)
        return jax.tree.map(jnp.asarray, x)

    vl, ve = (np.asarray(a) for a in run.evaluate(state, hp))
    for i in range(len(seeds)):
        tracker.record(i, 0, dict(val_loss=vl[i], val_error=ve[i], train_loss=np.nan), False, 0)

    # lane_cell[l] is the cell that vmap lane l trains; lanes past n_live are padding.
    lane_cell, n_live = np.arange(n_cells), n_cells
    step = 0

    def noise_table(step):
        return np.stack(
            [
                np.stack(
                    [
                        noise_indices(s, step + (j + 1) * every, n, opts.noise_num_micro, micro)
                        for j in range(k)
                    ]
                )
                for s in useeds
            ]
        )

    # Index tables per call (and, for a streamed training set, the gathered examples,
    # prepared one call ahead in a background thread).
    feeder = ChunkFeeder(
        problem,
        useeds,
        (k, every, B),
        noise_table if opts.noise_scale else None,
        end=p_end if ramped else None,
    )
    pending = _PendingReplays()
    target = program_target(opts.target)
    slots = np.arange(k * every, dtype=np.int32).reshape(k, every)
    while step < opts.max_steps and not tracker.done.all():
        if step >= p_end:  # the next phase of a batch ramp: same cells, a new batch size
            if pending.items:  # replays run at the batch size the cells crossed at
                t_rep = time.perf_counter()
                _replay(run, pending, lr, hp, put, None, tracker, opts, layout)
                tracker.replay_seconds += time.perf_counter() - t_rep
            feeder.close()
            phase += 1
            step, p_end, B = phases[phase]
            micro = opts.noise_micro_batch or B
            feeder = ChunkFeeder(
                problem,
                useeds,
                (k, every, B),
                noise_table if opts.noise_scale else None,
                streams=feeder.streams,
                end=p_end,
            )
        table, ntable, data = feeder.get(step)
        # Each lane gets its seed's rows (a replay gives every lane its own rows).
        table = np.asarray(table)[seed_idx]
        ntable = None if ntable is None else put(np.asarray(ntable)[seed_idx])
        reached_before = tracker.reached.copy()
        every_slot = np.ones((lr.shape[0], k, every), bool)
        if ramped:  # steps past the phase's end are no-ops
            every_slot &= (step + slots < p_end)[None]
        # snap: each lane's state at its last evaluation above target (where a crossing
        # replay starts), when the run keeps it (exact crossings).
        state, out, snap = run.call(
            state,
            lr,
            hp,
            put(table),
            ntable,
            data,
            jnp.asarray(step + slots),
            put(every_slot),
            target,
            layout=layout,
        )
        out = {key: np.asarray(v) for key, v in out.items()}
        applied = np.asarray(state.step)
        for j in range(k):
            start = step + j * every
            if start >= p_end:
                break
            at = min(start + every, p_end)
            for lane in range(n_live):
                i = int(lane_cell[lane])
                metrics = dict(
                    val_loss=out["val_loss"][lane, j],
                    val_error=out["val_error"][lane, j],
                    train_loss=out["train_loss"][lane, j],
                )
                # Updates applied up to this evaluation: the cell's counter is only known at
                # the end of the call, so use it for the last evaluation and `at` before.
                tracker.record(
                    i, at, metrics, bool(out["diverged"][lane, j]), int(min(at, applied[lane]))
                )
                if opts.noise_scale and not out["diverged"][lane, j]:
                    tracker.record_noise(
                        i, at, float(out["grad_sq"][lane, j]), float(out["trace_sigma"][lane, j])
                    )
        if snap is not None and opts.exact and every > 1:
            crossing = [
                _Crossing(
                    lane,
                    int(lane_cell[lane]),
                    step,
                    int(tracker.t_before[lane_cell[lane]]),
                    int(tracker.s_target[lane_cell[lane]]),
                    table[lane].reshape(k * every, B),
                )
                for lane in range(n_live)
                if tracker.reached[lane_cell[lane]]
                and not reached_before[lane_cell[lane]]
                and not tracker.exact[lane_cell[lane]]
            ]
            if crossing:
                t_rep = time.perf_counter()
                pending.add(snap, crossing)
                if data is not None:  # a streamed chunk serves this call's replays only
                    _replay(run, pending, lr, hp, put, data, tracker, opts, layout)
                tracker.replay_seconds += time.perf_counter() - t_rep
        del snap
        step = min(step + k * every, p_end)  # a ramp's phase ends at p_end
        if progress is not None:
            at = min(step, opts.max_steps)
            running = int((~tracker.done).sum())
            progress(
                float(len(seeds) - running + running * at / opts.max_steps),
                f"B={B} step {at}/{opts.max_steps}, {running}/{len(seeds)} cells running",
            )
        live = np.flatnonzero(~tracker.done[lane_cell[:n_live]])
        # Finished cells would otherwise ride along (and cost compute) until the block's
        # slowest cell is done. Once at most half the lanes are live, gather the live cells
        # into a narrower vmap (widths are powers of two) -- but only when the compute it
        # saves over the remaining calls beats the compile of the narrower program. The
        # decision uses a fixed cost model, never timings: the vmap width can change a
        # lane's floating-point summation order, so a timing-based choice would make
        # results depend on machine load. Finished cells are no longer recorded, so what
        # they compute after finishing never reaches a table either way.
        width = lr.shape[0]
        new_width = padded_size(1 << max(len(live) - 1, 0).bit_length())
        worth = opts.compact == "always"
        if opts.compact == "auto":
            calls_left = math.ceil((opts.max_steps - step) / (k * every))
            worth = compaction_pays(
                width - new_width,
                calls_left,
                k * every * B,
                k * int(problem.x_val.shape[0]),
                problem.num_params,
            )
        if opts.compact != "never" and len(live) and new_width < width and worth:
            if pending.items:  # replay in the program of the width the cells crossed at
                t_rep = time.perf_counter()
                _replay(run, pending, lr, hp, put, None, tracker, opts, layout)
                tracker.replay_seconds += time.perf_counter() - t_rep
            sel = np.concatenate([live, np.repeat(live[-1:], new_width - len(live))])
            state, lr, seed_idx = (
                jax.tree.map(lambda x, sel=sel: x[sel], state),
                lr[sel],
                seed_idx[sel],
            )
            hp = {name: v[sel] for name, v in hp.items()}
            if jax.local_device_count() > 1:
                lr, hp = shard_cells((lr, hp), new_width)
                state = jax.device_put(state, lr.sharding)
            lane_cell, n_live = lane_cell[live], len(live)
    feeder.close()
    if pending.items:
        t_rep = time.perf_counter()
        _replay(run, pending, lr, hp, put, None, tracker, opts, layout)
        tracker.replay_seconds += time.perf_counter() - t_rep
    return tracker.result()
