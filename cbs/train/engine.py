"""The vmapped training engine: one compiled program per (model, optimizer, batch size).

A *cell* is one training run. Its state is a pure pytree (params, optimizer state, EMA of
the params, step counter, diverged flag) and its train step is a pure function of that
state, the batch indices, and the cell's hyperparameters (LR and the optimizer's
hyperparameters, all traced scalars). The block's cells are stacked along a leading axis
and the step is ``vmap``-ed over it, so LR x hyperparameters x seed share one program.

Determinism: a cell's initialisation depends only on ``PRNGKey(seed)`` and its data order
only on ``seed`` (host-side epoch permutations, :class:`IndexStream`), so a cell trained
alone follows the same trajectory as inside a block. Numerically, vmapping turns matmuls
into batched matmuls whose summation order XLA may choose differently for different
widths; at stable LRs the curves agree to ~1e-6, but at near-divergent LRs such rounding
differences can be amplified and a cell may diverge in one block layout and not another.

Divergence: a step whose loss or updated params are not finite (or whose loss exceeds
``diverge_loss``) is not applied; the cell is marked diverged and frozen
(``jnp.where`` on every leaf), so it never affects other cells.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from cbs.train.layout import over_cells
from cbs.train.models import loss_and_error
from cbs.train.optimizers import NEEDS_OBJECTIVE, build_optimizer, evaluation_point

__all__ = [
    "TrainProblem",
    "CellState",
    "IndexStream",
    "BlockRun",
    "make_block_fns",
    "per_example_metrics",
    "noise_scale_estimates",
]


@dataclasses.dataclass(frozen=True, eq=False)
class TrainProblem:
    """Everything static about a training problem: model, task and data.

    The validation set is on the device. The training set is on the device too unless
    ``streaming``: then ``x_train``/``y_train`` are host (possibly memory-mapped) NumPy
    arrays and every compiled call receives the examples it consumes as its ``data``
    argument (:mod:`cbs.train.streaming`).
    """

    model: nn.Module
    task: str
    x_train: jax.Array
    y_train: jax.Array
    x_val: jax.Array
    y_val: jax.Array
    eval_batch: int = 1024
    diverge_loss: float = math.inf
    streaming: bool = False
    _cache: dict = dataclasses.field(default_factory=dict, repr=False)

    @property
    def num_train(self) -> int:
        return int(self.x_train.shape[0])

    @property
    def num_params(self) -> int:
        """Parameters of the model (the same for every seed)."""
        return int(sum(np.size(x) for x in jax.tree.leaves(self.init_params(0))))

    def init_params(self, seed: int):
        """Initial params of a seed: ``model.init(PRNGKey(seed))``, cached.

        One jitted, un-vmapped init serves every seed and block: XLA's CPU compile of
        Flax's truncated-normal initialisers takes seconds, and a vmapped copy per block
        width would pay it again each time.
        """
        if "init" not in self._cache:
            x0 = jnp.asarray(np.asarray(self.x_train[:1]))
            self._cache["init"] = (
                jax.jit(lambda s: self.model.init(jax.random.PRNGKey(s), x0))
                .lower(jnp.int32(0))
                .compile(compiler_options=one_shot_compiler_options())
            )
        key = ("params", int(seed))
        if key not in self._cache:
            self._cache[key] = self._cache["init"](jnp.int32(seed))
        return self._cache[key]


class CellState(NamedTuple):
    params: Any
    opt_state: Any
    ema: Any  # EMA accumulator of params (zeros at init, bias-corrected at eval)
    step: jax.Array  # updates applied so far (stops counting when diverged)
    diverged: jax.Array  # bool


class IndexStream:
    """The training-example order of one seed: concatenated epoch permutations.

    Epoch ``e`` is ``default_rng([seed, e]).permutation(n)``, so the order depends only
    on the seed and the training-set size, never on the block a cell runs in.
    """

    def __init__(self, seed: int, n: int):
        self.seed, self.n, self.epoch, self.buf = int(seed), int(n), 0, np.zeros(0, np.int32)

    def take(self, count: int) -> np.ndarray:
        parts, have = [self.buf], self.buf.size
        while have < count:
            perm = (
                np.random.default_rng([self.seed, self.epoch]).permutation(self.n).astype(np.int32)
            )
            self.epoch += 1
            parts.append(perm)
            have += perm.size
        allidx = np.concatenate(parts)
        self.buf = allidx[count:]
        return allidx[:count]


def one_shot_compiler_options() -> dict:
    """XLA options for programs that run once per cell (initialisation): on CPU, LLVM's
    lighter optimisation level, which compiles Flax's initialisers (threefry and the
    truncated normal) about 2.5x faster (1.2 -> 0.45 s for the MNIST-1D MLP) and runs
    them in microseconds either way. The values are the default level's bit for bit on
    the built-in models (tests/test_train_layout.py checks it against ``model.init``).
    Other platforms keep their defaults (their compile of these programs is not the cost)."""
    return {"xla_backend_optimization_level": 1} if jax.default_backend() == "cpu" else {}


def per_example_metrics(task: str, outputs, y):
    """Per-example loss and error (LM: averaged over positions; regression: error NaN;
    a :class:`cbs.train.user.CustomLoss` task: its loss on one-example batches)."""
    if not isinstance(task, str):
        return task.per_example(outputs, y)
    if task == "regression":
        loss = 0.5 * jnp.sum((outputs - y) ** 2, axis=-1)
        return loss, jnp.full_like(loss, jnp.nan)
    loss = optax.softmax_cross_entropy_with_integer_labels(outputs, y)
    err = (jnp.argmax(outputs, axis=-1) != y).astype(jnp.float32)
    if task == "lm":
        loss, err = loss.mean(-1), err.mean(-1)
    return loss, err


def _where(pred, new, old):
    return jax.tree.map(lambda n, o: jnp.where(pred, n, o), new, old)


def _all_finite(tree) -> jax.Array:
    # x * 0 is 0 for a finite x and NaN for inf or NaN (IEEE; XLA does not fold it without
    # fast-math), so one float sum per leaf answers "all finite" exactly. It compiles
    # cheaper on XLA:CPU than a boolean all(isfinite) per leaf: 0.35 of 2.4 CPU-seconds
    # for the MNIST-1D MLP's vmapped call program (benchmarks/README.md, train_speed).
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    if not leaves:
        return jnp.array(True)
    return jnp.isfinite(sum(jnp.sum(x * 0) for x in leaves))


def eval_params(state: CellState, ema_decay, point: Callable | None = None) -> Any:
    """The weights to evaluate: bias-corrected EMA ``ema / (1 - d**t)`` (raw at t = 0).
    With d = 0 the EMA equals the raw params, so no branch is needed.

    ``point(params, opt_state)``: the optimizer's evaluation point (schedule-free AdamW's
    average, :func:`cbs.train.optimizers.evaluation_point`); the EMA averages that point.
    """
    raw = state.params if point is None else point(state.params, state.opt_state)
    t = state.step.astype(jnp.float32)
    corr = jnp.where(t > 0, 1.0 - ema_decay**t, 1.0)
    return jax.tree.map(lambda e, p: jnp.where(t > 0, e / corr, p), state.ema, raw)


def make_block_fns(problem: TrainProblem, kind: str, schedule: Callable, max_steps: int):
    """Pure per-cell functions of one (problem, optimizer kind, schedule).

    Returns:
      (init, train_interval, evaluate, grad_fn): ``init(params, hp) -> CellState``;
      ``train_interval(state, lr, hp, idx[steps, B], data=None, block_steps=None,
      live=None) -> (state, mean_loss)`` runs the steps in a ``lax.scan``;
      ``evaluate(state, hp) -> (val_loss, val_error)``; ``grad_fn(params, idx, data=None)
      -> grads`` (for the noise scale). ``idx`` indexes the training set, or ``data = (x,
      y)`` when given (a streamed chunk). ``block_steps[steps]``: the block's step of each
      step, shared by all cells (unbatched), so step-dependent optimizer branches (SOAP's
      basis refresh) stay conditionals under vmap. ``live[steps]``: False skips a step (a
      no-op; the mean loss is over live steps). None is vmapped; the caller vmaps over
      cells.
    """
    model, task = problem.model, problem.task
    point = evaluation_point(kind)

    def tx_of(lr, hp, block_step=None):
        return build_optimizer(kind, lambda count: lr * schedule(count), hp, block_step=block_step)

    def init(params, hp):
        opt_state = tx_of(jnp.float32(0.0), hp).init(params)
        return CellState(
            params, opt_state, jax.tree.map(jnp.zeros_like, params), jnp.int32(0), jnp.array(False)
        )

    def batch_loss(params, idx, data=None):
        xs, ys = (problem.x_train, problem.y_train) if data is None else data
        x, y = xs[idx], ys[idx]
        return loss_and_error(task, model.apply(params, x), y)[0]

    grad_fn = jax.grad(batch_loss)

    def step(state: CellState, lr, hp, idx, data=None, block_step=None, slot_live=True):
        # block_step: the block's step (unbatched; equals every live cell's state.step).
        # slot_live: False makes this step a no-op for the cell (the crossing replay runs
        # single steps between evaluations inside the block's own program, see BlockRun).
        tx = tx_of(lr, hp, block_step)
        loss, grads = jax.value_and_grad(batch_loss)(state.params, idx, data)
        # Sophia's curvature estimate differentiates the same batch's loss again.
        extra = dict(obj_fn=lambda p: batch_loss(p, idx, data)) if kind in NEEDS_OBJECTIVE else {}
        updates, opt_state = tx.update(grads, state.opt_state, state.params, **extra)
        params = optax.apply_updates(state.params, updates)
        bad = ~jnp.isfinite(loss) | (loss > problem.diverge_loss) | ~_all_finite(params)
        # Steps past the budget (the tail of the last scan call) are no-ops too.
        in_budget = (state.step < max_steps) & slot_live
        live = ~(state.diverged | bad) & in_budget
        d = hp["ema_decay"]
        ema = jax.tree.map(lambda e, p: d * e + (1.0 - d) * p, state.ema, point(params, opt_state))
        new = CellState(params, opt_state, ema, state.step + 1, state.diverged)
        out = _where(live, new, state)
        return out._replace(diverged=state.diverged | (bad & in_budget)), loss

    def train_interval(state, lr, hp, idx, data=None, block_steps=None, live=None, any_live=None):
        # block_steps: (steps,) block step of each step (unbatched), or None.
        # live: (steps,) bool, False for a step that is skipped (a no-op), or None.
        # any_live: (steps,) bool, unbatched: False where the step is skipped for every
        # vmapped cell, so that it is not computed at all (a conditional, not a select).
        if block_steps is None and live is None:
            state, losses = jax.lax.scan(lambda s, i: step(s, lr, hp, i, data), state, idx)
            return state, jnp.mean(losses)
        n = idx.shape[0]
        ts = jnp.zeros(n, jnp.int32) if block_steps is None else block_steps
        lv = jnp.ones(n, bool) if live is None else live

        def one_step(s, xs):
            i, t, alive = xs[:3]

            def run(s):
                return step(s, lr, hp, i, data, None if block_steps is None else t, alive)

            if any_live is None:
                return run(s)
            return jax.lax.cond(xs[3], run, lambda s: (s, jnp.float32(0.0)), s)

        xs = (idx, ts, lv) if any_live is None else (idx, ts, lv, any_live)
        state, losses = jax.lax.scan(one_step, state, xs)
        return state, jnp.sum(jnp.where(lv, losses, 0.0)) / jnp.maximum(jnp.sum(lv), 1)

    def evaluate(state, hp):
        params = eval_params(state, hp["ema_decay"], point)
        n, eb = problem.x_val.shape[0], min(problem.eval_batch, problem.x_val.shape[0])
        pieces = -(-n // eb)
        pad = pieces * eb - n
        xs = jnp.concatenate(
            [problem.x_val, jnp.zeros((pad,) + problem.x_val.shape[1:], problem.x_val.dtype)]
        )
        ys = jnp.concatenate(
            [problem.y_val, jnp.zeros((pad,) + problem.y_val.shape[1:], problem.y_val.dtype)]
        )
        mask = (jnp.arange(pieces * eb) < n).astype(jnp.float32)

        def piece(args):
            x, y, m = args
            loss, err = per_example_metrics(task, model.apply(params, x), y)
            return jnp.sum(loss * m), jnp.sum(jnp.where(m > 0, err, 0.0))

        if pieces == 1:  # the common small-validation-set case: no loop to compile
            sl, se = piece((xs, ys, mask))
            return sl / n, se / n
        sl, se = jax.lax.map(
            piece,
            (
                xs.reshape(pieces, eb, *xs.shape[1:]),
                ys.reshape(pieces, eb, *ys.shape[1:]),
                mask.reshape(pieces, eb),
            ),
        )
        return jnp.sum(sl) / n, jnp.sum(se) / n

    return init, train_interval, evaluate, grad_fn


def noise_scale_estimates(grad_fn, params, idx):
    """Unbiased two-batch-size estimates of |G|^2 and tr(Sigma) (McCandlish et al. App. A.1).

    ``idx`` has shape (k, b): k micro-batches of b examples. B_small = b with |G_small|^2
    the mean of the k micro-batch squared norms; B_big = k*b with |G_big|^2 the squared
    norm of their mean (the data-parallel form, no extra gradients needed).

    Returns:
      (grad_sq, trace_sigma) estimates, fp32.
    """
    k, b = idx.shape
    grads = jax.vmap(lambda i: grad_fn(params, i))(idx)
    flat = jnp.concatenate([g.reshape(k, -1) for g in jax.tree.leaves(grads)], axis=1).astype(
        jnp.float32
    )
    small_sq = jnp.mean(jnp.sum(flat**2, axis=1))
    big_sq = jnp.sum(jnp.mean(flat, axis=0) ** 2)
    b_small, b_big = float(b), float(k * b)
    grad_sq = (b_big * big_sq - b_small * small_sq) / (b_big - b_small)
    trace_sigma = (small_sq - big_sq) / (1.0 / b_small - 1.0 / b_big)
    return grad_sq, trace_sigma


class BlockRun:
    """Compiled, vmapped functions of one block layout (kind, schedule, budget).

    ``call`` runs ``evals_per_call`` intervals of ``eval_every`` steps for every cell and
    evaluates after each interval, all in one program; the host checks the stopping rule
    between calls. jit caches programs by shape, so blocks of the same batch size and
    width reuse them.

    The same program replays crossing intervals (exact first crossing, :mod:`cbs.train.loop`):
    every step slot has a per-cell live flag, so an interval can hold a single live step
    followed by its evaluation, and cells that are not replayed stay frozen. The replay
    thus compiles nothing, and a cell's replayed steps are the very arithmetic of its run.
    With ``crossing_metric``, ``call`` also keeps each cell's state at the evaluation before
    its first one below target, so a replay starts there rather than at the call's start.
    """

    def __init__(
        self,
        problem: TrainProblem,
        kind: str,
        schedule: Callable,
        max_steps: int,
        crossing_metric: str | None = None,
    ):
        """``crossing_metric``: "val_loss" or "val_error" to have ``call`` also return each
        cell's state at its last evaluation not below ``target`` before its first one
        below it in the call (where a crossing replay starts); None: no such state."""
        init, train_interval, evaluate, grad_fn = make_block_fns(problem, kind, schedule, max_steps)
        self.problem, self.kind = problem, kind
        skip_dead = jax.default_backend() == "cpu"

        def call(
            state, lr, hp, idx_table, noise_table, data, slot_steps, slot_live, target, layout
        ):
            # Per cell (vmapped): idx_table (evals_per_call, eval_every, B) training rows;
            # noise_table (evals_per_call, num_micro, micro_batch) or None; slot_live
            # (evals_per_call, eval_every) bool, False for a skipped (no-op) step.
            # Shared: data, None (indices into the device-resident training set) or the
            # streamed chunk (x, y) the indices point into; slot_steps (evals_per_call,
            # eval_every) int32, the block step of each slot (unbatched, so step-dependent
            # optimizer branches stay conditionals under vmap).
            # Returns (state, per-evaluation outputs, state before the crossing or None).
            # target: float32 scalar, rounded up by the caller so that "below" here is never
            # later than the host's float64 test (the host checks the kept state's step).
            # On CPU, slots and evaluations that no cell needs (in a replay) are not computed:
            # their "any cell live" flags are unbatched, so a conditional skips them. Elsewhere
            # they are computed and discarded (a select), keeping the step loop free of
            # conditionals on accelerators, where none was measured.
            any_slot = jnp.any(slot_live, axis=0) if skip_dead else None

            def one(state, lr, hp, idx, nt, live):
                def interval(carry, xs):
                    s, keep, crossed = carry
                    idx, nidx, ts, lv, any_lv = xs
                    s, train_loss = train_interval(s, lr, hp, idx, data, ts, lv, any_lv)

                    def measure(s):
                        vl, ve = evaluate(s, hp)
                        if nidx is None:
                            gsq = tr = jnp.float32(jnp.nan)
                        else:
                            gsq, tr = noise_scale_estimates(
                                lambda p, i: grad_fn(p, i, data), s.params, nidx
                            )
                        return vl, ve, gsq, tr

                    if any_lv is None:
                        vl, ve, gsq, tr = measure(s)
                    else:
                        vl, ve, gsq, tr = jax.lax.cond(
                            jnp.any(any_lv), measure, lambda s: (jnp.float32(jnp.nan),) * 4, s
                        )
                    if crossing_metric is not None:
                        below = (vl if crossing_metric == "val_loss" else ve) < target
                        keep = _where(~crossed & ~below, s, keep)
                        crossed = crossed | below
                    return (s, keep, crossed), dict(
                        train_loss=train_loss,
                        val_loss=vl,
                        val_error=ve,
                        diverged=s.diverged,
                        grad_sq=gsq,
                        trace_sigma=tr,
                    )

                keep0 = state if crossing_metric is not None else None
                (s, keep, _), out = jax.lax.scan(
                    interval,
                    (state, keep0, jnp.array(False)),
                    (idx, nt, slot_steps, live, any_slot),
                )
                return s, out, keep

            return over_cells(layout, one, (state, lr, hp, idx_table, noise_table, slot_live))

        self._init = jax.jit(jax.vmap(init))
        self._call = jax.jit(call, donate_argnums=(0,), static_argnames=("layout",))
        self.evaluate = jax.jit(jax.vmap(evaluate))

    def call(self, *args, layout: str = "vmap"):
        """One call of the block program (arguments as documented in ``__init__``'s
        ``call``); ``layout``: how the cells are laid out in it (:mod:`cbs.train.layout`),
        a separate compiled program per layout."""
        return self._call(*args, layout=layout)

    def lower_call(self, *args, layout: str = "vmap"):
        """The call's program traced and lowered (jax's AOT API), for profiling."""
        return self._call.trace(*args, layout=layout).lower()

    def init(self, seeds, hp) -> CellState:
        """Stacked initial states of cells with these seeds and hyperparameters."""
        params = [self.problem.init_params(int(sd)) for sd in np.asarray(seeds)]
        return self._init(jax.tree.map(lambda *xs: jnp.stack(xs), *params), hp)
