"""Vmapped block vs one-cell-at-a-time training: same cells, same steps, same evaluations.

Ours: TrainBackend.run_blocks on one block (LR x momentum x seed cells vmapped inside one
compiled lax.scan program). Two baselines, configurations one after another:

* naive: the conventional loop a researcher would write per configuration: build
  ``optax.sgd(lr, momentum)`` with Python floats, ``jax.jit`` a train step and an eval step,
  loop over steps in Python, evaluate every ``eval_every`` steps (compiles per configuration);
* strong: what a careful JAX user writes: one jitted program compiled once for all
  configurations, hyperparameters as traced arguments (``optax.inject_hyperparams``), the
  steps in ``lax.scan`` (an inner scan per evaluation interval), the data order precomputed.

All see the same data order (cbs.train.engine.IndexStream), the same initialisation and the
same evaluation schedule. Times are reported compile included (every side) and run only
(ours: a second run_blocks call on the same back end, whose programs are cached; strong:
the AOT-compiled program's calls; naive: everything after each configuration's first step
and first evaluation, which trigger its compiles). The target is set unreachable so every
cell runs the full budget (same work). "% of peak" divides XLA's FLOP count by the run-only
time and by a 1024x1024 f32 matmul rate measured first in the same run.

    python benchmarks/train_speed.py            # about 3 minutes on 2 CPU cores
    python benchmarks/train_speed.py --quick    # about a minute
    python benchmarks/train_speed.py --quick --profile   # + trace/lower/compile per program
    python benchmarks/train_speed.py --size 256,1024,1000 --skip-naive   # a GPU (gpu_check.sh)

``--profile`` compiles every program of each side again in a fresh back end through jax's
AOT API (``.trace().lower().compile()``) and prints the three phases; ``--layout`` sets our
block's ``train.layout``.
Last line: ``RESULT speedup=... speedup_strong=... ours_s=... strong_s=... baseline_s=...``
(speedup = vs the naive loop, speedup_strong = vs the strong baseline, compile included).
"""

from __future__ import annotations

import argparse
import os
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cbs.train.backend import TrainBackend
from cbs.train.direct import make_block, make_config
from cbs.train.engine import IndexStream
from cbs.train.models import loss_and_error

warnings.filterwarnings("ignore", message="Some donated buffers were not usable")


def matmul_flops_per_s(n: int = 1024, reps: int = 20) -> float:
    """Measured float32 matmul throughput of the default device (FLOP/s)."""
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    t = time.perf_counter()
    for _ in range(reps):
        out = f(a)
    out.block_until_ready()
    return 2 * n**3 * reps / (time.perf_counter() - t)


def baseline(be: TrainBackend, block, max_steps: int, eval_every: int):
    """The same cells trained one at a time with a conventional per-config jitted loop.
    Returns (total time, time after each configuration's first calls, curves)."""
    p = be.problem
    xt, yt, xv, yv = p.x_train, p.y_train, p.x_val, p.y_val
    curves = []
    first_calls = 0.0
    t0 = time.perf_counter()
    for cell in block.cells:
        tx = optax.sgd(cell.lr, momentum=cell.hparams["momentum"])
        params = p.model.init(jax.random.PRNGKey(cell.seed), xt[:1])
        opt_state = tx.init(params)

        @jax.jit
        def step(params, opt_state, idx):
            def loss(pr):
                return loss_and_error(p.task, p.model.apply(pr, xt[idx]), yt[idx])[0]

            l, g = jax.value_and_grad(loss)(params)
            # a new closure per configuration, as such loops are written
            u, opt_state = tx.update(g, opt_state, params)  # noqa: B023
            return optax.apply_updates(params, u), opt_state, l

        @jax.jit
        def evaluate(params):
            return loss_and_error(p.task, p.model.apply(params, xv), yv)

        stream = IndexStream(cell.seed, p.num_train)
        t1 = time.perf_counter()
        vals = [float(evaluate(params)[0])]
        for s in range(1, max_steps + 1):
            params, opt_state, _ = step(
                params, opt_state, jnp.asarray(stream.take(block.batch_size))
            )
            if s == 1:
                jax.block_until_ready(params)
                first_calls += time.perf_counter() - t1  # both compiles and one step
            if s % eval_every == 0:
                vals.append(float(evaluate(params)[0]))
        curves.append(np.array(vals))
    total = time.perf_counter() - t0
    return total, total - first_calls, curves


def strong_program(p):
    """The strong baseline's one program: a cell's validation curve from its params, LR,
    momentum and data order, hyperparameters as traced arguments (optax.inject_hyperparams)
    and the steps in lax.scan. ``strong_baseline`` times it; ``profile_phases`` splits its
    compile."""
    xt, yt, xv, yv = p.x_train, p.y_train, p.x_val, p.y_val
    tx = optax.inject_hyperparams(optax.sgd)(learning_rate=0.0, momentum=0.0)

    def evaluate(params):
        return loss_and_error(p.task, p.model.apply(params, xv), yv)[0]

    def train(params, lr, momentum, idx):
        # idx: (n_evals, eval_every, B) example indices, the cell's data order
        opt_state = tx.init(params)
        opt_state.hyperparams["learning_rate"] = lr
        opt_state.hyperparams["momentum"] = momentum

        def step(carry, ix):
            params, opt_state = carry
            g = jax.grad(lambda pr: loss_and_error(p.task, p.model.apply(pr, xt[ix]), yt[ix])[0])(
                params
            )
            u, opt_state = tx.update(g, opt_state, params)
            return (optax.apply_updates(params, u), opt_state), None

        def interval(carry, ixs):
            carry, _ = jax.lax.scan(step, carry, ixs)
            return carry, evaluate(carry[0])

        _, vals = jax.lax.scan(interval, (params, opt_state), idx)
        return jnp.concatenate([evaluate(params)[None], vals])

    return train


def strong_baseline(be: TrainBackend, block, max_steps: int, eval_every: int):
    """The same cells one after another through ONE compiled program (``strong_program``).
    Returns (total time incl. compile, run-only time, compile time, curves)."""
    p = be.problem
    xt = p.x_train
    n_evals = max_steps // eval_every
    train = strong_program(p)

    t0 = time.perf_counter()
    params0 = p.model.init(jax.random.PRNGKey(0), xt[:1])
    idx_shape = jax.ShapeDtypeStruct((n_evals, eval_every, block.batch_size), jnp.int32)
    f32 = jax.ShapeDtypeStruct((), jnp.float32)
    compiled = jax.jit(train).lower(params0, f32, f32, idx_shape).compile()
    compile_s = time.perf_counter() - t0
    curves = []
    t1 = time.perf_counter()
    for cell in block.cells:
        params = p.model.init(jax.random.PRNGKey(cell.seed), xt[:1])
        stream = IndexStream(cell.seed, p.num_train)
        idx = np.stack([stream.take(block.batch_size) for _ in range(n_evals * eval_every)]).astype(
            np.int32
        )
        curves.append(
            np.asarray(
                compiled(
                    params,
                    jnp.float32(cell.lr),
                    jnp.float32(cell.hparams["momentum"]),
                    jnp.asarray(idx.reshape(n_evals, eval_every, -1)),
                )
            )
        )
    run_s = time.perf_counter() - t1
    return time.perf_counter() - t0, run_s, compile_s, curves


def _aot(fn, *args, compiler_options=None, **kw):
    """(trace, lower, compile) seconds of a jitted ``fn`` at ``args`` (jax's AOT API)."""
    t0 = time.perf_counter()
    traced = fn.trace(*args, **kw)
    t1 = time.perf_counter()
    lowered = traced.lower()
    t2 = time.perf_counter()
    lowered.compile(compiler_options=compiler_options)
    return t1 - t0, t2 - t1, time.perf_counter() - t2


def profile_phases(cfg, block, steps: int, every: int) -> list[tuple[str, float, float, float]]:
    """Trace / lower / compile seconds of every program our block compiles, and of the
    strong baseline's one program, each in a fresh back end (nothing cached in-process)."""
    from cbs.train.engine import one_shot_compiler_options
    from cbs.train.loop import program_target
    from cbs.train.optimizers import OPTIMIZERS

    be = TrainBackend(cfg)
    p = be.problem
    run = be._run_for(block.kind, block.schedule)
    n, k = len(block.cells), be.options().evals_per_call
    x0 = jnp.asarray(np.asarray(p.x_train[:1]))
    rows = [
        (
            "ours: init_params (one cell)",
            *_aot(
                jax.jit(lambda s: p.model.init(jax.random.PRNGKey(s), x0)),
                jnp.int32(0),
                compiler_options=one_shot_compiler_options(),
            ),
        )
    ]
    hp = {h: jnp.asarray(block.hparam(h), jnp.float32) for h in OPTIMIZERS[block.kind].hparams}
    params = jax.tree.map(lambda *xs: jnp.stack(xs), *[p.init_params(c.seed) for c in block.cells])
    rows.append(("ours: vmapped state init", *_aot(run._init, params, hp)))
    state = run._init(params, hp)
    rows.append(("ours: step-0 evaluation", *_aot(run.evaluate, state, hp)))
    layout = be.block_layout(block)[0]
    args = (
        state,
        jnp.asarray(block.lrs, jnp.float32),
        hp,
        jnp.zeros((n, k, every, block.batch_size), jnp.int32),
        None,
        None,
        jnp.zeros((k, every), jnp.int32),
        jnp.ones((n, k, every), bool),
        program_target(1e-9),
    )
    rows.append((f"ours: train+eval call ({layout})", *_aot(run._call, *args, layout=layout)))
    train = strong_program(p)
    f32 = jax.ShapeDtypeStruct((), jnp.float32)
    idx = jax.ShapeDtypeStruct((steps // every, every, block.batch_size), jnp.int32)
    rows.append(("strong: train program", *_aot(jax.jit(train), p.init_params(0), f32, f32, idx)))
    return rows


def step_flops(be: TrainBackend, batch_size: int) -> float:
    """XLA's FLOP count of one SGD train step of one cell."""
    p = be.problem
    params = p.init_params(0)

    def f(params, idx):
        return jax.grad(
            lambda pr: loss_and_error(p.task, p.model.apply(pr, p.x_train[idx]), p.y_train[idx])[0]
        )(params)

    cost = jax.jit(f).lower(params, jnp.zeros(batch_size, jnp.int32)).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float(cost.get("flops", np.nan))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small run (< 1 minute on 2 CPU cores)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument(
        "--profile",
        action="store_true",
        help="also print trace / lower / compile seconds of every program, each side",
    )
    ap.add_argument(
        "--size",
        default=None,
        help="cells,width,steps instead of the preset sizes, e.g. 256,512,1000 (a GPU)",
    )
    ap.add_argument("--layout", default="auto", help="train.layout of our block")
    ap.add_argument(
        "--skip-naive",
        action="store_true",
        help="no naive baseline (it compiles per configuration: minutes at GPU sizes)",
    )
    args = ap.parse_args()
    if args.quick:
        n_lr, moms, seeds, steps, every, width = 4, [0.5, 0.9], [0, 1], 300, 50, 64
    else:
        n_lr, moms, seeds, steps, every, width = 8, [0.5, 0.9], [0, 1], 1000, 50, 128
    if args.size:  # cells = LRs x 2 momenta x 2 seeds
        cells, width, steps = (int(v) for v in args.size.split(","))
        n_lr = max(1, cells // 4)
    # Stable LRs only: near the edge of stability vmapped and single-cell rounding differ
    # and chaotic trajectories amplify it, which would spoil the same-work check.
    lrs = list(np.logspace(-3, -1, n_lr))
    cfg = make_config(
        dict(
            dataset="mnist1d",
            model="mlp",
            width=width,
            depth=2,
            steps_per_call=steps,
            layout=args.layout,
        ),
        metric="val_loss",
        value=1e-9,
        max_steps=steps,
        eval_every=every,
        batch_sizes=[args.batch_size],
        kinds=["momentum"],
        name="bench",
    )
    be = TrainBackend(cfg)
    _ = be.problem  # data generation is not part of either timing
    block = make_block("momentum", args.batch_size, lrs, hparams=dict(momentum=moms), seeds=seeds)
    n = len(block.cells)

    # An accelerator needs a larger matmul to approach its peak than a CPU.
    peak = matmul_flops_per_s(1024 if jax.default_backend() == "cpu" else 8192)
    print(
        f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), measured f32 matmul "
        f"{peak / 1e9:.1f} GFLOP/s"
    )
    print(
        f"workload: MNIST-1D MLP width {width} depth 2, momentum SGD, B={args.batch_size}, {n} cells "
        f"({n_lr} LRs x {len(moms)} momenta x {len(seeds)} seeds), {steps} steps, eval every {every}"
    )

    load = os.getloadavg()
    t0 = time.perf_counter()
    res = be.run_blocks([block])[0]
    ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    be.run_blocks([block])  # same back end: its programs are cached
    ours_run = time.perf_counter() - t0
    strong, strong_run, strong_compile, strong_curves = strong_baseline(be, block, steps, every)
    if args.skip_naive:
        base, base_run, base_curves = np.nan, np.nan, None
    else:
        base, base_run, base_curves = baseline(be, block, steps, every)

    def agreement(curves):
        # Same work: the implementations must agree on the curves (stable LRs).
        diffs = []
        for cell, bc in zip(block.cells, curves):
            oc = (
                res.curves[res.curves.cell_id == cell.cell_id]
                .sort_values("step")
                .val_loss.to_numpy()
            )
            if np.all(np.isfinite(oc)) and np.all(np.isfinite(bc)):
                diffs.append(float(np.max(np.abs(oc - bc) / np.maximum(1.0, np.abs(bc)))))
        return np.array(diffs)

    flops = step_flops(be, args.batch_size) * n * steps
    print(
        f"load average before the timings: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} (2-core machine: "
        f"anything above ~2 slows every side)"
    )
    print(
        f"{'':34s}{'incl. compile':>14s}{'run only':>10s}{'cells/s':>9s}  {'% of matmul peak (run only)':>28s}"
    )
    for name, tot, run in (
        ("ours (vmapped block)", ours, ours_run),
        ("strong (1 program, scan, traced)", strong, strong_run),
        ("naive (per-config jitted loop)", base, base_run),
    ):
        if not np.isfinite(tot):
            continue
        print(
            f"{name:34s}{tot:12.2f} s{run:8.2f} s{n / tot:9.2f}  {flops / run / 1e9:10.2f} GFLOP/s = "
            f"{flops / run / peak:6.1%}"
        )
    print(f"strong baseline compile: {strong_compile:.2f} s (once, for all configurations)")
    # Rounding differs between batched and single matmuls; trajectories at the larger LRs
    # amplify it over many steps (chaotic late training), so report how many agree.
    for name, curves in (("strong", strong_curves), ("naive", base_curves)):
        if curves is None:
            continue
        d = agreement(curves)
        print(
            f"curves ours vs {name}: {np.sum(d < 1e-4)}/{n} cells agree to 1e-4 (relative); "
            f"median difference {np.median(d):.1e}, max {np.max(d):.1e}"
        )
    if args.profile:
        print(f"{'program':40s}{'trace':>8s}{'lower':>8s}{'compile':>9s}{'total':>8s}")
        for name, *secs in profile_phases(cfg, block, steps, every):
            print(f"{name:40s}" + "".join(f"{x:8.2f}" for x in secs) + f"{sum(secs):8.2f} s")
    timing = res.tables["timing"].iloc[0]
    print(f"our layout: {timing.layout} ({timing.layout_reason})")
    print(
        f"RESULT speedup={base / ours:.2f} speedup_strong={strong / ours:.2f} "
        f"speedup_run_only={base_run / ours_run:.2f} speedup_strong_run_only={strong_run / ours_run:.2f} "
        f"ours_s={ours:.2f} strong_s={strong:.2f} baseline_s={base:.2f} ours_run_s={ours_run:.2f} "
        f"strong_run_s={strong_run:.2f} baseline_run_s={base_run:.2f} load={load[0]:.2f} "
        f"cells_per_s={n / ours:.2f} cells_per_s_run_only={n / ours_run:.2f} "
        f"peak_fraction_run_only={flops / ours_run / peak:.4f} layout={timing.layout}"
    )


if __name__ == "__main__":
    main()
