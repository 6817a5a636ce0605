"""The contract between the sweep runner and a back end (NQM, real-network training).

The runner expands a config into :class:`Block` s (one batch size, one optimizer entry;
learning rate, hyperparameters and seed vary across the block's cells), hands blocks to a
:class:`Backend` and stores the :class:`BlockResult` it returns. The runner never knows
which back end it drives; a back end never touches files or the command line.
"""

from __future__ import annotations

import abc
import dataclasses
import importlib
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import numpy as np

__all__ = [
    "HParamSpec",
    "OptimizerSpec",
    "Cell",
    "Block",
    "CellResult",
    "BlockResult",
    "Backend",
    "BACKENDS",
    "get_backend",
]


@dataclasses.dataclass(frozen=True)
class HParamSpec:
    """One optimizer hyperparameter a config may set or sweep (besides the LR)."""

    default: float
    doc: str = ""
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None

    def allowed(self) -> str:
        parts = [
            f"{w} {b}"
            for w, b in ((">=", self.ge), (">", self.gt), ("<=", self.le), ("<", self.lt))
            if b is not None
        ]
        return "a number " + " and ".join(parts) if parts else "a number"

    def admits(self, x: float) -> bool:
        return (
            math.isfinite(x)
            and (self.ge is None or x >= self.ge)
            and (self.gt is None or x > self.gt)
            and (self.le is None or x <= self.le)
            and (self.lt is None or x < self.lt)
        )


@dataclasses.dataclass(frozen=True)
class OptimizerSpec:
    """An optimizer kind a back end implements and the hyperparameters it takes."""

    doc: str
    hparams: Mapping[str, HParamSpec] = dataclasses.field(default_factory=dict)
    # A learning rate at which this kind clearly makes progress on the back end's small test
    # problem (train: a width-16 MLP on digits in 40 steps). The registry-wide tests train
    # every kind at it, so a new optimizer needs no edit outside its registry entry.
    example_lr: float | None = None


@dataclasses.dataclass(frozen=True)
class Cell:
    """One point of the grid: a single training run / NQM trajectory."""

    cell_id: str  # stable hash of the coordinates below
    optimizer: str  # the optimizer entry's name (unique within a config)
    kind: str  # the optimizer kind, a key of Backend.optimizers
    batch_size: int
    lr: float
    hparams: Mapping[str, float]  # every hyperparameter of the kind, defaults filled in
    seed: int


@dataclasses.dataclass(frozen=True)
class Block:
    """Cells a back end evaluates in one compiled, vmapped call."""

    block_id: str
    optimizer: str
    kind: str
    batch_size: int
    cells: tuple[Cell, ...]
    schedule: Any = None  # the optimizer entry's cbs.sweep.config.Schedule
    # the family's quasi-random search (cbs.sweep.search.SearchPlan); None: an LR grid
    search: Any = None

    @property
    def lrs(self) -> np.ndarray:
        return np.array([c.lr for c in self.cells], dtype=np.float64)

    @property
    def seeds(self) -> np.ndarray:
        return np.array([c.seed for c in self.cells], dtype=np.int64)

    def hparam(self, name: str) -> np.ndarray:
        return np.array([c.hparams[name] for c in self.cells], dtype=np.float64)


@dataclasses.dataclass
class CellResult:
    """What a back end measured for one cell.

    ``steps_to_target`` is the first step at which the metric is strictly below the
    target, and NaN exactly when ``reached`` is False (censored by the budget, or
    diverged). ``extra`` holds back-end specific per-cell numbers that become columns
    of results.parquet (e.g. an interpolated step count, a settle step, a noise scale).
    """

    cell_id: str
    reached: bool
    diverged: bool
    steps_to_target: float
    final_metric: float
    best_metric: float
    steps_run: int
    extra: dict[str, float] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class BlockResult:
    """One record per cell, in the block's cell order, plus optional tables.

    ``curves``: long table with at least columns cell_id, step, metric.
    ``tables``: further per-block tables by name (e.g. "tuned" for continuously refined
    hyperparameters, "noise_scale"); the store concatenates each across blocks.
    """

    cells: list[CellResult]
    curves: Any = None  # pandas.DataFrame | None
    tables: dict[str, Any] = dataclasses.field(default_factory=dict)


class Backend(abc.ABC):
    """A way to turn blocks of cells into steps-to-target records.

    Subclasses set the class attributes and implement :meth:`run_blocks`. The
    constructor receives the validated :class:`cbs.sweep.config.SweepConfig`; the back
    end's own section (YAML key = ``name``) is ``config.section``, an instance of
    ``Section``.
    """

    name: ClassVar[str]
    Section: ClassVar[type]  # dataclass of the back end's config section
    optimizers: ClassVar[Mapping[str, OptimizerSpec]]
    metrics: ClassVar[Mapping[str, str]]  # metric name -> description; lower is better
    blocks_per_call: ClassVar[int] = 1  # how many blocks run_blocks may receive at once
    # Whether a block's cells may be evaluated as several sub-blocks whose records, curves
    # and tables are concatenated (False when a block yields block-level tables, e.g. NQM's
    # tuned optimum). Splittable back ends get memory-aware splitting and out-of-memory retry.
    splittable: ClassVar[bool] = False
    # whether one call may hold blocks of several optimizer entries (a back end that batches
    # work across them, e.g. the NQM's LR refinement); otherwise each call holds one entry
    calls_span_optimizers: ClassVar[bool] = False
    adaptive_default: ClassVar[bool] = (
        False  # grid.adaptive.enabled when the config leaves it unset
    )

    # Set by the runner before it calls run_blocks (None: nobody listens). A back end with
    # a host loop calls it while a block runs, as ``progress(block_id, cells_done, detail)``:
    # cells_done in cell equivalents (a finished cell 1, a running one the share of its step
    # budget used), detail a short text for the progress bar ("step 1200/5000, ..."). The
    # runner turns it into the bar or the log (cbs.sweep.progress); a back end never knows.
    # The id may carry a suffix, "<block_id>~<key>", one key per sub-block of a block split
    # for memory (the sub-blocks share the block's id), so their counts add up.
    progress: Callable[[str, float, str], None] | None = None

    def __init__(self, config):
        self.config = config

    @classmethod  # noqa: B027 - an optional hook, empty by default
    def check(cls, config) -> None:
        """Cross-field checks beyond types and bounds; raises ConfigError. No compute."""

    @abc.abstractmethod
    def run_blocks(self, blocks: Sequence[Block]) -> list[BlockResult]:
        """Evaluates the blocks; one BlockResult per block, in order."""

    # "seconds" when block_cost estimates wall seconds (then --dry-run prints a time estimate)
    block_cost_unit: ClassVar[str] = "relative"

    def block_cost(self, block: Block) -> float:
        """Estimated relative compute of a block, for balancing shards (no compute here).

        Default: cells x steps budget x batch size (examples processed if no cell stops early).
        """
        return (
            float(len(block.cells)) * float(self.config.budget.max_steps) * float(block.batch_size)
        )

    def cell_memory_bytes(self, block: Block) -> int | None:
        """Device memory one more vmapped cell of ``block`` needs, or None when unknown (then
        the block is never split ahead of time). Called only when a memory budget is set."""
        return None

    def manifest(self) -> dict[str, Any]:
        """Extra facts for the run manifest (dataset hashes, block layout, ...)."""
        return {}

    def reference_curves(self, batch_sizes: np.ndarray) -> dict[str, np.ndarray]:
        """Named steps-vs-batch-size reference curves for plots (e.g. a lower bound)."""
        return {}


BACKENDS = {
    "nqm": "cbs.nqm.backend:NQMBackend",
    "train": "cbs.train.backend:TrainBackend",
}


def get_backend(name: str) -> type[Backend]:
    """The back-end class for a registered name, or for a ``package.module:Class`` path
    (so a researcher can plug in a back end without editing cbs)."""
    module, _, attr = BACKENDS.get(name, name).partition(":")
    return getattr(importlib.import_module(module), attr)
