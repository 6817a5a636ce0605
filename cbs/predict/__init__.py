"""Predict before you sweep: an NQM calibrated from the network itself.

``python -m cbs.predict CONFIG.yaml`` measures the network at its initial parameters
(:mod:`cbs.train.spectrum`: top curvature eigenpairs, bulk density, gradient noise along
each top direction, tr Sigma, the gradient's projections), builds the NQM of those
measurements (:mod:`cbs.predict._calibrate`), anchors its target at one batch size from one
block of real training and forecasts S(B), B_crit and the LR scaling for every optimizer of
the config (:mod:`cbs.predict._forecast`). See :func:`predict` for the Python entry point.
"""

from cbs.predict._calibrate import (
    Calibration,
    OptimizerMap,
    adam_power,
    map_optimizer,
    nqm_from_measurement,
)
from cbs.predict._forecast import (
    Forecast,
    anchor_noise_scale,
    anchor_target,
    effective_batch,
    forecast,
    tuned_steps,
)
from cbs.predict._run import Prediction, PredictOptions, measure_network, predict

__all__ = [
    "Calibration",
    "Forecast",
    "OptimizerMap",
    "PredictOptions",
    "Prediction",
    "adam_power",
    "anchor_noise_scale",
    "anchor_target",
    "effective_batch",
    "forecast",
    "map_optimizer",
    "measure_network",
    "nqm_from_measurement",
    "predict",
    "tuned_steps",
]
