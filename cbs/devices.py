"""Platform-based defaults: what the local devices are and how work is spread over them.

Chosen from the JAX platform of this process (cpu, gpu, tpu), not from the machine's core
count: on a GPU the device parallelizes a program itself, so host threads only add
contention; on CPU, XLA's loops run on one core each, so the NQM spreads configurations
over as many threads as this process may use (its CPU affinity, which honours Slurm's
``--cpus-per-task`` and ``taskset``, unlike ``os.cpu_count()``).
"""

from __future__ import annotations

import os

__all__ = ["platform", "usable_cpus", "nqm_chunk", "nqm_threads", "defaults"]


def platform() -> str:
    import jax

    return jax.default_backend()


def usable_cpus() -> int:
    """CPU cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def nqm_chunk() -> int:
    """NQM configurations vmapped together: small on CPU (stays in cache), wide on
    accelerators (fills the device)."""
    return 4 if platform() == "cpu" else 64


def nqm_threads() -> int:
    """Parallel host threads over NQM configuration parts: one per usable core on CPU, one
    on an accelerator (the device runs the parts' work in parallel already)."""
    return usable_cpus() if platform() == "cpu" else 1


def defaults() -> dict[str, object]:
    """The platform defaults in force (for the manifest and ``python -m cbs.doctor``)."""
    return {
        "platform": platform(),
        "nqm_chunk": nqm_chunk(),
        "nqm_threads": nqm_threads(),
        "nqm_dtype": "float64 (exact risk; needs x64)",
        "train_dtype": "float32",
        "usable_cpus": usable_cpus(),
    }
