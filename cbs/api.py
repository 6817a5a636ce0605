"""The notebook API: run a sweep and get its tables and critical-batch-size fit as objects.

:func:`run` is ``python -m cbs.sweep`` without the command line: the same validation (bad
input raises a :class:`cbs.errors.ConfigError` naming the key, before any compute), the same
run folder, and the same resume (finished blocks are never redone). :func:`load` opens an
existing run folder. Both return a :class:`Results`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd

    from cbs.analysis import CriticalBatchSizeFit, RunAnalysis
    from cbs.sweep.config import SweepConfig
    from cbs.sweep.runner import SweepSummary

__all__ = ["Results", "run", "load"]


@dataclasses.dataclass
class Results:
    """A run folder's tables and its CBS analysis.

    Attributes:
        out_dir: the run folder.
        results: one row per cell (``results.parquet``): grid coordinates, steps to target,
            reached / censored / diverged, provenance.
        analysis: the :class:`cbs.analysis.RunAnalysis` (fits per optimizer, steps tables,
            report text), or None when the sweep is unfinished or ``analyze=False``.
        sweep: what :func:`run` did (cells computed, resumed, seconds); None from :func:`load`.
    """

    out_dir: Path
    results: pd.DataFrame
    analysis: RunAnalysis | None = None
    sweep: SweepSummary | None = None

    @property
    def cbs(self) -> pd.DataFrame:
        """One row per optimizer: S_min, E_min, B_crit, B* and the knee with intervals
        (``cbs.parquet``)."""
        self._need_analysis()
        return self.analysis.summary

    @property
    def fits(self) -> dict[str, CriticalBatchSizeFit]:
        """The :class:`cbs.analysis.CriticalBatchSizeFit` of each optimizer."""
        self._need_analysis()
        return self.analysis.fits

    @property
    def steps(self) -> pd.DataFrame:
        """Best steps to target per (optimizer, batch size), seeds combined."""
        self._need_analysis()
        return self.analysis.per_batch

    def table(self, name: str) -> pd.DataFrame | None:
        """Another table of the run folder by name (``curves``, ``tuned``, ``reference``,
        ``noise_scale``, ...); None if the run has none."""
        from cbs.store import read_table

        return read_table(self.out_dir, name)

    def __str__(self) -> str:
        head = self.sweep.line() if self.sweep is not None else f"run folder {self.out_dir}"
        return head + ("\n" + self.analysis.text if self.analysis is not None else "")

    def _need_analysis(self) -> None:
        if self.analysis is None:
            from cbs.errors import AnalysisError

            raise AnalysisError(
                f"{self.out_dir} has no analysis (unfinished sweep, or analyze=False)"
            )


def _plain(where: str, value: Any) -> Any:
    """``value`` with NumPy scalars and arrays made Python numbers and lists (recursively
    through lists, tuples and mappings); anything that is not a YAML value is a ConfigError
    naming ``where``."""
    import numpy as np

    from cbs.errors import ConfigError

    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise ConfigError(where, k, "allowed: string keys in a mapping")
            out[k] = _plain(f"{where}.{k}" if where else k, v)
        return out
    if isinstance(value, (list, tuple)):
        return [_plain(f"{where}[{i}]", v) for i, v in enumerate(value)]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise ConfigError(
        where,
        value,
        "allowed: a YAML value (number, string, true/false, null, or a list or mapping of "
        "them; NumPy scalars and arrays are accepted)",
    )


def _override_text(key: Any, value: Any) -> str:
    from cbs.errors import ConfigError

    if not isinstance(key, str) or not key:
        raise ConfigError("overrides", key, "allowed: dotted key strings such as 'grid.seeds'")
    value = _plain(key, value)
    # JSON is YAML, so a Python value becomes exactly the text a command-line override holds
    try:
        return f"{key}={json.dumps(value, allow_nan=False)}"
    except ValueError:  # NaN or infinity: JSON has no spelling for them, no key allows them
        raise ConfigError(key, value, "a finite number is required") from None


def run(
    config: str | Path | Mapping,
    overrides: Mapping[str, Any] | None = None,
    output_dir: str | Path | None = None,
    *,
    analyze: bool = True,
    progress: bool = False,
) -> Results:
    """Runs (or resumes) a sweep and analyzes it.

    Args:
        config: a YAML path, or the config as a mapping (the same keys as the YAML).
        overrides: dotted keys to values, as on the command line
            (``{"grid.batch_sizes": [8, 16, 32], "target.value": 0.02}``).
        output_dir: the run folder (default: the config's ``output.dir``).
        analyze: run the CBS analysis at the end (writing cbs.json, plots and report.md as
            the command line does, when ``output.plots`` is on).
        progress: show a progress bar.

    Returns:
        :class:`Results`. A second call with the same config resumes: nothing is recomputed.

    Raises:
        cbs.errors.ConfigError: invalid config, or a ``config``, ``overrides`` or
            ``output_dir`` of the wrong type, naming the key and the value (before any
            compute). NumPy scalars and arrays are accepted wherever a value is.
        cbs.errors.RunFolderError: ``output_dir`` holds a different sweep.

    Example:
        >>> import cbs, tempfile
        >>> cfg = {"name": "demo", "backend": "nqm",
        ...        "grid": {"batch_sizes": [4, 16, 64, 256, 1024, 4096],
        ...                 "learning_rates": {"log10_min": -3, "log10_max": 0.3, "num": 12},
        ...                 "optimizers": [{"kind": "sgd"}]},
        ...        "target": {"metric": "risk", "value": 0.05}, "budget": {"max_steps": 10**6},
        ...        "nqm": {"dim": 100}}
        >>> out = tempfile.mkdtemp()
        >>> res = cbs.run(cfg, overrides={"output.plots": False}, output_dir=out)
        >>> res.sweep.computed_cells, len(res.results)
        (72, 72)
        >>> again = cbs.run(cfg, overrides={"output.plots": False}, output_dir=out)
        >>> again.sweep.computed_cells, again.sweep.skipped_cells
        (0, 72)
        >>> bool(res.fits["sgd"].b_crit > 0)
        True
    """
    from cbs.errors import ConfigError
    from cbs.sweep.config import load_config
    from cbs.sweep.runner import run_sweep

    if overrides is not None and not isinstance(overrides, Mapping):
        raise ConfigError(
            "overrides",
            overrides,
            "allowed: a mapping of dotted keys to values, e.g. {'grid.seeds': [0, 1]}",
        )
    texts = [_override_text(k, v) for k, v in (overrides or {}).items()]
    if output_dir is not None:
        if not isinstance(output_dir, (str, os.PathLike)):
            raise ConfigError("output_dir", output_dir, "allowed: a folder path")
        texts.append(_override_text("output.dir", os.fspath(output_dir)))
    if isinstance(config, Mapping):
        source = _plain("", config)
    elif isinstance(config, (str, os.PathLike)):
        source = Path(config)
    else:
        raise ConfigError(
            "config", config, "allowed: a YAML file path, or a mapping of keys to values"
        )
    cfg = load_config(source, texts)
    summary = run_sweep(cfg, progress=progress, log=lambda _msg: None)
    results = load(summary.out_dir, analyze=analyze and summary.complete, _config=cfg)
    results.sweep = summary
    return results


def load(
    run_dir: str | Path, *, analyze: bool = True, _config: SweepConfig | None = None
) -> Results:
    """Opens a run folder (finished or not): its results table and, by default, its analysis.

    Example:
        >>> import cbs
        >>> cbs.load("no/such/folder")
        Traceback (most recent call last):
        ...
        cbs.errors.AnalysisError: run folder 'no/such/folder' does not exist
    """
    from cbs.analysis import analyze_run
    from cbs.analysis._tables import check_run_dir
    from cbs.store import read_table

    run_dir = check_run_dir(run_dir)
    results = read_table(run_dir, "results")
    analysis = None
    if analyze:
        plots = _config.output.plots if _config is not None else None
        analysis = analyze_run(run_dir, plots=plots)
    return Results(out_dir=run_dir, results=results, analysis=analysis)
