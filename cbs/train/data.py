"""Offline data sets for the training back end, each generated or read locally and hashed.

Every loader returns a :class:`Dataset` whose train/validation split is fixed by
``split_seed``; the hash covers the arrays after the split, so two runs that report the
same hash trained and evaluated on identical numbers.

* ``mnist1d``: MNIST-1D (Greydanus 2020) generated with ``mnist1d.data.make_dataset`` and
  the generation arguments pinned in :data:`MNIST1D_ARGS` (``get_dataset`` is never
  called: it downloads and writes a pickle). Generator train and test parts are pooled
  and re-split by ``split_seed``.
* ``digits``: scikit-learn's bundled 8x8 handwritten digits (1797 images, pixels / 16).
* ``linreg``: noisy linear regression, x ~ N(0, diag(lambda)) with lambda_i = i**-power,
  y = x.w* + noise (see :func:`linreg`).
* ``text``: byte-level corpus made of the documentation strings in
  ``pydoc_data.topics.topics`` (ships with CPython), keys sorted, joined by blank lines,
  UTF-8 encoded; vocabulary = 256 byte values. Non-overlapping windows of
  ``seq_len + 1`` bytes are split train/val by ``split_seed``. The corpus depends on the
  Python version, hence the hash in the manifest.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Literal

import numpy as np

__all__ = [
    "Dataset",
    "MNIST1D_ARGS",
    "load_dataset",
    "mnist1d",
    "digits",
    "linreg",
    "text_corpus",
    "text",
]

Task = Literal["classification", "regression", "lm"]

# Pinned MNIST-1D generation arguments: the package defaults of mnist1d 0.0.2 (the ones
# the paper's data set was made with), written out so that a package update cannot
# silently change the data.
MNIST1D_ARGS = dict(
    num_samples=5000,
    train_split=0.8,
    template_len=12,
    padding=[36, 60],
    scale_coeff=0.4,
    max_translation=48,
    corr_noise_scale=0.25,
    iid_noise_scale=2e-2,
    shear_scale=0.75,
    shuffle_seq=False,
    final_seq_length=40,
    seed=42,
)


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A train/validation split held in host memory.

    Attributes:
      name: data set name.
      task: "classification" (integer labels), "regression" (float targets) or "lm"
        (x = tokens[:-1], y = tokens[1:], both int32 of length seq_len).
      x_train, y_train, x_val, y_val: arrays; examples along axis 0.
      num_outputs: classes, vocabulary size, or 1 for regression.
      sha256: hash of the four arrays (dtype, shape and bytes).
      info: generation facts for the manifest.
    """

    name: str
    task: Task
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    num_outputs: int
    sha256: str
    info: dict

    @property
    def num_train(self) -> int:
        return int(self.x_train.shape[0])

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])


def _hash(*arrays: np.ndarray) -> str:
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _split(
    x: np.ndarray, y: np.ndarray, val_fraction: float, split_seed: int, max_train: int | None = None
):
    n = x.shape[0]
    perm = np.random.default_rng(split_seed).permutation(n)
    n_val = max(1, int(round(val_fraction * n)))
    val, train = perm[:n_val], perm[n_val:]
    if max_train is not None:
        train = train[:max_train]
    return x[train], y[train], x[val], y[val]


def _make(name, task, x, y, val_fraction, split_seed, num_outputs, info, max_train=None) -> Dataset:
    xt, yt, xv, yv = _split(x, y, val_fraction, split_seed, max_train)
    info = dict(
        info,
        num_train=int(xt.shape[0]),
        num_val=int(xv.shape[0]),
        val_fraction=val_fraction,
        split_seed=split_seed,
    )
    return Dataset(name, task, xt, yt, xv, yv, num_outputs, _hash(xt, yt, xv, yv), info)


def mnist1d(
    val_fraction: float = 0.2,
    split_seed: int = 0,
    num_samples: int = 5000,
    max_train: int | None = None,
) -> Dataset:
    """MNIST-1D generated locally: 40-sample signals, 10 classes."""
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    for k, v in dict(MNIST1D_ARGS, num_samples=num_samples).items():
        setattr(args, k, v)
    d = make_dataset(args)
    x = np.concatenate([d["x"], d["x_test"]]).astype(np.float32)
    y = np.concatenate([d["y"], d["y_test"]]).astype(np.int32)
    return _make(
        "mnist1d",
        "classification",
        x[..., None],
        y,
        val_fraction,
        split_seed,
        10,
        dict(
            generator="mnist1d.data.make_dataset", args=dict(MNIST1D_ARGS, num_samples=num_samples)
        ),
        max_train,
    )


def digits(val_fraction: float = 0.2, split_seed: int = 0, max_train: int | None = None) -> Dataset:
    """scikit-learn 8x8 digits (bundled with the package, no download), pixels in [0, 1]."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[..., None]
    y = d.target.astype(np.int32)
    return _make(
        "digits",
        "classification",
        x,
        y,
        val_fraction,
        split_seed,
        10,
        dict(source="sklearn.datasets.load_digits"),
        max_train,
    )


def linreg(
    val_fraction: float = 0.2,
    split_seed: int = 0,
    num_samples: int = 4096,
    dim: int = 64,
    spectrum_power: float = 1.0,
    label_noise: float = 0.1,
    data_seed: int = 0,
    max_train: int | None = None,
) -> Dataset:
    """Noisy linear regression y = x.w* + eps with a power-law input covariance.

    Covariance eigenvalues lambda_i = i**-spectrum_power (i = 1..dim), so lambda_1 = 1
    keeps the largest curvature fixed across powers. w* ~ N(0, I / sum(lambda)), so the
    expected signal variance sum_i lambda_i w_i**2 is 1; eps ~ N(0, label_noise**2). The Bayes risk of the 0.5*(y - y_hat)^2 loss is
    label_noise**2 / 2, so a val_loss target must lie above it.
    """
    rng = np.random.default_rng(data_seed)
    lam = np.arange(1, dim + 1, dtype=np.float64) ** -spectrum_power
    w = rng.standard_normal(dim) / np.sqrt(np.mean(lam) * dim) if dim else np.zeros(0)
    x = rng.standard_normal((num_samples, dim)) * np.sqrt(lam)
    y = x @ w + label_noise * rng.standard_normal(num_samples)
    info = dict(
        num_samples=num_samples,
        dim=dim,
        spectrum_power=spectrum_power,
        label_noise=label_noise,
        data_seed=data_seed,
        bayes_loss=0.5 * label_noise**2,
    )
    return _make(
        "linreg",
        "regression",
        x.astype(np.float32),
        y.astype(np.float32)[:, None],
        val_fraction,
        split_seed,
        1,
        info,
        max_train,
    )


def text_corpus() -> bytes:
    """The byte corpus: pydoc topic help texts, sorted by topic, joined by blank lines."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics)).encode("utf-8")


def text(
    seq_len: int = 64, val_fraction: float = 0.1, split_seed: int = 0, max_train: int | None = None
) -> Dataset:
    """Byte-level language modelling windows of the pydoc corpus (vocabulary 256)."""
    import sys

    corpus = np.frombuffer(text_corpus(), dtype=np.uint8)
    n = corpus.size // (seq_len + 1)
    windows = corpus[: n * (seq_len + 1)].reshape(n, seq_len + 1).astype(np.int32)
    info = dict(
        source="pydoc_data.topics.topics (sorted keys, '\\n\\n'-joined, UTF-8 bytes)",
        corpus_bytes=int(corpus.size),
        corpus_sha256=hashlib.sha256(corpus.tobytes()).hexdigest(),
        python=sys.version.split()[0],
        seq_len=seq_len,
        num_windows=int(n),
    )
    return _make(
        "text",
        "lm",
        windows[:, :-1],
        windows[:, 1:],
        val_fraction,
        split_seed,
        256,
        info,
        max_train,
    )


def load_dataset(name: str, **kwargs) -> Dataset:
    """The data set by name with loader keyword arguments."""
    loaders = dict(mnist1d=mnist1d, digits=digits, linreg=linreg, text=text)
    return loaders[name](**kwargs)
