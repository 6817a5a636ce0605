"""Orchestration: measure a config's network, anchor on one block of real training, forecast.

State and IO live here (training the anchor block, reading a finished sweep's tables,
writing prediction.parquet / prediction.json / prediction.png); the numerics are in
:mod:`cbs.train.spectrum`, :mod:`cbs.predict._calibrate` and :mod:`cbs.predict._forecast`.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd

from cbs.analysis._format import format_number
from cbs.errors import CbsError
from cbs.predict._calibrate import map_optimizer, nqm_from_measurement
from cbs.predict._forecast import forecast


class PredictOptionError(CbsError, ValueError):
    """A cbs.predict option (or the config it is given) outside what is allowed."""


__all__ = ["PredictOptions", "Prediction", "measure_network", "predict", "sweep_is_finished"]


@dataclasses.dataclass(frozen=True)
class PredictOptions:
    """How to measure and forecast (CLI flags of the same names with dashes)."""

    anchor: int | None = None  # anchor batch size (default: the smallest of the grid)
    seed: int | None = None  # parameters measured: init of this seed (default grid.seeds[0])
    examples: int = 2048  # training examples the measurement averages over
    top_k: int = 16
    lanczos_iters: int = 64
    slq_probes: int = 4
    slq_iters: int = 48
    noise_examples: int = 128  # examples in the Monte Carlo tr(C Sigma)
    chunk: int = 64  # per-example gradients in memory at once
    curvature: str = "ggn"
    bulk_noise: str = "trace"
    bins: int = 40
    floor: float = 1e-6
    max_memory_mb: float = 2048.0
    # ~1-10 min of float64 on a 2-core CPU (measured ~2-10 GFLOP/s); raise it on an accelerator
    max_tflop: float = 1.0
    lr_grid: str = "continuous"  # or "sweep": SGD/momentum pick from the config's LR grid
    measure_at: str = (
        "target"  # curvature, noise and start measured at theta_T ("init": at theta_0)
    )
    noise_at: str = "target"  # "target": noise where the anchor run reaches the target; "init"
    # "loss-drop": the start (measured at theta_T) rescaled so the NQM's initial risk is the
    # loss the anchor run descended, L(theta_0) - L(theta_T) (docs/predict.md)
    start: str = "displacement"

    def check(self) -> None:
        """One-line ValueError naming the flag, before any compute."""
        for name, lo in (
            ("examples", 2),
            ("top_k", 1),
            ("lanczos_iters", 1),
            ("slq_probes", 1),
            ("slq_iters", 2),
            ("noise_examples", 2),
            ("chunk", 1),
            ("bins", 1),
        ):
            v = getattr(self, name)
            if not isinstance(v, int) or v < lo:
                raise PredictOptionError(
                    f"--{name.replace('_', '-')}: got {v!r}; allowed: an integer >= {lo}"
                )
        if self.top_k > self.lanczos_iters:
            raise PredictOptionError(
                f"--top-k: got {self.top_k}; allowed: <= --lanczos-iters ({self.lanczos_iters})"
            )
        for name, allowed in (
            ("curvature", ("ggn", "hessian")),
            ("bulk_noise", ("trace", "curvature")),
            ("lr_grid", ("sweep", "continuous")),
            ("measure_at", ("target", "init")),
            ("noise_at", ("target", "init")),
            ("start", ("displacement", "loss-drop")),
        ):
            v = getattr(self, name)
            if v not in allowed:
                raise PredictOptionError(
                    f"--{name.replace('_', '-')}: got {v!r}; allowed: "
                    + ", ".join(repr(a) for a in allowed)
                )
        if not (isinstance(self.max_tflop, (int, float)) and self.max_tflop > 0):
            raise PredictOptionError(f"--max-tflop: got {self.max_tflop!r}; allowed: a number > 0")
        if not 0 < self.floor < 1:
            raise PredictOptionError(f"--floor: got {self.floor!r}; allowed: 0 < floor < 1")
        if self.anchor is not None and self.anchor < 1:
            raise PredictOptionError(f"--anchor: got {self.anchor!r}; allowed: a batch size >= 1")


@dataclasses.dataclass
class Prediction:
    """The forecast of one config (and the measured sweep beside it, when there is one)."""

    table: pd.DataFrame  # per (optimizer, batch size)
    summary: pd.DataFrame  # per optimizer
    measurement: object  # at initialisation (B_simple, B_noise)
    calibrated_on: object  # the measurement the NQM was built from
    costs: dict
    text: str
    files: list[Path]


@functools.lru_cache(maxsize=4)
def _network(backend, seed: int, examples: int):
    """(apply, loss, flatten, x, y): the back end's model on flat float64 parameters, and the
    measured examples (a seeded subsample of the training set).

    Cached: apply and loss are static arguments of the jitted measurement, so the
    measurements at theta_0 and theta_T share one compiled program only when they get the
    same function objects (a compile is most of a measurement on small models)."""
    import jax
    from jax.flatten_util import ravel_pytree

    from cbs.train.engine import per_example_metrics

    prob = backend.problem
    n = prob.num_train
    take = np.sort(np.random.default_rng(seed).permutation(n)[: min(examples, n)])
    x, y = np.asarray(prob.x_train)[take], np.asarray(prob.y_train)[take]
    with jax.enable_x64(True):
        _, unravel = ravel_pytree(
            jax.tree.map(lambda a: np.asarray(a, np.float64), prob.init_params(seed))
        )
    model, task = prob.model, prob.task

    def flatten(params):
        with jax.enable_x64(True):
            return ravel_pytree(jax.tree.map(lambda a: np.asarray(a, np.float64), params))[0]

    def apply(th, xb):
        return model.apply(unravel(th), xb)

    def loss(out, yb):
        return per_example_metrics(task, out, yb)[0]

    return apply, loss, flatten, x, y


def measure_network(backend, seed: int, options: PredictOptions):
    """cbs.train.spectrum.measure on the train back end's model at init(seed)."""
    from cbs.train.spectrum import measure

    apply, loss, flatten, x, y = _network(backend, seed, options.examples)
    return measure(
        apply,
        loss,
        flatten(backend.problem.init_params(seed)),
        x,
        y,
        **_measure_settings(options, seed),
    )


def _measure_settings(options: PredictOptions, seed: int) -> dict:
    """The settings of cbs.train.spectrum.measure that PredictOptions carries."""
    names = ("top_k", "lanczos_iters", "slq_probes", "slq_iters", "noise_examples", "chunk")
    names += ("curvature", "max_memory_mb", "max_tflop")
    return dict({k: getattr(options, k) for k in names}, seed=seed)


def _train_to(backend, entry, hp: dict, lr: float, batch: int, steps: int, seed: int):
    """The parameters of one cell (the anchor's best LR and hyperparameters, this seed)
    after ``steps`` steps at ``batch``: the engine's own step and data order, un-vmapped."""
    import jax
    import jax.numpy as jnp

    from cbs.train.engine import IndexStream, make_block_fns
    from cbs.train.optimizers import schedule_fn

    prob, budget = backend.problem, backend.config.budget.max_steps
    init, train_interval, _, _ = make_block_fns(
        prob, entry.kind, schedule_fn(entry.schedule, budget), budget
    )
    hpj = {k: jnp.float32(v) for k, v in hp.items()}
    # float32 as the engine trains (parameters built while x64 was on for the measurement
    # can come back float64, e.g. a Transformer's position table, and break the step's carry)
    params = jax.tree.map(
        lambda a: jnp.asarray(a, jnp.float32) if jnp.issubdtype(a.dtype, jnp.floating) else a,
        prob.init_params(seed),
    )
    state = init(params, hpj)
    idx = IndexStream(seed, prob.num_train).take(steps * batch).reshape(steps, batch)
    data = None
    if getattr(prob, "streaming", False):  # host-resident training set: hand over the examples
        flat = idx.reshape(-1)
        data = (
            jnp.asarray(np.asarray(prob.x_train)[flat]),
            jnp.asarray(np.asarray(prob.y_train)[flat]),
        )
        idx = np.arange(flat.size, dtype=np.int32).reshape(steps, batch)
    state, _ = jax.jit(train_interval)(state, jnp.float32(lr), hpj, jnp.asarray(idx), data)
    return state.params


def measure_at_target(backend, entry, hp, lr, batch, steps, seed, options: PredictOptions):
    """The full measurement at theta_T, where the anchor run reaches the target, with the
    displacement theta_0 - theta_T as the NQM's start (see cbs.predict._calibrate)."""
    from cbs.train.spectrum import measure

    apply, loss, flatten, x, y = _network(backend, seed, options.examples)
    theta_t = flatten(_train_to(backend, entry, hp, lr, batch, steps, seed))
    theta_0 = flatten(backend.problem.init_params(seed))
    return measure(
        apply,
        loss,
        theta_t,
        x,
        y,
        **_measure_settings(options, seed),
        displacement=np.asarray(theta_0 - theta_t),
    )


def noise_at_target(backend, meas, entry, hp, lr, batch, steps, seed, options: PredictOptions):
    """The measurement with its noise (c along the top directions, tr Sigma, tr C Sigma
    scaled alike) taken where the anchor run reaches the target: the gradient noise of a
    loss shrinks with the loss (linear regression: Sigma ~ (2 L) H), and the noise that sets
    how small a step must be to reach the target is the noise near the target."""
    from cbs.train.spectrum import noise_along

    apply, loss, flatten, x, y = _network(backend, seed, options.examples)
    params = _train_to(backend, entry, hp, lr, batch, steps, seed)
    tr, var = noise_along(apply, loss, flatten(params), x, y, meas.top_vectors, options.chunk)
    scale = tr / meas.trace_sigma if meas.trace_sigma > 0 else 1.0
    return dataclasses.replace(
        meas,
        top_var=var,
        trace_sigma=tr,
        trace_c_sigma=meas.trace_c_sigma * scale,
        trace_c_sigma_se=meas.trace_c_sigma_se * scale,
    )


def sweep_is_finished(cfg) -> bool:
    from cbs.store import RunStore
    from cbs.sweep.runner import plan

    out = Path(cfg.out_dir)
    if not (out / "manifest.json").exists():
        return False
    from cbs.sweep.config import config_hash

    store = RunStore(out)
    return store.existing_hash() == config_hash(cfg) and store.finished_blocks() >= {
        b.block_id for b in plan(cfg)
    }


def _anchor_from_results(run_dir: Path, anchor: int) -> pd.DataFrame:
    from cbs.analysis import per_batch_table, read_run_table, steps_table

    steps = steps_table(read_run_table(run_dir, "results"), read_run_table(run_dir, "tuned"))
    per_b = per_batch_table(steps)
    return per_b[per_b.batch_size == anchor].set_index("optimizer")


def _anchor_on_grid(cfg, anchor: int) -> bool:
    """Whether the anchor is one of the sweep's batch sizes (its blocks are then the sweep's
    own, trained in the sweep's folder)."""
    return int(anchor) in {int(b) for b in cfg.grid.batch_size_values()}


def _run_anchor(cfg, anchor: int, out_dir: Path, log) -> tuple[pd.DataFrame, float, str]:
    """Trains the anchor batch size's blocks (every optimizer entry, LR grid, seeds) with the
    sweep runner (resumable), returns per-optimizer steps, the seconds and where they came from.

    An anchor on the config's grid is trained as the sweep's own blocks in the sweep's own
    folder (same block ids, cells and rows): a later ``cbs.sweep`` there skips them, and
    blocks an earlier (interrupted) sweep already finished are read, not re-trained. An
    anchor off the grid is a one-batch-size sweep of its own in out_dir/predict_anchor."""
    from cbs.sweep.config import config_dict, load_config
    from cbs.sweep.runner import run_sweep

    if _anchor_on_grid(cfg, anchor):
        run_cfg, only = cfg, (lambda block: block.batch_size == anchor)
    else:
        raw = config_dict(cfg)
        raw["grid"]["batch_sizes"] = [int(anchor)]
        raw["output"]["dir"] = str(out_dir / "predict_anchor")
        raw["output"]["plots"] = False
        run_cfg, only = load_config(raw), None
    t0 = time.perf_counter()
    done = run_sweep(run_cfg, progress=False, log=lambda s: None, only=only)
    seconds = time.perf_counter() - t0
    run_dir = Path(run_cfg.out_dir)
    where = "the sweep folder" if only is not None else "its own folder"
    if done.skipped_cells:  # (partly) trained before: what the blocks cost (timing table)
        seconds = _block_seconds(run_dir, anchor)
        source = f"{'partly ' if done.computed_cells else ''}reused from {where}"
    else:
        source = f"trained into {where}"
    log(f"anchor: batch size {anchor} {source} ({seconds:.1f} s) -> {run_dir}")
    return _anchor_from_results(run_dir, anchor), seconds, source


def sweep_lrs(cfg, entry) -> list[float]:
    """Every LR the sweep's first pass tries for optimizer ``entry`` at any of its batch
    sizes (the config's one list, or the union of the lists that follow the batch size under
    ``grid.lr_scaling``): the grid a ``--lr-grid sweep`` forecast picks from."""
    from cbs.sweep.grid import learning_rates_at

    return sorted(
        {lr for b in cfg.grid.batch_size_values() for lr in learning_rates_at(cfg, entry, b)}
    )


def _hparams(entry, anchor_row) -> dict[str, float]:
    """The optimizer's hyperparameters: registry defaults, the config's value (a swept one
    at its anchor optimum, as the analysis reports it in best_hp_<name>)."""
    from cbs.train.optimizers import OPTIMIZERS

    hp = {k: float(v.default) for k, v in OPTIMIZERS[entry.kind].hparams.items()}
    for k, v in (entry.hparams or {}).items():
        best = anchor_row.get(f"best_hp_{k}", np.nan)
        if np.isfinite(best):
            hp[k] = float(best)
        elif isinstance(v, (int, float)):
            hp[k] = float(v)
        else:
            hp[k] = float((v.values() if hasattr(v, "values") else v)[0])
    return hp


def _block_seconds(run_dir: Path, batch: int) -> float:
    """Wall time the sweep spent on the blocks of one batch size (timing table), NaN if unknown."""
    import re

    from cbs.analysis import read_run_table

    t = read_run_table(run_dir, "timing")
    if t is None or "block_id" not in t or "seconds" not in t:
        return float("nan")
    sel = t.block_id.astype(str).str.contains(re.compile(rf"__B{int(batch)}(?:__|$)"))
    return float(t.seconds[sel].sum()) if sel.any() else float("nan")


def _sweep_seconds(run_dir: Path) -> float:
    """Seconds the finished sweep took: the wall time of every session that computed blocks
    in its folder or merged it (a cbs.predict that trained the anchor blocks there
    included), summed; the manifest's start-to-finish span when no session recorded its end."""
    from cbs.store import read_manifest, read_sessions

    spans = []
    for r in read_sessions(run_dir):
        if not (r.get("block_seconds") or r.get("merged")):
            continue  # computed nothing (e.g. a predict that found its anchor blocks done)
        try:
            spans.append(
                (
                    dt.datetime.fromisoformat(r["ended"]) - dt.datetime.fromisoformat(r["started"])
                ).total_seconds()
            )
        except (KeyError, ValueError, TypeError):
            continue
    if spans:
        return float(sum(spans))
    m = read_manifest(run_dir)
    try:
        return (
            dt.datetime.fromisoformat(m["finished"]) - dt.datetime.fromisoformat(m["started"])
        ).total_seconds()
    except (KeyError, ValueError, TypeError):
        return float("nan")


def predict(
    cfg,
    options: PredictOptions = PredictOptions(),
    *,
    out_dir: Path | None = None,
    plots: bool = True,
    measurement=None,
    target_measurement=None,
    log=print,
) -> Prediction:
    """Measure, calibrate, anchor and forecast for every optimizer entry of a train config.

    If ``cfg``'s output folder holds the finished sweep, the anchor is read from it (no
    training) and the measured S(B), B_crit (with its interval) are set beside the forecast.
    ``measurement`` reuses an earlier :func:`measure_network` result of the same config.
    """
    from cbs.analysis import fit_critical_batch_size
    from cbs.errors import ConfigError
    from cbs.train.backend import TrainBackend, train_size

    if cfg.backend != "train":
        raise ConfigError(
            "backend",
            cfg.backend,
            "allowed for cbs.predict: 'train' (the NQM back end is already a quadratic model)",
        )
    options.check()
    section = cfg.section
    batch_sizes = np.array(sorted(cfg.grid.batch_size_values()), np.float64)
    anchor = int(options.anchor if options.anchor is not None else batch_sizes[0])
    n_train = train_size(section)
    if anchor > n_train:
        raise PredictOptionError(
            f"--anchor: got {anchor}; allowed: a batch size <= the training-set size {n_train}"
        )
    seed = int(options.seed if options.seed is not None else cfg.grid.seeds[0])
    sweep_dir = Path(cfg.out_dir)
    out_dir = Path(out_dir or sweep_dir)
    from cbs.sweep.runner import check_output_dir

    # where the forecast goes must take it, before the measurement and the anchor runs
    check_output_dir(out_dir, "--out" if out_dir != sweep_dir else "output.dir")
    finished = sweep_is_finished(cfg)
    if not finished and _anchor_on_grid(cfg, anchor):
        # the anchor blocks go into the sweep's folder: refuse one holding another sweep (or
        # no folder at all) before the measurement, as cbs.sweep would
        from cbs.store import RunStore
        from cbs.sweep.config import config_hash
        from cbs.sweep.runner import _check_identity, check_output_dir

        check_output_dir(sweep_dir)
        _check_identity(RunStore(sweep_dir), cfg, config_hash(cfg))

    backend = TrainBackend(cfg)
    meas = measurement if measurement is not None else measure_network(backend, seed, options)
    log(
        f"measured d = {meas.dim} parameters on {meas.num_examples} examples in {meas.seconds:.1f} s: "
        f"h_max = {meas.top_h[0]:.4g}, tr Sigma = {meas.trace_sigma:.4g}, |G|^2 = {meas.grad_sq:.4g}, "
        f"B_simple = {meas.b_simple:.4g}, B_noise = {meas.b_noise:.4g}"
    )
    if finished and anchor in set(batch_sizes.astype(int)):
        anchor_df, anchor_seconds = (
            _anchor_from_results(sweep_dir, anchor),
            _block_seconds(sweep_dir, anchor),
        )
        anchor_source = "finished sweep"
    else:
        anchor_df, anchor_seconds, anchor_source = _run_anchor(cfg, anchor, out_dir, log)

    noise_meas, noise_seconds, noise_from = meas, 0.0, "init"
    if options.noise_at == "target" or options.measure_at == "target":
        reached = [
            e
            for e in cfg.grid.optimizers
            if e.kind != "kfac"
            and e.label in anchor_df.index
            and np.isfinite(anchor_df.loc[e.label, "steps"])
        ]
        if reached:
            e = reached[0]
            row = anchor_df.loc[e.label]
            t_noise = time.perf_counter()
            steps_t = int(np.ceil(row["steps"]))
            where = f"{e.label} at B={anchor} after {steps_t} steps"
            # the anchor's best cell, trained to the target: (hparams, lr, B, steps, seed, options)
            anchor_cell = (_hparams(e, row), float(row["best_lr"]), anchor, steps_t, seed, options)
            if options.measure_at == "target" and target_measurement is not None:
                noise_meas = target_measurement
                noise_from = f"everything measured at the target ({where})"
            elif options.measure_at == "target":
                noise_meas = measure_at_target(backend, e, *anchor_cell)
                noise_from = f"everything measured at the target ({where})"
            else:
                noise_meas = noise_at_target(backend, meas, e, *anchor_cell)
                noise_from = f"noise measured at the target ({where})"
            noise_seconds = time.perf_counter() - t_noise
            log(
                f"{noise_from}: tr Sigma = {noise_meas.trace_sigma:.4g} (init {meas.trace_sigma:.4g}), "
                f"h_max = {noise_meas.top_h[0]:.4g} (init {meas.top_h[0]:.4g}), {noise_seconds:.1f} s"
            )
        else:
            log("no optimizer reached the target at the anchor: measured at init only")
    start_risk = None
    if options.start == "loss-drop":
        drop = meas.loss - noise_meas.loss  # the same examples at theta_0 and theta_T
        if noise_meas.disp_sq is not None and drop > 0:
            start_risk = drop
        else:
            log(
                f"--start loss-drop: no displacement start measured at the target or no loss "
                f"drop ({drop:.4g}): the start is the measured displacement's"
            )
    cal = nqm_from_measurement(
        noise_meas,
        num_bins=options.bins,
        floor=options.floor,
        bulk_noise=options.bulk_noise,
        start_risk=start_risk,
    )

    from cbs.analysis import analyze_run

    measured = partial = None
    if finished:
        measured = analyze_run(sweep_dir, write=False, plots=False)
    elif (Path(sweep_dir) / "manifest.json").exists():
        # an unfinished sweep's finished blocks: their S is measured too (its B_crit is not
        # yet); anything the analysis refuses simply leaves S measured empty there
        from cbs.errors import CbsError

        try:
            partial = analyze_run(sweep_dir, write=False, plots=False, n_boot=0)
        except (CbsError, ValueError, OSError):
            partial = None

    t0 = time.perf_counter()
    rows, summary = [], []
    for entry in cfg.grid.optimizers:
        name = entry.label
        if name not in anchor_df.index or not np.isfinite(anchor_df.loc[name, "steps"]):
            log(f"{name}: the anchor batch size {anchor} did not reach the target; no forecast")
            continue
        hp = _hparams(entry, anchor_df.loc[name])
        a_steps = float(anchor_df.loc[name, "steps"])
        a_lr = float(anchor_df.loc[name, "best_lr"])
        omap = map_optimizer(entry.kind, hp, noise_meas, anchor)
        # SGD / heavy-ball on the measured curvature (P = I): the NQM's LR is the network's LR.
        same_units = entry.kind in ("sgd", "momentum", "nesterov")
        lrs = None
        if same_units and options.lr_grid == "sweep":
            lrs = sweep_lrs(cfg, entry)
        fc = forecast(
            cal.problem,
            omap.kind,
            omap.momentum,
            omap.precond_power,
            batch_sizes,
            anchor,
            a_steps,
            num_train=n_train,
            lrs=lrs,
        )
        a_idx = int(np.argmin(np.abs(batch_sizes - anchor)))
        if same_units:
            lr_scale = fc.nqm_lr / a_lr
        else:  # P = H^p: NQM LR units differ; scale the anchor's measured LR
            lr_scale = (
                fc.nqm_lr / fc.nqm_lr[a_idx] if batch_sizes[a_idx] == anchor else fc.nqm_lr * np.nan
            )
        fit = fit_critical_batch_size(batch_sizes, fc.steps, n_boot=0)
        m_steps = np.full(len(batch_sizes), np.nan)
        m_bcrit, m_ci = np.nan, (np.nan, np.nan)
        if measured is not None and name in measured.fits:
            pb = measured.per_batch[measured.per_batch.optimizer == name].set_index("batch_size")[
                "steps"
            ]
            m_steps = np.array([pb.get(int(b), np.nan) for b in batch_sizes], np.float64)
            mf = measured.fits[name]
            m_bcrit, m_ci = float(mf.b_crit), tuple(float(v) for v in mf.b_crit_ci)
        elif partial is not None and name in set(partial.per_batch["optimizer"]):
            pb = partial.per_batch[partial.per_batch.optimizer == name].set_index("batch_size")[
                "steps"
            ]
            m_steps = np.array([pb.get(int(b), np.nan) for b in batch_sizes], np.float64)
        m_steps = with_anchor(m_steps, batch_sizes, anchor, a_steps)
        for i, b in enumerate(batch_sizes):
            rows.append(
                {
                    "optimizer": name,
                    "kind": entry.kind,
                    "batch_size": int(b),
                    "steps_forecast": fc.steps[i],
                    "lr_forecast": a_lr * lr_scale[i],
                    "nqm_lr": fc.nqm_lr[i],
                    "steps_measured": m_steps[i],
                }
            )
        summary.append(
            {
                "optimizer": name,
                "kind": entry.kind,
                "nqm_kind": omap.kind,
                "nqm_momentum": omap.momentum,
                "precond_power": omap.precond_power,
                "mapping": omap.rule,
                "anchor_batch": anchor,
                "anchor_steps": a_steps,
                "anchor_lr": a_lr,
                "lr_grid": "sweep" if lrs is not None else "continuous",
                "start": "loss-drop" if start_risk is not None else "displacement",
                "anchor_source": anchor_source,
                "nqm_target": fc.target,
                "b_crit_forecast": fit.b_crit,
                "s_min_forecast": fit.s_min,
                "b_star_forecast": fit.b_star,
                "b_crit_measured": m_bcrit,
                "b_crit_measured_lo": m_ci[0],
                "b_crit_measured_hi": m_ci[1],
                "ratio": fit.b_crit / m_bcrit if np.isfinite(m_bcrit) else np.nan,
                "inside_ci": bool(m_ci[0] <= fit.b_crit <= m_ci[1])
                if np.isfinite(m_ci[0])
                else None,
                "b_simple": meas.b_simple,
                "b_noise": meas.b_noise,
                "b_simple_ratio": meas.b_simple / m_bcrit if np.isfinite(m_bcrit) else np.nan,
                "b_noise_ratio": meas.b_noise / m_bcrit if np.isfinite(m_bcrit) else np.nan,
            }
        )
    forecast_seconds = time.perf_counter() - t0
    table, summ = pd.DataFrame(rows), pd.DataFrame(summary)
    sweep_s = _sweep_seconds(sweep_dir) if finished else float("nan")
    costs = {
        "measure_s": meas.seconds + noise_seconds,
        "marginal_s": meas.seconds + noise_seconds + forecast_seconds,
        "noise_from": noise_from,
        "anchor_s": anchor_seconds,
        "forecast_s": forecast_seconds,
        "sweep_s": sweep_s,
        "anchor_source": anchor_source,
    }
    text = _text(table, summ, meas, cal, costs)
    files = _write(out_dir, table, summ, meas, cal, costs, plots)
    return Prediction(table, summ, meas, noise_meas, costs, text, files)


def with_anchor(m_steps, batch_sizes, anchor: int, a_steps: float) -> np.ndarray:
    """The measured S per forecast batch size, with the anchor's own S filled in where the
    sweep gave none (predict trained, or read, the anchor: it is measured).

    >>> with_anchor(np.full(3, np.nan), np.array([4, 16, 64]), 16, 120.0).tolist()
    [nan, 120.0, nan]
    """
    out = np.array(m_steps, np.float64)
    hit = np.flatnonzero(np.asarray(batch_sizes) == anchor)
    for i in hit:
        if not np.isfinite(out[i]):
            out[i] = a_steps
    return out


# How an optimizer becomes an NQM optimizer, once under the mapping column.
PRECOND_NOTE = (
    "NQM mapping: SGD and momentum map exactly (P = I, the same LR). An Adam-type optimizer "
    "becomes preconditioned SGD with P = C^p: p is the slope of log sqrt(E[g_B^2]) (its "
    "denominator at the anchor B) against log curvature on the top eigenvectors, in [0, 1]. "
    "p = 0.5 is the textbook Adam-as-H^0.5; a p near 0 means the denominator hardly follows "
    "the curvature there (gradient noise or eps dominate it), so the NQM treats that optimizer "
    "almost like SGD. K-FAC is P = C (p = 1)."
)


def _text(table, summ, meas, cal, costs) -> str:
    lines = [
        (
            f"NQM calibrated from the network: {cal.num_top} top directions + {cal.problem.h.size - cal.num_top} "
            f"bulk bins ({cal.bulk_count:.0f} eigenvalues; {cal.dropped_flat_mass:.0f} flatter than the floor "
            f"left out), bulk noise c = {cal.kappa:.3g} h"
        )
    ]
    lines[0] += f"; {costs['noise_from']}"
    lines += [f"  note: {n}" for n in cal.notes]
    if table.empty:
        return "\n".join(lines + ["no forecast (no optimizer reached the target at the anchor)"])
    lines.append(
        f"{'optimizer':<12} {'B':>6} {'S forecast':>11} {'S measured':>11} {'LR forecast':>12}"
    )
    for r in table.itertuples():
        lines.append(
            f"{r.optimizer:<12} {r.batch_size:>6} {format_number(r.steps_forecast, 4):>11} "
            f"{format_number(r.steps_measured, 4):>11} {format_number(r.lr_forecast, 3):>12}"
        )
    lines.append("")
    lines.append(
        f"{'optimizer':<12} {'B_crit fcst':>11} {'measured [95% CI]':>24} {'ratio':>6} "
        f"{'B_simple':>9} {'ratio':>6} {'B_noise':>9} {'ratio':>6}  NQM mapping"
    )
    for r in summ.itertuples():
        ci = (
            f"{format_number(r.b_crit_measured, 3)} [{format_number(r.b_crit_measured_lo, 3)}, {format_number(r.b_crit_measured_hi, 3)}]"
            if np.isfinite(r.b_crit_measured)
            else "-"
        )
        lines.append(
            f"{r.optimizer:<12} {format_number(r.b_crit_forecast, 3):>11} {ci:>24} {format_number(r.ratio, 2):>6} "
            f"{format_number(r.b_simple, 3):>9} {format_number(r.b_simple_ratio, 2):>6} {format_number(r.b_noise, 3):>9} "
            f"{format_number(r.b_noise_ratio, 2):>6}  {r.mapping}"
        )
    lines.append(PRECOND_NOTE)
    if summ["b_crit_measured"].isna().all():
        lines.append(
            "S measured: where the unfinished sweep has finished blocks (the anchor at least); "
            "the measured B_crit needs the finished sweep (run it, then predict again)"
        )
    anchor_s = costs["anchor_s"] if np.isfinite(costs["anchor_s"]) else 0.0
    marginal = costs["measure_s"] + costs["forecast_s"]
    total = marginal + anchor_s
    sweep = costs["sweep_s"]
    cost = (
        f"cost: measurement {costs['measure_s']:.1f} s + forecast {costs['forecast_s']:.1f} s = "
        f"{marginal:.1f} s beyond the sweep; with the anchor blocks "
        f"({format_number(costs['anchor_s'], 3)} s, {costs['anchor_source']}) {total:.1f} s"
    )
    cost += (
        f"; vs the sweep's {sweep:.0f} s: {100 * marginal / sweep:.1f}% beyond it, "
        f"{100 * total / sweep:.1f}% in all"
        if np.isfinite(sweep)
        else " (no finished sweep to compare with)"
    )
    lines.append(cost)
    return "\n".join(lines)


def _write(out_dir: Path, table, summ, meas, cal, costs, plots) -> list[Path]:
    from cbs.store import atomic_write_bytes

    out_dir.mkdir(parents=True, exist_ok=True)
    files = []
    p = out_dir / "prediction.parquet"
    atomic_write_bytes(p, table.to_parquet(index=False))
    files.append(p)
    info = {
        "summary": summ.to_dict(orient="records"),
        "costs": costs,
        "measurement": {
            "dim": meas.dim,
            "num_examples": meas.num_examples,
            "curvature": meas.curvature,
            "top_h": meas.top_h.tolist(),
            "top_var": meas.top_var.tolist(),
            "top_grad": meas.top_grad.tolist(),
            "trace_sigma": meas.trace_sigma,
            "trace_c_sigma": meas.trace_c_sigma,
            "grad_sq": meas.grad_sq,
            "gcg": meas.gcg,
            "b_simple": meas.b_simple,
            "b_noise": meas.b_noise,
            "loss": meas.loss,
        },
        "nqm": {
            "h": cal.problem.h.tolist(),
            "c": cal.problem.c.tolist(),
            "m0": cal.problem.m0.tolist(),
            "count": cal.problem.count.tolist(),
            "kappa": cal.kappa,
            "notes": list(cal.notes),
        },
    }
    p = out_dir / "prediction.json"
    atomic_write_bytes(
        p, json.dumps(info, indent=1, default=lambda o: None if o is None else float(o)).encode()
    )
    files.append(p)
    if plots and not table.empty:
        files.append(_plot(out_dir / "prediction.png", table, summ))
    return files


def _plot(path: Path, table, summ) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (name, g) in enumerate(table.groupby("optimizer", sort=False)):
        col = colors[i % len(colors)]
        s = summ[summ.optimizer == name].iloc[0]
        ax.plot(
            g.batch_size,
            g.steps_forecast,
            "-",
            color=col,
            label=f"{name} forecast (B_crit {format_number(s.b_crit_forecast, 3)})",
        )
        if g.steps_measured.notna().any():
            ax.plot(
                g.batch_size,
                g.steps_measured,
                "o",
                color=col,
                label=f"{name} measured (B_crit {format_number(s.b_crit_measured, 3)})",
            )
        ax.axvline(s.b_simple, color="gray", ls=":", lw=1)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size (examples)")
    ax.set_ylabel("steps to target")
    ax.set_title("NQM calibrated from the network (dotted: B_simple)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    from cbs.store import atomic_writer

    try:
        with atomic_writer(path) as tmp:
            fig.savefig(tmp, dpi=120, format="png")
    finally:
        plt.close(fig)
    return path
