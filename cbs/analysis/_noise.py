"""The gradient noise scale a sweep measured, per optimizer and batch size.

The train back end's ``noise_scale`` table (``train.noise_scale.enabled``) holds, per cell
and evaluation, B_simple = tr(Σ) / |G|² from EMAs of unbiased estimates of tr(Σ) and |G|²
over micro-batches (McCandlish et al. 2018, appendix A). The noise scale changes along
training, so it is read where the steps-to-target are read: at each cell's last
evaluation (where it reached the target, or its budget ended), then the median over the
cells of a batch size that reached the target (all non-diverged cells when none did).
B_noise = tr(HΣ) / (G^T H G) needs Hessian products and is not measured; B_simple is the
estimate of it that McCandlish et al. compare with B_crit.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

__all__ = ["noise_per_batch"]


def noise_per_batch(results: pd.DataFrame, noise: pd.DataFrame | None) -> pd.DataFrame | None:
    """Per (optimizer, batch size): ``b_simple`` (median over cells, see the module doc),
    ``n_cells`` used and ``at`` ("target" or "last evaluation"); None without measurements."""
    if noise is None or not len(noise) or "b_simple" not in noise:
        return None
    last = noise.sort_values("step", kind="stable").groupby("cell_id", sort=False).tail(1)
    last = last[np.isfinite(last["b_simple"].to_numpy(np.float64))]
    cols = ["cell_id", "optimizer", "batch_size", "reached", "diverged"]
    cells = results[[c for c in cols if c in results]].drop_duplicates("cell_id")
    m = last.merge(cells, on="cell_id", how="inner")
    if not len(m):
        return None
    rows = []
    for (opt, b), g in m.groupby(["optimizer", "batch_size"], sort=True):
        ok = g[g["reached"].astype(bool)] if "reached" in g else g
        at = "target"
        if not len(ok):
            ok = g[~g["diverged"].astype(bool)] if "diverged" in g else g
            at = "last evaluation"
        if not len(ok):
            continue
        rows.append(
            dict(
                optimizer=opt,
                batch_size=int(b),
                b_simple=float(np.median(ok["b_simple"].to_numpy(np.float64))),
                n_cells=len(ok),
                at=at,
            )
        )
    return pd.DataFrame(rows) if rows else None
