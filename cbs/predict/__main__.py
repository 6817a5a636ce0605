"""``python -m cbs.predict CONFIG.yaml [key.path=value ...] [options]``: forecast a train sweep.

Prints the forecast table (S(B), the LR per batch size, B_crit per optimizer with B_simple
and B_noise beside it) and writes prediction.parquet, prediction.json and prediction.png
into the config's output folder (or --out). If that folder holds the finished sweep, the
anchor is read from it and forecast and measurement are set side by side.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

from cbs.predict._run import PredictOptions

_DEFAULTS = PredictOptions()

# One flag per PredictOptions field (dashes for underscores), with its default and this help.
_HELP = {
    "anchor": "anchor batch size (default: the grid's smallest)",
    "seed": "measure at the init of this seed (default: grid.seeds[0])",
    "examples": "training examples measured",
    "top_k": "top curvature eigenpairs",
    "lanczos_iters": "Lanczos steps for the top-k",
    "slq_probes": "SLQ random probes (bulk density)",
    "slq_iters": "Lanczos steps per SLQ probe",
    "noise_examples": "examples in the Monte Carlo tr(C Sigma) (B_noise)",
    "chunk": "per-example gradients held at once",
    "curvature": "ggn (Gauss-Newton, PSD) or hessian",
    "bulk_noise": "bulk c = kappa h matched to tr(Sigma) ('trace') or tr(C Sigma) ('curvature')",
    "bins": "log bins of the bulk spectrum",
    "floor": "drop directions flatter than floor*h_max",
    "max_memory_mb": "refuse measurements whose buffers exceed this",
    "max_tflop": "refuse measurements whose estimated compute (float64 TFLOP, from XLA's FLOP "
    "count of the model) exceeds this, before any compute",
    "lr_grid": "continuous: tune the LR continuously; sweep: SGD/momentum forecasts pick the best "
    "of the config's LR grid (the NQM LR is the network's there)",
    "measure_at": "init: curvature and start at initialisation; target: curvature, noise and "
    "start (theta_0 - theta_T) measured where the anchor run reaches the target",
    "noise_at": "target: gradient noise measured where the anchor run reaches the target; init",
    "start": "displacement: the NQM starts at theta_0 - theta_T as measured; loss-drop: that "
    "start rescaled so its risk is the loss the anchor run descended (docs/predict.md)",
}


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" only where the help does not already say what the default is."""

    def _get_help_string(self, action):
        if action.default is None or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def _parser() -> argparse.ArgumentParser:
    from cbs.errors import ArgumentParser

    p = ArgumentParser(
        prog="python -m cbs.predict",
        prefix="cbs.predict",
        description=__doc__.split("\n\n")[0],
        formatter_class=_HelpFormatter,
    )
    # optional to argparse only so that intermixed parsing names just the config when it
    # is missing (main refuses its absence itself)
    p.add_argument("config", nargs="?", default=None, help="a train config (YAML)")
    p.add_argument("overrides", nargs="*", help="key.path=value overrides, as for cbs.sweep")
    p.add_argument("--out", default=None, help="output folder (default: the config's output.dir)")
    for field in dataclasses.fields(PredictOptions):
        default = getattr(_DEFAULTS, field.name)
        p.add_argument(
            "--" + field.name.replace("_", "-"),
            type=int if default is None else type(default),  # (anchor, seed: integers)
            default=default,
            help=_HELP[field.name],
        )
    p.add_argument("--no-plot", action="store_true", help="skip prediction.png")
    return p


def _fail(msg: str, code: int = 2) -> int:
    from cbs.errors import one_line

    print(f"cbs.predict: error: {one_line(msg)}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status: 0 done, 2 bad input or a file-system problem
    (one line on stderr), 130 interrupted, 1 an internal error (one line; CBS_TRACEBACK=1
    shows the traceback)."""
    # intermixed: option flags may come before, between or after the config and the
    # overrides, the rule of cbs.sweep
    parser = _parser()
    args = parser.parse_intermixed_args(argv)
    if args.config is None:
        parser.error("the following arguments are required: config")
    from cbs.errors import (
        CbsError,
        ConfigError,
        describe_error,
        exit_code,
        record_interrupts,
        was_interrupted,
    )

    try:
        with record_interrupts():
            return _predict(args)
    except ConfigError as e:
        return _fail(f"{args.config}: {e}")
    except CbsError as e:
        return _fail(str(e).splitlines()[0])
    except BrokenPipeError:  # output piped into `head` and the like
        sys.stderr.close()
        return 0
    except SystemExit:
        raise
    except BaseException as e:  # noqa: BLE001 - the CLI's contract is one line, never a traceback
        # (was_interrupted: a library turned our KeyboardInterrupt into another error)
        if isinstance(e, KeyboardInterrupt) or was_interrupted():
            print("cbs.predict: interrupted", file=sys.stderr)
            return 130
        if os.environ.get("CBS_TRACEBACK"):
            raise
        return _fail(describe_error(e), exit_code(e))


def _predict(args) -> int:
    opts = PredictOptions(
        **{f.name: getattr(args, f.name) for f in dataclasses.fields(PredictOptions)}
    )
    opts.check()
    from cbs.sweep.config import load_config

    cfg = load_config(Path(args.config), args.overrides)
    from cbs.compile_cache import enable_compilation_cache
    from cbs.predict._run import predict

    enable_compilation_cache()
    result = predict(
        cfg, opts, out_dir=Path(args.out) if args.out else None, plots=not args.no_plot
    )
    print(result.text)
    print("wrote " + ", ".join(str(f) for f in result.files))
    return 0


if __name__ == "__main__":
    sys.exit(main())
