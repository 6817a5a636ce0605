"""Spreading a block's cells over the local devices.

A block's cells are independent, so the cell axis is the natural one to shard: put the
per-cell arrays on a 1-D mesh over all devices and let ``jit`` partition the vmapped
program. On one device this is a no-op, so back ends call it unconditionally and run
unchanged on a laptop, a GPU or a TPU slice. (Across hosts, the runner shards whole
blocks instead: see ``--shard``.)
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

__all__ = ["cell_mesh", "padded_size", "shard_cells", "unpad"]


def cell_mesh() -> jax.sharding.Mesh:
    # Auto axis: let XLA propagate the cell sharding through the vmapped program (gathers
    # of a replicated data table by a sharded seed index need no annotations).
    return jax.make_mesh(
        (jax.local_device_count(),),
        ("cells",),
        devices=jax.local_devices(),
        axis_types=(jax.sharding.AxisType.Auto,),
    )


def padded_size(n: int, devices: int | None = None) -> int:
    """n rounded up to a multiple of the device count."""
    d = devices or jax.local_device_count()
    return -(-n // d) * d


def shard_cells(tree, n: int):
    """Pads every leaf's leading (cell) axis from n to a multiple of the device count by
    repeating the last cell, and places it sharded along that axis.

    Padding repeats a real cell rather than inserting zeros so that padded lanes run the
    same (finite) arithmetic; their results are dropped by :func:`unpad`.
    """
    devices = jax.local_device_count()
    m = padded_size(n, devices)

    def pad(x):
        x = np.asarray(x)
        if m != n:
            x = np.concatenate([x, np.repeat(x[-1:], m - n, axis=0)], axis=0)
        if devices == 1:
            return jax.device_put(x)
        return jax.device_put(x, NamedSharding(cell_mesh(), PartitionSpec("cells")))

    return jax.tree.map(pad, tree)


def unpad(tree, n: int):
    """The first n cells of every leaf, as NumPy arrays."""
    return jax.tree.map(lambda x: np.asarray(x)[:n], tree)
