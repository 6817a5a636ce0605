"""``--slurm``: a 2-task array plus a dependent merge task, merged result equal to the
single-process run, for an NQM and a train sweep.

The fixture starts a real single-node Slurm (munged, slurmctld, slurmd from Debian's
``slurm-wlm`` and ``munge``, private config and ports, as root) when those programs are
installed; otherwise the same submission goes through submitit's local executor (separate
processes, the merge started after the array), which exercises everything but sbatch.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
PROVENANCE = {"host"}

SWEEPS = {
    "nqm": [
        "configs/nqm_quickstart.yaml",
        "grid.batch_sizes=[4,256,16384]",
        "grid.learning_rates={log10_min: -3, log10_max: 0.3, num: 8}",
        "grid.optimizers=[{kind: sgd, name: p0}, {kind: sgd, name: p5, hparams: {precond_power: 0.5}}]",
        "nqm.refine=false",
        "nqm.certify=false",
        "budget.max_steps=100000",
        "nqm.curves=none",
    ],
    "train": [
        "configs/train_linreg_cpu.yaml",
        "grid.batch_sizes=[8,64]",
        "grid.learning_rates=[0.1,0.3]",
        "grid.optimizers=[{kind: sgd}, {kind: adam}]",
        "budget.max_steps=300",
        "budget.eval_every=20",
        "train.noise_scale.enabled=false",
        "train.num_samples=1024",
        "target.value=0.05",
    ],
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _slurm_programs() -> dict[str, str] | None:
    if os.environ.get("CBS_TEST_SLURM") == "off":  # force the local-executor path
        return None
    progs = {}
    for name in ("munged", "slurmctld", "slurmd", "sbatch", "sinfo", "squeue"):
        path = shutil.which(name) or (
            f"/usr/sbin/{name}" if os.path.exists(f"/usr/sbin/{name}") else None
        )
        if path is None:
            return None
        progs[name] = path
    return progs if os.geteuid() == 0 else None


@pytest.fixture(scope="module")
def slurm_env(tmp_path_factory):
    """Environment variables pointing at a private single-node Slurm, or None (use the
    local executor) when Slurm's programs are not installed or we are not root."""
    progs = _slurm_programs()
    if progs is None:
        yield None
        return
    d = tmp_path_factory.mktemp("slurm")
    for sub in ("state", "spool", "log", "munge"):
        (d / sub).mkdir()
    key = d / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))
    os.chmod(key, 0o600)
    os.chmod(d / "munge", 0o700)
    host = socket.gethostname()
    sock = d / "munge" / "munge.socket"
    conf = d / "slurm.conf"
    conf.write_text(
        "\n".join(
            [
                "ClusterName=cbstest",
                f"SlurmctldHost={host}",
                "SlurmUser=root",
                "SlurmdUser=root",
                "AuthType=auth/munge",
                "CredType=cred/munge",
                f"AuthInfo=socket={sock}",
                f"StateSaveLocation={d}/state",
                f"SlurmdSpoolDir={d}/spool",
                f"SlurmctldPidFile={d}/slurmctld.pid",
                f"SlurmdPidFile={d}/slurmd.pid",
                f"SlurmctldPort={_free_port()}",
                f"SlurmdPort={_free_port()}",
                f"SlurmctldLogFile={d}/log/ctld.log",
                f"SlurmdLogFile={d}/log/d.log",
                "ProctrackType=proctrack/linuxproc",
                "TaskPlugin=task/none",
                "JobAcctGatherType=jobacct_gather/none",
                "SwitchType=switch/none",
                "MpiDefault=none",
                "ReturnToService=2",
                "SchedulerType=sched/backfill",
                "SelectType=select/cons_tres",
                "SelectTypeParameters=CR_CPU",
                f"NodeName={host} CPUs={os.cpu_count()} State=UNKNOWN",
                "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES",
                "",
            ]
        )
    )
    env = {**os.environ, "SLURM_CONF": str(conf)}
    pids = []
    try:
        subprocess.run(
            [
                progs["munged"],
                f"--key-file={key}",
                f"--socket={sock}",
                f"--pid-file={d}/munge/munged.pid",
                f"--log-file={d}/munge/munged.log",
                f"--seed-file={d}/munge/seed",
                "-f",
            ],
            env=env,
            check=True,
            timeout=30,
        )
        pids.append(d / "munge" / "munged.pid")
        subprocess.run([progs["slurmctld"], "-c"], env=env, check=True, timeout=30)
        pids.append(d / "slurmctld.pid")
        subprocess.run([progs["slurmd"]], env=env, check=True, timeout=30)
        pids.append(d / "slurmd.pid")
        deadline = time.time() + 60
        while time.time() < deadline:
            out = subprocess.run(
                [progs["sinfo"], "-h", "-o", "%t"], env=env, capture_output=True, text=True
            )
            if out.stdout.strip() == "idle":
                break
            time.sleep(0.5)
        else:
            pytest.fail(f"the test Slurm did not come up: {out.stdout} {out.stderr}")
        yield env
    finally:
        for pid_file in reversed(pids):
            try:
                os.kill(int(Path(pid_file).read_text().strip()), 15)
            except (OSError, ValueError):
                pass


def _table(out: Path) -> pd.DataFrame:
    df = pd.read_parquet(out / "results.parquet")
    return df[[c for c in df.columns if c not in PROVENANCE]]


@pytest.mark.parametrize("sweep", ["nqm", "train"])
def test_slurm_array_merges_to_the_single_process_table(sweep, slurm_env, tmp_path):
    env = {**(slurm_env or os.environ), "CBS_JAX_CACHE": "off", "JAX_PLATFORMS": "cpu"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    args = SWEEPS[sweep]
    one = subprocess.run(
        [
            sys.executable,
            "-m",
            "cbs.sweep",
            *args,
            f"output.dir={tmp_path / 'one'}",
            "--no-progress",
            "--no-analysis",
        ],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert one.returncode == 0, one.stderr
    out = tmp_path / "array"
    executor = "slurm" if slurm_env is not None else "local"
    sub = subprocess.run(
        [
            sys.executable,
            "-m",
            "cbs.sweep",
            *args,
            f"output.dir={out}",
            "--slurm",
            f"array=2,time=10,cpus_per_task=1,executor={executor}",
        ],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert sub.returncode == 0, sub.stderr
    assert "submitted 2 shard tasks" in sub.stdout
    deadline = time.time() + 600
    while executor == "slurm" and time.time() < deadline:
        from cbs.store import read_manifest

        if "finished" in read_manifest(out) and "cbs.json" in os.listdir(out):
            q = subprocess.run(["squeue", "-h"], env=env, capture_output=True, text=True)
            if not q.stdout.strip():
                break
        time.sleep(1)
    pd.testing.assert_frame_equal(_table(tmp_path / "one"), _table(out))
    from cbs.store import read_sessions

    sessions = read_sessions(out)
    assert sorted(tuple(s["shard"]) for s in sessions) == [(0, 2), (1, 2)]
    assert not any(s["merged"] for s in sessions)  # shards never merge; the merge task did
    assert (out / "cbs.json").exists()  # ... and analysed
    if executor == "slurm":
        assert all(s.get("slurm_job_id") for s in sessions)


def test_slurm_dry_run_prints_the_array_and_the_dependent_merge(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "cbs.sweep",
            *SWEEPS["nqm"],
            f"output.dir={tmp_path}",
            "--slurm",
            "array=4,partition=gpu,gpus_per_task=1,time=02:00:00,mem=16G",
            "--slurm-dry-run",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    for fragment in (
        "#SBATCH --array=0-3%4",
        "#SBATCH --partition=gpu",
        "#SBATCH --gpus-per-task=1",
        "#SBATCH --time=120",
        "#SBATCH --mem=16G",
        "#SBATCH --dependency=afterok:ARRAY_JOB_ID",
        "--shard $SLURM_ARRAY_TASK_ID/4 --no-merge",
        "--merge-only",
    ):
        assert fragment in text, fragment
    assert not (tmp_path / "manifest.json").exists()  # nothing submitted, nothing run


@pytest.mark.parametrize(
    "value,message",
    [
        ("array=0", "--slurm array: got '0'"),
        ("bogus=1", "allowed: key=value with key in"),
        ("time=soon", "--slurm time: got 'soon'"),
        ("executor=k8s", "allowed: slurm, local"),
    ],
)
def test_bad_slurm_options_are_one_line_errors(value, message, tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "cbs.sweep",
            *SWEEPS["nqm"],
            f"output.dir={tmp_path}",
            "--slurm",
            value,
            "--slurm-dry-run",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr
