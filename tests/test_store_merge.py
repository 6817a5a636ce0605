"""RunStore.merge: the Arrow concatenation equals pandas' concatenation of the parts."""

import numpy as np
import pandas as pd

from cbs.store import RunStore


def _pandas_merge(parts: list[pd.DataFrame]) -> pd.DataFrame:
    return pd.concat([p for p in parts if len(p)], ignore_index=True)


def _write(store: RunStore, parts: dict[str, pd.DataFrame]) -> None:
    for block, df in parts.items():
        store.write_block(block, {"results": df})


def test_merge_equals_pandas_concat_in_block_order(tmp_path):
    rng = np.random.default_rng(0)
    parts = {
        f"b{i}": pd.DataFrame(
            {
                "block_id": [f"b{i}"] * n,
                "steps": rng.integers(0, 100, n),
                # a column that is integer in some parts and float (with NaN) in others
                "lr": rng.random(n) if i % 2 else rng.integers(1, 5, n),
                "reached": rng.random(n) > 0.5,
                "device": ["cpu:cpu"] * n,
            }
        )
        for i, n in enumerate([3, 0, 5, 1])
    }
    parts["b2"].loc[1, "lr"] = np.nan
    store = RunStore(tmp_path)
    _write(store, parts)
    order = ["b0", "b3", "b2", "b1"]  # an integer "lr" part first, then float ones
    assert store.merge(order) == {"results": 9}
    expected = _pandas_merge([parts[b] for b in order])
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "results.parquet"), expected)
