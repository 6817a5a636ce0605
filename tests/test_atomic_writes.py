"""Every file the project writes is atomic: with the disk full midway, each file in the run
folder is its old complete version or its new one, and no temporary file is left behind.

A real small file system (a tmpfs mount, when the tests run as root and may mount) is
filled to several levels; elsewhere the disk filling up is simulated by making the k-th
``fsync`` fail with ENOSPC (the point where a full disk reports a delayed write);
CBS_TEST_SIMULATE_ENOSPC=1 forces the simulated path where a mount would work."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest
from conftest import fake_config

from cbs.analyze import main as analyze
from cbs.errors import RunFolderError
from cbs.sweep.config import load_config
from cbs.sweep.runner import run_sweep

FS_BYTES = 6 * 2**20


def _try_mount(where: Path) -> bool:
    if os.environ.get("CBS_TEST_SIMULATE_ENOSPC"):
        return False
    if os.name != "posix" or os.geteuid() != 0 or not shutil.which("mount"):
        return False
    where.mkdir()
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={FS_BYTES}", "tmpfs", str(where)],
        capture_output=True,
    )
    return r.returncode == 0


@pytest.fixture
def small_fs(tmp_path):
    """(folder, filler) where filler(free) leaves about ``free`` bytes (real) or arms the
    ``free``-th fsync to fail (simulated); filler(None) undoes it."""
    mnt = tmp_path / "fs"
    if _try_mount(mnt):
        fill = mnt / "filler"

        def filler(free):
            if free is None:
                fill.unlink(missing_ok=True)
                return
            with open(fill, "wb") as f:
                chunk = b"\0" * 2**16
                with contextlib.suppress(OSError):
                    while True:
                        f.write(chunk)
                        f.flush()
                size = f.tell()
            os.truncate(fill, max(0, size - free))

        try:
            yield mnt, filler, "real"
        finally:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
        return
    mnt.mkdir(exist_ok=True)
    real_fsync = os.fsync
    armed = {"k": None}

    def fsync(fd):
        if armed["k"] is not None:
            armed["k"] -= 1
            if armed["k"] < 0:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_fsync(fd)

    def filler(k):
        armed["k"] = k

    os.fsync = fsync
    try:
        yield mnt, filler, "simulated"
    finally:
        os.fsync = real_fsync


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not p.name.endswith(".lock")
    }


def _check_old_or_new(seen, old, new, what):
    leftovers = [f for f in seen if Path(f).name.startswith(".")]
    assert not leftovers, f"{what}: temporary files left: {leftovers}"
    for f in set(seen) | set(old) | set(new):
        if f.startswith("sessions/"):  # one process's own record, rewritten as it goes
            continue
        got = seen.get(f)
        assert got in (old.get(f), new.get(f)), f"{what}: {f} is neither the old nor the new file"


def test_full_disk_leaves_every_file_old_or_new(fake_backend, small_fs, capsys):
    mnt, filler, kind = small_fs
    run = mnt / "run"
    cfg = load_config(fake_config(mnt, analysis={"bootstrap": 20}))
    assert cfg.out_dir == run
    args = [str(run), "--bootstrap", "20", "--quiet"]

    # the sweep itself, interrupted by the full disk at several points, then resumed
    clean = None
    levels = [20_000, 60_000] if kind == "real" else [3, 9]
    for level in levels:
        shutil.rmtree(run, ignore_errors=True)
        filler(level)
        with pytest.raises((OSError, RunFolderError)):  # (the latter: full before any block)
            run_sweep(cfg, progress=False)
        filler(None)
        seen = _snapshot(run)
        assert not [f for f in seen if Path(f).name.startswith(".")], seen.keys()
        run_sweep(cfg, progress=False)
        table = pd.read_parquet(run / "results.parquet")
        if clean is not None:
            pd.testing.assert_frame_equal(table, clean)
        clean = table
    assert analyze(args) == 0
    old = _snapshot(run)
    backup = mnt.parent / "old"
    shutil.copytree(run, backup)
    assert analyze(args + ["--delta", "0.5"]) == 0
    new = _snapshot(run)
    changed = [f for f in new if new[f] != old.get(f)]
    assert {"cbs.json", "cbs.parquet", "report.md", "steps_vs_batch.png"} <= set(changed)

    # the analysis, with the disk full at several points: the old or the new files, nothing else
    total = sum(len(new[f]) for f in changed)
    levels = [0, total // 4, total // 2, 3 * total // 4] if kind == "real" else [0, 2, 4, 6]
    failed = 0
    for level in levels:
        shutil.rmtree(run)
        shutil.copytree(backup, run)
        filler(level)
        capsys.readouterr()
        code = analyze(args + ["--delta", "0.5"])
        filler(None)
        err = capsys.readouterr().err
        assert code in (0, 2), err
        if code == 2:
            failed += 1
            assert len(err.strip().splitlines()) == 1 and "No space left" in err, err
        _check_old_or_new(_snapshot(run), old, new, f"{kind} fill to {level}")
    assert failed >= 2, "the disk never filled up: the test tested nothing"
