"""K-FAC cells via kfac-jax 0.0.8.

kfac-jax's ``Optimizer.step`` is a jitted Python-level call that takes the global step as
a Python int and cannot be placed inside ``lax.scan`` or ``vmap``. So a K-FAC block runs
its cells one after another. The LR, momentum and damping are passed to ``step`` as
arrays (adaptive LR/momentum/damping are off), so one compiled step serves every cell
that shares a weight decay (kfac-jax's ``l2_reg`` is a constructor argument: one
optimizer, hence one compile, per distinct weight decay). Data order and initialisation
follow the same seed rules as the vmapped path, and the records go through the same
:class:`~cbs.train.loop.Tracker`.

Layers are found by kfac-jax's automatic graph matching (dense and conv layers of the
Flax MLP and CNN); the loss is registered in the loss function.

Counting: every batch K-FAC consumes is a step of ``batch_size`` examples. Each update
estimates the curvature on its own gradient batch (no extra examples). kfac-jax's
optional burn-in (hyperparameter ``burnin_steps``, off by default) estimates the curvature
on that many extra batches before the first update; those batches count as steps (and
their examples as examples), so a cell with burn-in ``b`` that reaches the target after
``k`` updates reports ``steps_to_target = b + k`` (evaluations stay on multiples of
``eval_every`` of this count; the burn-in steps leave the weights unchanged), and the budget
``max_steps`` covers them too. The LR schedule is indexed by updates. Rows carry
``burnin_steps`` and ``examples_to_target`` (= ``steps_to_target * batch_size``).
"""

from __future__ import annotations

import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from cbs.sweep.backend import Block, BlockResult
from cbs.train.engine import IndexStream, TrainProblem, _all_finite, make_block_fns
from cbs.train.loop import RunOptions, Tracker, noise_indices
from cbs.train.models import loss_and_error
from cbs.train.streaming import host_batch

__all__ = ["KfacRunner", "burnin_steps"]


def burnin_steps(hparams) -> int:
    """The cell's curvature-only burn-in batches (hyperparameter ``burnin_steps``)."""
    return int(round(float(hparams.get("burnin_steps", 0.0))))


_step_keys = jax.jit(jax.vmap(jax.random.fold_in, in_axes=(None, 0)))


class KfacRunner:
    """K-FAC optimizers (one per weight decay) and jitted helpers for one problem."""

    def __init__(self, problem: TrainProblem, schedule, max_steps: int):
        self.problem, self.schedule, self.max_steps = problem, schedule, max_steps
        # Reuse the vmapped path's evaluation and gradient code (kind "sgd" is only a
        # placeholder: the optimizer part of these functions is unused here).
        _, _, evaluate, grad_fn = make_block_fns(problem, "sgd", schedule, max_steps)
        from cbs.train.engine import CellState, noise_scale_estimates

        def eval_fn(params, ema, step, ema_decay):
            st = CellState(params, None, ema, step, jnp.array(False))
            return evaluate(st, dict(ema_decay=ema_decay))

        self._eval = jax.jit(eval_fn)
        self._ema = jax.jit(lambda e, p, d: jax.tree.map(lambda a, b: d * a + (1 - d) * b, e, p))
        self._finite = jax.jit(_all_finite)
        self._noise = jax.jit(
            lambda p, idx, data: noise_scale_estimates(lambda q, i: grad_fn(q, i, data), p, idx)
        )
        self._opts: dict[float, object] = {}
        model, task = problem.model, problem.task

        def loss(params, batch):
            x, y = batch
            return loss_and_error(task, model.apply(params, x), y, register_kfac=True)[0]

        self._loss = loss

    def optimizer(self, weight_decay: float, burnin: int = 0):
        """kfac-jax's optimizer for a weight decay and burn-in (both constructor arguments)."""
        import kfac_jax

        key = (weight_decay, burnin)
        if key not in self._opts:
            self._opts[key] = kfac_jax.Optimizer(
                value_and_grad_func=jax.value_and_grad(self._loss),
                l2_reg=weight_decay,
                use_adaptive_learning_rate=False,
                use_adaptive_momentum=False,
                use_adaptive_damping=False,
                multi_device=False,
                inverse_update_period=5,
                num_burnin_steps=burnin,
            )
        return self._opts[key]

    def run_block(self, block: Block, opts: RunOptions) -> BlockResult:
        tracker = Tracker(block, opts)
        p = self.problem
        B, n = block.batch_size, p.num_train
        # Host copies: batches are gathered with numpy (one transfer per step instead of
        # several small device dispatches), and per-step keys are made in one call.
        xt, yt = np.asarray(p.x_train), np.asarray(p.y_train)
        extras = []
        for i, cell in enumerate(block.cells):
            hp = {k: jnp.float32(v) for k, v in cell.hparams.items()}
            burnin = burnin_steps(cell.hparams)
            opt = self.optimizer(float(cell.hparams.get("weight_decay", 0.0)), burnin)
            stream = IndexStream(cell.seed, n)
            key = jax.random.PRNGKey(cell.seed)
            step_keys = _step_keys(key, jnp.arange(opts.max_steps))
            params = p.init_params(cell.seed)
            ema = jax.tree.map(jnp.zeros_like, params)
            idx = stream.take(B)
            state = opt.init(params, jax.random.fold_in(key, 1 << 30), (xt[idx], yt[idx]))
            stream = IndexStream(
                cell.seed, n
            )  # the init batch only shapes the state: restart the order
            vl, ve = self._eval(params, ema, jnp.int32(0), hp["ema_decay"])
            tracker.record(i, 0, dict(val_loss=vl, val_error=ve, train_loss=np.nan), False, 0)

            def kstep(
                params,
                state,
                step,
                idx,
                cell=cell,
                opt=opt,
                step_keys=step_keys,
                hp=hp,
                burnin=burnin,
            ):
                """Update number ``step`` (0-based) on the examples ``idx``: (params, state, loss)."""
                lr = jnp.float32(cell.lr * float(self.schedule(step)))
                batch = (xt[idx], yt[idx])
                if step == 0 and burnin:
                    # Burn-in: kfac-jax estimates the curvature on `burnin` extra batches before
                    # the first update (drawn apart from the training order, which stays the
                    # same as for every other optimizer), then takes the first training batch.
                    burn = [
                        noise_indices(cell.seed, j, n, 1, B, tag=0xB0B)[0] for j in range(burnin)
                    ]
                    feed = dict(data_iterator=iter([(xt[b], yt[b]) for b in burn] + [batch]))
                else:
                    feed = dict(batch=batch)
                with warnings.catch_warnings():
                    # kfac-jax donates the batch too; XLA cannot reuse it and says so at compile.
                    warnings.filterwarnings(
                        "ignore", message="Some donated buffers were not usable"
                    )
                    # kfac-jax donates params and state; pass a copy of the params so the last
                    # finite ones survive a diverging step.
                    new_params, new_state, stats = opt.step(
                        jax.tree.map(jnp.copy, params),
                        state,
                        step_keys[step],
                        **feed,
                        learning_rate=lr,
                        momentum=hp["momentum"],
                        damping=hp["damping"],
                        global_step_int=step,
                    )
                return new_params, new_state, float(stats["loss"])

            def counted(updates: int, burnin=burnin) -> int:
                """Steps (batches consumed) after ``updates`` updates: burn-in included."""
                return updates + burnin if updates else 0

            def replay(snapshot, t0: int, t1: int, cell=cell, hp=hp, kstep=kstep, counted=counted):
                """Exact first crossing in (t0, t1]: retrain from the state kept at the
                evaluation t0 (``u0`` updates) with an evaluation after every update (the same
                trajectory: the data order and step keys are functions of the seed and step)."""
                params, state, ema, u0 = snapshot
                params, state, ema = jax.tree.map(jnp.copy, (params, state, ema))
                stream = IndexStream(cell.seed, n)
                stream.take(u0 * B)
                for u in range(u0, t1):
                    if counted(u + 1) > t1:
                        break
                    params, state, _ = kstep(params, state, u, stream.take(B))
                    ema = self._ema(ema, params, hp["ema_decay"])
                    vl, ve = self._eval(params, ema, jnp.int32(u + 1), hp["ema_decay"])
                    if float(vl if opts.metric == "val_loss" else ve) < opts.target:
                        return counted(u + 1)
                return None

            # step: batches consumed (burn-in included); updates: updates applied.
            losses, diverged, step, updates = [], False, 0, 0
            snapshot = None
            while counted(updates + 1) <= opts.max_steps and not tracker.done[i]:
                if opts.exact and opts.eval_every > 1 and step % opts.eval_every == 0:
                    # state at evaluation `step`
                    snapshot = (*jax.tree.map(jnp.copy, (params, state, ema)), updates)
                    t_snap = step
                idx = stream.take(B)
                new_params, new_state, loss = kstep(params, state, updates, idx)
                if (
                    not np.isfinite(loss)
                    or loss > p.diverge_loss
                    or not bool(self._finite(new_params))
                ):
                    diverged = True  # keep the last finite params, stop this cell
                else:
                    params, state = new_params, new_state
                    ema = self._ema(ema, params, hp["ema_decay"])
                    losses.append(loss)
                    updates += 1
                    step = counted(updates)
                if diverged or step % opts.eval_every == 0 or step >= opts.max_steps:
                    # A divergence is reported at the next evaluation step, as in the vmapped path.
                    at = (
                        min((step // opts.eval_every + 1) * opts.eval_every, opts.max_steps)
                        if diverged
                        else step
                    )
                    # The EMA's bias correction counts updates (the burn-in moved nothing).
                    vl, ve = self._eval(params, ema, jnp.int32(updates), hp["ema_decay"])
                    tl = float(np.mean(losses)) if losses else np.nan
                    tracker.record(
                        i, at, dict(val_loss=vl, val_error=ve, train_loss=tl), diverged, step
                    )
                    if tracker.reached[i] and not tracker.exact[i] and snapshot is not None:
                        t_rep = time.perf_counter()
                        tracker.set_exact(i, replay(snapshot, t_snap, at))
                        tracker.replay_seconds += time.perf_counter() - t_rep
                    if opts.noise_scale and not diverged:
                        nidx = noise_indices(
                            cell.seed, at, n, opts.noise_num_micro, opts.noise_micro_batch or B
                        )
                        g, t = self._noise(params, *host_batch(p, nidx))
                        tracker.record_noise(i, at, float(g), float(t))
                    losses = []
                if diverged:
                    break
            extras.append(dict(burnin_steps=float(burnin)))
        result = tracker.result()
        for rec, extra in zip(result.cells, extras):
            rec.extra.update(extra, examples_to_target=float(rec.steps_to_target) * B)
        return result
