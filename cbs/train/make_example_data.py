"""Writes the example data sets of ``configs/examples/`` (one per source kind).

    python -m cbs.train.make_example_data [OUT_DIR]      # default: data/examples

All of them hold the same numbers: scikit-learn's bundled 8x8 digits (1797 images,
pixels / 16, float32; labels int64) split 80/20 by ``numpy.random.default_rng(0)``, so
every source kind reports the same content hash in the manifest:

* ``digits.npz``: ``x_train, y_train, x_val, y_val`` (8x8x1 images);
* ``digits_npy/``: the same four arrays as ``.npy`` files (opened memory-mapped);
* ``digits.parquet``: columns ``pixels`` (list of 64 floats), ``label``, ``split``
  (``train``/``val``); the config restores the image shape with ``x_shape: [8, 8, 1]``;
* ``digits_hf/``: a Hugging Face ``DatasetDict`` (``train``, ``validation``; columns
  ``x``, ``label``) written with ``save_to_disk`` (only when ``datasets`` is installed).

The factory example (``configs/examples/user_code.py:two_spirals``) generates its data
when called, so it needs no file. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

__all__ = ["digits_splits", "write_all"]


def digits_splits() -> dict[str, np.ndarray]:
    """The four arrays every example file holds."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[..., None]
    y = d.target.astype(np.int64)
    perm = np.random.default_rng(0).permutation(len(y))
    n_val = round(0.2 * len(y))
    val, train = perm[:n_val], perm[n_val:]
    return {"x_train": x[train], "y_train": y[train], "x_val": x[val], "y_val": y[val]}


def write_all(out: str | Path) -> list[Path]:
    """Writes every example file under ``out``; returns their paths."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from cbs.store import atomic_writer

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    a = digits_splits()
    written = []
    with atomic_writer(out / "digits.npz") as tmp:
        np.savez(tmp, **a)
    written.append(out / "digits.npz")
    (out / "digits_npy").mkdir(exist_ok=True)
    for k, v in a.items():
        with atomic_writer(out / "digits_npy" / f"{k}.npy") as tmp:
            np.save(tmp, v)
    written.append(out / "digits_npy")
    x = np.concatenate([a["x_train"], a["x_val"]]).reshape(-1, 64)
    y = np.concatenate([a["y_train"], a["y_val"]])
    split = ["train"] * len(a["y_train"]) + ["val"] * len(a["y_val"])
    pixels = pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), 64)
    with atomic_writer(out / "digits.parquet") as tmp:
        pq.write_table(pa.table({"pixels": pixels, "label": y, "split": split}), tmp)
    written.append(out / "digits.parquet")
    try:
        import datasets
    except ImportError:
        print(
            "datasets is not installed: skipping digits_hf (pip install 'cbs[hf]')", file=sys.stderr
        )
    else:
        dd = datasets.DatasetDict(
            {
                "train": datasets.Dataset.from_dict({"x": a["x_train"], "label": a["y_train"]}),
                "validation": datasets.Dataset.from_dict({"x": a["x_val"], "label": a["y_val"]}),
            }
        )
        dd.save_to_disk(str(out / "digits_hf"))
        written.append(out / "digits_hf")
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m cbs.train.make_example_data", description=__doc__.split("\n\n")[0]
    )
    p.add_argument(
        "out", nargs="?", default="data/examples", help="folder to write (default: data/examples)"
    )
    args = p.parse_args(argv)
    for path in write_all(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
