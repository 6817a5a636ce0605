"""The real-network training back end: ``backend: train`` with a ``train:`` section.

One compiled program per (model, optimizer kind, batch size); the block's cells (LR x
hyperparameters x seed) are vmapped inside it (K-FAC cells run one after another, see
:mod:`cbs.train.kfac`). See :mod:`cbs.train.engine` for the determinism and divergence
rules, :mod:`cbs.train.loop` for steps-to-target, :mod:`cbs.train.data` for the data sets.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cbs.sweep.backend import Backend, Block, BlockResult
from cbs.sweep.schema import ConfigError, spec
from cbs.train import data as data_mod
from cbs.train.engine import BlockRun, TrainProblem
from cbs.train.loop import RunOptions, run_vmapped_block
from cbs.train.models import make_model
from cbs.train.optimizers import OPTIMIZERS, schedule_fn, soap_available

__all__ = ["NoiseScale", "TrainSection", "TrainBackend"]


@dataclasses.dataclass(frozen=True)
class NoiseScale:
    """Gradient noise scale B_simple = tr(Σ)/|G|², measured at every evaluation with the
    unbiased two-batch-size estimator (cbs.md 3.2): num_micro micro-batches of
    micro_batch examples give |G_small|² (mean of their squared norms) and |G_big|²
    (squared norm of their mean)."""
    enabled: bool = spec(False, doc="measure the gradient noise scale (table noise_scale)")
    micro_batch: int | None = spec(None, doc="B_small in examples (default: the block's batch size)", ge=1)
    num_micro: int = spec(4, doc="micro-batches per estimate; B_big = num_micro * micro_batch", ge=2)
    ema: float = spec(0.0, doc="EMA of |G|² and tr(Σ) across evaluations before the ratio (0 = none)",
                      ge=0, lt=1)


@dataclasses.dataclass(frozen=True)
class TrainSection:
    """The ``train:`` section: data set, model, evaluation and measurement options."""
    dataset: Literal["mnist1d", "digits", "linreg", "text"] = spec("mnist1d", doc="data set (all generated or read offline)")
    model: Literal["mlp", "cnn", "mnist1d_cnn", "transformer"] = spec(
        "mlp", doc="model family (transformer: text only; mnist1d_cnn: the MNIST-1D paper's CNN, 5/3/3-wide "
                   "stride-2 convolutions then a linear read-out of the flattened features)")
    width: int = spec(64, doc="hidden units / channels / model width", ge=1)
    depth: int = spec(2, doc="hidden layers / conv layers / Transformer blocks (mlp depth 0 = linear)", ge=0)
    heads: int = spec(4, doc="attention heads (transformer)", ge=1)
    seq_len: int = spec(64, doc="tokens per example (text); set analysis.tokens_per_example to match", ge=2)
    val_fraction: float = spec(0.2, doc="fraction of the examples held out for validation", gt=0, lt=1)
    split_seed: int = spec(0, doc="seed of the train/validation split", ge=0)
    max_train: int | None = spec(None, doc="use at most this many training examples", ge=1)
    num_samples: int | None = spec(None, doc="examples to generate (mnist1d default 5000, linreg 4096)", ge=2)
    data_seed: int = spec(0, doc="linreg: seed of w*, inputs and label noise", ge=0)
    linreg_dim: int = spec(64, doc="linreg: input dimension", ge=1)
    spectrum_power: float = spec(1.0, doc="linreg: covariance eigenvalues i**-spectrum_power", ge=0)
    label_noise: float = spec(0.1, doc="linreg: label noise standard deviation", ge=0)
    eval_batch: int = spec(1024, doc="validation examples per evaluation piece (memory only)", ge=1)
    steps_per_call: int = spec(100, doc="steps per compiled call; the stop check runs between calls", ge=1)
    compact: Literal["auto", "always", "never"] = spec(
        "auto", doc="drop finished cells from a running block once half are done: auto = when the measured "
                    "compute saved beats the measured compile of the narrower program")
    diverge_loss: float | None = spec(None, doc="also call a cell diverged when its training loss exceeds this", gt=0)
    diverge_factor: float = spec(10.0, doc="a cell whose val_loss exceeds this times its initial val_loss is "
                                 "recorded diverged", gt=1)
    noise_scale: NoiseScale = spec(factory=NoiseScale, doc="gradient noise scale measurement")


_DEFAULT_SAMPLES = dict(mnist1d=5000, linreg=4096)
_UNSUPPORTED_SCHEDULES = {"optimized_pwc": "is NQM-only", }


def _load(section: TrainSection) -> data_mod.Dataset:
    """The section's data set: its keys mapped onto the loader's arguments (the dispatch by
    name is ``data.load_dataset``)."""
    kw = dict(val_fraction=section.val_fraction, split_seed=section.split_seed, max_train=section.max_train)
    if section.dataset in _DEFAULT_SAMPLES:
        kw["num_samples"] = section.num_samples or _DEFAULT_SAMPLES[section.dataset]
    if section.dataset == "linreg":
        kw.update(dim=section.linreg_dim, spectrum_power=section.spectrum_power,
                  label_noise=section.label_noise, data_seed=section.data_seed)
    elif section.dataset == "text":
        kw.update(seq_len=section.seq_len)
    return data_mod.load_dataset(section.dataset, **kw)


def train_size(section: TrainSection) -> int:
    """Training-set size without generating the data (same rounding as the split)."""
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
    values = value.values() if hasattr(value, "log10_min") else value if isinstance(value, (list, tuple)) else [value]
    for v in values:
        if float(v) != int(v) or v >= max_steps:
            raise ConfigError(where, v, f"allowed: a whole number of batches below budget.max_steps = {max_steps}")


class TrainBackend(Backend):
    """Trains real networks (Flax + Optax) and records steps to a validation target."""
    name = "train"
    Section = TrainSection
    optimizers = OPTIMIZERS
    metrics = {"val_loss": "validation loss (cross-entropy; 0.5 * squared error for linreg)",
               "val_error": "validation error rate (top-1; next-byte error for text)"}
    blocks_per_call = 1

    def __init__(self, config):
        super().__init__(config)
        self.section: TrainSection = config.section or TrainSection()
        self._data = None
        self._problem = None
        self._runs: dict = {}
        self._kfac: dict = {}
        self._layout: list[dict] = []

    # ------------------------------------------------------------------ config checks
    @classmethod
    def check(cls, config) -> None:
        s: TrainSection = config.section or TrainSection()
        t = config.target
        if s.model == "transformer" and s.dataset != "text":
            raise ConfigError("train.model", s.model, "allowed with this dataset: 'mlp', 'cnn', 'mnist1d_cnn'",
                              "the transformer needs dataset: text")
        if s.dataset == "text" and s.model != "transformer":
            raise ConfigError("train.model", s.model, "allowed with dataset text: 'transformer'")
        if s.model in ("cnn", "mnist1d_cnn") and s.dataset == "linreg":
            raise ConfigError("train.model", s.model, "allowed with dataset linreg: 'mlp' (depth 0 = linear)")
        if s.model == "transformer" and s.width % s.heads:
            raise ConfigError("train.heads", s.heads, f"allowed: a divisor of train.width = {s.width}")
        if s.dataset == "text" and config.analysis.tokens_per_example != s.seq_len:
            raise ConfigError("analysis.tokens_per_example", config.analysis.tokens_per_example,
                              f"allowed with dataset text: train.seq_len = {s.seq_len}",
                              "batch sizes are counted in sequences; this reports them in tokens")
        if t.metric == "val_error" and s.dataset == "linreg":
            raise ConfigError("target.metric", t.metric, "allowed for dataset linreg: 'val_loss' (no error rate)")
        if t.value <= 0:
            raise ConfigError("target.value", t.value, f"allowed: a value > 0 ({t.metric} is never below 0, "
                              "and the target must be strictly undercut)")
        if t.metric == "val_error" and t.value > 1:
            raise ConfigError("target.value", t.value, "allowed: an error rate <= 1")
        if s.dataset == "linreg" and t.metric == "val_loss" and t.value <= 0.5 * s.label_noise**2:
            raise ConfigError("target.value", t.value, f"allowed: a loss above the Bayes risk "
                              f"0.5 * label_noise**2 = {0.5 * s.label_noise**2:g}")
        n = train_size(s)
        for b in config.grid.batch_size_values():
            if b > n:
                raise ConfigError("grid.batch_sizes", b, f"allowed: batch sizes <= the training-set size {n}")
        if s.noise_scale.enabled:
            bmax = (s.noise_scale.micro_batch or max(config.grid.batch_size_values())) * s.noise_scale.num_micro
            if bmax > n:
                raise ConfigError("train.noise_scale", bmax, f"allowed: num_micro * micro_batch <= {n} "
                                  "(training examples)")
        for i, opt in enumerate(config.grid.optimizers):
            where = f"grid.optimizers[{i}]"
            if opt.kind == "soap" and not soap_available():
                raise ConfigError(f"{where}.kind", "soap", "cbs.train.soap is not importable in this install")
            if opt.kind == "kfac" and s.model not in ("mlp", "cnn", "mnist1d_cnn"):
                raise ConfigError(f"{where}.kind", "kfac", "allowed with model mlp, cnn or mnist1d_cnn (kfac-jax layer "
                                  "registration and per-example loss scaling)")
            if opt.kind == "kfac":
                _check_burnin(opt.hparams.get("burnin_steps"), f"{where}.hparams.burnin_steps",
                              config.budget.max_steps)
            sch = opt.schedule
            if sch.kind == "optimized_pwc":
                raise ConfigError(f"{where}.schedule.kind", sch.kind, "allowed for the train back end: constant, "
                                  "step, cosine, linear_decay, piecewise (optimized_pwc is NQM-only)")
            if sch.batch_growth or sch.seesaw:
                raise ConfigError(f"{where}.schedule", "batch_growth/seesaw", "batch-size schedules are not "
                                  "supported by the train back end (one program per batch size)")
            if sch.kind == "piecewise" and not sch.pieces:
                raise ConfigError(f"{where}.schedule.pieces", [], "allowed: [[steps, lr_multiplier], ...]")

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
            model = make_model(s.model, s.width, s.depth, d.num_outputs, s.seq_len, s.heads)
            self._problem = TrainProblem(model, d.task, jnp.asarray(d.x_train), jnp.asarray(d.y_train),
                                    jnp.asarray(d.x_val), jnp.asarray(d.y_val), s.eval_batch,
                                    s.diverge_loss if s.diverge_loss is not None else math.inf)
        return self._problem

    def options(self) -> RunOptions:
        c, s = self.config, self.section
        return RunOptions(max_steps=c.budget.max_steps, eval_every=c.budget.eval_every, metric=c.target.metric,
                          target=c.target.value, interpolate=c.target.interpolate, steps_per_call=s.steps_per_call,
                          noise_scale=s.noise_scale.enabled, noise_micro_batch=s.noise_scale.micro_batch,
                          noise_num_micro=s.noise_scale.num_micro, noise_ema=s.noise_scale.ema,
                          diverge_factor=s.diverge_factor, compact=s.compact)

    def _run_for(self, kind: str, schedule) -> BlockRun:
        key = (kind, repr(schedule))
        if key not in self._runs:
            sched = schedule_fn(schedule, self.config.budget.max_steps)
            self._runs[key] = BlockRun(self.problem, kind, sched, self.config.budget.max_steps)
        return self._runs[key]

    # ------------------------------------------------------------------ contract
    def run_blocks(self, blocks: Sequence[Block]) -> list[BlockResult]:
        opts = self.options()
        results = []
        for block in blocks:
            if block.kind == "kfac":
                from cbs.train.kfac import KfacRunner
                key = repr(block.schedule)
                if key not in self._kfac:
                    self._kfac[key] = KfacRunner(self.problem, schedule_fn(block.schedule, opts.max_steps),
                                                 opts.max_steps)
                res = self._kfac[key].run_block(block, opts)
                layout = "sequential (kfac-jax step per cell; one compile per weight decay)"
            else:
                run = self._run_for(block.kind, block.schedule)
                res = run_vmapped_block(self.problem, block, opts, run, list(OPTIMIZERS[block.kind].hparams))
                layout = f"vmap over {len(block.cells)} cells, {opts.evals_per_call} evaluations per call"
            self._layout.append(dict(block_id=block.block_id, optimizer=block.optimizer, kind=block.kind,
                                     batch_size=block.batch_size, cells=len(block.cells), layout=layout))
            results.append(res)
        return results

    def manifest(self) -> dict:
        d, s = self.dataset, self.section
        params = self.problem.init_params(0)
        return dict(
            dataset=dict(name=d.name, sha256=d.sha256, num_train=d.num_train, num_val=int(d.x_val.shape[0]),
                         **{k: v for k, v in d.info.items() if k not in ("num_train", "num_val")}),
            model=dict(kind=s.model, width=s.width, depth=s.depth, heads=s.heads,
                       parameters=int(sum(np.size(x) for x in jax.tree.leaves(params)))),
            jax=dict(version=jax.__version__, backend=jax.default_backend(), devices=len(jax.devices())),
            determinism=("init = PRNGKey(seed); data order = numpy default_rng([seed, epoch]) permutations; "
                         "a cell alone matches its vmapped run at stable LRs (~1e-6); at near-divergent LRs "
                         "the vmap width can change summation order and hence the outcome"),
            block_layout=self._block_layout())

    def _block_layout(self) -> dict:
        """How the sweep's blocks map to compiled programs (known before any block runs)."""
        opts = self.options()
        rule = (f"one compiled program per (model, optimizer kind, schedule, batch size, cell count); "
                f"cells (LR x hyperparameters x seed) vmapped inside it; lax.scan over "
                f"{opts.evals_per_call} evaluation intervals of {opts.eval_every} steps per call, stop check "
                f"between calls; kfac cells run one after another (kfac-jax step, one compile per weight decay)")
        try:
            from cbs.sweep.grid import expand_blocks
            blocks = expand_blocks(self.config, type(self))
        except Exception:  # noqa: BLE001 - the layout is informative; never fail a run over it
            blocks = []
        rows = [dict(block_id=b.block_id, kind=b.kind, batch_size=b.batch_size, cells=len(b.cells),
                     vmap_width=1 if b.kind == "kfac" else len(b.cells),
                     mode="sequential" if b.kind == "kfac" else "vmap") for b in blocks]
        return dict(rule=rule, blocks=rows or list(self._layout))
