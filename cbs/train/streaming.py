"""Training sets larger than the device: host-gathered chunks, double-buffered.

When the training set exceeds the device budget (``train.device_budget_mb``; default a
quarter of the device memory JAX reports, unlimited where it reports none, as on CPU),
the :class:`~cbs.train.engine.TrainProblem` keeps ``x_train``/``y_train`` on the host (a
``.npy`` folder stays memory-mapped) and every compiled call receives the examples it
will consume:

* the call's index table (``n_seeds x evals_per_call x eval_every x B``, each seed's
  epoch permutations, :class:`~cbs.train.engine.IndexStream`) is drawn exactly as in the
  in-memory path;
* those rows (plus the noise-scale micro-batches) are gathered on the host in table
  order into one chunk ``(x, y)``, and the table is replaced by positions in the chunk,
  which are the same for every call, so one program serves all calls;
* the chunk is cast to the dtype the device would hold and ``jax.device_put``; a
  background thread prepares the next call's chunk while the device runs the current
  one (double buffering: at most two chunks are alive).

Each step then reads ``chunk[position]``, the very values the in-memory path reads with
``x_train[index]``, so both paths produce bit-identical results for the same seed.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cbs.train.engine import IndexStream, TrainProblem

__all__ = ["device_budget_bytes", "should_stream", "ChunkFeeder", "host_batch"]


def device_budget_bytes(budget_mb: float | None) -> float:
    """The byte budget for a device-resident training set: ``budget_mb`` MiB when set,
    else a quarter of the first device's memory (``bytes_limit``), else unlimited."""
    if budget_mb is not None:
        return float(budget_mb) * 2**20
    try:
        stats = jax.devices()[0].memory_stats() or {}
    except Exception:  # noqa: BLE001 - backends without memory stats
        stats = {}
    limit = stats.get("bytes_limit")
    return limit / 4 if limit else float("inf")


def should_stream(x_train: np.ndarray, y_train: np.ndarray, budget_mb: float | None) -> bool:
    """Whether the training set (at the dtypes the device would hold) exceeds the budget."""
    nbytes = sum(
        int(np.prod(a.shape)) * jax.dtypes.canonicalize_dtype(a.dtype).itemsize
        for a in (x_train, y_train)
    )
    return nbytes > device_budget_bytes(budget_mb)


class ChunkFeeder:
    """The per-call inputs ``(idx_table, noise_table, data)`` of one block.

    In-memory problems get index tables into the device-resident training set and
    ``data=None``. Streaming problems get positions into a host-gathered chunk and the
    chunk itself; the next call's chunk is prepared in a background thread.
    """

    prefetch = True  # prepare the next chunk in a background thread (False: on demand; benchmarks)

    def __init__(
        self,
        problem: TrainProblem,
        seeds: Sequence[int],
        per_call: tuple[int, int, int],
        noise=None,
        streams: dict | None = None,
        end: int | None = None,
    ):
        """``per_call = (evals_per_call, eval_every, batch_size)``; ``noise(step)`` gives the
        ``(n_seeds, evals_per_call, num_micro, micro)`` noise-scale indices of the call
        starting at ``step``, or is None. A batch ramp's phase passes the seeds' index
        ``streams`` on from the previous phase and its ``end`` step: steps at or past it
        draw no examples (their table rows are 0), so the examples a cell sees depend only
        on its seed and the samples it has consumed."""
        self.problem, self.seeds, self.noise = problem, list(seeds), noise
        self.k, self.every, self.batch = per_call
        self.end = end
        self.streams = (
            streams
            if streams is not None
            else {s: IndexStream(s, problem.num_train) for s in self.seeds}
        )
        self._pool = (
            concurrent.futures.ThreadPoolExecutor(1)
            if problem.streaming and self.prefetch
            else None
        )
        self._next: tuple[int, concurrent.futures.Future] | None = None
        self._positions = None

    def _indices(self, step: int):
        k, every, b = self.k, self.every, self.batch
        if self.end is None:
            table = np.stack(
                [self.streams[s].take(k * every * b).reshape(k, every, b) for s in self.seeds]
            )
        else:
            live = int(np.clip(self.end - step, 0, k * every))
            table = np.zeros((len(self.seeds), k * every * b), np.int32)
            for i, s in enumerate(self.seeds):
                table[i, : live * b] = self.streams[s].take(live * b)
            table = table.reshape(len(self.seeds), k, every, b)
        ntable = None if self.noise is None else self.noise(step)
        return table, ntable

    def _stage(self, step: int):
        table, ntable = self._indices(step)
        if not self.problem.streaming:
            return jnp.asarray(table), None if ntable is None else jnp.asarray(ntable), None
        rows = table.ravel() if ntable is None else np.concatenate([table.ravel(), ntable.ravel()])
        data = tuple(
            jax.device_put(np.asarray(a[rows], dtype=jax.dtypes.canonicalize_dtype(a.dtype)))
            for a in (self.problem.x_train, self.problem.y_train)
        )
        if self._positions is None:
            pos = np.arange(rows.size, dtype=np.int32)
            self._positions = (
                jnp.asarray(pos[: table.size].reshape(table.shape)),
                None if ntable is None else jnp.asarray(pos[table.size :].reshape(ntable.shape)),
            )
        return self._positions + (data,)

    def get(self, step: int):
        """Inputs of the call that starts at block step ``step`` (calls come in order)."""
        if self._next is None:
            out = self._stage(step)
        elif self._next[0] == step:
            out = self._next[1].result()
        else:
            raise RuntimeError(
                f"calls out of order: prepared step {self._next[0]}, asked for {step}"
            )
        if self._pool is not None:
            # Index streams advance in call order: the background thread is the only
            # caller until the next get() collects its result.
            nxt = step + self.k * self.every
            self._next = (nxt, self._pool.submit(self._stage, nxt))
        return out

    def close(self) -> None:
        if self._pool is not None:
            if self._next is not None:
                self._next[1].cancel()
            self._pool.shutdown(wait=True)
            self._pool = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def host_batch(problem: TrainProblem, idx: np.ndarray):
    """``(idx, None)`` for an in-memory problem; for a streamed one, positions into the
    gathered rows and those rows ``(x, y)`` on the device (same values as indexing)."""
    idx = np.asarray(idx)
    if not problem.streaming:
        return jnp.asarray(idx), None
    rows = idx.ravel()
    data = tuple(
        jax.device_put(np.asarray(a[rows], dtype=jax.dtypes.canonicalize_dtype(a.dtype)))
        for a in (problem.x_train, problem.y_train)
    )
    return jnp.arange(rows.size, dtype=jnp.int32).reshape(idx.shape), data
