"""How a block's cells are laid out inside its one compiled program.

Three layouts of the same per-cell function (``one(state, lr, hp, idx, noise, live)`` in
:class:`cbs.train.engine.BlockRun`), all inside one ``jit`` program:

* ``vmap``: every cell in one vmapped computation (batched matmuls over the cells);
* ``sequential``: ``lax.map`` over the cells, one cell at a time (the single-cell program
  in a loop: what the strongest one-by-one baseline compiles);
* ``grouped:G``: ``lax.map`` over groups of G cells, each group vmapped
  (``lax.map(..., batch_size=G)``; a last partial group is vmapped on its own).

Which is fastest depends on the platform and the block: an accelerator wants the whole
block in one batched computation, a CPU whose small matmuls gain nothing from batching
may prefer the loop. With ``train.layout: probe``, :func:`choose_layout` decides from a
cost model whose rates (seconds of the model's forward pass for the block's cells in each
layout) are measured by a short probe at the block's shapes; the probe and the decision
are recorded in the block's timing table. ``auto`` (the default) is vmap by a fixed rule.

The layouts run the same per-cell arithmetic, but XLA:CPU rounds a batched matmul
differently from a single one at some shapes (~1e-7 relative), so a layout chosen by timing
could make results depend on machine load: that is why ``auto`` does not time anything.
``tests/test_train_layout.py`` checks that every outcome and count recorded is the same
whichever layout runs and every metric agrees to float32 rounding.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["LAYOUTS", "parse_layout", "over_cells", "LayoutProbe", "probe_rates", "choose_layout"]

LAYOUTS = ("auto", "probe", "vmap", "sequential", "grouped")


def parse_layout(text: str) -> tuple[str, int]:
    """``"vmap"``, ``"sequential"``, ``"grouped:G"`` (G >= 1), ``"auto"`` or ``"probe"`` ->
    (mode, G).
    G is 0 for the modes without a group size. Raises ValueError naming what is allowed."""
    mode, _, g = str(text).partition(":")
    if mode not in LAYOUTS or (mode == "grouped") != bool(g):
        raise ValueError(f"{text!r}: allowed auto, probe, vmap, sequential, grouped:G (G >= 1)")
    if mode != "grouped":
        return mode, 0
    if not g.isdigit() or int(g) < 1:
        raise ValueError(f"{text!r}: the group size G of grouped:G must be an integer >= 1")
    return mode, int(g)


def over_cells(layout: str, fn: Callable, args: tuple):
    """``fn`` applied to every cell (leading axis of each leaf of ``args``) in ``layout``;
    the outputs are stacked along that axis in every layout."""
    mode, g = parse_layout(layout)
    if mode in ("auto", "probe"):
        raise ValueError(
            f"{layout!r}: a program runs a concrete layout (vmap, sequential, grouped:G)"
        )
    if mode == "vmap":
        return jax.vmap(fn)(*args)
    return jax.lax.map(lambda a: fn(*a), args, batch_size=g if mode == "grouped" else None)


@dataclasses.dataclass(frozen=True)
class LayoutProbe:
    """Measured seconds of one forward pass of the model at the block's batch size, for
    ``cells`` cells laid out each way (min of interleaved repetitions; compile excluded)."""

    cells: int
    batch_size: int
    seconds: dict  # layout -> seconds for all the cells
    probe_seconds: float  # wall time of the probe itself, its compiles included

    def as_dict(self) -> dict:
        return dict(
            cells=self.cells,
            batch_size=self.batch_size,
            forward_seconds={k: float(v) for k, v in self.seconds.items()},
            probe_seconds=float(self.probe_seconds),
        )


def candidate_layouts(cells: int) -> list[str]:
    """vmap, sequential and grouped layouts with groups of a quarter and a half of the cells
    (powers of two strictly between 1 and the cell count)."""
    out = ["vmap", "sequential"]
    for g in sorted({max(2, cells // 4), max(2, cells // 2)}):
        if 1 < g < cells:
            out.append(f"grouped:{g}")
    return out


def probe_rates(model, params, x_example, cells: int, reps: int = 5) -> LayoutProbe:
    """Times the model's forward pass for ``cells`` cells in each candidate layout.

    The forward pass (the matmuls and activations that dominate a train step of these
    networks) stands in for the step: it compiles in a fraction of the step's time, and the
    ratio between layouts is what the choice needs. ``params``: one cell's params (stacked
    ``cells`` times here); ``x_example``: one batch of inputs.
    """
    t0 = time.perf_counter()
    stacked = jax.tree.map(lambda p: jnp.broadcast_to(p, (cells, *p.shape)), params)
    xs = jnp.broadcast_to(x_example, (cells, *x_example.shape))

    def forward(p, x):
        return jnp.sum(model.apply(p, x))

    fns = {}
    for layout in candidate_layouts(cells):
        fns[layout] = (
            jax.jit(lambda p, x, layout=layout: over_cells(layout, forward, (p, x)))
            .lower(stacked, xs)
            .compile()
        )
        jax.block_until_ready(fns[layout](stacked, xs))  # first run: allocation, warm caches
    best = {k: np.inf for k in fns}
    for _ in range(reps):  # interleaved, so that a load spike hits every layout alike
        for layout, f in fns.items():
            t = time.perf_counter()
            jax.block_until_ready(f(stacked, xs))
            best[layout] = min(best[layout], time.perf_counter() - t)
    return LayoutProbe(cells, int(x_example.shape[0]), best, time.perf_counter() - t0)


# A layout must beat vmap by this factor in the probe to be chosen: the probe is short and
# the machine may be loaded, so a small measured gain is not trusted over the default.
MARGIN = 1.15


def choose_layout(platform: str, cells: int, probe: Callable[[], LayoutProbe] | None) -> tuple:
    """(layout, why, probe or None) for a block of ``cells`` cells on ``platform``.

    Accelerators: vmap (one batched computation fills the device; a loop over cells leaves
    it idle between small kernels). One cell: vmap (nothing to lay out). CPU: the probe's
    fastest layout if it beats vmap by :data:`MARGIN`, else vmap. The layouts compile to
    programs of about the same size (the per-cell function once, in a loop or batched), so
    the cost model compares run time only.
    """
    if platform != "cpu":
        return "vmap", f"{platform}: one batched computation over the cells", None
    if cells <= 1 or probe is None:
        return "vmap", "one cell" if cells <= 1 else "no probe", None
    measured = probe()
    secs = measured.seconds
    best = min(secs, key=secs.get)
    if best != "vmap" and secs[best] * MARGIN < secs["vmap"]:
        why = f"probe: {best} {secs['vmap'] / secs[best]:.2f}x faster than vmap"
        return best, why, measured
    return "vmap", f"probe: no layout beats vmap by {MARGIN}x", measured
