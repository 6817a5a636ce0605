"""``python -m cbs.predict CONFIG.yaml [key.path=value ...] [options]``: forecast a train sweep.

Prints the forecast table (S(B), the LR per batch size, B_crit per optimizer with B_simple
and B_noise beside it) and writes prediction.parquet, prediction.json and prediction.png
into the config's output folder (or --out). If that folder holds the finished sweep, the
anchor is read from it and forecast and measurement are set side by side.
"""

from __future__ import annotations

import argparse
import dataclasses
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
    p = argparse.ArgumentParser(
        prog="python -m cbs.predict",
        description=__doc__.split("\n\n")[0],
        formatter_class=_HelpFormatter,
    )
    p.add_argument("config", help="a train config (YAML)")
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


def _fail(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from cbs.errors import CbsError, ConfigError

    opts = PredictOptions(
        **{f.name: getattr(args, f.name) for f in dataclasses.fields(PredictOptions)}
    )
    try:
        opts.check()
        from cbs.sweep.config import load_config

        cfg = load_config(Path(args.config), args.overrides)
        from cbs.compile_cache import enable_compilation_cache
        from cbs.predict._run import predict

        enable_compilation_cache()
        result = predict(
            cfg, opts, out_dir=Path(args.out) if args.out else None, plots=not args.no_plot
        )
    except ConfigError as e:
        return _fail(f"{args.config}: {e}")
    except CbsError as e:
        return _fail(str(e).splitlines()[0])
    print(result.text)
    print("wrote " + ", ".join(str(f) for f in result.files))
    return 0


if __name__ == "__main__":
    sys.exit(main())
