"""The real-network training back end: ``backend: train`` with a ``train:`` section.

One compiled program per (model, optimizer kind, batch size); the block's cells (LR x
hyperparameters x seed) are vmapped inside it (K-FAC cells run one after another, see
:mod:`cbs.train.kfac`). See :mod:`cbs.train.engine` for the determinism and divergence
rules, :mod:`cbs.train.loop` for steps-to-target, :mod:`cbs.train.data` for the data sets.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from cbs.devices import platform
from cbs.ramps import is_ramped, ramp_plan
from cbs.sweep.backend import Backend, Block, BlockResult
from cbs.sweep.schema import ConfigError, spec
from cbs.train import data as data_mod
from cbs.train import sources
from cbs.train.engine import BlockRun, TrainProblem
from cbs.train.layout import choose_layout, parse_layout, probe_rates
from cbs.train.loop import RunOptions, compaction_pays, run_vmapped_block
from cbs.train.models import make_model
from cbs.train.optimizers import OPTIMIZERS, schedule_fn, soap_available
from cbs.train.streaming import device_budget_bytes, should_stream

__all__ = ["NoiseScale", "TrainSection", "TrainBackend"]


@dataclasses.dataclass(frozen=True)
class NoiseScale:
    """Gradient noise scale B_simple = tr(Σ)/|G|², measured at every evaluation with the
    unbiased two-batch-size estimator (docs/cbs.md section 6): num_micro micro-batches of
    micro_batch examples give |G_small|² (mean of their squared norms) and |G_big|²
    (squared norm of their mean)."""

    enabled: bool = spec(False, doc="measure the gradient noise scale (table noise_scale)")
    micro_batch: int | None = spec(
        None, doc="B_small in examples (default: the block's batch size)", ge=1
    )
    num_micro: int = spec(
        4, doc="micro-batches per estimate; B_big = num_micro * micro_batch", ge=2
    )
    ema: float = spec(
        0.0, doc="EMA of |G|² and tr(Σ) across evaluations before the ratio (0 = none)", ge=0, lt=1
    )


@dataclasses.dataclass(frozen=True)
class TrainSection:
    """The ``train:`` section: data set, model, evaluation and measurement options."""

    dataset: str = spec(
        "mnist1d",
        doc="data set: a built-in name (mnist1d, digits, linreg, text; generated or "
        "read offline), a path (.npz file, folder of .npy files, .parquet file, Hugging Face "
        "save_to_disk folder) or 'pkg.module:function' returning arrays (see cbs.train.sources)",
    )
    dataset_args: dict[str, Any] = spec(
        {},
        doc="keyword arguments of a dataset factory; for files: x / y (array "
        "names or columns), parquet also x_shape and split (column)",
    )
    task: Literal["auto", "classification", "regression", "lm"] = spec(
        "auto",
        doc="loss of a file or factory data set: auto = integer labels -> classification (lm when labels "
        "are token sequences shaped like the inputs), float labels -> regression",
    )
    num_outputs: int | None = spec(
        None, doc="classes / vocabulary size (default: largest label + 1)", ge=1
    )
    loss: str | None = spec(
        None,
        doc="custom loss 'pkg.module:loss_fn', loss_fn(outputs, y) -> (mean loss, "
        "error rate); replaces the task's loss",
    )
    model: str = spec(
        "mlp",
        doc="mlp, cnn, mnist1d_cnn (the MNIST-1D paper's CNN: 5/3/3-wide stride-2 convolutions, flatten, linear read-out), transformer (text / lm only), or 'pkg.module:Factory' building a "
        "Flax linen or nnx module (see cbs.train.user)",
    )
    model_args: dict[str, Any] = spec({}, doc="keyword arguments of a 'pkg.module:Factory' model")
    device_budget_mb: float | None = spec(
        None,
        doc="training sets larger than this (MiB) stay on the host and stream per compiled call "
        "(default: a quarter of the device memory; unlimited on CPU; 0 = always stream)",
        ge=0,
    )
    width: int = spec(64, doc="hidden units / channels / model width", ge=1)
    depth: int = spec(
        2, doc="hidden layers / conv layers / Transformer blocks (mlp depth 0 = linear)", ge=0
    )
    heads: int = spec(4, doc="attention heads (transformer)", ge=1)
    seq_len: int = spec(
        64, doc="tokens per example (text); set analysis.tokens_per_example to match", ge=2
    )
    val_fraction: float = spec(
        0.2, doc="fraction of the examples held out for validation", gt=0, lt=1
    )
    split_seed: int = spec(0, doc="seed of the train/validation split", ge=0)
    max_train: int | None = spec(
        None,
        doc="use at most this many training examples (more than the data set has is an error)",
        ge=1,
    )
    num_samples: int | None = spec(
        None, doc="examples to generate (mnist1d default 5000, linreg 4096)", ge=2
    )
    data_seed: int = spec(0, doc="linreg: seed of w*, inputs and label noise", ge=0)
    linreg_dim: int = spec(64, doc="linreg: input dimension", ge=1)
    spectrum_power: float = spec(1.0, doc="linreg: covariance eigenvalues i**-spectrum_power", ge=0)
    label_noise: float = spec(0.1, doc="linreg: label noise standard deviation", ge=0)
    eval_batch: int = spec(1024, doc="validation examples per evaluation piece (memory only)", ge=1)
    steps_per_call: int = spec(
        100, doc="steps per compiled call; the stop check runs between calls", ge=1
    )
    compact: Literal["auto", "always", "never"] = spec(
        "auto",
        doc="drop finished cells from a running block once half are done: auto = when the compute "
        "saved beats a compile by a fixed FLOP cost model (never timings: results stay reproducible)",
    )
    layout: str = spec(
        "auto",
        doc="how a block's cells are laid out in its program: vmap, sequential (lax.map over "
        "cells), grouped:G (lax.map over vmapped groups of G cells), auto (vmap: a fixed rule, "
        "results the same on every run) or probe (CPU: a short probe's fastest; recorded in the "
        "timing table; layouts differ at rounding level)",
    )
    diverge_loss: float | None = spec(
        None, doc="also call a cell diverged when its training loss exceeds this", gt=0
    )
    diverge_factor: float = spec(
        10.0,
        doc="a cell whose val_loss exceeds this times its initial val_loss is recorded diverged",
        gt=1,
    )
    exact_crossing: bool = spec(
        True,
        doc="replay each cell's crossing interval with an evaluation after every "
        "step, so steps_to_target is exact whatever eval_every (crossing_exact = 1)",
    )
    noise_scale: NoiseScale = spec(factory=NoiseScale, doc="gradient noise scale measurement")


_DEFAULT_SAMPLES = dict(mnist1d=5000, linreg=4096)
BUILTIN_MODELS = ("mlp", "cnn", "mnist1d_cnn", "transformer")


def _load(section: TrainSection) -> data_mod.Dataset:
    """The section's data set, read and validated by the source registry
    (:mod:`cbs.train.sources`; built-in names go through ``data.load_dataset``)."""
    return sources.load(section)


def _task_of(section: TrainSection, d: data_mod.Dataset):
    if section.loss is not None:
        from cbs.train.user import load_loss

        return load_loss(section.loss)
    return d.task


def _build_model(section: TrainSection, d: data_mod.Dataset):
    if section.model in BUILTIN_MODELS:
        return make_model(
            section.model,
            section.width,
            section.depth,
            d.num_outputs,
            section.seq_len,
            section.heads,
        )
    from cbs.train.user import build_user_model

    return build_user_model(section.model, section.model_args, d.num_outputs)


def available_train_size(section: TrainSection) -> int:
    """The training examples the data set has after the validation split, before
    ``train.max_train`` (which may not ask for more: it is refused, not clipped)."""
    if section.dataset not in sources.BUILTIN:
        d = _load(section)
        return int(d.info.get("num_train_available", d.num_train))
    return train_size(dataclasses.replace(section, max_train=None))


def train_size(section: TrainSection) -> int:
    """Training-set size (built-in data sets: without generating the data, same rounding
    as the split; other sources: read and validated, cached)."""
    if section.dataset not in sources.BUILTIN:
        return _load(section).num_train
    if section.dataset == "digits":
        total = 1797
    elif section.dataset == "text":
        total = len(data_mod.text_corpus()) // (section.seq_len + 1)
    else:
        total = section.num_samples or _DEFAULT_SAMPLES[section.dataset]
    n = total - max(1, int(round(section.val_fraction * total)))
    return min(n, section.max_train) if section.max_train else n


def _check_burnin(value, where: str, max_steps: int) -> None:
    """K-FAC's burn-in is a count of batches: whole numbers that leave room for an update."""
    if value is None:
        return
    values = (
        value.values()
        if hasattr(value, "log10_min")
        else value
        if isinstance(value, (list, tuple))
        else [value]
    )
    for v in values:
        if float(v) != int(v) or v >= max_steps:
            raise ConfigError(
                where, v, f"allowed: a whole number of batches below budget.max_steps = {max_steps}"
            )


class TrainBackend(Backend):
    """Trains real networks (Flax + Optax) and records steps to a validation target."""

    name = "train"
    Section = TrainSection
    optimizers = OPTIMIZERS
    metrics = {
        "val_loss": "validation loss (cross-entropy; 0.5 * squared error for linreg)",
        "val_error": "validation error rate (top-1; next-byte error for text)",
    }
    blocks_per_call = 1
    adaptive_default = True
    splittable = True  # cells are independent; tables (curves, noise_scale) are per cell
    # K-FAC cells run one after another (no vmap amortization) and pay curvature estimates
    # and periodic inverses: a prior for their per-cell cost relative to a vmapped cell,
    # replaced by measured block times when --costs-from is given.
    KFAC_COST_FACTOR = 3.0
    # (seconds of fixed overhead per cell, FLOP/s) by platform, for block_cost. Fitted on CPU
    # to the measured block times of train_digits_cpu and train_linreg_cpu (57 blocks; least
    # squares of seconds per cell on budget FLOPs per cell; benchmarks/README.md, scale.py):
    # 2.6 s + FLOPs / 9.4e9 under a 15x oversubscribed machine, i.e. ~2.4e10 FLOPs of compute
    # per cell of overhead; the absolute scale does not matter for balancing, only the ratio.
    # Without the overhead term, blocks of small batches looked ~50x cheaper than large ones,
    # while compile-bound CPU blocks all take about the same time. GPU/TPU: nominal.
    NOMINAL_COST = {"cpu": (0.25, 1e11), "gpu": (0.25, 1e13), "tpu": (0.25, 1e13)}

    def __init__(self, config):
        super().__init__(config)
        self.section: TrainSection = config.section or TrainSection()
        self._cell_bytes: dict = {}
        self._data = None
        self._problem = None
        self._runs: dict = {}
        self._kfac: dict = {}
        self._layout: list[dict] = []
        self._widths: dict | None = None
        self._layouts: dict = {}  # (kind, schedule, batch size, lanes) -> (layout, why, probe)

    # ------------------------------------------------------------------ config checks
    @classmethod
    def check(cls, config) -> None:
        s: TrainSection = config.section or TrainSection()
        t = config.target
        user_model = s.model not in BUILTIN_MODELS
        if user_model and ":" not in s.model:
            import difflib

            close = difflib.get_close_matches(s.model, BUILTIN_MODELS, n=1)
            raise ConfigError(
                "train.model",
                s.model,
                "allowed: " + ", ".join(map(repr, BUILTIN_MODELS)) + " or 'pkg.module:Factory'",
                f"did you mean {close[0]!r}?" if close else "",
            )
        try:
            parse_layout(s.layout)
        except ValueError as e:
            raise ConfigError(
                "train.layout",
                s.layout,
                "allowed: auto, probe, vmap, sequential, grouped:G (G >= 1)",
            ) from e
        if s.model_args and not user_model:
            raise ConfigError(
                "train.model_args",
                s.model_args,
                "allowed only with a 'pkg.module:Factory' model "
                f"(built-in {s.model!r} takes train.width, depth, heads)",
            )
        builtin_data = sources.source_kind(s.dataset) == "builtin"
        if builtin_data and s.dataset_args:
            raise ConfigError(
                "train.dataset_args",
                s.dataset_args,
                f"allowed only with a file or factory dataset "
                f"(built-in {s.dataset!r} takes its own train.* options)",
            )
        if builtin_data and not user_model and s.loss is None and s.task == "auto":
            task = (
                "lm"
                if s.dataset == "text"
                else "regression"
                if s.dataset == "linreg"
                else "classification"
            )
        else:
            task = cls._check_data_and_model(s, config)
        if s.model == "transformer" and task != "lm":
            raise ConfigError(
                "train.model",
                s.model,
                "allowed with this dataset: 'mlp', 'cnn', 'mnist1d_cnn'",
                "the transformer needs token sequences (dataset text, or train.task lm)",
            )
        if task == "lm" and not user_model and s.model != "transformer":
            raise ConfigError(
                "train.model",
                s.model,
                f"allowed with {'dataset text' if builtin_data else 'task lm'}: 'transformer'",
            )
        if s.model in ("cnn", "mnist1d_cnn") and s.dataset == "linreg":
            raise ConfigError(
                "train.model", s.model, "allowed with dataset linreg: 'mlp' (depth 0 = linear)"
            )
        if s.model == "transformer" and s.width % s.heads:
            raise ConfigError(
                "train.heads", s.heads, f"allowed: a divisor of train.width = {s.width}"
            )
        if s.dataset == "text" and config.analysis.tokens_per_example != s.seq_len:
            raise ConfigError(
                "analysis.tokens_per_example",
                config.analysis.tokens_per_example,
                f"allowed with dataset text: train.seq_len = {s.seq_len}",
                "batch sizes are counted in sequences; this reports them in tokens",
            )
        if task == "lm" and not builtin_data:
            seq = int(_load(s).y_train.shape[1])
            if config.analysis.tokens_per_example != seq:
                raise ConfigError(
                    "analysis.tokens_per_example",
                    config.analysis.tokens_per_example,
                    f"allowed with task lm on this data set: its sequence length {seq}",
                    "batch sizes are counted in sequences; this reports them in tokens",
                )
        if t.metric == "val_error" and task == "regression":
            raise ConfigError(
                "target.metric",
                t.metric,
                f"allowed for {s.dataset!r} (regression): 'val_loss' (no error rate)",
            )
        if t.value is not None and t.value <= 0:
            raise ConfigError(
                "target.value",
                t.value,
                f"allowed: a value > 0 ({t.metric} is never below 0, "
                "and the target must be strictly undercut)",
            )
        if t.value is not None and t.metric == "val_error" and t.value > 1:
            raise ConfigError("target.value", t.value, "allowed: an error rate <= 1")
        if (
            t.value is not None
            and s.dataset == "linreg"
            and t.metric == "val_loss"
            and t.value <= 0.5 * s.label_noise**2
        ):
            raise ConfigError(
                "target.value",
                t.value,
                f"allowed: a loss above the Bayes risk "
                f"0.5 * label_noise**2 = {0.5 * s.label_noise**2:g}",
            )
        if s.max_train is not None and s.max_train > (available := available_train_size(s)):
            raise ConfigError(
                "train.max_train",
                s.max_train,
                f"allowed: at most the {available} training examples the data set has after "
                "the validation split (leave it unset to use them all)",
            )
        n = train_size(s)
        if n < 2:
            if s.dataset == "text":
                corpus = len(data_mod.text_corpus())
                raise ConfigError(
                    "train.seq_len",
                    s.seq_len,
                    f"allowed: a length that leaves at least 2 training "
                    f"sequences of seq_len + 1 bytes in the {corpus}-byte corpus after the validation "
                    f"split (at most about {int(corpus * (1 - s.val_fraction)) // 2 - 1} here)",
                )
            raise ConfigError(
                "train.val_fraction",
                s.val_fraction,
                f"allowed: a fraction that leaves at least 2 training examples (this leaves {n})",
            )
        for b in config.grid.batch_size_values():
            if b > n:
                raise ConfigError(
                    "grid.batch_sizes", b, f"allowed: batch sizes <= the training-set size {n}"
                )
        if s.noise_scale.enabled:
            bmax = (
                s.noise_scale.micro_batch or max(config.grid.batch_size_values())
            ) * s.noise_scale.num_micro
            if bmax > n:
                raise ConfigError(
                    "train.noise_scale",
                    bmax,
                    f"allowed: num_micro * micro_batch <= {n} (training examples)",
                )
        for i, opt in enumerate(config.grid.optimizers):
            where = f"grid.optimizers[{i}]"
            if opt.kind == "soap" and not soap_available():
                raise ConfigError(
                    f"{where}.kind", "soap", "cbs.train.soap is not importable in this install"
                )
            if opt.kind == "kfac" and s.model == "transformer":
                raise ConfigError(
                    f"{where}.kind",
                    "kfac",
                    "allowed with model mlp or cnn (kfac-jax layer "
                    "registration and per-example loss scaling)",
                )
            if opt.kind == "kfac" and (user_model or s.loss is not None):
                cls._check_kfac(s, where, task)
            if opt.kind == "kfac":
                _check_burnin(
                    opt.hparams.get("burnin_steps"),
                    f"{where}.hparams.burnin_steps",
                    config.budget.max_steps,
                )
            sch = opt.schedule
            if sch.kind == "optimized_pwc":
                raise ConfigError(
                    f"{where}.schedule.kind",
                    sch.kind,
                    "allowed for the train back end: constant, "
                    "step, cosine, linear_decay, piecewise (optimized_pwc is NQM-only)",
                )
            if opt.kind == "kfac" and is_ramped(sch):
                raise ConfigError(
                    f"{where}.schedule",
                    "ramp" if sch.ramp else "seesaw",
                    "allowed with kind 'kfac': no batch ramp (kfac-jax's curvature estimates "
                    "are tied to one batch size and its runner keeps one)",
                )
        from cbs.sweep.config import check_ramps

        check_ramps(config, max_examples=n)

    @staticmethod
    def _check_data_and_model(s: TrainSection, config) -> str:
        """Reads and validates the data set, builds the model and traces it abstractly
        (shapes only) against the labels; returns the task. Raises ConfigError."""
        from cbs.train.user import CustomLoss, check_model

        d = _load(s)
        if s.task != "auto" and s.dataset in sources.BUILTIN and s.task != d.task:
            raise ConfigError(
                "train.task", s.task, f"allowed with dataset {s.dataset}: 'auto' or {d.task!r}"
            )
        task = _task_of(s, d)
        model = _build_model(s, d)
        check_model(model, s.model, task, d.x_train, d.y_train, d.num_outputs)
        return "custom" if isinstance(task, CustomLoss) else task

    @staticmethod
    def _check_kfac(s: TrainSection, where: str, task: str) -> None:
        from cbs.train.user import kfac_unregistered

        if s.loss is not None:
            raise ConfigError(
                f"{where}.kind",
                "kfac",
                f"allowed with the built-in losses only: kfac-jax must "
                f"register the loss, and train.loss = {s.loss!r} is a custom function",
            )
        d = _load(s)
        try:
            generic = kfac_unregistered(_build_model(s, d), task, d.x_train, d.y_train)
        except ConfigError:
            raise
        except Exception as e:  # noqa: BLE001 - kfac-jax's graph matcher refused the model
            raise ConfigError(
                f"{where}.kind",
                "kfac",
                f"allowed where kfac-jax can register the model's layers; "
                f"its graph matcher raised {type(e).__name__}: {' '.join(str(e).split())[:200]}",
            ) from None
        if generic:
            raise ConfigError(
                f"{where}.kind",
                "kfac",
                "allowed where kfac-jax can register every layer (dense, "
                f"conv, scale-and-shift); {s.model} has parameters it cannot place in one: "
                + ", ".join(generic[:5])
                + (" ..." if len(generic) > 5 else ""),
            )

    # ------------------------------------------------------------------ lazily built state
    @property
    def dataset(self) -> data_mod.Dataset:
        if self._data is None:
            self._data = _load(self.section)
        return self._data

    @property
    def problem(self) -> TrainProblem:
        if self._problem is None:
            d, s = self.dataset, self.section
            stream = should_stream(d.x_train, d.y_train, s.device_budget_mb)
            # Streamed training sets stay on the host (memory-mapped when the source is);
            # the loop gathers each compiled call's examples (cbs.train.streaming).
            xt, yt = (
                (d.x_train, d.y_train)
                if stream
                else (jnp.asarray(d.x_train), jnp.asarray(d.y_train))
            )
            self._problem = TrainProblem(
                _build_model(s, d),
                _task_of(s, d),
                xt,
                yt,
                jnp.asarray(d.x_val),
                jnp.asarray(d.y_val),
                s.eval_batch,
                s.diverge_loss if s.diverge_loss is not None else math.inf,
                streaming=stream,
            )
        return self._problem

    def options(self) -> RunOptions:
        c, s = self.config, self.section
        return RunOptions(
            max_steps=c.budget.max_steps,
            eval_every=c.budget.eval_every,
            metric=c.target.metric,
            target=c.target.value,
            interpolate=c.target.interpolate,
            steps_per_call=s.steps_per_call,
            noise_scale=s.noise_scale.enabled,
            noise_micro_batch=s.noise_scale.micro_batch,
            noise_num_micro=s.noise_scale.num_micro,
            noise_ema=s.noise_scale.ema,
            diverge_factor=s.diverge_factor,
            compact=s.compact,
            exact=s.exact_crossing,
        )

    def ramp_plan(self, block: Block):
        """The batch ramp of a block's cells (``cbs.ramps.ramp_plan``), None when its
        schedule keeps one batch size."""
        if not is_ramped(block.schedule):
            return None
        return ramp_plan(
            block.schedule,
            block.batch_size,
            self.config.budget.max_steps,
            kind=block.kind,
            tokens_per_example=self.config.analysis.tokens_per_example,
        )

    def _run_for(self, kind: str, schedule, plan=None) -> BlockRun:
        key = (kind, repr(schedule), None if plan is None else plan.batch_size)
        if key not in self._runs:
            sched = schedule_fn(schedule, self.config.budget.max_steps)
            if plan is not None:
                # a ramp's LR depends on the samples consumed, so on the starting batch
                # size: the plan's phase multipliers (the one rule, cbs.ramps.ramp_plan),
                # looked up by step (memory per phase, not per step of the budget)
                ends = jnp.asarray(np.cumsum(plan.steps)[:-1], jnp.int32)
                mults = jnp.asarray(plan.lr_mult, jnp.float32)
                sched = lambda count: mults[jnp.searchsorted(ends, count, side="right")]  # noqa: E731
            opts = self.options()
            self._runs[key] = BlockRun(
                self.problem,
                kind,
                sched,
                opts.max_steps,
                crossing_metric=opts.metric if opts.exact and opts.eval_every > 1 else None,
            )
        return self._runs[key]

    # ------------------------------------------------------------------ contract
    def run_blocks(self, blocks: Sequence[Block]) -> list[BlockResult]:
        opts = self.options()
        results = []
        for block in blocks:
            plan = self.ramp_plan(block)  # None for K-FAC: a ramp with K-FAC is refused
            if block.kind == "kfac":
                from cbs.train.kfac import KfacRunner

                key = repr(block.schedule)
                if key not in self._kfac:
                    self._kfac[key] = KfacRunner(
                        self.problem, schedule_fn(block.schedule, opts.max_steps), opts.max_steps
                    )
                res = self._kfac[key].run_block(block, opts)
                layout = "sequential (kfac-jax step per cell; one compile per weight decay)"
            else:
                run = self._run_for(block.kind, block.schedule, plan)
                width = self.program_width(block)
                cell_layout, why, probe = self.block_layout(block)
                res = run_vmapped_block(
                    self.problem,
                    block,
                    opts,
                    run,
                    list(OPTIMIZERS[block.kind].hparams),
                    width,
                    progress=self._block_progress(block),
                    phases=None if plan is None else plan.batch_phases(),
                    layout=cell_layout,
                )
                # The layout and its probe go into the block's timing table (stored).
                res.tables["timing"] = res.tables["timing"].assign(
                    layout=cell_layout,
                    layout_reason=why,
                    layout_probe=json.dumps(probe.as_dict()) if probe else "",
                )
                layout = (
                    f"{cell_layout} over {len(block.cells)} cells"
                    + (f" padded to {width} lanes" if width > len(block.cells) else "")
                    + f", {opts.evals_per_call} evaluations per call ({why})"
                )
            _add_samples_to_target(res, block, plan)
            # Epochs beside steps: how often the data repeat before the target (a run that
            # needs many passes measures generalisation from repeated examples, not
            # optimisation); examples consumed to the target (a ramp's sum over its phases)
            # / training-set size, NaN when not reached.
            n_train = int(self.problem.x_train.shape[0])
            for rec in res.cells:
                rec.extra["train_examples"] = float(n_train)
                rec.extra["epochs_to_target"] = rec.extra["samples_to_target"] / n_train
            self._layout.append(
                dict(
                    block_id=block.block_id,
                    optimizer=block.optimizer,
                    kind=block.kind,
                    batch_size=block.batch_size,
                    cells=len(block.cells),
                    layout=layout,
                )
            )
            results.append(res)
        return results

    def _block_progress(self, block: Block):
        """The loop's in-block progress callable for ``block`` (None when nobody listens)."""
        report = self.progress
        if report is None:
            return None
        # a block split for memory arrives as sub-blocks with the block's id: key each apart
        key = f"{block.block_id}~{id(block):x}"
        return lambda done, detail: report(key, done, f"{block.optimizer} {detail}")

    def _first_pass_widths(self) -> dict:
        """Cells of the config's first-pass blocks per program family (kind, schedule,
        batch size): the widest, when several optimizers share a family."""
        if self._widths is None:
            from cbs.sweep.grid import expand_blocks

            self._widths = {}
            for b in expand_blocks(self.config, type(self)):
                key = (b.kind, repr(b.schedule), b.batch_size)
                self._widths[key] = max(self._widths.get(key, 0), len(b.cells))
        return self._widths

    def program_width(self, block: Block) -> int:
        """Lanes of the vmapped program that runs ``block``: its family's first-pass width
        when it has no more cells than that, else its own cell count.

        The adaptive rounds of a family (extension, zoom: ``cbs.sweep.adaptive``) have other
        cell counts than its first pass; padded to the first pass's width (copies of the
        last cell, never recorded), they run in the program the first pass compiled instead
        of compiling one per cell count (on CPU, sweeps of small models are compile-bound:
        compiles took 38% of the wall time of ``train_mnist1d_mlp_cpu`` at 8 batch sizes).
        A block is padded only where its padded lanes, run for the whole budget, cost less
        than a compile by compaction's FLOP model (:func:`cbs.train.loop.compaction_pays`):
        small batches.
        The width is a function of the config and the block alone (results are too: the
        vmap width can change XLA's summation order). Where a memory budget is known, a
        padded width that would not fit it is not used (the block was split to fit).
        """
        n = len(block.cells)
        w0 = self._first_pass_widths().get((block.kind, repr(block.schedule), block.batch_size))
        if w0 is None or n >= w0 or block.kind == "kfac":
            return n
        # Padding pays where the padded lanes' compute over the whole budget costs less than
        # the compile it saves (the compaction cost model, so that the first stop check does
        # not drop the padded lanes again, compiling a narrower program after all).
        opts = self.options()
        calls = math.ceil(opts.max_steps / (opts.evals_per_call * opts.eval_every))
        if compaction_pays(
            w0 - n,
            calls,
            opts.evals_per_call * opts.eval_every * block.batch_size,
            opts.evals_per_call * int(self.problem.x_val.shape[0]),
            self.problem.num_params,
        ):
            return n
        from cbs.sweep.memory import memory_budget

        budget = memory_budget()
        if budget is not None:
            cell = self.cell_memory_bytes(block)
            if cell is None or w0 * cell > budget * jax.local_device_count():
                return n
        return w0

    block_cost_unit = "seconds"

    def block_layout(self, block: Block) -> tuple[str, str, Any]:
        """(layout, reason, probe or None) of the program that runs ``block``.

        ``train.layout`` vmap / sequential / grouped:G: that layout. ``auto`` (the default):
        vmap, on every platform, by a fixed rule: the layouts round differently at ~1e-7
        (XLA:CPU's batched and single matmuls differ at some shapes), so a choice by timing
        would make results depend on machine load, and the probe found no layout faster
        than vmap on CPU at the benchmark sizes (benchmarks/README.md). ``probe``: the
        fastest layout by :func:`cbs.train.layout.choose_layout`'s probe, decided once per
        program family and width and recorded with the probe (fast, but a rerun on another
        machine or load may pick another layout and differ at rounding level).
        """
        lanes = self.program_width(block)
        mode = self.section.layout
        if mode not in ("auto", "probe"):
            return mode, "train.layout", None
        if mode == "auto":
            return "vmap", "auto: vmap (a fixed rule, the same on every run)", None
        if jax.local_device_count() > 1:  # the lanes are sharded over devices: keep vmap
            return "vmap", f"{jax.local_device_count()} devices share the lanes", None
        key = (block.kind, repr(block.schedule), block.batch_size, lanes)
        if key not in self._layouts:
            p = self.problem
            x = p.x_train[: block.batch_size]
            x = jnp.asarray(np.asarray(x)) if p.streaming else x
            self._layouts[key] = choose_layout(
                platform(), lanes, lambda: probe_rates(p.model, p.init_params(0), x, lanes)
            )
        return self._layouts[key]

    def block_cost(self, block: Block) -> float:
        """Estimated seconds of a block (for balancing shards; measured times replace it).

        Per cell: a fixed overhead (the block's compiles, evaluations and crossing replays,
        shared out over its cells) plus its compute, the steps budget x examples per step (3x
        the batch for forward + backward, plus the validation set amortized over eval_every)
        x forward FLOPs per example, at a nominal throughput of the platform.
        """
        c = self.config
        p = self.problem
        positions = self.section.seq_len if self.section.model == "transformer" else 1
        flops = 2.0 * p.num_params * positions
        per_step = 3.0 * block.batch_size + int(p.x_val.shape[0]) / c.budget.eval_every
        factor = self.KFAC_COST_FACTOR if block.kind == "kfac" else 1.0
        overhead_s, flops_per_s = self.NOMINAL_COST.get(platform(), self.NOMINAL_COST["gpu"])
        compute_s = c.budget.max_steps * per_step * flops * factor / flops_per_s
        return float(len(block.cells) * (overhead_s + compute_s))

    def cell_memory_bytes(self, block: Block) -> int | None:
        """Device bytes per vmapped cell, as XLA reports them for a one-cell program: the
        cell state (params, optimizer state, EMA; twice, input and output, and once more
        for the state kept for a crossing replay) plus the
        temporaries of one training call at this batch size and of one evaluation."""
        if block.kind == "kfac":  # K-FAC cells run one at a time already
            return None
        key = (block.kind, repr(block.schedule), block.batch_size)
        plan = self.ramp_plan(block)
        # a ramp's cells hold the largest batch of its phases at some point
        batch = block.batch_size * (1 if plan is None else plan.max_batch_mult)
        if key not in self._cell_bytes:
            from cbs.train.engine import make_block_fns

            opts = self.options()
            init, train_interval, evaluate, _ = make_block_fns(
                self.problem,
                block.kind,
                schedule_fn(block.schedule, opts.max_steps),
                opts.max_steps,
            )
            hp = {k: jnp.float32(block.cells[0].hparams[k]) for k in OPTIMIZERS[block.kind].hparams}
            state = jax.eval_shape(init, self.problem.init_params(0), hp)
            state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
            idx = jax.ShapeDtypeStruct((opts.eval_every, batch), jnp.int32)
            data = None
            p = self.problem
            if getattr(p, "streaming", False):  # a streamed chunk: the examples themselves
                data = tuple(
                    jax.ShapeDtypeStruct((opts.eval_every, batch, *a.shape[1:]), a.dtype)
                    for a in (p.x_train, p.y_train)
                )

            def temp(fn, *args):
                analysis = jax.jit(fn).lower(*args).compile().memory_analysis()
                return int(getattr(analysis, "temp_size_in_bytes", 0) or 0)

            batch_bytes = (
                4 * opts.eval_every * batch
                if data is None
                else sum(x.size * x.dtype.itemsize for x in data)
            ) * opts.evals_per_call
            # the state twice (input and output), once more where the call keeps the state
            # at the evaluation before a crossing (exact crossings)
            kept = 1 if opts.exact and opts.eval_every > 1 else 0
            self._cell_bytes[key] = int(
                (2 + kept) * state_bytes
                + temp(train_interval, state, jnp.float32(0.1), hp, idx, data)
                + temp(evaluate, state, hp)
                + batch_bytes
            )
        return self._cell_bytes[key]

    def manifest(self) -> dict:
        d, s = self.dataset, self.section
        params = self.problem.init_params(0)
        return dict(
            dataset=dict(
                name=d.name,
                sha256=d.sha256,
                num_train=d.num_train,
                num_val=int(d.x_val.shape[0]),
                task=d.task,
                num_outputs=d.num_outputs,
                shapes=dict(
                    x_train=list(d.x_train.shape),
                    y_train=list(d.y_train.shape),
                    x_val=list(d.x_val.shape),
                    y_val=list(d.y_val.shape),
                ),
                dtypes=dict(x=str(d.x_train.dtype), y=str(d.y_train.dtype)),
                **{
                    k: v
                    for k, v in d.info.items()
                    if k not in ("num_train", "num_val", "shapes", "dtypes", "task")
                },
            ),
            data_placement=dict(
                streaming=self.problem.streaming,
                device_budget_bytes=(
                    None
                    if math.isinf(budget := device_budget_bytes(s.device_budget_mb))
                    else budget
                ),
                train_bytes=int(d.x_train.nbytes + d.y_train.nbytes),
            ),
            model=dict(
                kind=s.model,
                parameters=int(sum(np.size(x) for x in jax.tree.leaves(params))),
                **(
                    dict(
                        model_args={k: repr(v) for k, v in s.model_args.items()},
                        wrapper=repr(self.problem.model),
                    )
                    if s.model not in BUILTIN_MODELS
                    else dict(width=s.width, depth=s.depth, heads=s.heads)
                ),
            ),
            loss=s.loss or "task",
            jax=dict(
                version=jax.__version__, backend=jax.default_backend(), devices=len(jax.devices())
            ),
            determinism=(
                "init = PRNGKey(seed); data order = numpy default_rng([seed, epoch]) permutations; "
                "a cell alone matches its vmapped run at stable LRs (~1e-6); at near-divergent LRs "
                "the vmap width can change summation order and hence the outcome"
            ),
            block_layout=self._block_layout(),
        )

    def _planned_layout(self, block: Block) -> str:
        """The layout known before the block runs: the rule's, or with ``probe`` the one
        already chosen for its program, else "probe" (chosen when it runs; see its timing
        table)."""
        if self.section.layout != "probe":
            return self.block_layout(block)[0]
        key = (block.kind, repr(block.schedule), block.batch_size, self.program_width(block))
        return self._layouts[key][0] if key in self._layouts else "probe"

    def _block_layout(self) -> dict:
        """How the sweep's blocks map to compiled programs (known before any block runs)."""
        opts = self.options()
        rule = (
            f"one compiled program per (model, optimizer kind, schedule, batch size, vmap "
            f"width); cells (LR x hyperparameters x seed) vmapped inside it, an adaptive round "
            f"padded to its first pass's width (same program); lax.scan over "
            f"{opts.evals_per_call} evaluation intervals of {opts.eval_every} steps per call, stop check "
            f"between calls; kfac cells run one after another (kfac-jax step, one compile per weight decay); "
            f"cells laid out per train.layout = {self.section.layout} (auto: vmap; probe: on CPU "
            f"a probe's fastest of vmap / sequential / grouped; the layout of every block and any "
            f"probe are recorded in its timing table)"
        )
        try:
            from cbs.sweep.grid import expand_blocks

            blocks = expand_blocks(self.config, type(self))
        except Exception:  # noqa: BLE001 - the layout is informative; never fail a run over it
            blocks = []
        rows = [
            dict(
                block_id=b.block_id,
                kind=b.kind,
                batch_size=b.batch_size,
                cells=len(b.cells),
                vmap_width=1 if b.kind == "kfac" else self.program_width(b),
                mode="sequential" if b.kind == "kfac" else self._planned_layout(b),
            )
            for b in blocks
        ]
        return dict(rule=rule, blocks=rows or list(self._layout))


def _add_samples_to_target(res, block: Block, plan) -> None:
    """Each record's examples consumed up to its crossing step (NaN when not reached):
    steps x B at a constant batch size, the ramp's sum over its phases otherwise."""
    for rec in res.cells:
        t = rec.steps_to_target if rec.reached else float("nan")
        if plan is None:
            rec.extra["samples_to_target"] = float(t) * block.batch_size
        else:
            rec.extra["samples_to_target"] = float(plan.samples_after([t])[0])
