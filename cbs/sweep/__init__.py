"""The sweep engine: config -> grid of blocks -> back end -> results store.

Run it as ``python -m cbs.sweep CONFIG.yaml``; from Python::

    from cbs.sweep import load_config, run_sweep
    summary = run_sweep(load_config("configs/nqm_quickstart.yaml", ["output.dir=/tmp/q"]))
"""

from cbs.sweep.config import SweepConfig, config_hash, load_config
from cbs.sweep.runner import run_sweep

__all__ = ["SweepConfig", "config_hash", "load_config", "run_sweep"]
