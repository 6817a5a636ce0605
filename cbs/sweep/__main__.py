"""Command line: ``python -m cbs.sweep [CONFIG.yaml] [key.path=value ...]``.

Kept short on purpose: parsing and printing only; the work is in cbs.sweep.runner.
"""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
from pathlib import Path

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "nqm_quickstart.yaml"


def _help_epilog() -> str:
    # The same text as docs/config.md (cbs.sweep.reference), so --help and the docs agree.
    from cbs.sweep.reference import config_reference

    return config_reference()


def _parser(full_help: bool) -> argparse.ArgumentParser:
    from cbs.errors import ArgumentParser

    p = ArgumentParser(
        prog="python -m cbs.sweep",
        prefix="cbs.sweep",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=textwrap.dedent("""\
            Run a batch-size sweep: steps-to-target for every batch size x learning rate x
            optimizer x seed cell, then the critical-batch-size analysis.

            Results go to the output folder (output.dir): results.parquet (one row per cell),
            curves.parquet, config.yaml, manifest.json, cbs.json, plots and report.md.
            Re-running the same command resumes an interrupted sweep: finished blocks are kept."""),
        epilog=_help_epilog() if full_help else "Run with --help for every config key.",
    )
    p.add_argument(
        "config",
        nargs="?",
        default=None,
        help=f"YAML config file (default: the built-in {DEFAULT_CONFIG.name})",
    )
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="key.path=value",
        help="dotted overrides, YAML values: grid.batch_sizes=[8,16,32] target.value=0.02 output.dir=/tmp/x",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print the grid (cells, blocks, batch sizes) and exit",
    )
    p.add_argument(
        "--no-progress",
        action="store_true",
        help="print no progress at all (same as --progress off)",
    )
    p.add_argument(
        "--progress",
        choices=("auto", "bar", "lines", "off"),
        default="auto",
        help="bar: a bar that moves within blocks (cells and steps, ETA including planned "
        "adaptive rounds); lines: one line per finished block and per planned adaptive round; "
        "auto (default): bar on a terminal, lines otherwise (logs, batch jobs)",
    )
    p.add_argument(
        "--tensorboard",
        action="store_true",
        help="write live TensorBoard event files under OUTPUT/tensorboard/ (output.tensorboard=true)",
    )
    p.add_argument(
        "--no-analysis",
        action="store_true",
        help="skip the critical-batch-size analysis at the end",
    )
    p.add_argument(
        "--shard",
        default=None,
        metavar="I/N",
        help="run only shard I of N (0-based) of the blocks, e.g. one per cluster job; every shard "
        "writes into the same output folder and the last one to finish merges the tables "
        "(default: one shard per JAX process in a multi-process job, else 0/1)",
    )
    g = p.add_argument_group(
        "multi-process JAX job (also detected from srun, or from JAX_COORDINATOR_ADDRESS "
        "+ JAX_NUM_PROCESSES + JAX_PROCESS_ID)"
    )
    g.add_argument(
        "--coordinator",
        default=None,
        metavar="HOST:PORT",
        help="address of process 0's coordination service",
    )
    g.add_argument(
        "--num-processes", type=int, default=None, metavar="N", help="processes in the job"
    )
    g.add_argument(
        "--process-id", type=int, default=None, metavar="I", help="this process's index, 0..N-1"
    )
    g = p.add_argument_group("Slurm (through submitit)")
    g.add_argument(
        "--slurm",
        default=None,
        metavar="key=value,...",
        help="submit an array job (one shard per task) and a dependent merge-and-analyse task; keys: "
        "array (tasks, default 2), partition, gpus_per_task, cpus_per_task, time (minutes or "
        "HH:MM:SS), mem, account, qos, constraint, parallelism, merge_time, merge_partition, "
        "merge_mem (the merge task requests no GPU and not the array's mem), folder, job_name, "
        "setup (';'-separated shell lines), executor (slurm or local)",
    )
    g.add_argument(
        "--slurm-dry-run", action="store_true", help="print the generated sbatch scripts and exit"
    )
    g = p.add_argument_group("shards and merging")
    g.add_argument(
        "--costs-from",
        action="append",
        default=[],
        metavar="RUN_DIR",
        help="balance shards by the block times measured in this earlier run folder (repeatable); "
        "used by the process that creates the output folder",
    )
    g.add_argument(
        "--no-merge",
        action="store_true",
        help="do not merge the tables when the last block is done (a separate --merge-only step will)",
    )
    g.add_argument(
        "--merge-only",
        action="store_true",
        help="compute nothing: merge a finished sweep's tables once and analyse",
    )
    return p


def _fail(msg: str, code: int = 2) -> int:
    from cbs.errors import one_line

    print(f"cbs.sweep: {one_line(msg)}", file=sys.stderr)
    return code


def quote_hint(value, overrides) -> str:
    """A hint when a bad value looks like a piece of an override the shell took apart:
    bash brace-expands ``k={a:1,b:2}`` into ``k=a:1 k=b:2`` and splits ``k=[4, 8]`` at the
    space, so the config sees ``'b:2'`` or ``'[4,'``.

    >>> quote_hint("step:2", []), quote_hint("[4,", []), quote_hint("sgd", ["a=1"])
    (" (quote the override, e.g. 'grid.batch_sizes={log2_min: 2, step: 2}': the shell split or brace-expanded it)", " (quote the override, e.g. 'grid.batch_sizes={log2_min: 2, step: 2}': the shell split or brace-expanded it)", '')
    """
    import re

    hint = (
        " (quote the override, e.g. 'grid.batch_sizes={log2_min: 2, step: 2}': the shell split "
        "or brace-expanded it)"
    )
    keys = [o.split("=", 1)[0] for o in overrides if "=" in o]
    if len(keys) != len(set(keys)) or any("=" not in o for o in overrides):
        return hint
    if isinstance(value, str):
        text = value.strip()
        if re.fullmatch(r"[A-Za-z_][\w.]*:\S.*", text):  # 'step:2', a brace-expanded piece
            return hint
        if text.count("[") != text.count("]") or text.count("{") != text.count("}"):
            return hint
        if text.endswith(","):
            return hint
    return ""


def _parse_shard(text: str | None) -> tuple[int, int]:
    if text is None:
        import jax

        return (jax.process_index(), jax.process_count())
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard: got {text!r}; allowed: I/N with integers 0 <= I < N") from None
    if not 0 <= i < n:
        raise ValueError(f"--shard: got {text!r}; allowed: I/N with integers 0 <= I < N")
    return i, n


def print_plan(cfg, blocks) -> None:
    from collections import Counter

    cells = sum(len(b.cells) for b in blocks)
    print(
        f"sweep {cfg.name} (backend {cfg.backend}): {cells} cells in {len(blocks)} blocks -> {cfg.out_dir}"
    )
    print(f"  batch sizes ({len(cfg.grid.batch_size_values())}): {cfg.grid.batch_size_values()}")
    print(
        f"  seeds: {cfg.grid.seeds}; target: {cfg.target.metric} < "
        f"{cfg.target.value if cfg.target.value is not None else 'the pilot rule (target.rule)'}; "
        f"budget: {cfg.budget.max_steps} steps"
    )
    per_opt = Counter()
    for b in blocks:
        per_opt[(b.optimizer, b.kind)] += len(b.cells)
    for (label, kind), n in per_opt.items():
        opt = next(o for o in cfg.grid.optimizers if o.label == label)
        nb = sum(1 for b in blocks if b.optimizer == label)
        print(
            f"  {label} (kind {kind}, schedule {opt.schedule.kind}): {nb} blocks x {n // nb} cells/block; "
            f"hparams {dict(opt.hparams) or 'defaults'}"
        )
        search = opt.search or cfg.grid.search
        if search is not None:
            print(
                f"    search: {search.trials} {search.sequence} trials of "
                f"{', '.join(sorted(search.space))} per batch size, up to {search.max_rounds} "
                "extension rounds"
            )


def print_estimate(cfg, blocks) -> None:
    """The bound on adaptive rounds and, where the back end has a time model, the time."""
    from cbs.sweep.backend import get_backend
    from cbs.sweep.progress import duration
    from cbs.sweep.runner import plan_estimate

    backend = None
    if get_backend(cfg.backend).block_cost_unit == "seconds":
        backend = get_backend(cfg.backend)(cfg)  # builds data and model, computes nothing
    est = plan_estimate(cfg, blocks, backend)
    a = cfg.grid.adaptive
    if est["adaptive"]:
        print(
            f"  first pass: {est['cells']} cells in {est['blocks']} blocks; adaptive LR rounds "
            f"(max_extend={a.max_extend}, points={a.points}, zoom={a.zoom}) add at most "
            f"{est['max_adaptive_cells']} cells in {est['max_adaptive_blocks']} blocks: at most "
            f"{est['cells'] + est['max_adaptive_cells']} cells"
        )
    else:
        print(f"  first pass: {est['cells']} cells in {est['blocks']} blocks; no adaptive rounds")
    if est["seconds_first_pass"] is not None:
        first, more = est["seconds_first_pass"], est["seconds_adaptive"] or 0.0
        print(
            f"  time (cost model: full step budget per cell at a nominal speed, no early stop; "
            f"compiles and machine load come on top): first pass ~{duration(first)}"
            + (f", with every adaptive round at most ~{duration(first + more)}" if more else "")
        )
    else:
        print(f"  time: no time model for backend {cfg.backend} (its block costs are relative)")


def best_per_batch_size(run_dir) -> str:
    """Terminal table: per optimizer, the best steps-to-target and its LR per batch size."""
    from cbs.analysis._format import format_number, text_table
    from cbs.store import read_table

    df = read_table(run_dir, "results")
    if df is None or not len(df):
        return ""
    reached = df[df["reached"]]
    batch_sizes = sorted(df["batch_size"].unique())
    optimizers = list(dict.fromkeys(df["optimizer"]))
    best = (
        reached.loc[reached.groupby(["optimizer", "batch_size"])["steps_to_target"].idxmin()]
        if len(reached)
        else reached
    )
    cell = {
        (
            r.optimizer,
            r.batch_size,
        ): f"{format_number(r.steps_to_target)} @ {format_number(r.lr, 3)}"
        for r in best.itertuples()
    }
    rows = [[format_number(b)] + [cell.get((o, b), "-") for o in optimizers] for b in batch_sizes]
    return (
        "best steps to target @ learning rate, grid (the best swept cell: min over configs and "
        "seeds; '-' = never reached; the analysis may refine the NQM's LRs, see report.md):\n"
        + text_table(["batch size", *optimizers], rows)
    )


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status: 0 done, 2 bad input or a file-system problem
    (one line on stderr, before any compute when the config is at fault), 130 interrupted,
    1 an internal error (one line; CBS_TRACEBACK=1 shows the traceback)."""
    from cbs.errors import describe_error, exit_code, record_interrupts, was_interrupted

    interrupted = "interrupted; finished blocks are saved, run the same command again to resume"
    try:
        with record_interrupts():
            return _main(argv)
    except KeyboardInterrupt:
        return _fail(interrupted, 130)
    except BrokenPipeError:  # output piped into `head` and the like
        sys.stderr.close()
        return 0
    except SystemExit:
        raise
    except BaseException as e:  # noqa: BLE001 - the CLI's contract is one line, never a traceback
        if was_interrupted():  # a library turned our KeyboardInterrupt into another error
            return _fail(interrupted, 130)
        if os.environ.get("CBS_TRACEBACK"):
            raise
        return _fail(describe_error(e), exit_code(e))


def _main(argv: list[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    full_help = any(a in ("-h", "--help") for a in argv)
    # intermixed: option flags may come before, between or after the config and overrides
    args = _parser(full_help).parse_intermixed_args(argv)
    config, overrides = args.config, list(args.overrides)
    if config is not None and "=" in config and not Path(config).exists():
        config, overrides = None, [config] + overrides
    config = Path(config) if config is not None else DEFAULT_CONFIG

    from cbs import distributed
    from cbs.errors import CbsError, ConfigError

    try:
        from cbs.sweep.config import load_config

        if args.tensorboard:
            overrides = overrides + ["output.tensorboard=true"]
        cfg = load_config(config, overrides)
        spec = distributed.detect(args.coordinator, args.num_processes, args.process_id)
        if spec is not None and args.shard is not None:
            raise ValueError(
                f"--shard: got {args.shard!r} in a multi-process job; allowed: no --shard "
                "(each process takes shard process_index/process_count)"
            )
        slurm = None
        if args.slurm is not None or args.slurm_dry_run:
            from cbs.sweep.slurm import parse_slurm

            slurm = parse_slurm(args.slurm or "")
            if args.shard is not None or spec is not None or args.merge_only:
                raise ValueError(
                    "--slurm: allowed only without --shard, --merge-only and multi-process flags "
                    "(it starts the shards itself)"
                )
        if spec is None:
            shard = _parse_shard(args.shard if args.shard is not None else "0/1")
    except ConfigError as e:
        where = f"{config}: " if e.path != "<file>" else ""
        return _fail(f"{where}{e}{quote_hint(e.value, overrides)}")
    except (CbsError, ValueError) as e:
        return _fail(str(e))

    from cbs.sweep.runner import plan, run_sweep

    if args.dry_run:
        blocks = plan(cfg)
        print_plan(cfg, blocks)
        print_estimate(cfg, blocks)
        return 0
    if slurm is not None:
        return _slurm(slurm, args, config, overrides, cfg)
    if spec is not None:
        shard = distributed.initialize(spec)
    from cbs.compile_cache import enable_compilation_cache

    enable_compilation_cache()

    def finalize():
        if args.no_analysis:
            print(best_per_batch_size(cfg.out_dir))
        else:
            from cbs.analysis import print_summary

            a = cfg.analysis
            print_summary(
                cfg.out_dir,
                steps=True,  # the report's numbers, tuned ones labelled (one truth per cell)
                plots=cfg.output.plots,
                delta=a.delta,
                b0=a.b0,
                n_boot=a.bootstrap,
                tokens_per_example=a.tokens_per_example,
            )

    if args.merge_only:
        return _merge_only(cfg, finalize)
    try:
        summary = run_sweep(
            cfg,
            progress="off" if args.no_progress else args.progress,
            shard=shard,
            finalize=finalize,
            costs_from=args.costs_from,
            merge=not args.no_merge,
            before_merge=(lambda: distributed.barrier("computed")) if spec else None,
        )
    except ConfigError as e:  # a back end's check that needs the data or the model
        return _fail(f"{config}: {e}")
    if summary.complete and not summary.merged and not args.no_merge:
        print("all blocks are done; another process merged the tables and ran the analysis")
    print(summary.line())
    if spec is not None:
        # Nobody leaves (taking the coordinator down) before the merging process is done.
        distributed.barrier("finished")
        distributed.shutdown()
    return 0


def _merge_only(cfg, finalize) -> int:
    from cbs.store import RunStore
    from cbs.sweep.backend import get_backend
    from cbs.sweep.config import config_hash
    from cbs.sweep.runner import merge_plan, merge_run, plan

    store = RunStore(cfg.out_dir)
    if store.existing_hash() != config_hash(cfg):
        return _fail(
            f"--merge-only: {store.dir} holds no run of this config (config hash "
            f"{config_hash(cfg)}); run the sweep first",
            1,
        )
    blocks = plan(cfg)
    complete, order, extra = merge_plan(store, cfg, blocks, get_backend(cfg.backend))
    if not complete:
        missing = [b.block_id for b in blocks if b.block_id not in store.finished_blocks()]
        where = (
            f"{len(missing)} of {len(blocks)} blocks are not finished (first: {missing[0]})"
            if missing
            else "adaptive learning-rate rounds are still pending"
        )
        return _fail(f"--merge-only: {where}; re-run the failed shards, then merge again", 1)
    merged = merge_run(store, order, finalize, force_finalize=True, wait_s=3600, extra=extra)
    print(f"merged {store.dir}" if merged else f"{store.dir} was already merged; analysis re-run")
    return 0


def _slurm(opts, args, config, overrides, cfg) -> int:
    from cbs.sweep import slurm

    if args.slurm_dry_run:
        print(slurm.dry_run(opts, config, overrides, cfg.name, cfg.out_dir))
        return 0
    try:
        import submitit  # noqa: F401
    except ImportError:
        return _fail("--slurm: needs the submitit package (pip install submitit)")
    jobs, merge_job = slurm.submit(opts, config, overrides, cfg.name, cfg.out_dir)
    print(
        f"submitted {len(jobs)} shard tasks (job {jobs[0].job_id.split('_')[0]}) and the merge task "
        f"(job {merge_job.job_id}, runs after all shards succeed); results -> {cfg.out_dir}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
