"""Data sets, schedules and data order of the training back end (fast, no training)."""

from __future__ import annotations

import numpy as np
import pytest

from cbs.sweep.config import Schedule
from cbs.train import data
from cbs.train.engine import IndexStream
from cbs.train.optimizers import schedule_fn


def test_mnist1d_is_generated_offline_and_deterministic(monkeypatch):
    import mnist1d.data as md

    monkeypatch.setattr(md, "get_dataset", lambda *a, **k: pytest.fail("get_dataset downloads"))
    a = data.mnist1d(num_samples=600)
    b = data.mnist1d(num_samples=600)
    assert a.sha256 == b.sha256
    assert a.x_train.shape == (480, 40, 1) and a.x_val.shape == (120, 40, 1)
    assert set(np.unique(a.y_train)) <= set(range(10))
    assert a.info["args"]["seed"] == 42
    c = data.mnist1d(num_samples=600, split_seed=1)
    assert c.sha256 != a.sha256


def test_digits_split():
    d = data.digits(val_fraction=0.25)
    assert d.num_train + d.x_val.shape[0] == 1797
    assert d.x_train.max() <= 1.0 and d.input_shape == (8, 8, 1)


def test_linreg_noise_floor():
    d = data.linreg(num_samples=4000, dim=16, label_noise=0.2, spectrum_power=1.0)
    assert d.info["bayes_loss"] == pytest.approx(0.02)
    # Least squares on the training set reaches about the Bayes loss on validation.
    w, *_ = np.linalg.lstsq(d.x_train, d.y_train, rcond=None)
    val = 0.5 * np.mean((d.x_val @ w - d.y_val) ** 2)
    assert 0.8 * 0.02 < val < 1.3 * 0.02


def test_text_corpus_is_bytes_and_shifted():
    d = data.text(seq_len=16)
    assert d.num_outputs == 256 and d.x_train.dtype == np.int32
    assert d.x_train.max() < 256
    np.testing.assert_array_equal(d.x_train[:, 1:], d.y_train[:, :-1])
    assert d.info["corpus_sha256"] == data.text(seq_len=16).info["corpus_sha256"]


def test_index_stream_depends_only_on_seed():
    a, b = IndexStream(3, 10), IndexStream(3, 10)
    whole = a.take(35)
    parts = np.concatenate([b.take(7), b.take(13), b.take(15)])
    np.testing.assert_array_equal(whole, parts)
    assert sorted(whole[:10]) == list(range(10))  # epochs are permutations
    assert not np.array_equal(IndexStream(4, 10).take(35), whole)


def test_schedules():
    # values written out from the definition in cbs.sweep.config.Schedule: warm-up (t+1)/w,
    # then the kind's clock s = t - w; decays at s + 0.5, final_lr_fraction from s = horizon
    m = schedule_fn(Schedule(kind="constant", warmup_steps=4), 100)
    assert [float(m(t)) for t in range(5)] == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0])
    m = schedule_fn(Schedule(kind="cosine", final_lr_fraction=0.1), 100)
    cos = lambda s: 0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * (s + 0.5) / 100))  # noqa: E731
    assert [float(m(t)) for t in (0, 50, 99, 100, 500)] == pytest.approx(
        [cos(0), cos(50), cos(99), 0.1, 0.1], rel=1e-6
    )
    m = schedule_fn(Schedule(kind="linear_decay", warmup_steps=10, horizon=100), 1000)
    assert [float(m(t)) for t in (0, 9, 10, 60, 109, 110, 500)] == pytest.approx(
        [0.1, 1.0, 1 - 0.5 / 100, 1 - 50.5 / 100, 1 - 99.5 / 100, 0.0, 0.0], abs=1e-6
    )
    m = schedule_fn(Schedule(kind="cosine", warmup_steps=10), 110)  # default horizon 110 - 10
    assert float(m(109)) == pytest.approx(0.5 * (1 + np.cos(np.pi * 99.5 / 100)), abs=1e-6)
    m = schedule_fn(Schedule(kind="step", boundaries=[10, 20], decay_factor=0.5), 100)
    assert [float(m(t)) for t in (9, 10, 19, 20)] == pytest.approx([1.0, 0.5, 0.5, 0.25])
    m = schedule_fn(Schedule(kind="step", warmup_steps=2, boundaries=[10], decay_factor=0.5), 100)
    assert [float(m(t)) for t in (0, 1, 11, 12)] == pytest.approx([0.5, 1.0, 1.0, 0.5])
    m = schedule_fn(Schedule(kind="piecewise", pieces=[[5, 1.0], [5, 0.3], [1, 0.1]]), 100)
    assert [float(m(t)) for t in (4, 5, 9, 10, 500)] == pytest.approx([1.0, 0.3, 0.3, 0.1, 0.1])
