"""One sweep as a 2-process JAX job on the loopback address equals the single-process run;
the multi-process flags and variables are validated before any compute."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from cbs import distributed

ROOT = Path(__file__).resolve().parents[1]
# Small NQM sweep (cheap to compile): 2 optimizers x 4 batch sizes = 8 blocks; provenance columns that
# legitimately differ between a 1- and a 2-process run are left out of the comparison.
NQM = [
    "configs/nqm_quickstart.yaml",
    "grid.batch_sizes=[4,64,1024,16384]",
    "grid.learning_rates={log10_min: -3, log10_max: 0.3, num: 12}",
    "grid.optimizers=[{kind: sgd, name: p0}, {kind: sgd, name: p5, hparams: {precond_power: 0.5}}]",
    "nqm.refine=false",
    "nqm.certify=false",
    "budget.max_steps=100000",
    "nqm.curves=none",
]
FLAGS = ["--no-progress", "--no-analysis"]
PROVENANCE = {"host", "process_count", "device_count"}


def _env():
    env = {**os.environ, "CBS_JAX_CACHE": "off", "JAX_PLATFORMS": "cpu"}
    for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "SLURM_JOB_ID"):
        env.pop(k, None)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _table(out: Path, name="results"):
    df = pd.read_parquet(out / f"{name}.parquet")
    return df[[c for c in df.columns if c not in PROVENANCE]]


def test_two_process_job_equals_single_process_run(tmp_path):
    env = _env()
    one = subprocess.run(
        [sys.executable, "-m", "cbs.sweep", *NQM, f"output.dir={tmp_path / 'one'}", *FLAGS],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert one.returncode == 0, one.stderr
    port = _free_port()
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "cbs.sweep",
                *NQM,
                f"output.dir={tmp_path / 'two'}",
                *FLAGS,
                "--coordinator",
                f"127.0.0.1:{port}",
                "--num-processes",
                "2",
                "--process-id",
                str(i),
            ],
            env=env,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    for name in ("results", "tuned", "reference"):
        pd.testing.assert_frame_equal(
            _table(tmp_path / "one", name), _table(tmp_path / "two", name)
        )
    rows = pd.read_parquet(tmp_path / "two" / "results.parquet")
    assert set(rows["process_count"]) == {2}
    from cbs.store import read_sessions

    sessions = read_sessions(tmp_path / "two")
    assert sorted(tuple(s["shard"]) for s in sessions) == [(0, 2), (1, 2)]
    assert all(s["blocks"] > 0 for s in sessions) and sum(bool(s["merged"]) for s in sessions) == 1


@pytest.mark.parametrize(
    "env,flags,message",
    [
        ({}, dict(coordinator="h:1"), "all three together"),
        ({}, dict(coordinator="nohost", num_processes=2, process_id=0), "host:port"),
        ({}, dict(coordinator="h:1", num_processes=2, process_id=2), "0..1"),
        ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2"}, {}, "all three together"),
        (
            {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "x", "JAX_PROCESS_ID": "0"},
            {},
            "an integer",
        ),
    ],
)
def test_partial_or_bad_multiprocess_settings_are_one_line_errors(env, flags, message):
    with pytest.raises(ValueError, match=message):
        distributed.detect(**flags, env=env)


def test_detection_sources():
    assert distributed.detect(env={}) is None
    s = distributed.detect(
        env={
            "JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234",
            "JAX_NUM_PROCESSES": "4",
            "JAX_PROCESS_ID": "3",
        }
    )
    assert (s.source, s.coordinator, s.num_processes, s.process_id) == (
        "env",
        "10.0.0.1:1234",
        4,
        3,
    )
    srun = {"SLURM_JOB_ID": "7", "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "4"}
    assert distributed.detect(env=srun).source == "slurm"
    # A Slurm array task (or a batch script's single task) is one process, not a job of many.
    assert (
        distributed.detect(env={**srun, "SLURM_STEP_NUM_TASKS": "1", "SLURM_NTASKS": "1"}) is None
    )
    assert (
        distributed.detect(env={"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4"}) is None
    )  # batch script, no srun
    flags = distributed.detect("127.0.0.1:5", 2, 1, env=srun)
    assert flags.source == "flags" and flags.process_id == 1


def test_cli_rejects_shard_in_a_multiprocess_job(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "cbs.sweep",
            "configs/nqm_quickstart.yaml",
            f"output.dir={tmp_path}",
            "--coordinator",
            "127.0.0.1:1",
            "--num-processes",
            "2",
            "--process-id",
            "5",
        ],
        env=_env(),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "--process-id: got 5" in proc.stderr
