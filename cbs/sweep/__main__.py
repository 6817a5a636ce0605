"""Command line: ``python -m cbs.sweep [CONFIG.yaml] [key.path=value ...]``.

Kept short on purpose: parsing and printing only; the work is in cbs.sweep.runner.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "nqm_quickstart.yaml"


def _help_epilog() -> str:
    from cbs.sweep.config import SweepConfig
    from cbs.sweep.schema import describe
    lines = ["config keys (YAML; any of them can be overridden as key.path=value):"]
    lines += describe(SweepConfig)
    from cbs.sweep.config import OptimizerEntry
    lines.append("  each entry of grid.optimizers (grid.optimizers.I.KEY=value on the command line):")
    lines += describe(OptimizerEntry, prefix="grid.optimizers[i].")
    lines += ["", "back ends, their sections, metrics and optimizer kinds:"]
    from cbs.sweep.backend import BACKENDS, get_backend
    from cbs.sweep.schema import describe as describe_section
    for name in BACKENDS:
        try:
            backend = get_backend(name)
        except Exception as e:  # a back end that cannot import still leaves --help usable
            lines.append(f"  {name}: unavailable ({type(e).__name__}: {e})")
            continue
        lines.append(f"  backend {name!r}: section '{name}:'")
        lines += ["  " + l for l in describe_section(backend.Section, prefix=f"{name}.")]
        lines.append(f"    metrics: " + ", ".join(backend.metrics))
        for kind, spec in backend.optimizers.items():
            hps = ", ".join(f"{k}={v.default:g}" for k, v in spec.hparams.items()) or "no hyperparameters"
            lines.append(f"    kind {kind}: {spec.doc} [{hps}]")
    return "\n".join(lines)


def _parser(full_help: bool) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m cbs.sweep",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=textwrap.dedent("""\
            Run a batch-size sweep: steps-to-target for every batch size x learning rate x
            optimizer x seed cell, then the critical-batch-size analysis.

            Results go to the output folder (output.dir): results.parquet (one row per cell),
            curves.parquet, config.yaml, manifest.json, cbs.json, plots and report.md.
            Re-running the same command resumes an interrupted sweep: finished blocks are kept."""),
        epilog=_help_epilog() if full_help else "Run with --help for every config key.")
    p.add_argument("config", nargs="?", default=None,
                   help=f"YAML config file (default: the built-in {DEFAULT_CONFIG.name})")
    p.add_argument("overrides", nargs="*", metavar="key.path=value",
                   help="dotted overrides, YAML values: grid.batch_sizes=[8,16,32] target.value=0.02 output.dir=/tmp/x")
    p.add_argument("--dry-run", action="store_true", help="print the grid (cells, blocks, batch sizes) and exit")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-analysis", action="store_true", help="skip the critical-batch-size analysis at the end")
    p.add_argument("--shard", default=None, metavar="I/N",
                   help="run only shard I of N (0-based) of the blocks, e.g. one per cluster job; every shard "
                        "writes into the same output folder and the last one to finish merges the tables "
                        "(default: one shard per JAX process in a multi-host job, else 0/1)")
    return p


def _fail(msg: str, code: int = 2) -> int:
    print(f"cbs.sweep: {msg}", file=sys.stderr)
    return code


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
    print(f"sweep {cfg.name} (backend {cfg.backend}): {cells} cells in {len(blocks)} blocks -> {cfg.out_dir}")
    print(f"  batch sizes ({len(cfg.grid.batch_size_values())}): {cfg.grid.batch_size_values()}")
    print(f"  seeds: {cfg.grid.seeds}; target: {cfg.target.metric} < {cfg.target.value}; "
          f"budget: {cfg.budget.max_steps} steps")
    per_opt = Counter()
    for b in blocks:
        per_opt[(b.optimizer, b.kind)] += len(b.cells)
    for (label, kind), n in per_opt.items():
        opt = next(o for o in cfg.grid.optimizers if o.label == label)
        nb = sum(1 for b in blocks if b.optimizer == label)
        print(f"  {label} (kind {kind}, schedule {opt.schedule.kind}): {nb} blocks x {n // nb} cells/block; "
              f"hparams {dict(opt.hparams) or 'defaults'}")


def best_per_batch_size(run_dir) -> str:
    """Terminal table: per optimizer, the best steps-to-target and its LR per batch size."""
    from cbs.store import read_table
    df = read_table(run_dir, "results")
    if df is None or not len(df):
        return ""
    reached = df[df["reached"]]
    batch_sizes = sorted(df["batch_size"].unique())
    optimizers = list(dict.fromkeys(df["optimizer"]))
    best = reached.loc[reached.groupby(["optimizer", "batch_size"])["steps_to_target"].idxmin()] if len(reached) else reached
    cell = {(r.optimizer, r.batch_size): f"{r.steps_to_target:.4g} @ {r.lr:.3g}" for r in best.itertuples()}
    width = max([len(v) for v in cell.values()] + [len(o) for o in optimizers] + [12])
    lines = ["best steps to target @ learning rate (min over configs and seeds; '-' = never reached):",
             f"{'batch size':>10}  " + "  ".join(f"{o:>{width}}" for o in optimizers)]
    for b in batch_sizes:
        lines.append(f"{b:>10}  " + "  ".join(f"{cell.get((o, b), '-'):>{width}}" for o in optimizers))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    full_help = any(a in ("-h", "--help") for a in argv)
    args = _parser(full_help).parse_args(argv)
    config, overrides = args.config, list(args.overrides)
    if config is not None and "=" in config and not Path(config).exists():
        config, overrides = None, [config] + overrides
    config = Path(config) if config is not None else DEFAULT_CONFIG

    from cbs.errors import CbsError, ConfigError
    try:
        from cbs.sweep.config import load_config
        cfg = load_config(config, overrides)
        shard = _parse_shard(args.shard)
    except ConfigError as e:
        where = f"{config}: " if e.path != "<file>" else ""
        return _fail(f"{where}{e}")
    except (CbsError, ValueError) as e:
        return _fail(str(e))

    from cbs.sweep.runner import plan, run_sweep
    if args.dry_run:
        print_plan(cfg, plan(cfg))
        return 0
    from cbs.compile_cache import enable_compilation_cache
    enable_compilation_cache()
    try:
        summary = run_sweep(cfg, progress=not args.no_progress, shard=shard)
    except CbsError as e:
        return _fail(str(e))
    except KeyboardInterrupt:
        print("\ninterrupted: finished blocks are saved; run the same command again to resume", file=sys.stderr)
        return 130
    if summary.complete:
        print(best_per_batch_size(summary.out_dir))
    if summary.complete and not args.no_analysis:
        from cbs.analysis import print_summary
        print_summary(summary.out_dir, plots=cfg.output.plots)
    print(summary.line())
    return 0


if __name__ == "__main__":
    sys.exit(main())
