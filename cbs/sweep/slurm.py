"""Slurm arrays without a login shell: ``python -m cbs.sweep CONFIG --slurm key=value,...``.

Submits, through ``submitit``, an array job whose task i runs shard i/N of the sweep
(``--shard i/N --no-merge``) and a final task, dependent on the whole array
(``afterok``), that merges the tables once and runs the analysis. ``--slurm-dry-run``
prints the two generated sbatch scripts instead. Each task runs the same command a user
would type, so a killed or failed task is re-run by submitting again (finished blocks are
kept) or by typing its ``--shard`` command.

With ``executor=local`` the same jobs run as local processes through submitit's local
executor (no Slurm needed; the merge task is started after the array has finished).
"""

from __future__ import annotations

import dataclasses
import re
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["SlurmOptions", "parse_slurm", "submit", "dry_run", "run_shard", "run_merge"]


@dataclasses.dataclass(frozen=True)
class SlurmOptions:
    """What ``--slurm key=value,...`` accepts (every key optional)."""

    array: int = 2  # array size = number of shards
    partition: str | None = None
    gpus_per_task: int | None = None
    cpus_per_task: int | None = None
    time: int = 60  # minutes per task (also accepts HH:MM:SS, D-HH:MM:SS)
    mem: str | None = None  # e.g. 16G
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    parallelism: int | None = None  # at most this many array tasks at once
    merge_time: int = 30  # minutes for the merge-and-analyse task
    # The merge task needs no GPU and little memory: it requests no GPUs, only merge_mem
    # (unset: the cluster's default, never the array's mem), on merge_partition (unset: the
    # array's partition, since partition names are the cluster's own)
    merge_partition: str | None = None
    merge_mem: str | None = None
    folder: str | None = None  # submitit logs and pickles (default OUTPUT/slurm)
    job_name: str | None = None
    executor: str = "slurm"  # slurm, or local (submitit's local executor; for tests)
    setup: str | None = None  # shell lines run before each task, ';'-separated (module load ...)

    @staticmethod
    def keys() -> str:
        return ", ".join(f.name for f in dataclasses.fields(SlurmOptions))


_INT_KEYS = {"array", "gpus_per_task", "cpus_per_task", "parallelism"}


def _minutes(key: str, text: str) -> int:
    m = re.fullmatch(r"(?:(\d+)-)?(?:(\d+):)?(\d+)(?::(\d+))?", text.strip())
    if not m:
        raise ValueError(f"--slurm {key}: got {text!r}; allowed: minutes, HH:MM:SS or D-HH:MM:SS")
    d, a, b, c = m.groups()
    if a is None and c is None:  # plain minutes
        total = int(b) + 24 * 60 * int(d or 0)
    elif c is None:  # MM:SS (Slurm reads "a:b" as minutes:seconds)
        total = int(a) + (int(b) > 0) + 24 * 60 * int(d or 0)
    else:  # HH:MM:SS
        total = 60 * int(a) + int(b) + (int(c) > 0) + 24 * 60 * int(d or 0)
    if total < 1:
        raise ValueError(f"--slurm {key}: got {text!r}; allowed: at least one minute")
    return total


def parse_slurm(text: str) -> SlurmOptions:
    """Parses ``key=value,key=value``; dashes in keys may be written as dashes or underscores.

    Raises:
      ValueError: one line naming the key, the value and what is allowed.
    """
    fields = {f.name for f in dataclasses.fields(SlurmOptions)}
    values: dict[str, object] = {}
    for item in [s for s in text.split(",") if s.strip()] if text else []:
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if key == "gpus":
            key = "gpus_per_task"
        if not sep or key not in fields:
            raise ValueError(
                f"--slurm: got {item!r}; allowed: key=value with key in {SlurmOptions.keys()}"
            )
        value = value.strip()
        if key in _INT_KEYS:
            if not value.isdigit() or int(value) < (0 if key == "gpus_per_task" else 1):
                low = 0 if key == "gpus_per_task" else 1
                raise ValueError(f"--slurm {key}: got {value!r}; allowed: an integer >= {low}")
            values[key] = int(value)
        elif key in ("time", "merge_time"):
            values[key] = _minutes(key, value)
        elif key == "executor":
            if value not in ("slurm", "local"):
                raise ValueError(f"--slurm executor: got {value!r}; allowed: slurm, local")
            values[key] = value
        else:
            if not value:
                raise ValueError(f"--slurm {key}: got an empty value; allowed: a non-empty string")
            values[key] = value
    return SlurmOptions(**values)


def _sweep_args(config: Path, overrides: Sequence[str]) -> list[str]:
    return [str(Path(config).resolve()), *overrides]


def run_shard(args: Sequence[str], index: int, count: int) -> int:
    """One array task: shard ``index/count`` of the sweep, no merge (the merge task does it)."""
    from cbs.sweep.__main__ import main

    code = main([*args, "--shard", f"{index}/{count}", "--no-merge", "--progress", "lines"])
    if code:
        raise RuntimeError(f"shard {index}/{count} exited with status {code}")
    return code


def run_merge(args: Sequence[str], analysis: bool = True) -> int:
    """The final task: merge once and analyse (also reports blocks still missing)."""
    from cbs.sweep.__main__ import main

    code = main([*args, "--merge-only", "--no-progress"] + ([] if analysis else ["--no-analysis"]))
    if code:
        raise RuntimeError(f"merge exited with status {code}")
    return code


def _parameters(opts: SlurmOptions, name: str, merge: bool) -> dict:
    p: dict = {"job_name": opts.job_name or name, "time": opts.merge_time if merge else opts.time}
    for key in ("partition", "account", "qos", "constraint", "mem"):
        source = f"merge_{key}" if merge and key in ("partition", "mem") else key
        value = getattr(opts, source)
        if value is None and merge and key == "partition":
            value = opts.partition
        if value is not None:
            p[key] = value
    if not merge:
        if opts.gpus_per_task is not None:
            p["gpus_per_task"] = opts.gpus_per_task
        if opts.cpus_per_task is not None:
            p["cpus_per_task"] = opts.cpus_per_task
        p["array_parallelism"] = opts.parallelism or opts.array
    if opts.setup:
        p["setup"] = [s.strip() for s in opts.setup.split(";") if s.strip()]
    return p


def _folder(opts: SlurmOptions, out_dir: Path) -> Path:
    return Path(opts.folder) if opts.folder else Path(out_dir) / "slurm"


def dry_run(
    opts: SlurmOptions, config: Path, overrides: Sequence[str], name: str, out_dir: Path
) -> str:
    """The two sbatch scripts submitit would submit, with the commands each task runs."""
    from submitit.slurm.slurm import _make_sbatch_string

    folder = _folder(opts, out_dir)
    args = _sweep_args(config, overrides)
    shard_cmd = (
        " ".join(shlex.quote(a) for a in [sys.executable, "-m", "cbs.sweep", *args])
        + f" --shard $SLURM_ARRAY_TASK_ID/{opts.array} --no-merge --progress lines"
    )
    merge_cmd = (
        " ".join(shlex.quote(a) for a in [sys.executable, "-m", "cbs.sweep", *args])
        + " --merge-only --no-progress"
    )
    submit_cmd = (
        f"{shlex.quote(sys.executable)} -u -m submitit.core._submit {shlex.quote(str(folder))}"
    )
    array = _make_sbatch_string(
        submit_cmd, folder, map_count=opts.array, **_parameters(opts, name, False)
    )
    merge = _make_sbatch_string(
        submit_cmd,
        folder,
        dependency="afterok:ARRAY_JOB_ID",
        **_parameters(opts, name + "-merge", True),
    )
    return "\n".join(
        [
            f"# {opts.array}-task array: task i runs (through submitit's pickled call of cbs.sweep.slurm.run_shard)",
            f"#   {shard_cmd}",
            "",
            array,
            "",
            "# then one task after the whole array succeeded: merge once and analyse",
            f"#   {merge_cmd}",
            "",
            merge,
        ]
    )


def submit(
    opts: SlurmOptions,
    config: Path,
    overrides: Sequence[str],
    name: str,
    out_dir: Path,
    wait: bool = False,
):
    """Submits the array and the dependent merge task; returns (array jobs, merge job).

    With ``executor=local`` (no dependency support) the array runs to completion first.
    """
    import submitit

    folder = _folder(opts, out_dir)
    args = _sweep_args(config, overrides)
    if opts.executor == "local":
        ex = submitit.LocalExecutor(folder=folder)
        ex.update_parameters(timeout_min=opts.time)
        jobs = ex.map_array(
            run_shard, [args] * opts.array, list(range(opts.array)), [opts.array] * opts.array
        )
        for job in jobs:
            job.result()  # raises if the shard failed
        ex.update_parameters(timeout_min=opts.merge_time)
        merge_job = ex.submit(run_merge, args)
        merge_job.result()
        return jobs, merge_job
    ex = submitit.SlurmExecutor(folder=folder)
    ex.update_parameters(**_parameters(opts, name, False))
    jobs = ex.map_array(
        run_shard, [args] * opts.array, list(range(opts.array)), [opts.array] * opts.array
    )
    array_id = jobs[0].job_id.split("_")[0]
    ex = submitit.SlurmExecutor(folder=folder)
    ex.update_parameters(
        dependency=f"afterok:{array_id}", **_parameters(opts, name + "-merge", True)
    )
    merge_job = ex.submit(run_merge, args)
    if wait:
        merge_job.result()
    return jobs, merge_job
