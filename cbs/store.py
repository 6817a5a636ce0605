"""The results store: one folder per sweep, written crash-safely.

Layout of a run folder::

    config.yaml              resolved config (what was actually run)
    manifest.json            config hash, versions, device, host, start/end times
    parts/<table>/<block>.parquet   one file per finished block and table
    results.parquet          one row per cell (merged from parts when the sweep ends)
    curves.parquet, tuned.parquet, reference.parquet, ...   other tables, same rule

Every file is written to a temporary name and renamed into place, so a crash (even
``kill -9``) loses at most the block being computed; a block is finished exactly when
its results part exists. Readers use :func:`read_table`, which prefers the merged file
and otherwise concatenates the parts, so an interrupted sweep can be analysed too.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

__all__ = ["RunStore", "read_table", "read_manifest", "read_config", "atomic_write_bytes"]

RESULTS = "results"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Writes ``data`` to ``path`` so that readers see the old file or the new one, never a torn one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _parquet_bytes(df: pd.DataFrame) -> bytes:
    import io
    buf = io.BytesIO()
    df.to_parquet(buf, index=False)
    return buf.getvalue()


def read_table(run_dir: str | Path, name: str) -> pd.DataFrame | None:
    """A table of a run folder (merged file, else the concatenated parts); None if absent."""
    run_dir = Path(run_dir)
    merged = run_dir / f"{name}.parquet"
    # The merged file is written only once every block is finished (and rewritten at
    # each later merge), so when it exists it is complete; otherwise use the parts.
    if merged.exists():
        return pd.read_parquet(merged)
    parts_dir = run_dir / "parts" / name
    parts = sorted(parts_dir.glob("*.parquet")) if parts_dir.is_dir() else []
    if not parts:
        return None
    frames = [f for f in (pd.read_parquet(p) for p in parts) if len(f)]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def read_manifest(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / "manifest.json"
    return json.loads(path.read_text()) if path.exists() else {}


def read_config(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / "config.yaml"
    return yaml.safe_load(path.read_text()) if path.exists() else {}


class RunStore:
    """Writes one sweep's folder. Owned by the runner; back ends never see it."""

    def __init__(self, run_dir: str | Path):
        self.dir = Path(run_dir)

    # -- identity -------------------------------------------------------------------
    def existing_hash(self) -> str | None:
        return read_manifest(self.dir).get("config_hash")

    def initialise(self, config: dict, manifest: dict) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self.dir / "config.yaml", yaml.safe_dump(config, sort_keys=False).encode())
        self.write_manifest(manifest)

    def write_manifest(self, manifest: dict) -> None:
        atomic_write_bytes(self.dir / "manifest.json",
                           json.dumps(manifest, indent=2, sort_keys=True, default=str).encode())

    # -- blocks ---------------------------------------------------------------------
    def finished_blocks(self) -> set[str]:
        parts = self.dir / "parts" / RESULTS
        return {p.stem for p in parts.glob("*.parquet")} if parts.is_dir() else set()

    def write_block(self, block_id: str, tables: dict[str, pd.DataFrame]) -> None:
        """Writes a finished block's tables; the results part goes last, so its presence
        means every other part of the block is complete."""
        for name, df in tables.items():
            if name != RESULTS and df is not None:
                atomic_write_bytes(self.dir / "parts" / name / f"{block_id}.parquet", _parquet_bytes(df))
        atomic_write_bytes(self.dir / "parts" / RESULTS / f"{block_id}.parquet", _parquet_bytes(tables[RESULTS]))

    def table_names(self) -> list[str]:
        parts = self.dir / "parts"
        return sorted(p.name for p in parts.iterdir() if p.is_dir()) if parts.is_dir() else []

    def write_table(self, name: str, df: pd.DataFrame) -> None:
        atomic_write_bytes(self.dir / f"{name}.parquet", _parquet_bytes(df))

    def merge(self, order: Iterable[str] | None = None) -> dict[str, int]:
        """Writes each table's merged file from its parts (rows in block order); returns row counts.

        Parts are kept: they are the resume state. The merged files are a convenience
        for pandas users and are rewritten at every merge.
        """
        counts = {}
        rank = {b: i for i, b in enumerate(order)} if order is not None else None
        for name in self.table_names():
            files = sorted((self.dir / "parts" / name).glob("*.parquet"),
                           key=lambda p: (rank.get(p.stem, len(rank)) if rank else 0, p.stem))
            frames = [pd.read_parquet(p) for p in files]
            frames = [f for f in frames if len(f)]
            df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
            self.write_table(name, df)
            counts[name] = len(df)
        return counts
