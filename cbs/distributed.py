"""One sweep, many processes: ``jax.distributed`` start-up, shard choice and barriers.

A sweep started as N processes of one JAX job (``srun -n N``, the ``JAX_*`` environment
variables, or ``--coordinator``/``--num-processes``/``--process-id``) initializes
``jax.distributed`` and each process takes shard ``process_index / process_count`` of the
blocks. Blocks are independent, so no collective runs between processes; the coordination
service is used only for two barriers: all processes finish computing before one of them
merges, and none exits (taking the coordinator down) while another still works.
"""

from __future__ import annotations

import dataclasses
import os

__all__ = ["ProcessSpec", "detect", "initialize", "barrier", "shutdown"]

# A sweep's processes may finish hours apart (shards of unequal luck with early stopping),
# so barriers wait long; the int32-millisecond limit of the coordination service is ~24 days.
BARRIER_TIMEOUT_S = 7 * 24 * 3600


@dataclasses.dataclass(frozen=True)
class ProcessSpec:
    """How this process joins a multi-process job; None fields are found by JAX (Slurm)."""

    source: str  # "flags", "env", "slurm"
    coordinator: str | None
    num_processes: int | None
    process_id: int | None


def _int_env(env, key: str) -> int | None:
    value = env.get(key)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{key}: got {value!r}; allowed: an integer") from None


def detect(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    env=None,
) -> ProcessSpec | None:
    """The multi-process job this process belongs to, or None for a single-process run.

    Precedence: command-line flags, then ``JAX_COORDINATOR_ADDRESS`` with
    ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``, then a Slurm job step with more than one
    task (``srun``; ``SLURM_STEP_NUM_TASKS``/``SLURM_NTASKS`` > 1). A Slurm *array* task is
    one process of its own (``SLURM_NTASKS`` = 1): it is sharded by ``--shard``, not here.

    Raises:
      ValueError: flags or variables are given partially or are out of range (one line).
    """
    env = os.environ if env is None else env
    flags = (coordinator, num_processes, process_id)
    if any(f is not None for f in flags):
        if any(f is None for f in flags):
            raise ValueError(
                "--coordinator, --num-processes and --process-id: got only some of them; "
                "allowed: all three together (or none)"
            )
        _check(
            coordinator,
            num_processes,
            process_id,
            "--coordinator",
            "--num-processes",
            "--process-id",
        )
        return ProcessSpec("flags", coordinator, num_processes, process_id)
    addr = env.get("JAX_COORDINATOR_ADDRESS")
    n, i = _int_env(env, "JAX_NUM_PROCESSES"), _int_env(env, "JAX_PROCESS_ID")
    if addr or n is not None or i is not None:
        if not addr or n is None or i is None:
            raise ValueError(
                "JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID: got only some of "
                "them; allowed: all three together (or none)"
            )
        _check(addr, n, i, "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")
        return ProcessSpec("env", addr, n, i)
    tasks = _int_env(env, "SLURM_STEP_NUM_TASKS") or _int_env(env, "SLURM_NTASKS")
    if env.get("SLURM_JOB_ID") and env.get("SLURM_STEP_ID") is not None and tasks and tasks > 1:
        return ProcessSpec("slurm", None, None, None)
    return None


def _check(addr: str, n: int, i: int, addr_name: str, n_name: str, i_name: str) -> None:
    host, _, port = addr.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{addr_name}: got {addr!r}; allowed: host:port with a port in 1..65535")
    if n < 1:
        raise ValueError(f"{n_name}: got {n}; allowed: an integer >= 1")
    if not 0 <= i < n:
        raise ValueError(f"{i_name}: got {i}; allowed: an integer in 0..{n - 1} ({n_name} = {n})")


def initialize(spec: ProcessSpec) -> tuple[int, int]:
    """Initializes ``jax.distributed`` for ``spec``; returns (process_index, process_count).

    Must run before any JAX computation in this process.
    """
    import jax

    kw = dict(shutdown_timeout_seconds=3600)
    if spec.source == "slurm":
        jax.distributed.initialize(cluster_detection_method="slurm", **kw)
    else:
        # On CPU each process contributes its own host devices; local_device_ids keeps JAX
        # from assuming one device per process on GPU machines where that is not wanted.
        jax.distributed.initialize(
            coordinator_address=spec.coordinator,
            num_processes=spec.num_processes,
            process_id=spec.process_id,
            **kw,
        )
    return jax.process_index(), jax.process_count()


def _client():
    from jax._src import distributed as jd  # the public API offers no plain (device-free) barrier

    return jd.global_state.client


def barrier(name: str, timeout_s: float = BARRIER_TIMEOUT_S) -> None:
    """Waits until every process of the job reached ``barrier(name)``; no-op when alone."""
    client = _client()
    if client is None:
        return
    client.wait_at_barrier(f"cbs:{name}", int(min(timeout_s * 1000, 2**31 - 1)))


def shutdown() -> None:
    import jax

    if _client() is not None:
        jax.distributed.shutdown()
