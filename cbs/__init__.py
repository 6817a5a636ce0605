"""cbs: measure steps-to-target against batch size and extract the critical batch size.

The public surface, for notebooks and scripts::

    import cbs
    res = cbs.run("configs/nqm_quickstart.yaml", overrides={"grid.batch_sizes": [4, 64, 1024]})
    res.cbs            # B_crit, B*, S_min, E_min per optimizer (pandas), with intervals
    res.fits["sgd_p0"] # the CriticalBatchSizeFit of one optimizer
    res.results        # one row per cell
    cbs.load("runs/nqm_quickstart")   # an existing run folder

* :func:`run`, :func:`load`, :class:`Results` -- the sweep and its analysis as objects.
* :class:`CbsError` and its subclasses :class:`ConfigError`, :class:`AnalysisError`,
  :class:`RunFolderError` -- everything a user can fix, with a message naming what and how.
* The building blocks are subpackages: :mod:`cbs.nqm` (the exact NQM), :mod:`cbs.analysis`
  (fits from any table), :mod:`cbs.train`, :mod:`cbs.sweep`.
"""

from cbs.errors import AnalysisError, CbsError, ConfigError, RunFolderError

__version__ = "0.1.0"

__all__ = [
    "run",
    "load",
    "Results",
    "CbsError",
    "ConfigError",
    "AnalysisError",
    "RunFolderError",
    "__version__",
]


def __getattr__(name: str):
    # run / load / Results import JAX and pandas; `import cbs` stays light until they are used.
    if name in ("run", "load", "Results"):
        from cbs import api

        return getattr(api, name)
    raise AttributeError(f"module 'cbs' has no attribute {name!r}")
