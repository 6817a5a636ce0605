"""What parts that prove what they hold cost: writing, verifying and merging a run folder's
parts with the integrity record (cbs.store) against the same parts written and merged plainly.

    python benchmarks/part_integrity.py [--blocks 76] [--rows 100] [--repeats 3]

Baseline ("plain"): the store's previous path, pandas' to_parquet bytes written atomically,
resume = listing the parts, merge = pyarrow read + concat + write. Ours: part_bytes (with
digest), resume = finished_blocks() in a fresh RunStore (every part read and its digest
checked), merge = RunStore.merge (verified read + concat + write). Best of --repeats.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from cbs.store import RESULTS, RunStore, _parquet_bytes, atomic_write_bytes


def _frame(block: str, rows: int, rng) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "block_id": [block] * rows,
            "cell_id": [f"{block}-{i}" for i in range(rows)],
            "batch_size": rng.integers(1, 2**20, rows),
            "lr": rng.random(rows),
            "steps_to_target": rng.random(rows) * 1e4,
            "reached": rng.random(rows) > 0.3,
            "device_kind": ["cpu:cpu"] * rows,
        }
    )


def _best(fn, repeats: int) -> float:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return min(out)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--blocks", type=int, default=76)
    p.add_argument("--rows", type=int, default=100)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    rng = np.random.default_rng(0)
    frames = {f"b{i:04d}": _frame(f"b{i:04d}", args.rows, rng) for i in range(args.blocks)}
    with tempfile.TemporaryDirectory() as tmp:
        plain, ours = Path(tmp) / "plain", Path(tmp) / "ours"

        def write_plain():
            for b, df in frames.items():
                atomic_write_bytes(plain / "parts" / RESULTS / f"{b}.parquet", _parquet_bytes(df))

        def write_ours():
            store = RunStore(ours, config_hash="0123456789abcdef")
            for b, df in frames.items():
                store.write_block(b, {RESULTS: df})

        def resume_plain():
            {q.stem for q in (plain / "parts" / RESULTS).glob("*.parquet")}

        def resume_ours():
            assert len(RunStore(ours, config_hash="0123456789abcdef").finished_blocks()) == len(
                frames
            )

        def merge_plain():
            files = sorted((plain / "parts" / RESULTS).glob("*.parquet"))
            merged = pa.concat_tables([pq.read_table(f) for f in files])
            sink = pa.BufferOutputStream()
            pq.write_table(merged, sink)
            atomic_write_bytes(plain / "results.parquet", sink.getvalue().to_pybytes())

        def merge_ours():
            RunStore(ours, config_hash="0123456789abcdef").merge(sorted(frames))

        rows = [
            ("write all parts", _best(write_plain, args.repeats), _best(write_ours, args.repeats)),
            ("resume check", _best(resume_plain, args.repeats), _best(resume_ours, args.repeats)),
            ("merge", _best(merge_plain, args.repeats), _best(merge_ours, args.repeats)),
        ]
    print(f"{args.blocks} blocks x {args.rows} rows, best of {args.repeats}")
    print(f"{'step':<18} {'plain s':>9} {'verified s':>11} {'ratio':>7}")
    for name, a, b in rows:
        print(f"{name:<18} {a:>9.3f} {b:>11.3f} {b / a:>7.2f}")


if __name__ == "__main__":
    main()
