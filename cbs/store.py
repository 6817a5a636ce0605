"""The results store: one folder per sweep, written crash-safely.

Layout of a run folder::

    config.yaml              resolved config (what was actually run)
    manifest.json            config hash, versions, device, block layout and costs; created once
                             (exclusively), rewritten only by the one merge, under merge.lock
    sessions/<id>.json       one record per process that ran (shard, host, pid, times, measured
                             block seconds); each written only by its own process
    parts/<table>/<block>.parquet   one file per finished block and table, each carrying
                             its integrity record (see below)
    parts/quarantine/<table>/       parts that failed verification, moved aside (never read)
    results.parquet          one row per cell (merged from parts when the sweep ends)
    curves.parquet, tuned.parquet, reference.parquet, ...   other tables, same rule

Every file is written to a temporary name and renamed into place, so a crash (even
``kill -9``) loses at most the block being computed; a block is finished exactly when
its results part exists. Readers use :func:`read_table`, which prefers the merged file
and otherwise concatenates the parts, so an interrupted sweep can be analysed too.

Parts prove what they hold: each part's Parquet schema metadata records its table, its
block id, the sweep's config hash and a SHA-256 digest of its content (the results part also
lists the block's other tables). Every reader of the parts (resume, merge, the analysis of an
unfinished run) verifies them; a part that is unreadable, names another block or table, comes
from another config hash, lacks the record, or whose content no longer matches its digest, is
moved to ``parts/quarantine/`` with a one-line warning naming the file and why, and its block
counts as not finished, so the next run recomputes it. (A folder whose manifest lacks
``part_integrity``, written by an older cbs, has parts without records: those are checked on
their rows' block id and config hash instead.) A damaged ``manifest.json`` or
``config.yaml`` is a :class:`~cbs.errors.RunFolderError` naming the file.

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
import hashlib
import json
import os
import socket
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from cbs.errors import RunFolderError, one_line

__all__ = [
    "RunStore",
    "read_table",
    "read_manifest",
    "read_config",
    "read_sessions",
    "atomic_write_bytes",
    "atomic_write_text",
    "atomic_writer",
    "part_bytes",
    "verify_part",
    "LockBusy",
    "DamagedParts",
]

RESULTS = "results"
QUARANTINE = "quarantine"  # parts/quarantine/: not a table (no table may take this name)


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


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(Path(path), text.encode())


@contextlib.contextmanager
def atomic_writer(path: str | Path) -> Iterator[Path]:
    """For writers that want a file name (matplotlib's ``savefig``, ``to_parquet``): yields a
    temporary path in ``path``'s folder; on a clean exit the file is fsynced and renamed onto
    ``path``, on an error it is removed, so ``path`` is the old complete file or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # the suffix is kept so writers that choose the format by extension still can
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _json_bytes(obj) -> bytes:
    return json.dumps(obj, indent=2, sort_keys=True, default=str).encode()


def _parquet_bytes(df: pd.DataFrame) -> bytes:
    import io

    buf = io.BytesIO()
    df.to_parquet(buf, index=False)
    return buf.getvalue()


# -- part integrity ----------------------------------------------------------------------
# Keys of a part's Parquet schema metadata (bytes, as Arrow stores them).
_M_TABLE, _M_BLOCK, _M_HASH, _M_DIGEST, _M_TABLES = (
    b"cbs.table",
    b"cbs.block_id",
    b"cbs.config_hash",
    b"cbs.digest",
    b"cbs.block_tables",
)
_M_KEYS = (_M_TABLE, _M_BLOCK, _M_HASH, _M_DIGEST, _M_TABLES)


def _table_digest(table) -> str:
    """SHA-256 of a table's columns (names, types, values) in Arrow's IPC encoding, schema
    metadata left out. Always taken of a table as read back from Parquet, on the writing and
    the verifying side alike, so both hash the very same Arrow representation."""
    import pyarrow as pa

    plain = table.replace_schema_metadata(None).combine_chunks()
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, plain.schema) as writer:
        writer.write_table(plain)
    return hashlib.sha256(sink.getvalue().to_pybytes()).hexdigest()


def _arrow_parquet_bytes(table) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


def part_bytes(
    df: pd.DataFrame,
    *,
    table: str,
    block_id: str,
    config_hash: str,
    block_tables: Iterable[str] = (),
) -> bytes:
    """A part's Parquet bytes with its integrity record (table, block id, config hash,
    content digest; ``block_tables``: the block's other tables, recorded in its results part)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    arrow = pa.Table.from_pandas(df, preserve_index=False)
    read_back = pq.read_table(pa.BufferReader(_arrow_parquet_bytes(arrow)))
    meta = dict(arrow.schema.metadata or {})
    meta.update(
        {
            _M_TABLE: table.encode(),
            _M_BLOCK: block_id.encode(),
            _M_HASH: str(config_hash).encode(),
            _M_DIGEST: _table_digest(read_back).encode(),
            _M_TABLES: ",".join(sorted(block_tables)).encode(),
        }
    )
    return _arrow_parquet_bytes(arrow.replace_schema_metadata(meta))


def strip_integrity(table):
    """``table`` without the part integrity keys (a merged table is not any one block's)."""
    meta = {k: v for k, v in (table.schema.metadata or {}).items() if k not in _M_KEYS}
    return table.replace_schema_metadata(meta or None)


# The manifest key of a folder created with integrity records: there, a part without one is
# foreign or hand-written. A folder from an older cbs lacks the key; its parts carry no record
# and are accepted on what they can show (their rows' block id and config hash), so that an
# upgrade does not recompute finished sweeps.
PART_INTEGRITY_KEY = "part_integrity"


def verify_part(
    path: Path, table: str, block_id: str, config_hash: str | None, legacy_ok: bool = False
):
    """``(arrow_table, None)`` when the part at ``path`` proves it is ``table``'s part of
    ``block_id`` for ``config_hash`` (None: any hash) with the content it was written with;
    otherwise ``(None, why)``. ``legacy_ok``: a part without a record (an older cbs's folder)
    passes when its rows name this block and hash."""
    import pyarrow.parquet as pq

    try:
        t = pq.read_table(path)
    except FileNotFoundError:
        return None, "missing"
    except Exception as e:  # noqa: BLE001 -- a damaged file fails inside Arrow in many ways
        text = one_line(str(e).replace(f"'{path}'", "").replace(str(path), ""))
        return None, f"unreadable ({type(e).__name__}: {text[:120]})"
    meta = t.schema.metadata or {}
    if _M_DIGEST not in meta or _M_BLOCK not in meta:
        if not legacy_ok:
            return None, "carries no integrity record (block id, config hash, digest)"
        return _check_legacy(t, block_id, config_hash)
    got = {k: meta.get(k, b"").decode(errors="replace") for k in _M_KEYS}
    if got[_M_BLOCK] != block_id:
        return None, f"holds block {got[_M_BLOCK]!r}, not {block_id!r}"
    if got[_M_TABLE] != table:
        return None, f"holds table {got[_M_TABLE]!r}, not {table!r}"
    if config_hash is not None and got[_M_HASH] != config_hash:
        return None, f"was written for config hash {got[_M_HASH]}, this sweep is {config_hash}"
    if _table_digest(t) != got[_M_DIGEST]:
        return None, "content does not match its digest (edited or damaged)"
    return t, None


def _check_legacy(t, block_id: str, config_hash: str | None):
    """A part without a record, from a folder an older cbs wrote: its rows' own columns."""
    for column, want in (("block_id", block_id), ("config_hash", config_hash)):
        if want is None or column not in t.column_names:
            continue
        found = set(t.column(column).to_pylist()) - {want}
        if found:
            return None, f"holds rows of {column} {sorted(map(str, found))[0]!r}, not {want!r}"
    return t, None


def _block_tables_of(table) -> list[str]:
    raw = (table.schema.metadata or {}).get(_M_TABLES, b"").decode()
    return [n for n in raw.split(",") if n]


def read_table(
    run_dir: str | Path, name: str, columns: list[str] | None = None
) -> pd.DataFrame | None:
    """A table of a run folder (merged file, else the concatenated verified parts); None if
    absent. ``columns``: read only these (all of them must exist)."""
    run_dir = Path(run_dir)
    merged = run_dir / f"{name}.parquet"
    # The merged file is written only once every block is finished (and rewritten at
    # each later merge), so when it exists it is complete; otherwise use the parts.
    if merged.exists():
        try:
            return pd.read_parquet(merged, columns=columns)
        except FileNotFoundError:
            pass
        except Exception as e:  # noqa: BLE001 -- a damaged file fails inside Arrow in many ways
            if columns is not None and isinstance(e, (KeyError, ValueError)) and _readable(merged):
                raise  # a column that is not there: the caller's question, not damage
            if not any((run_dir / "parts" / name).glob("*.parquet")):
                raise  # no parts to fall back on: the caller reports the damaged file
            print(
                f"warning: {merged} is unreadable ({type(e).__name__}); reading the verified "
                "parts instead (the next run of the sweep rewrites it)",
                file=sys.stderr,
            )
    parts_dir = run_dir / "parts" / name
    if not (parts_dir.is_dir() and any(parts_dir.glob("*.parquet"))):
        return None
    store = RunStore(run_dir)
    tables = [store.verified_part(name, b) for b in sorted(store.finished_blocks())]
    frames = [t.to_pandas() for t in tables if t is not None and t.num_rows]
    if columns is not None:
        frames = [f[columns] for f in frames]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def _readable(path: Path) -> bool:
    """Whether ``path`` is a Parquet file whose footer reads (a torn or foreign file fails)."""
    import pyarrow.parquet as pq

    try:
        pq.read_metadata(path)
    except Exception:  # noqa: BLE001 -- missing or damaged, in whichever way Arrow reports it
        return False
    return True


def read_manifest(run_dir: str | Path) -> dict[str, Any]:
    """manifest.json as a mapping ({} when absent); a file that is not a JSON mapping is a
    RunFolderError naming it."""
    path = Path(run_dir) / "manifest.json"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RunFolderError(_damaged(path, f"is not valid JSON ({one_line(e)})")) from None
    if not isinstance(data, dict):
        raise RunFolderError(_damaged(path, f"holds a {type(data).__name__}, not a JSON object"))
    return data


def _damaged(path: Path, why: str) -> str:
    return (
        f"{str(path)!r} {why}; the run folder's record is damaged: restore it, or move it "
        "aside and re-run the same config (the parts are verified against it, and every "
        "block whose part fails is recomputed)"
    )


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
    """config.yaml as a mapping ({} when absent); a file that is not a YAML mapping is a
    RunFolderError naming it."""
    path = Path(run_dir) / "config.yaml"
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        return {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise RunFolderError(_damaged(path, f"is not valid YAML ({one_line(e)[:160]})")) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise RunFolderError(_damaged(path, f"holds a {type(data).__name__}, not a mapping"))
    return data


class RunStore:
    """Writes one sweep's folder. Owned by the runner; back ends never see it."""

    def __init__(
        self,
        run_dir: str | Path,
        config_hash: str | None = None,
        log: Callable[[str], None] | None = None,
    ):
        """``config_hash``: the sweep's hash, which every part must carry (None: the
        manifest's, read when first needed). ``log``: where quarantine warnings go (stderr)."""
        self.dir = Path(run_dir)
        self.config_hash = config_hash
        self.log = log or (lambda line: print(line, file=sys.stderr, flush=True))
        # path -> ((inode, size, mtime_ns), the block's tables) of a part verified (or
        # written) by this process: a part is replaced only by rename, so an unchanged stat
        # is an unchanged file and it is not read again
        self._verified: dict[Path, tuple[tuple[int, int, int], list[str]]] = {}
        self._legacy: bool | None = None

    # -- identity -------------------------------------------------------------------
    def existing_hash(self) -> str | None:
        return read_manifest(self.dir).get("config_hash")

    def _expected_hash(self) -> str | None:
        if self.config_hash is None:
            self.config_hash = self.existing_hash()
        return self.config_hash

    def _legacy_ok(self) -> bool:
        """Whether parts without a record are an older cbs's (see PART_INTEGRITY_KEY)."""
        if self._legacy is None:
            manifest = read_manifest(self.dir)
            self._legacy = bool(manifest) and not manifest.get(PART_INTEGRITY_KEY)
        return self._legacy

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
    def _part(self, table: str, block_id: str) -> Path:
        return self.dir / "parts" / table / f"{block_id}.parquet"

    @staticmethod
    def _stat_key(path: Path) -> tuple[int, int, int] | None:
        try:
            st = path.stat()
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    def _check(self, table: str, block_id: str, want_table: bool = False):
        """``(block_tables, arrow_table)`` of a part that verifies (``arrow_table`` only with
        ``want_table``); ``(None, None)`` when it is missing or failed (then quarantined)."""
        import pyarrow.parquet as pq

        path = self._part(table, block_id)
        key = self._stat_key(path)
        if key is None:
            return None, None
        cached = self._verified.get(path)
        if cached is not None and cached[0] == key:
            return cached[1], (pq.read_table(path) if want_table else None)
        t, why = verify_part(path, table, block_id, self._expected_hash(), self._legacy_ok())
        if t is None:
            if why != "missing":
                self.quarantine(path, why, key)
            return None, None
        tables = _block_tables_of(t)
        self._verified[path] = (key, tables)
        return tables, t

    def verified_part(self, table: str, block_id: str):
        """The part as an Arrow table when it verifies; otherwise it is quarantined (with a
        warning) and the result is None. A missing part is None without a warning."""
        return self._check(table, block_id, want_table=True)[1]

    def quarantine(self, path: Path, why: str, key=None) -> None:
        """Moves a part that failed verification to ``parts/quarantine/<table>/`` and warns
        in one line. ``key``: the stat of the file that was judged; when ``path`` has been
        replaced since (another process recomputed the block), the new file is left alone."""
        self._verified.pop(path, None)
        if key is not None and self._stat_key(path) != key:
            return
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        aside = (
            self.dir
            / "parts"
            / QUARANTINE
            / path.parent.name
            / f"{path.stem}.{stamp}-{uuid.uuid4().hex[:6]}{path.suffix}"
        )
        try:
            aside.parent.mkdir(parents=True, exist_ok=True)
            os.rename(path, aside)
        except FileNotFoundError:
            return  # another process moved it first (and warned)
        except OSError as e:  # a read-only folder: the part is skipped, not moved
            self.log(
                f"warning: {path} {why}; skipped (cannot move it aside: {e.strerror or e}); "
                "its block counts as not finished"
            )
            return
        self.log(
            f"warning: {path} {why}; moved to {aside.relative_to(self.dir)}, its block will be "
            "recomputed"
        )

    def finished_blocks(self) -> set[str]:
        """The blocks whose parts all verify (the results part, and every other table it
        lists). A block with a failing part has it quarantined, and its results part too
        when the failure is elsewhere, so that the block is recomputed whole."""
        parts = self.dir / "parts" / RESULTS
        if not parts.is_dir():
            return set()
        done = set()
        for p in sorted(parts.glob("*.parquet")):
            block_id = p.stem
            others, _ = self._check(RESULTS, block_id)
            if others is None:
                continue
            bad = [n for n in others if n != RESULTS and self._check(n, block_id)[0] is None]
            if bad:
                self.quarantine(
                    p,
                    f"belongs to a block whose {', '.join(bad)} part failed or is missing",
                    self._verified.get(p, (None,))[0],
                )
                continue
            done.add(block_id)
        return done

    def write_block(self, block_id: str, tables: dict[str, pd.DataFrame]) -> None:
        """Writes a finished block's tables; the results part goes last, so its presence
        means every other part of the block is complete (and it lists them)."""
        chash = self._expected_hash()
        written = [n for n, df in tables.items() if n != RESULTS and df is not None]
        for name in written + [RESULTS]:
            path = self._part(name, block_id)
            data = part_bytes(
                tables[name],
                table=name,
                block_id=block_id,
                config_hash=chash,
                block_tables=written if name == RESULTS else (),
            )
            atomic_write_bytes(path, data)
            key = self._stat_key(path)
            if key is not None:
                self._verified[path] = (key, written if name == RESULTS else [])

    def table_names(self) -> list[str]:
        parts = self.dir / "parts"
        return (
            sorted(p.name for p in parts.iterdir() if p.is_dir() and p.name != QUARANTINE)
            if parts.is_dir()
            else []
        )

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
        """True when the merged tables were written from exactly the current parts (and
        are still readable Parquet files)."""
        merged = manifest.get("merged") or {}
        return merged.get("parts") == self.parts_signature() and all(
            _readable(self.dir / f"{name}.parquet") for name in self.table_names()
        )

    def merge(self, order: Iterable[str] | None = None) -> dict[str, int]:
        """Writes each table's merged file from the verified parts of the finished blocks
        (rows in block order); returns row counts.

        Parts are kept: they are the resume state. The merged files are a convenience
        for pandas users and are rewritten at every merge. Raises :class:`DamagedParts`
        (writing nothing) when a block of ``order`` is not finished or one of its parts
        fails verification here (it is quarantined, so the next run recomputes it).
        """
        done = self.finished_blocks()
        order = list(order) if order is not None else sorted(done)
        missing = [b for b in order if b not in done]
        if missing:
            raise DamagedParts(missing)
        rank = {b: i for i, b in enumerate(order)}
        blocks = sorted(done, key=lambda b: (rank.get(b, len(rank)), b))
        merged = {}
        for name in self.table_names():
            tables = []
            for b in blocks:
                if not self._part(name, b).exists():
                    continue
                t = self.verified_part(name, b)
                if t is None:
                    raise DamagedParts([b])
                tables.append(t)
            merged[name] = tables
        return {name: self._merge_parts(name, tables) for name, tables in merged.items()}

    def _merge_parts(self, name: str, tables: list) -> int:
        # Concatenated in Arrow, without a pandas round trip: 2x less CPU on the quickstart's
        # 76 parts. "permissive" unifies what pandas' concat did (int with float, a column
        # that is all null in one part).
        import pyarrow as pa
        import pyarrow.parquet as pq

        tables = [strip_integrity(t) for t in tables if t.num_rows]
        if not tables:
            self.write_table(name, pd.DataFrame())
            return 0
        merged = pa.concat_tables(tables, promote_options="permissive")
        sink = pa.BufferOutputStream()
        pq.write_table(merged, sink)
        atomic_write_bytes(self.dir / f"{name}.parquet", sink.getvalue().to_pybytes())
        return merged.num_rows


class DamagedParts(RuntimeError):
    """A merge found blocks unfinished or parts failing verification (now quarantined)."""

    def __init__(self, blocks: list[str]):
        self.blocks = blocks
        super().__init__(
            f"{len(blocks)} block(s) not finished or with a part that failed verification "
            f"(first: {blocks[0]}); re-run to compute them"
        )
