"""Command line: ``python -m cbs.analyze RUN_DIR [RUN_DIR ...]``.

Analyzes run folders written by the sweep runner (critical batch size per optimizer,
tables, plots, report.md) and, given several, compares them. The work is done by
:mod:`cbs.analysis`; this module only parses options and reports errors.
"""

from __future__ import annotations

import argparse
import os
import sys

__all__ = ["main", "build_parser"]

_DESCRIPTION = """\
Extract the critical batch size (CBS) from one or more sweep run folders.

For each run and optimizer: steps to target S(B) = min over hyperparameter configs of the
first evaluated step with the metric strictly below the target (median over seeds;
diverged cells excluded, censored batch sizes kept out of the fit), a fit of
S = S_min + E_min / B by least squares in log S, and from it
  B_crit = E_min / S_min                     (McCandlish et al. 2018; primary)
  B*     = (1 + delta) B0 + delta B_crit     (Zhang et al. 2024: delta more steps than
                                              perfect scaling from B0)
  knee   = first B with B S(B) / (B0 S(B0)) > 1 + delta, on the raw table (diagnostic)
with percentile bootstrap intervals (over seeds when there are >= 2, else over log-space
residuals). Options left out come from the run's config.yaml (analysis: section).

Writes into the run folder: cbs.json, cbs.parquet, steps_vs_batch.png, best_lr.png,
data_efficiency.png and report.md. With several runs, only compare.md, compare.parquet,
compare.json and compare_steps_vs_batch.png (in --out, default the first run folder); the
input runs' own files are left as they were.
"""

_EPILOG = """\
examples:
  python -m cbs.analyze runs/nqm_sgd
  python -m cbs.analyze runs/a runs/b --out runs/compare --delta 0.2 --b0 256
  python -m cbs.analyze runs/m1 runs/m2 runs/m3 --scale-key train.model.params
  python -m cbs.analyze runs/nqm_sgd --targets 0.1,0.03,0.01

exit status: 0 on success, 2 on a usage error or a missing/invalid run folder.
"""


def build_parser() -> argparse.ArgumentParser:
    from cbs.errors import ArgumentParser

    p = ArgumentParser(
        prog="python -m cbs.analyze",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "run_dirs",
        nargs="+",
        metavar="RUN_DIR",
        help="run folder(s) written by the sweep runner (results.parquet, or parts/ while running)",
    )
    p.add_argument(
        "--delta",
        type=float,
        default=None,
        help="overhead over perfect linear scaling that defines B* and the knee (default: "
        "config analysis.delta, else 0.2)",
    )
    p.add_argument(
        "--b0",
        type=float,
        default=None,
        help="anchor batch size of B* and the knee, in examples (default: config analysis.b0, "
        "else the smallest swept batch size; 256 reproduces Zhang et al.)",
    )
    p.add_argument(
        "--bootstrap",
        type=int,
        default=None,
        metavar="N",
        help="bootstrap resamples for the intervals; 0 = no intervals (default: config "
        "analysis.bootstrap, else 1000)",
    )
    p.add_argument(
        "--ci",
        type=float,
        default=0.95,
        metavar="LEVEL",
        help="level of the percentile intervals (default 0.95)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap (default 0)")
    p.add_argument(
        "--form",
        choices=["mcCandlish", "general"],
        default="mcCandlish",
        help="S(B) model: mcCandlish = S_min (1 + B_crit/B) (default); general = "
        "S_min (1 + (B_crit/B)^alpha) with alpha fitted",
    )
    p.add_argument(
        "--units",
        choices=["auto", "examples", "tokens"],
        default="auto",
        help="batch-size unit of every output: examples, or tokens = examples x tokens_per_example "
        "(default auto: tokens when tokens_per_example > 1)",
    )
    p.add_argument(
        "--tokens-per-example",
        type=int,
        default=None,
        metavar="T",
        help="tokens per example (sequence length), overriding the results' tokens_per_example column",
    )
    p.add_argument(
        "--no-tuned",
        action="store_true",
        help="ignore tuned.parquet (the continuously refined LR optimum the NQM back end writes); "
        "use the grid's cells only",
    )
    p.add_argument(
        "--interpolated",
        action="store_true",
        help="use steps linearly interpolated between evaluations (steps_interpolated) instead "
        "of the first evaluated crossing",
    )
    p.add_argument(
        "--uncertified",
        action="store_true",
        help="also fit points whose first crossing is not proven (crossing_exact / crossing_certified "
        "0); by default they are excluded and counted in the report",
    )
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots and report.md")
    p.add_argument(
        "--no-write",
        action="store_true",
        help="write nothing into the run folders (print only; a comparison is written only with --out)",
    )
    p.add_argument(
        "--out",
        default=None,
        metavar="DIR",
        help="folder for the comparison files of several runs (default: the first run folder)",
    )
    p.add_argument(
        "--scale-key",
        default=None,
        metavar="KEY",
        help="dotted key in each run's config.yaml (or manifest.json) giving its model or data "
        "size, e.g. train.model.params; fits B_crit = c * scale^beta (and B* likewise) across the runs",
    )
    p.add_argument(
        "--scale-values",
        default=None,
        metavar="X1,X2,...",
        help="explicit scales, one per run in order (instead of --scale-key)",
    )
    p.add_argument(
        "--targets",
        default=None,
        metavar="T1,T2,...",
        help="also fit the CBS at these targets, with steps read off curves.parquet (McCandlish/Kaplan "
        "per-target fits); writes cbs_targets.parquet/.json and cbs_vs_target.png per run",
    )
    p.add_argument("--quiet", action="store_true", help="print only the short summary")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    parser = build_parser()
    # intermixed: option flags may come before, between or after the run folders, as in
    # cbs.sweep and cbs.predict
    args = parser.parse_intermixed_args(argv)
    from cbs.errors import (
        CbsError,
        describe_error,
        exit_code,
        one_line,
        record_interrupts,
        was_interrupted,
    )

    options = dict(
        delta=args.delta,
        b0=args.b0,
        n_boot=args.bootstrap,
        tokens_per_example=args.tokens_per_example,
        unit=args.units,
        form=args.form,
        use_tuned=not args.no_tuned,
        interpolated=args.interpolated,
        ci_level=args.ci,
        seed=args.seed,
        write=not args.no_write,
        uncertified=args.uncertified,
    )
    plots = False if args.no_plots else None
    try:
        with record_interrupts():
            return _analyze(args, options, plots)
    except CbsError as e:  # AnalysisError, or a config error met while reading a run folder
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into `head` and the like
        sys.stderr.close()
        return 0
    except BaseException as e:  # noqa: BLE001 - the CLI's contract is one line, never a traceback
        # (was_interrupted: a library turned our KeyboardInterrupt into another error)
        if isinstance(e, KeyboardInterrupt) or was_interrupted():
            print(f"{parser.prog}: interrupted", file=sys.stderr)
            return 130
        if isinstance(e, SystemExit) or os.environ.get("CBS_TRACEBACK"):
            raise
        print(f"{parser.prog}: error: {one_line(describe_error(e))}", file=sys.stderr)
        return exit_code(e)


def _numbers(flag: str, text: str | None) -> list[float] | None:
    """The comma-separated numbers of a flag (None when not given)."""
    from cbs.errors import AnalysisError

    if not text:
        return None
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise AnalysisError(f"{flag} must be comma-separated numbers; got {text!r}") from None


def _analyze(args, options, plots) -> int:
    from cbs.analysis import analyze_run, compare_runs, short_summary
    from cbs.errors import AnalysisError

    if not 0 < args.ci < 1:
        raise AnalysisError(f"--ci must be between 0 and 1; got {args.ci}")
    scale_values = _numbers("--scale-values", args.scale_values)
    targets = _numbers("--targets", args.targets)
    if len(args.run_dirs) == 1 and not (args.scale_key or scale_values):
        analysis = analyze_run(args.run_dirs[0], plots=plots, **options)
        print(short_summary(analysis) if args.quiet else analysis.text)
        if not args.quiet and analysis.files:
            print("wrote " + ", ".join(str(f) for f in analysis.files))
    else:
        comp = compare_runs(
            args.run_dirs,
            out=args.out,
            scale_key=args.scale_key,
            scale_values=scale_values,
            plots=plots,
            **options,
        )
        for a in comp.runs:
            print(short_summary(a) if args.quiet else a.text)
        print(comp.text)
        if comp.files:
            print("wrote " + ", ".join(str(f) for f in comp.files))
    if targets:
        from cbs.analysis import analyze_targets

        # the run's fit options; analyze_targets reads steps off the curves itself
        # (no tuned LRs, its own interpolation, no certification flags)
        shared = ("delta", "b0", "n_boot", "tokens_per_example", "unit", "form", "ci_level")
        for run_dir in args.run_dirs:
            sweep = analyze_targets(
                run_dir,
                targets,
                plots=not args.no_plots,
                **{k: options[k] for k in (*shared, "seed", "write")},
            )
            print(sweep.text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
