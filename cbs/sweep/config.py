"""The sweep config: YAML file + dotted command-line overrides -> validated SweepConfig."""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import re
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml

from cbs.sweep.backend import BACKENDS, get_backend
from cbs.sweep.schema import ConfigError, parse, spec, to_dict

__all__ = [
    "LogRange",
    "LRScaling",
    "Log2Range",
    "HParamRange",
    "SearchRange",
    "Search",
    "TargetRule",
    "Schedule",
    "OptimizerEntry",
    "Grid",
    "Adaptive",
    "Target",
    "Budget",
    "Output",
    "AnalysisOptions",
    "SweepConfig",
    "load_config",
    "apply_overrides",
    "config_hash",
]


@dataclasses.dataclass(frozen=True)
class LogRange:
    """num values log-spaced from 10**log10_min to 10**log10_max, both included."""

    log10_min: float = spec(doc="log10 of the smallest value")
    log10_max: float = spec(doc="log10 of the largest value")
    num: int = spec(doc="how many values", ge=1)

    def __post_init__(self):
        if self.num > 1 and self.log10_max < self.log10_min:
            raise ValueError(
                f"allowed: log10_max >= log10_min (got log10_min {self.log10_min} > "
                f"log10_max {self.log10_max})"
            )
        _check_log10_range(self.log10_min, self.log10_max)

    def values(self) -> list[float]:
        return [float(v) for v in np.logspace(self.log10_min, self.log10_max, self.num)]


# 10**x is a finite, normal float64 for x in this range (float64 overflows above ~308.25
# and loses precision below ~-307).
_LOG10_LIMIT = 300


def _check_log10_range(lo: float, hi: float) -> None:
    for key, x in (("log10_min", lo), ("log10_max", hi)):
        if not -_LOG10_LIMIT <= x <= _LOG10_LIMIT:
            raise ValueError(
                f"allowed: {key} between -{_LOG10_LIMIT} and {_LOG10_LIMIT} (got {x}; 10**{x} "
                f"is not a finite positive number)"
            )


@dataclasses.dataclass(frozen=True)
class Log2Range:
    """Powers of two 2**log2_min, 2**(log2_min+step), ..., up to 2**log2_max."""

    # batch sizes stay below 2^31 (32-bit on the device), as a listed batch size must
    log2_min: int = spec(doc="smallest exponent", ge=0, le=30)
    log2_max: int = spec(doc="largest exponent", ge=0, le=30)
    step: int = spec(1, doc="exponent increment", ge=1)

    def __post_init__(self):
        if self.log2_max < self.log2_min:
            raise ValueError(
                f"allowed: log2_max >= log2_min (got {self.log2_min} > {self.log2_max})"
            )

    def values(self) -> list[int]:
        return [2**k for k in range(self.log2_min, self.log2_max + 1, self.step)]


@dataclasses.dataclass(frozen=True)
class HParamRange:
    """A log-spaced hyperparameter grid; with one_minus, the values are 1 - 10**x
    (momentum / EMA decay grids such as 1 - logspace(-5, 0, 20))."""

    log10_min: float = spec(doc="log10 of the smallest value (of 1 - value with one_minus)")
    log10_max: float = spec(doc="log10 of the largest value (of 1 - value with one_minus)")
    num: int = spec(doc="how many values", ge=1)
    one_minus: bool = spec(False, doc="values are 1 - 10**x")

    def __post_init__(self):
        _check_log10_range(self.log10_min, self.log10_max)

    def values(self) -> list[float]:
        xs = np.logspace(self.log10_min, self.log10_max, self.num)
        return [float(1.0 - x) if self.one_minus else float(x) for x in xs]


@dataclasses.dataclass(frozen=True)
class RampPhase:
    """One phase of a batch ramp (``schedule.ramp``), its length counted in samples."""

    samples: int | None = spec(
        None,
        doc="length in samples (examples, or tokens with analysis.tokens_per_example); "
        "omitted for the last phase, which lasts until the budget ends",
        ge=1,
    )
    lr_mult: float = spec(1.0, doc="LR multiplier (times the base schedule's)", gt=0)
    batch_mult: int = spec(1, doc="batch size as a multiple of the cell's batch size", ge=1)


@dataclasses.dataclass(frozen=True)
class Schedule:
    """Learning-rate (and batch-size) schedule of an optimizer entry.

    Horizon-free kinds (constant, warmup then constant, piecewise) suit steps-to-target
    directly; cosine and linear decay anneal to ``final_lr_fraction`` over ``horizon``
    steps. ``optimized_pwc`` (NQM only) optimizes ``pieces`` piecewise-constant LRs per
    batch size.

    One definition for every back end (``cbs.nqm._schedules.schedule_phases``,
    ``cbs.train.optimizers.schedule_fn``; tests/test_schedule_config.py checks they agree
    step by step): step ``t < warmup_steps`` uses ``(t + 1) / warmup_steps`` of the peak;
    after it the kind's own clock ``s = t - warmup_steps`` starts, so ``boundaries``,
    ``pieces`` and ``horizon`` all count steps after the warm-up. Cosine and linear decay
    take their value at the middle of each step (``s + 0.5``) and hold
    ``final_lr_fraction`` from ``s = horizon`` on.
    """

    kind: Literal["constant", "step", "cosine", "linear_decay", "piecewise", "optimized_pwc"] = (
        spec("constant", doc="schedule shape")
    )
    warmup_steps: int = spec(0, doc="linear warm-up steps from 0 to the peak LR", ge=0)
    horizon: int | None = spec(
        None,
        doc="cosine/linear decay: steps over which the LR anneals, counted after the "
        "warm-up (default: the rest of the budget, budget.max_steps - warmup_steps)",
        ge=1,
    )
    final_lr_fraction: float = spec(
        0.0, doc="LR at the horizon as a fraction of the peak", ge=0, le=1
    )
    boundaries: list[int] = spec(
        [],
        doc="step decay: steps (counted after the warm-up) at which LR is multiplied by "
        "decay_factor",
        ge=1,
    )
    decay_factor: float = spec(0.1, doc="step decay: LR multiplier at each boundary", gt=0, le=1)
    pieces: list[list[float]] = spec(
        [],
        doc="piecewise: [[steps, lr_multiplier], ...] after the warm-up; the last piece "
        "lasts forever",
    )
    ramp: list[RampPhase] = spec(
        [],
        doc="batch ramp: phases counted in samples (examples, or tokens with "
        "analysis.tokens_per_example), each with an LR and a batch multiplier; the last "
        "phase lasts until the budget ends (docs/ramps.md)",
    )
    seesaw: bool = spec(
        False,
        doc="Seesaw: each LR halving of the base schedule becomes a batch doubling with the "
        "LR times 2**-seesaw_q (docs/ramps.md)",
    )
    seesaw_q: float | None = spec(
        None,
        doc="Seesaw exponent q (default by optimizer kind: 0 for sgd, momentum, nesterov; "
        "0.5 for adaptive / normalized kinds)",
        ge=0,
        le=1,
    )
    max_batch_size: int | None = spec(
        None,
        doc="ramps and Seesaw: largest batch size; Seesaw's halvings beyond it stay LR decays",
        ge=1,
    )
    num_pieces: int = spec(10, doc="optimized_pwc: number of equal-length pieces", ge=1)


# Which schedule keys each kind reads; a key set to anything but its default under another
# kind would be silently ignored, so it is rejected instead (warmup_steps: every kind but
# optimized_pwc, which optimizes the whole schedule itself).
_SCHEDULE_KEYS = {
    "warmup_steps": ("constant", "step", "cosine", "linear_decay", "piecewise"),
    "horizon": ("cosine", "linear_decay"),
    "final_lr_fraction": ("cosine", "linear_decay"),
    "boundaries": ("step",),
    "decay_factor": ("step",),
    "pieces": ("piecewise",),
    "ramp": ("constant", "step", "cosine", "linear_decay", "piecewise"),
    "seesaw": ("step", "cosine", "linear_decay", "piecewise"),
    "seesaw_q": ("step", "cosine", "linear_decay", "piecewise"),
    "max_batch_size": ("constant", "step", "cosine", "linear_decay", "piecewise"),
    "num_pieces": ("optimized_pwc",),
}


def _check_schedule(where: str, sch: Schedule) -> None:
    """Per-kind validation of a schedule: only the kind's own keys, and the ones it needs."""
    defaults = Schedule()
    for key, kinds in _SCHEDULE_KEYS.items():
        value = getattr(sch, key)
        if sch.kind not in kinds and value != getattr(defaults, key):
            raise ConfigError(
                f"{where}.{key}",
                value,
                f"kind {sch.kind!r} does not use this key; it applies to kinds " + ", ".join(kinds),
            )
    if sch.kind == "step":
        if not sch.boundaries:
            raise ConfigError(
                f"{where}.boundaries",
                sch.boundaries,
                "allowed: at least one step at which the LR decays (kind 'step')",
            )
    # (increasing boundaries and well-formed pieces: _check_schedule_budget, run first)
    _check_ramp_keys(where, sch)


def _check_ramp_keys(where: str, sch: Schedule) -> None:
    """Budget-free checks of a batch ramp / Seesaw (cbs.ramps); the per-batch-size ones
    (budget, dataset, max_batch_size) are in cbs.sweep.config.check_ramps."""
    from cbs.ramps import halvings

    if sch.seesaw_q is not None and not sch.seesaw:
        raise ConfigError(f"{where}.seesaw_q", sch.seesaw_q, "allowed only with seesaw: true")
    if sch.max_batch_size is not None and not (sch.seesaw or sch.ramp):
        raise ConfigError(
            f"{where}.max_batch_size",
            sch.max_batch_size,
            "allowed only with a batch ramp (schedule.ramp or seesaw: true)",
        )
    if sch.seesaw and sch.ramp:
        raise ConfigError(
            f"{where}.ramp",
            "ramp with seesaw",
            "allowed: one of schedule.ramp (explicit phases) or seesaw: true (phases from the "
            "base schedule's halvings), not both",
        )
    for j, ph in enumerate(sch.ramp):
        last = j == len(sch.ramp) - 1
        if ph.samples is None and not last:
            raise ConfigError(
                f"{where}.ramp[{j}].samples",
                None,
                "allowed: a length in samples for every phase but the last",
            )
        if ph.samples is not None and last:
            raise ConfigError(
                f"{where}.ramp[{j}].samples",
                ph.samples,
                "allowed: none for the last phase (it lasts until the budget ends, "
                "budget.max_steps serial steps)",
            )
    if not sch.seesaw:
        return
    exact = sch.kind in ("step", "piecewise")
    if sch.kind == "step":
        key, mults = "decay_factor", [sch.decay_factor]
    elif sch.kind == "piecewise":
        key, mults = "pieces", [p[1] for p in sch.pieces if len(p) == 2]
    else:
        key, mults = "final_lr_fraction", [sch.final_lr_fraction]
    try:
        k = halvings(np.array(mults, np.float64), exact=exact)
    except ValueError:
        raise ConfigError(
            f"{where}.{key}",
            getattr(sch, key),
            "allowed with seesaw: LR multipliers 1/2, 1/4, ... (each halving becomes a batch "
            "doubling, so the batch multiplier must be a whole number)",
        ) from None
    if sch.kind != "step" and sch.kind != "piecewise":
        k = halvings(np.array([sch.final_lr_fraction]), exact=False)
    if not np.any(k > 0):
        raise ConfigError(
            f"{where}.seesaw",
            True,
            f"the base schedule never halves the LR ({key} = {getattr(sch, key)!r}), so Seesaw "
            "would change nothing; use a schedule that decays the LR to 1/2 or below",
        )


@dataclasses.dataclass(frozen=True)
class LRScaling:
    """Learning rates that follow the batch size: the grid's LRs are those at
    ``reference_batch``; at batch size B each is multiplied by (B / reference_batch) ** power.

    The best LR grows with the batch size (linearly for SGD below the critical batch size,
    about as its square root for Adam-type optimizers), so one LR grid for every batch size
    puts the optimum on the grid's edge at one end or the other and the adaptive grid
    spends rounds walking it back (docs/measurement.md, "Learning rates that follow the
    batch size").
    """

    power: float = spec(
        0.0,
        doc="exponent: 1 = linear rule (SGD), 0.5 = square-root rule (Adam-type), "
        "0 = the same LRs at every batch size",
        ge=0,
        le=2,
    )
    reference_batch: int | None = spec(
        None, doc="batch size the listed LRs are for (default: the smallest swept)", ge=1
    )

    def factor(self, batch_size: int, smallest: int) -> float:
        """The multiplier of the grid's LRs at ``batch_size``."""
        ref = self.reference_batch if self.reference_batch is not None else smallest
        return float((batch_size / ref) ** self.power)


@dataclasses.dataclass(frozen=True)
class SearchRange:
    """One searched quantity's range: uniform in log10 (``scale: log``) or linearly."""

    min: float = spec(doc="smallest value")
    max: float = spec(doc="largest value")
    scale: Literal["log", "linear"] = spec("log", doc="log: uniform in log10; linear: uniform")

    def __post_init__(self):
        if self.max == self.min:
            raise ValueError(f"allowed: min < max (got an empty range, min = max = {self.min})")
        if self.max < self.min:
            raise ValueError(
                f"allowed: min < max (got an inverted range, min {self.min} > max {self.max})"
            )
        if self.scale == "log" and self.min <= 0:
            raise ValueError(
                f"allowed: min > 0 with scale 'log' (got min {self.min}; a log range cannot "
                "reach or cross zero)"
            )
        if self.scale == "log":
            _check_log10_range(float(np.log10(self.min)), float(np.log10(self.max)))


@dataclasses.dataclass(frozen=True)
class Search:
    """Quasi-random search per batch size (cbs.sweep.search): ``trials`` points of a
    scrambled low-discrepancy sequence in the box ``space``, the same points at every batch
    size, each trial one cell per seed of that batch size's block. Keys of ``space``:
    ``lr``, any hyperparameter the optimizer kind declares, or ``one_minus_<name>`` (the
    range is of 1 - value: momentum / EMA decays on a log scale). A best trial within
    ``edge_fraction`` of a side of any searched range gets that side extended (a new round
    of trials in the extended box, at most ``max_rounds``) or, where the range cannot grow
    (a bound of the hyperparameter, or no rounds left), flagged."""

    trials: int = spec(doc="quasi-random points per batch size (first pass)", ge=1)
    space: dict[str, SearchRange] = spec(
        doc="searched quantities: lr, a hyperparameter name, or one_minus_<name>"
    )
    kind: Literal["quasi_random"] = spec("quasi_random", doc="search kind")
    seed: int = spec(0, doc="scrambling seed of the sequence", ge=0)
    sequence: Literal["halton", "sobol"] = spec(
        "halton", doc="low-discrepancy sequence (scipy.stats.qmc, scrambled)"
    )
    max_rounds: int = spec(
        2, doc="most rounds that extend a range whose side holds the best trial", ge=0, le=20
    )
    round_trials: int | None = spec(
        None, doc="trials per extension round (default: trials, the first pass's program)", ge=1
    )
    edge_fraction: float = spec(
        0.1,
        doc="a best trial closer than this fraction of a range's width to its side is on that edge",
        gt=0,
        lt=0.5,
    )
    extend_fraction: float = spec(
        0.5, doc="an edge side moves outward by this fraction of the range's width", gt=0, le=4
    )


@dataclasses.dataclass(frozen=True)
class OptimizerEntry:
    """One optimizer of the sweep: a kind, a name, and its hyperparameter grid."""

    kind: str = spec(doc="optimizer kind (see --help for the back end's list)")
    name: str | None = spec(None, doc="label in tables and plots (default: the kind)")
    hparams: dict[str, float | list[float] | HParamRange] = spec(
        {}, doc="hyperparameters: a value, a list to sweep, or a log range"
    )
    learning_rates: list[float] | LogRange | None = spec(
        None, doc="overrides grid.learning_rates", gt=0
    )
    lr_scaling: LRScaling | None = spec(None, doc="overrides grid.lr_scaling")
    schedule: Schedule = spec(factory=Schedule, doc="learning-rate / batch-size schedule")
    search: Search | None = spec(None, doc="overrides grid.search (quasi-random search)")

    @property
    def label(self) -> str:
        return self.name or self.kind


@dataclasses.dataclass(frozen=True)
class Adaptive:
    """Adaptive LR grid (cbs.sweep.adaptive): extend an edge optimum, then zoom in once."""

    enabled: bool | None = spec(
        None,
        doc="on/off; default: on for backend train, off for nqm (which refines "
        "its optimum continuously)",
    )
    max_extend: int = spec(
        3, doc="most rounds that extend an edge optimum's LR grid outward", ge=0, le=20
    )
    points: int = spec(
        2, doc="LRs added per side and extension round, at the grid's spacing", ge=1, le=20
    )
    zoom: bool = spec(True, doc="one final round adding the midpoints around each best LR")


@dataclasses.dataclass(frozen=True)
class Grid:
    batch_sizes: list[int] | Log2Range = spec(
        doc="batch sizes: a list, or {log2_min, log2_max, step}", ge=1
    )
    optimizers: list[OptimizerEntry] = spec(
        doc="optimizers, each with its own hyperparameter grid", min_len=1
    )
    learning_rates: list[float] | LogRange | None = spec(
        None,
        doc="LRs: a list, or {log10_min, log10_max, num} (required unless every optimizer "
        "entry searches lr)",
        gt=0,
    )
    seeds: list[int] = spec(
        [0], doc="seeds (initialisation, data order, noise)", ge=0, lt=2**32, min_len=1
    )
    lr_scaling: LRScaling = spec(
        factory=LRScaling,
        doc="LRs that follow the batch size: learning_rates are for reference_batch, "
        "multiplied by (B / reference_batch) ** power at batch size B",
    )
    adaptive: Adaptive = spec(
        factory=Adaptive, doc="adaptive LR grid: extend edge optima, zoom once"
    )
    search: Search | None = spec(
        None,
        doc="quasi-random search of lr and hyperparameters per batch size, for every "
        "optimizer entry without its own search",
    )
    max_cells: int = spec(
        1_000_000,
        doc="refuse grids with more cells than this (a guard against typos such "
        "as num: 100000000; raise it for a sweep that is meant to be that big)",
        ge=1,
    )

    def batch_size_values(self) -> list[int]:
        return (
            self.batch_sizes.values()
            if isinstance(self.batch_sizes, Log2Range)
            else list(self.batch_sizes)
        )


@dataclasses.dataclass(frozen=True)
class TargetRule:
    """The target from a pilot (cbs.sweep.target_rule): every optimizer entry's first-pass
    cells at the pilot batch size run the whole pilot budget with no target; the best
    validation metric any cell reaches, relaxed by the margin, is the target."""

    kind: Literal["pilot_best"] = spec("pilot_best", doc="rule")
    margin: float = spec(
        0.1, doc="relaxation: target = best * (1 + margin) (relative) or best + margin", ge=0
    )
    margin_kind: Literal["relative", "absolute"] = spec("relative", doc="how margin applies")
    batch_size: int | None = spec(None, doc="pilot batch size (default: the largest swept)", ge=1)
    max_steps: int | None = spec(
        None, doc="pilot step budget (default: budget.max_steps, the largest budget)", ge=1
    )


@dataclasses.dataclass(frozen=True)
class Target:
    metric: str = spec(doc="metric that must fall strictly below value")
    value: float | None = spec(None, doc="target value (required unless rule is set)")
    rule: TargetRule | None = spec(
        None, doc="derive value from a pilot run (written to the run folder's target_rule.json)"
    )
    interpolate: bool = spec(
        False, doc="also report steps linearly interpolated between evaluations"
    )


@dataclasses.dataclass(frozen=True)
class Budget:
    max_steps: int = spec(doc="steps after which a cell is censored", ge=1)
    eval_every: int = spec(1, doc="evaluate the target metric every k steps (train back end)", ge=1)


@dataclasses.dataclass(frozen=True)
class Output:
    dir: str = spec("runs/{name}", doc="output folder; {name} is replaced by the sweep name")
    curves: bool = spec(True, doc="store per-cell metric curves when the back end returns them")
    plots: bool = spec(True, doc="write PNG plots and report.md at the end")
    tensorboard: bool = spec(
        False,
        doc="write live TensorBoard event files under OUTPUT/tensorboard/ (per cell curves, "
        "block times, running best steps); needs tensorboardX (pip install -e '.[tensorboard]')",
    )


@dataclasses.dataclass(frozen=True)
class AnalysisOptions:
    delta: float = spec(0.2, doc="overhead over linear scaling that defines B*", gt=0)
    b0: float | None = spec(None, doc="anchor batch size of B* (default: smallest swept)", gt=0)
    bootstrap: int = spec(1000, doc="bootstrap resamples for intervals", ge=0)
    tokens_per_example: int = spec(1, doc="sequence length, to report batch sizes in tokens", ge=1)


@dataclasses.dataclass(frozen=True)
class SweepConfig:
    name: str = spec(doc="sweep name (letters, digits, '-', '_', '.')")
    backend: str = spec(
        doc="which back end evaluates the cells: nqm (Noisy Quadratic Model) or train (real networks)"
    )
    grid: Grid = spec(doc="the batch size x LR x optimizer x seed grid")
    target: Target = spec(doc="what 'reached the target' means")
    budget: Budget = spec(doc="step budget")
    output: Output = spec(factory=Output, doc="where and what to write")
    analysis: AnalysisOptions = spec(factory=AnalysisOptions, doc="critical-batch-size extraction")
    section: Any = spec(
        None, doc="the back end's own section (YAML key: the back end name)", hidden=True
    )

    @property
    def out_dir(self) -> Path:
        return Path(self.output.dir.replace("{name}", self.name))


_NAME = re.compile(r"^[A-Za-z0-9_.\-]+$")
_TOP_KEYS = [f.name for f in dataclasses.fields(SweepConfig) if f.name != "section"]


def _build(raw: Any) -> SweepConfig:
    if not isinstance(raw, dict):
        raise ConfigError("", raw, "the config must be a mapping of keys to values")
    raw = dict(raw)
    backend_name = raw.get("backend")
    backend = _resolve_backend(backend_name)
    section_key = backend.name
    known = set(BACKENDS) | {section_key}
    for key in raw:
        if not isinstance(key, str):
            raise ConfigError(
                str(key),
                key,
                "keys must be strings; allowed keys: " + ", ".join(_TOP_KEYS + [section_key]),
            )
        if key not in _TOP_KEYS and key not in known:
            close = difflib.get_close_matches(str(key), _TOP_KEYS + [section_key], n=1)
            raise ConfigError(
                str(key),
                key,
                "unknown key; allowed keys: " + ", ".join(_TOP_KEYS + [section_key]),
                f"did you mean {close[0]!r}?" if close else "",
            )
        if key in known and key != section_key:
            raise ConfigError(
                key,
                raw[key],
                f"this section belongs to backend {key!r}, but backend is {backend_name!r}",
            )
    section = parse(backend.Section, raw.pop(section_key, None), section_key)
    cfg = parse(SweepConfig, raw)
    cfg = dataclasses.replace(cfg, section=section)
    _check(cfg, backend)
    backend.check(cfg)
    return cfg


def _resolve_backend(name: Any):
    if isinstance(name, str) and name in BACKENDS:
        return get_backend(name)
    if isinstance(name, str) and re.match(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$", name):
        try:
            cls = get_backend(name)
        except (ImportError, AttributeError) as e:
            raise ConfigError("backend", name, f"could not import this back end ({e})") from None
        except Exception as e:  # noqa: BLE001 - a user module failing at import time
            raise ConfigError(
                "backend",
                name,
                f"importing this back end failed ({type(e).__name__}: "
                f"{str(e).splitlines()[0] if str(e) else ''})",
            ) from None
        from cbs.sweep.backend import Backend

        if not (isinstance(cls, type) and issubclass(cls, Backend)):
            raise ConfigError(
                "backend",
                name,
                "allowed: a subclass of cbs.sweep.backend.Backend "
                f"(this names {type(cls).__name__} {getattr(cls, '__name__', cls)!r})",
            )
        import inspect

        missing = [a for a in ("name", "Section", "optimizers", "metrics") if not hasattr(cls, a)]
        if missing or inspect.isabstract(cls):
            what = (
                f"it lacks {', '.join(missing)}"
                if missing
                else "it is abstract (run_blocks not implemented)"
            )
            raise ConfigError("backend", name, f"allowed: a complete Backend subclass; {what}")
        return cls
    close = (
        difflib.get_close_matches(str(name), list(BACKENDS), n=1) if isinstance(name, str) else []
    )
    raise ConfigError(
        "backend",
        name,
        "allowed: " + ", ".join(map(repr, BACKENDS)) + " or a 'package.module:Class' path",
        f"did you mean {close[0]!r}?" if close else "",
    )


def _check(cfg: SweepConfig, backend) -> None:
    if not _NAME.match(cfg.name):
        raise ConfigError("name", cfg.name, "allowed: letters, digits, '-', '_', '.'")
    if cfg.target.metric not in backend.metrics:
        close = difflib.get_close_matches(cfg.target.metric, list(backend.metrics), n=1)
        raise ConfigError(
            "target.metric",
            cfg.target.metric,
            f"allowed for backend {cfg.backend!r}: " + ", ".join(backend.metrics),
            f"did you mean {close[0]!r}?" if close else "",
        )
    bs = cfg.grid.batch_size_values()
    if not bs:
        raise ConfigError("grid.batch_sizes", bs, "allowed: at least one batch size")
    if len(set(bs)) != len(bs):
        raise ConfigError("grid.batch_sizes", bs, "allowed: distinct batch sizes")
    if isinstance(cfg.grid.learning_rates, list) and not cfg.grid.learning_rates:
        raise ConfigError("grid.learning_rates", [], "allowed: at least one learning rate")
    if cfg.budget.eval_every > cfg.budget.max_steps:
        raise ConfigError(
            "budget.eval_every",
            cfg.budget.eval_every,
            f"allowed: at most budget.max_steps = {cfg.budget.max_steps} (otherwise no evaluation "
            "happens before the budget ends)",
        )
    for i, opt in enumerate(cfg.grid.optimizers):
        _check_schedule_budget(f"grid.optimizers[{i}].schedule", opt.schedule, cfg.budget.max_steps)
    _check_target(cfg)
    _check_searches(cfg, backend)
    # Count before expanding: a typo such as num: 100000000 must not allocate the grid.
    cells = count_cells(cfg, backend)
    if cells > cfg.grid.max_cells:
        raise ConfigError(
            "grid",
            f"{cells} cells",
            f"allowed: at most grid.max_cells = {cfg.grid.max_cells} "
            "cells (batch sizes x learning rates x hyperparameter values x seeds)",
            "raise grid.max_cells if the sweep is meant to be this big",
        )
    labels = set()
    for i, opt in enumerate(cfg.grid.optimizers):
        where = f"grid.optimizers[{i}]"
        if opt.kind not in backend.optimizers:
            close = difflib.get_close_matches(opt.kind, list(backend.optimizers), n=1)
            raise ConfigError(
                f"{where}.kind",
                opt.kind,
                f"allowed for backend {cfg.backend!r}: " + ", ".join(backend.optimizers),
                f"did you mean {close[0]!r}?" if close else "",
            )
        if not _NAME.match(opt.label):
            raise ConfigError(f"{where}.name", opt.label, "allowed: letters, digits, '-', '_', '.'")
        if opt.label in labels:
            raise ConfigError(
                f"{where}.name", opt.label, "allowed: a name no other optimizer entry uses"
            )
        labels.add(opt.label)
        specs = backend.optimizers[opt.kind].hparams
        for hp, value in opt.hparams.items():
            if hp not in specs:
                close = difflib.get_close_matches(hp, list(specs), n=1)
                allowed = ", ".join(specs) or "none"
                raise ConfigError(
                    f"{where}.hparams.{hp}",
                    hp,
                    f"unknown hyperparameter for kind {opt.kind!r}; allowed: {allowed}",
                    f"did you mean {close[0]!r}?" if close else "",
                )
            values = (
                value.values()
                if isinstance(value, HParamRange)
                else value
                if isinstance(value, list)
                else [value]
            )
            if not values:
                raise ConfigError(f"{where}.hparams.{hp}", value, "allowed: at least one value")
            if len(set(values)) != len(values):
                raise ConfigError(f"{where}.hparams.{hp}", value, "allowed: distinct values")
            for v in values:
                if not specs[hp].admits(v):
                    raise ConfigError(f"{where}.hparams.{hp}", v, f"allowed: {specs[hp].allowed()}")
        _check_schedule(f"{where}.schedule", opt.schedule)
        if isinstance(opt.learning_rates, list) and not opt.learning_rates:
            raise ConfigError(f"{where}.learning_rates", [], "allowed: at least one learning rate")
        for key, lrs in (
            (f"{where}.learning_rates", opt.learning_rates),
            ("grid.learning_rates", cfg.grid.learning_rates),
        ):
            if isinstance(lrs, list) and len(set(lrs)) != len(lrs):
                raise ConfigError(key, lrs, "allowed: distinct learning rates")
    if len(set(cfg.grid.seeds)) != len(cfg.grid.seeds):
        raise ConfigError("grid.seeds", cfg.grid.seeds, "allowed: distinct seeds")
    check_ramps(cfg)


def check_ramps(cfg: SweepConfig, max_examples: int | None = None) -> None:
    """Per-batch-size checks of every batch ramp / Seesaw schedule of the grid (cheap: the
    plans are a few phases): its phases must start within the budget, and its batch stay
    within ``max_batch_size`` and, when given, the training set (``max_examples``)."""
    from cbs.ramps import is_ramped, ramp_plan

    tpe = cfg.analysis.tokens_per_example
    for i, opt in enumerate(cfg.grid.optimizers):
        sch = opt.schedule
        if not is_ramped(sch):
            continue
        where = f"grid.optimizers[{i}].schedule"
        if max_examples is not None and sch.max_batch_size is not None:
            if sch.max_batch_size > max_examples:
                raise ConfigError(
                    f"{where}.max_batch_size",
                    sch.max_batch_size,
                    f"allowed: at most the training-set size {max_examples}",
                )
        for b in cfg.grid.batch_size_values():
            plan = ramp_plan(sch, b, cfg.budget.max_steps, kind=opt.kind, tokens_per_example=tpe)
            biggest = b * plan.max_batch_mult
            if sch.max_batch_size is not None and biggest > sch.max_batch_size:
                raise ConfigError(
                    f"{where}.max_batch_size",
                    sch.max_batch_size,
                    f"the ramp reaches batch size {biggest} at grid batch size {b}; allowed: "
                    "a max_batch_size >= every phase's batch size",
                )
            if max_examples is not None and biggest > max_examples:
                raise ConfigError(
                    f"{where}" + (".ramp" if sch.ramp else ".max_batch_size"),
                    biggest if sch.ramp else None,
                    f"the ramp reaches batch size {biggest} at grid batch size {b}, more than "
                    f"the {max_examples} training examples"
                    + ("" if sch.ramp else "; set max_batch_size to cap Seesaw's doublings"),
                )
            if sch.ramp and len(sch.ramp) > 1:
                need = sum(ph.samples for ph in sch.ramp[:-1])
                have = float(plan.samples_after(cfg.budget.max_steps)) * tpe
                if have <= need:
                    unit = "tokens" if tpe > 1 else "examples"
                    raise ConfigError(
                        f"{where}.ramp",
                        f"{need} {unit} before the last phase",
                        f"at batch size {b} the budget of {cfg.budget.max_steps} steps consumes "
                        f"only {have:.0f} {unit}, so the ramp's last phase is never reached; "
                        "allowed: phases whose lengths fit the budget at every batch size",
                    )


def _axis_len(value) -> int:
    if isinstance(value, (LogRange, HParamRange)):
        return value.num
    return len(value) if isinstance(value, list) else 1


def count_cells(cfg: SweepConfig, backend) -> int:
    """Number of cells of the grid, computed without expanding it."""
    n_bs = (
        len(
            range(
                cfg.grid.batch_sizes.log2_min,
                cfg.grid.batch_sizes.log2_max + 1,
                cfg.grid.batch_sizes.step,
            )
        )
        if isinstance(cfg.grid.batch_sizes, Log2Range)
        else len(cfg.grid.batch_sizes)
    )
    total = 0
    for opt in cfg.grid.optimizers:
        search = search_of(cfg, opt)
        if search is not None:
            # one cell per trial and seed, times any hyperparameter grid not searched
            n = search.trials * n_bs * len(cfg.grid.seeds)
        else:
            lrs = opt.learning_rates if opt.learning_rates is not None else cfg.grid.learning_rates
            n = _axis_len(lrs) * n_bs * len(cfg.grid.seeds)
        for value in opt.hparams.values():
            n *= _axis_len(value)
        total += n
    return total


def search_of(cfg: SweepConfig, opt: OptimizerEntry) -> Search | None:
    """The search an optimizer entry runs: its own, else ``grid.search`` (None: a grid)."""
    return opt.search if opt.search is not None else cfg.grid.search


def _search_where(cfg: SweepConfig, i: int) -> str:
    return (
        f"grid.optimizers[{i}].search"
        if cfg.grid.optimizers[i].search is not None
        else "grid.search"
    )


def _check_searches(cfg: SweepConfig, backend) -> None:
    """The search spaces against each optimizer kind's declared hyperparameters (its
    OptimizerSpec metadata, so a newly registered optimizer is searchable with no edit
    here), the explicit grids they would clash with, and the cell guard."""
    from cbs.sweep.search import ONE_MINUS, resolve_name

    n_bs = len(cfg.grid.batch_size_values())
    uses_grid_lrs = False
    for i, opt in enumerate(cfg.grid.optimizers):
        search = search_of(cfg, opt)
        if search is None:
            uses_grid_lrs |= opt.learning_rates is None
            if cfg.grid.learning_rates is None and opt.learning_rates is None:
                raise ConfigError(
                    "grid.learning_rates",
                    None,
                    f"required: grid.optimizers[{i}] ({opt.label}) has neither its own "
                    "learning_rates nor a search over lr",
                )
            continue
        where = _search_where(cfg, i)
        if opt.kind not in backend.optimizers:
            continue  # reported by the kind check
        specs = backend.optimizers[opt.kind].hparams
        allowed = ", ".join(["lr", *specs, *(ONE_MINUS + h for h in specs)])
        if "lr" not in search.space:
            raise ConfigError(
                f"{where}.space",
                sorted(search.space),
                "allowed: a space that includes lr (the trials set the learning rate)",
            )
        seen: dict[str, str] = {}
        for key, rng in search.space.items():
            target, one_minus = resolve_name(key)
            if key != "lr" and target not in specs:
                import difflib

                close = difflib.get_close_matches(key, allowed.split(", "), n=1)
                raise ConfigError(
                    f"{where}.space.{key}",
                    key,
                    f"kind {opt.kind!r} has no such hyperparameter; allowed: {allowed}",
                    f"did you mean {close[0]!r}?" if close else "",
                )
            if target in seen:
                raise ConfigError(
                    f"{where}.space.{key}",
                    key,
                    f"allowed: one range per hyperparameter ({seen[target]!r} already "
                    f"searches {target!r})",
                )
            seen[target] = key
            for end in (rng.min, rng.max):
                value = 1.0 - end if one_minus else end
                ok = value > 0 if key == "lr" else specs[target].admits(value)
                if not ok:
                    what = "a learning rate > 0" if key == "lr" else specs[target].allowed()
                    raise ConfigError(
                        f"{where}.space.{key}",
                        {"min": rng.min, "max": rng.max},
                        f"allowed: a range whose values are {what}"
                        + (f" (as 1 - {key[len(ONE_MINUS) :]})" if one_minus else "")
                        + f"; {end} gives {target} = {value:g}",
                    )
            if key == "lr" and opt.learning_rates is not None:
                raise ConfigError(
                    f"grid.optimizers[{i}].learning_rates",
                    opt.learning_rates,
                    f"allowed: no LR grid where {where}.space searches lr (one of the two)",
                )
            if key != "lr" and target in opt.hparams:
                raise ConfigError(
                    f"grid.optimizers[{i}].hparams.{target}",
                    to_dict(opt.hparams[target]),
                    f"allowed: no value or grid for a hyperparameter that {where}.space.{key} "
                    "searches (one of the two)",
                )
        per_trial = n_bs * len(cfg.grid.seeds)
        for value in opt.hparams.values():
            per_trial *= _axis_len(value)
        for key, trials in (
            ("trials", search.trials),
            ("round_trials", search.round_trials or search.trials),
        ):
            if trials * per_trial > cfg.grid.max_cells:
                raise ConfigError(
                    f"{where}.{key}",
                    trials,
                    f"allowed: at most grid.max_cells = {cfg.grid.max_cells} cells, i.e. "
                    f"{cfg.grid.max_cells // per_trial} trials ({per_trial} cells per trial: "
                    "batch sizes x seeds x hyperparameter values)",
                    "raise grid.max_cells if the search is meant to be this big",
                )
    searched = any(search_of(cfg, o) is not None for o in cfg.grid.optimizers)
    if cfg.grid.learning_rates is not None and not uses_grid_lrs and searched:
        raise ConfigError(
            "grid.learning_rates",
            to_dict(cfg.grid.learning_rates),
            "allowed: no LR grid where every optimizer entry searches lr or has its own "
            "learning_rates (a search and a grid for lr: one of the two; this one is unused)",
        )


def _check_target(cfg: SweepConfig) -> None:
    t = cfg.target
    if t.value is None and t.rule is None:
        raise ConfigError("target.value", None, "required: a number, or target.rule")
    if t.value is not None and t.rule is not None:
        raise ConfigError(
            "target.value",
            t.value,
            "allowed: no value where target.rule derives it from a pilot (one of the two)",
        )
    r = t.rule
    if r is not None and r.batch_size is not None:
        if r.batch_size not in cfg.grid.batch_size_values():
            raise ConfigError(
                "target.rule.batch_size",
                r.batch_size,
                "allowed: one of grid.batch_sizes " + str(cfg.grid.batch_size_values()),
            )


def _check_schedule_budget(where: str, sch: Schedule, max_steps: int) -> None:
    """Schedule checks every back end shares (they need the budget, so not in Schedule)."""
    if sch.warmup_steps >= max_steps:
        raise ConfigError(
            f"{where}.warmup_steps",
            sch.warmup_steps,
            f"allowed: fewer than budget.max_steps = {max_steps} steps (the warm-up must end "
            "within the budget)",
        )
    b = sch.boundaries
    for j in range(1, len(b)):
        if b[j] <= b[j - 1]:
            raise ConfigError(f"{where}.boundaries", b, "allowed: strictly increasing steps")
    if sch.kind == "piecewise" and not sch.pieces:
        raise ConfigError(
            f"{where}.pieces", [], "allowed: a non-empty list [[steps, lr_multiplier], ...]"
        )
    for j, piece in enumerate(sch.pieces):
        if (
            len(piece) != 2
            or not float(piece[0]).is_integer()
            or piece[0] < 1
            or not np.isfinite(piece[1])
            or piece[1] <= 0
        ):
            raise ConfigError(
                f"{where}.pieces[{j}]",
                piece,
                "allowed: [steps, lr_multiplier] with steps an integer >= 1 and lr_multiplier > 0",
            )


def _parse_override(text: str) -> tuple[list[str], Any]:
    key, sep, value = text.partition("=")
    if not sep or not key or not re.match(r"^[A-Za-z_][\w]*(\.[A-Za-z_0-9][\w]*)*$", key):
        raise ConfigError(
            "<command line>", text, "overrides are written key.path=value, e.g. target.value=0.02"
        )
    try:
        parsed = _load_yaml_text(value) if value.strip() else None
    except _DuplicateKey as e:
        raise ConfigError(key, value, f"duplicate key {e.key!r} in the value") from None
    except yaml.YAMLError:
        raise ConfigError(
            key, value, "the value must be valid YAML (a number, a string, [a, list], {a: map})"
        ) from None
    return key.split("."), parsed


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Applies ``a.b.c=value`` overrides (YAML values; list indices allowed as path parts)."""
    import copy

    raw = copy.deepcopy(raw) if raw is not None else {}
    for text in overrides:
        path, value = _parse_override(text)
        node = raw
        for depth, part in enumerate(path[:-1]):
            where = ".".join(path[: depth + 1])
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise ConfigError(where, part, f"allowed: an index below {len(node)}")
                node = node[int(part)]
            elif isinstance(node, dict):
                node = node.setdefault(part, {})
                if node is None:
                    node = raw_set(raw, path[: depth + 1], {})
            else:
                raise ConfigError(
                    where, node, "cannot set a key inside a value that is not a mapping"
                )
        last = path[-1]
        if isinstance(node, list):
            if not last.isdigit() or int(last) >= len(node):
                raise ConfigError(".".join(path), last, f"allowed: an index below {len(node)}")
            node[int(last)] = value
        elif isinstance(node, dict):
            node[last] = value
        else:
            raise ConfigError(
                ".".join(path[:-1]), node, "cannot set a key inside a value that is not a mapping"
            )
    return raw


def raw_set(raw: dict, path: list[str], value: Any) -> Any:
    node = raw
    for part in path[:-1]:
        node = node[int(part)] if isinstance(node, list) else node[part]
    if isinstance(node, list):
        node[int(path[-1])] = value
    else:
        node[path[-1]] = value
    return value


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, key, first: int, second: int):
        self.key, self.first, self.second = key, first, second
        super().__init__(f"duplicate key {key!r}")


class _StrictLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):
    """The safe loader (libyaml's parser when PyYAML was built with it, ~10x faster) that
    refuses a key given twice in one mapping: YAML would silently keep the last one, and a
    config with two ``target:`` sections runs a sweep its author did not mean."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # '<<: *anchor' merges may override
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                if key in seen:
                    raise _DuplicateKey(key, seen[key], line)
                seen[key] = line
            except TypeError:  # an unhashable key: the base constructor names it
                continue
        return super().construct_mapping(node, deep=deep)


def _load_yaml_text(text: str) -> Any:
    return yaml.load(text, Loader=_StrictLoader)


def read_yaml(path: str | Path) -> Any:
    path = Path(path)
    if not path.exists():
        raise ConfigError("<file>", str(path), "the config file does not exist")
    if path.is_dir():
        raise ConfigError("<file>", str(path), "expected a YAML file, got a folder")
    try:
        return _load_yaml_text(path.read_text())
    except _DuplicateKey as e:
        raise ConfigError(
            "<file>",
            str(path),
            f"duplicate key {e.key!r} at lines {e.first} and {e.second} (YAML would silently "
            "keep the last; give each key once)",
        ) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "unknown position"
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError("<file>", str(path), f"YAML syntax error at {where}: {problem}") from None
    except UnicodeDecodeError:
        raise ConfigError("<file>", str(path), "the file is not UTF-8 text") from None


def load_config(source: str | Path | dict, overrides: list[str] = ()) -> SweepConfig:
    """A validated config from a YAML path (or an already-read mapping) and overrides."""
    raw = source if isinstance(source, dict) else read_yaml(source)
    if not isinstance(raw, dict):
        raise ConfigError("", raw, "the config must be a mapping of keys to values")
    return _build(apply_overrides(raw, list(overrides)))


def config_dict(cfg: SweepConfig) -> dict:
    """The resolved config as a plain mapping, the back-end section under its own key."""
    d = to_dict(cfg)
    from cbs.sweep.backend import get_backend

    d[get_backend(cfg.backend).name] = d.pop("section")
    # lr_scaling at its default is left out, so that configs which do not scale their LRs
    # keep the hash (and resumable run folders) they had before the key existed.
    if d["grid"].get("lr_scaling") == to_dict(LRScaling()):
        del d["grid"]["lr_scaling"]
    for entry in d["grid"]["optimizers"]:
        if entry.get("lr_scaling", 0) is None:
            del entry["lr_scaling"]
        # likewise for the search and target-rule keys (absent = the grid as before)
        if entry.get("search", 0) is None:
            del entry["search"]
        _legacy_schedule_keys(entry.get("schedule"))
    if d["grid"].get("search", 0) is None:
        del d["grid"]["search"]
    if d["target"].get("rule", 0) is None:
        del d["target"]["rule"]
    return d


def _legacy_schedule_keys(sch: dict | None) -> None:
    """A schedule without a batch ramp hashes as it did before ramps were counted in
    samples (its mapping then had ``batch_growth: []`` and no ramp keys), so that its run
    folders stay resumable. Seesaw schedules keep their new keys: their meaning changed."""
    if not sch or sch.get("ramp") or sch.get("seesaw"):
        return
    if sch.get("seesaw_q") is None and sch.get("max_batch_size") is None:
        for key in ("ramp", "seesaw_q", "max_batch_size"):
            sch.pop(key, None)
        sch["batch_growth"] = []


# Keys that are not part of a sweep's identity: the analysis options (re-run on an existing
# folder with new values), where the folder is, whether plots are drawn, and the grid-size
# guard. Everything else must match for a folder to be resumed.
NON_IDENTITY_KEYS = (
    "analysis",
    "output.dir",
    "output.plots",
    "output.tensorboard",
    "grid.max_cells",
)


def _drop(d: dict, dotted: str) -> None:
    *parents, last = dotted.split(".")
    for part in parents:
        d = d.get(part) if isinstance(d, dict) else None
        if not isinstance(d, dict):
            return
    d.pop(last, None)


def identity_dict(config: dict) -> dict:
    """A resolved config mapping without its :data:`NON_IDENTITY_KEYS`."""
    import copy

    d = copy.deepcopy(config)
    for key in NON_IDENTITY_KEYS:
        _drop(d, key)
    return d


def _fmt(value: Any) -> str:
    text = json.dumps(value, default=str) if not isinstance(value, str) else value
    return text if len(text) <= 40 else text[:37] + "..."


def config_differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """``key: old → new`` for every leaf that differs between two config mappings."""
    out = []
    if isinstance(old, dict) and isinstance(new, dict):
        for key in list(old) + [k for k in new if k not in old]:
            where = f"{prefix}.{key}" if prefix else str(key)
            if key not in new:
                out.append(f"{where}: {_fmt(old[key])} → (absent)")
            elif key not in old:
                out.append(f"{where}: (absent) → {_fmt(new[key])}")
            else:
                out += config_differences(old[key], new[key], where)
    elif isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        for i, (a, b) in enumerate(zip(old, new)):
            out += config_differences(a, b, f"{prefix}.{i}")
    elif old != new:
        out.append(f"{prefix}: {_fmt(old)} → {_fmt(new)}")
    return out


def config_hash(cfg: SweepConfig) -> str:
    """Hash of everything that changes results; the output options are left out so a run
    can be moved or re-plotted without becoming a different sweep."""
    d = config_dict(cfg)
    d.pop("output", None)
    d.pop("analysis", None)
    _drop(d, "grid.max_cells")
    blob = json.dumps(d, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
