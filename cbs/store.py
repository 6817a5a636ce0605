"""The results store: one folder per sweep, written crash-safely.

Layout of a run folder::

    config.yaml              resolved config (what was actually run)
    manifest.json            config hash, versions, device, block layout and costs; created once
                             (exclusively), rewritten only by the one merge, under merge.lock
    sessions/<id>.json       one record per process that ran (shard, host, pid, times, measured
                             block seconds); each written only by its own process
    parts/<table>/<block>.parquet   one file per finished block and table
    results.parquet          one row per cell (merged from parts when the sweep ends)
    curves.parquet, tuned.parquet, reference.parquet, ...   other tables, same rule

Every file is written to a temporary name and renamed into place, so a crash (even
``kill -9``) loses at most the block being computed; a block is finished exactly when
its results part exists. Readers use :func:`read_table`, which prefers the merged file
and otherwise concatenates the parts, so an interrupted sweep can be analysed too.

Concurrency: any number of processes (shards, or identical copies) may work on one folder
at once. No shared file is read-modified-written: the manifest is created with an
exclusive link, each process writes its own session record, a block's parts are written
atomically (two processes computing the same block write identical bytes), and the merge
runs under an exclusive lock file (with stale-lock recovery: a lock whose process is gone
or that is older than ``CBS_LOCK_STALE_S`` seconds, default 3600, is broken), skipping the
work when the merged files already reflect exactly the current parts.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import tempfile
import time
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

__all__ = [
    "RunStore",
    "read_table",
    "read_manifest",
    "read_config",
    "read_sessions",
    "atomic_write_bytes",
    "LockBusy",
]

RESULTS = "results"


def _umask() -> int:
    """The process umask (read by setting it, so set it straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Writes ``data`` to ``path`` so that readers see the old file or the new one, never a torn one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp creates 0600; a run folder is shared (colleagues, other jobs), so give the
        # file the mode open() would have: 0666 minus the user's umask.
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _json_bytes(obj) -> bytes:
    return json.dumps(obj, indent=2, sort_keys=True, default=str).encode()


def _parquet_bytes(df: pd.DataFrame) -> bytes:
    import io

    buf = io.BytesIO()
    df.to_parquet(buf, index=False)
    return buf.getvalue()


def read_table(
    run_dir: str | Path, name: str, columns: list[str] | None = None
) -> pd.DataFrame | None:
    """A table of a run folder (merged file, else the concatenated parts); None if absent.
    ``columns``: read only these (all of them must exist)."""
    run_dir = Path(run_dir)
    merged = run_dir / f"{name}.parquet"
    # The merged file is written only once every block is finished (and rewritten at
    # each later merge), so when it exists it is complete; otherwise use the parts.
    if merged.exists():
        return pd.read_parquet(merged, columns=columns)
    parts_dir = run_dir / "parts" / name
    parts = sorted(parts_dir.glob("*.parquet")) if parts_dir.is_dir() else []
    if not parts:
        return None
    frames = [f for f in (pd.read_parquet(p, columns=columns) for p in parts) if len(f)]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def read_manifest(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / "manifest.json"
    return json.loads(path.read_text()) if path.exists() else {}


def read_sessions(run_dir: str | Path) -> list[dict[str, Any]]:
    """Every process's session record, oldest first (unreadable records are skipped: a record
    is written atomically, so only foreign files can be unreadable)."""
    folder = Path(run_dir) / "sessions"
    out = []
    for p in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            out.append(json.loads(p.read_text()))
        except (OSError, json.JSONDecodeError):
            continue
    return sorted(out, key=lambda r: (str(r.get("started", "")), str(r.get("session_id", ""))))


class LockBusy(RuntimeError):
    """Another live process holds the lock."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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

    def initialise(self, config: dict, manifest: dict) -> dict:
        """Creates the folder's config and manifest unless another process already did;
        returns the manifest in force (ours, or the one that won the race).

        The manifest appears with an exclusive hard link of a complete temporary file, so
        of several processes starting at once exactly one creates it and none sees a torn
        one.
        """
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / "manifest.json"
        if path.exists():
            return read_manifest(self.dir)
        atomic_write_bytes(
            self.dir / "config.yaml", yaml.safe_dump(config, sort_keys=False).encode()
        )
        tmp = self.dir / f".manifest.json.{uuid.uuid4().hex}.tmp"
        atomic_write_bytes(tmp, _json_bytes(manifest))
        try:
            os.link(tmp, path)
            return manifest
        except FileExistsError:
            return read_manifest(self.dir)
        finally:
            tmp.unlink(missing_ok=True)

    def write_config(self, config: dict) -> None:
        atomic_write_bytes(
            self.dir / "config.yaml", yaml.safe_dump(config, sort_keys=False).encode()
        )

    def write_manifest(self, manifest: dict) -> None:
        """Replaces the manifest; only the merging process (holding the merge lock) calls this."""
        atomic_write_bytes(self.dir / "manifest.json", _json_bytes(manifest))

    # -- sessions -------------------------------------------------------------------
    def write_session(self, session_id: str, record: dict) -> None:
        """This process's own record (no other process writes this file)."""
        atomic_write_bytes(self.dir / "sessions" / f"{session_id}.json", _json_bytes(record))

    # -- locking --------------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self, name: str, wait_s: float = 0.0, stale_s: float | None = None) -> Iterator[None]:
        """An exclusive lock file ``<name>.lock`` held for the ``with`` body.

        A lock whose holder is a dead process on this host, or older than ``stale_s``
        (default ``CBS_LOCK_STALE_S`` or 3600 s), is broken. Raises :class:`LockBusy`
        when a live holder keeps it for more than ``wait_s`` seconds.
        """
        stale_s = float(os.environ.get("CBS_LOCK_STALE_S", 3600)) if stale_s is None else stale_s
        path = self.dir / f"{name}.lock"
        me = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "time": time.time(),
            "token": uuid.uuid4().hex,
        }
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                if self._break_if_stale(path, stale_s):
                    continue
                if time.monotonic() >= deadline:
                    raise LockBusy(f"{path} is held by another process") from None
                time.sleep(0.05)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            break
        try:
            yield
        finally:
            try:
                if json.loads(path.read_text()).get("token") == me["token"]:
                    path.unlink()
            except (OSError, json.JSONDecodeError):
                pass

    @staticmethod
    def _break_if_stale(path: Path, stale_s: float) -> bool:
        try:
            text = path.read_text()
            holder = json.loads(text)
        except FileNotFoundError:
            return True  # released meanwhile: retry at once
        except (OSError, json.JSONDecodeError):
            # Created but not yet written (the holder is between open and write), or junk:
            # judge by the file's age only.
            try:
                if time.time() - path.stat().st_mtime < stale_s:
                    return False
            except FileNotFoundError:
                return True
            text, holder = None, {}
        same_host = holder.get("host") == socket.gethostname()
        dead = same_host and isinstance(holder.get("pid"), int) and not _pid_alive(holder["pid"])
        old = time.time() - float(holder.get("time", 0)) > stale_s
        if not (dead or old):
            return False
        # Move it aside atomically; if what we moved is not the lock we judged (it was
        # released and re-taken in between), put it back.
        aside = path.with_name(f"{path.name}.stale-{uuid.uuid4().hex}")
        try:
            os.rename(path, aside)
        except FileNotFoundError:
            return True
        try:
            if text is not None and aside.read_text() != text:
                try:
                    os.link(aside, path)
                except FileExistsError:
                    pass
        finally:
            aside.unlink(missing_ok=True)
        return True

    # -- blocks ---------------------------------------------------------------------
    def finished_blocks(self) -> set[str]:
        parts = self.dir / "parts" / RESULTS
        return {p.stem for p in parts.glob("*.parquet")} if parts.is_dir() else set()

    def write_block(self, block_id: str, tables: dict[str, pd.DataFrame]) -> None:
        """Writes a finished block's tables; the results part goes last, so its presence
        means every other part of the block is complete."""
        for name, df in tables.items():
            if name != RESULTS and df is not None:
                atomic_write_bytes(
                    self.dir / "parts" / name / f"{block_id}.parquet", _parquet_bytes(df)
                )
        atomic_write_bytes(
            self.dir / "parts" / RESULTS / f"{block_id}.parquet", _parquet_bytes(tables[RESULTS])
        )

    def table_names(self) -> list[str]:
        parts = self.dir / "parts"
        return sorted(p.name for p in parts.iterdir() if p.is_dir()) if parts.is_dir() else []

    def write_table(self, name: str, df: pd.DataFrame) -> None:
        atomic_write_bytes(self.dir / f"{name}.parquet", _parquet_bytes(df))

    def parts_signature(self) -> list[list]:
        """(table, block, size) of every part: equal signatures mean equal merged tables
        (parts are deterministic per block, so a rewrite by a duplicate process keeps it)."""
        sig = []
        for name in self.table_names():
            for p in sorted((self.dir / "parts" / name).glob("*.parquet")):
                try:
                    sig.append([name, p.stem, p.stat().st_size])
                except FileNotFoundError:
                    continue
        return sig

    def merged_is_current(self, manifest: dict) -> bool:
        """True when the merged tables were written from exactly the current parts."""
        merged = manifest.get("merged") or {}
        return merged.get("parts") == self.parts_signature() and all(
            (self.dir / f"{name}.parquet").exists() for name in self.table_names()
        )

    def merge(self, order: Iterable[str] | None = None) -> dict[str, int]:
        """Writes each table's merged file from its parts (rows in block order); returns row counts.

        Parts are kept: they are the resume state. The merged files are a convenience
        for pandas users and are rewritten at every merge.
        """
        counts = {}
        rank = {b: i for i, b in enumerate(order)} if order is not None else None
        for name in self.table_names():
            files = sorted(
                (self.dir / "parts" / name).glob("*.parquet"),
                key=lambda p: (rank.get(p.stem, len(rank)) if rank else 0, p.stem),
            )
            counts[name] = self._merge_parts(name, files)
        return counts

    def _merge_parts(self, name: str, files: list[Path]) -> int:
        # Concatenated in Arrow, without a pandas round trip: 2x less CPU on the quickstart's
        # 76 parts. "permissive" unifies what pandas' concat did (int with float, a column
        # that is all null in one part).
        import pyarrow as pa
        import pyarrow.parquet as pq

        tables = [t for t in (pq.read_table(p) for p in files) if t.num_rows]
        if not tables:
            self.write_table(name, pd.DataFrame())
            return 0
        merged = pa.concat_tables(tables, promote_options="permissive")
        sink = pa.BufferOutputStream()
        pq.write_table(merged, sink)
        atomic_write_bytes(self.dir / f"{name}.parquet", sink.getvalue().to_pybytes())
        return merged.num_rows
