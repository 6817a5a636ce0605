"""The streaming path (training set on the host, gathered per compiled call, prefetched in
a background thread) must train bit-for-bit like the device-resident path."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from cbs.train.backend import TrainBackend
from cbs.train.direct import make_block, make_config
from cbs.train.streaming import ChunkFeeder, device_budget_bytes, should_stream

warnings.filterwarnings("ignore", message="Some donated buffers were not usable")
TINY = dict(dataset="digits", model="mlp", width=16, depth=1)


def _run(budget, block, **train):
    cfg = make_config(
        dict(TINY, device_budget_mb=budget, **train),
        metric="val_loss",
        value=1e-3,
        max_steps=60,
        eval_every=10,
    )
    be = TrainBackend(cfg)
    # steps_per_call 20 with eval_every 10: 3 calls, so the prefetched chunk is used.
    be.section = be.section.__class__(**{**be.section.__dict__, "steps_per_call": 20})
    return be, be.run_blocks([block])[0]


def test_streaming_equals_in_memory_to_the_last_bit():
    block = make_block("momentum", 32, [0.03, 0.3], hparams=dict(momentum=[0.9]), seeds=(0, 1))
    mem_be, mem = _run(None, block, noise_scale=dict(enabled=True, micro_batch=8, num_micro=4))
    st_be, st = _run(0, block, noise_scale=dict(enabled=True, micro_batch=8, num_micro=4))
    assert not mem_be.problem.streaming and st_be.problem.streaming
    assert isinstance(st_be.problem.x_train, np.ndarray)  # stayed on the host
    cols = ["cell_id", "step", "val_loss", "val_error", "train_loss"]
    a = mem.curves.sort_values(["cell_id", "step"])[cols].reset_index(drop=True)
    b = st.curves.sort_values(["cell_id", "step"])[cols].reset_index(drop=True)
    assert len(a) == 4 * 7
    assert list(a.cell_id) == list(b.cell_id)
    num = cols[1:]
    np.testing.assert_array_equal(
        a[num].to_numpy(float), b[num].to_numpy(float)
    )  # exact, not allclose
    na, nb = (r.tables["noise_scale"].sort_values(["cell_id", "step"]) for r in (mem, st))
    np.testing.assert_array_equal(
        na[["grad_sq", "trace_sigma"]].to_numpy(), nb[["grad_sq", "trace_sigma"]].to_numpy()
    )
    for x, y in zip(mem.cells, st.cells):
        assert (x.final_metric, x.steps_run) == (y.final_metric, y.steps_run)


def test_feeder_serves_the_same_examples_with_and_without_prefetch():
    """The chunk a streamed call receives, read through its position table, is exactly
    the in-memory index table applied to the training set, call after call."""
    cfg = make_config(dict(TINY, device_budget_mb=0), max_steps=60, eval_every=10)
    streamed = TrainBackend(cfg).problem
    cfg2 = make_config(TINY, max_steps=60, eval_every=10)
    resident = TrainBackend(cfg2).problem
    f_s = ChunkFeeder(streamed, [0, 5], (2, 10, 16))
    f_m = ChunkFeeder(resident, [0, 5], (2, 10, 16))
    xt = np.asarray(resident.x_train)
    for step in (0, 20, 40):
        pos, _, (xs, _ys) = f_s.get(step)
        idx, _, data = f_m.get(step)
        assert data is None
        np.testing.assert_array_equal(np.asarray(xs)[np.asarray(pos)], xt[np.asarray(idx)])
    with pytest.raises(RuntimeError, match="out of order"):
        f_s.get(0)
    f_s.close()


def test_budget_rule():
    x = np.zeros((1000, 256), np.float64)  # held as float32 on the device: 1 MB
    y = np.zeros(1000, np.int64)  # int32: 4 kB
    assert not should_stream(x, y, 2.0) and should_stream(x, y, 0.5) and should_stream(x, y, 0)
    assert device_budget_bytes(3) == 3 * 2**20


def test_streaming_exact_crossing_matches_in_memory():
    """A reachable target: the exact-crossing replay re-reads the call's streamed chunk,
    so the recorded first crossings equal the in-memory ones."""
    block = make_block("adam", 32, [1e-2, 3e-2], seeds=(0,))
    out = []
    for budget in (None, 0):
        cfg = make_config(
            dict(TINY, device_budget_mb=budget),
            metric="val_error",
            value=0.5,
            max_steps=60,
            eval_every=10,
        )
        out.append(TrainBackend(cfg).run_blocks([block])[0])
    for a, b in zip(*(r.cells for r in out)):
        assert a.reached == b.reached and a.steps_run == b.steps_run
        assert (a.steps_to_target, a.extra) == (b.steps_to_target, b.extra) or not a.reached
    assert any(c.reached and c.extra.get("crossing_exact") == 1 for c in out[0].cells)
