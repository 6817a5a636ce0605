"""``python -m cbs.predict CONFIG.yaml [key.path=value ...] [options]``: forecast a train sweep.

Prints the forecast table (S(B), the LR per batch size, B_crit per optimizer with B_simple
and B_noise beside it) and writes prediction.parquet, prediction.json and prediction.png
into the config's output folder (or --out). If that folder holds the finished sweep, the
anchor is read from it and forecast and measurement are set side by side.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cbs.predict._run import PredictOptions

_DEFAULTS = PredictOptions()


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
    p.add_argument(
        "--anchor", type=int, default=None, help="anchor batch size (default: the grid's smallest)"
    )
    p.add_argument(
        "--seed",
        type=int,
        default=None,
        help="measure at the init of this seed (default: grid.seeds[0])",
    )
    p.add_argument(
        "--examples", type=int, default=_DEFAULTS.examples, help="training examples measured"
    )
    p.add_argument("--top-k", type=int, default=_DEFAULTS.top_k, help="top curvature eigenpairs")
    p.add_argument(
        "--lanczos-iters",
        type=int,
        default=_DEFAULTS.lanczos_iters,
        help="Lanczos steps for the top-k",
    )
    p.add_argument(
        "--slq-probes",
        type=int,
        default=_DEFAULTS.slq_probes,
        help="SLQ random probes (bulk density)",
    )
    p.add_argument(
        "--slq-iters", type=int, default=_DEFAULTS.slq_iters, help="Lanczos steps per SLQ probe"
    )
    p.add_argument(
        "--noise-examples",
        type=int,
        default=_DEFAULTS.noise_examples,
        help="examples in the Monte Carlo tr(C Sigma) (B_noise)",
    )
    p.add_argument(
        "--chunk", type=int, default=_DEFAULTS.chunk, help="per-example gradients held at once"
    )
    p.add_argument(
        "--curvature", default=_DEFAULTS.curvature, help="ggn (Gauss-Newton, PSD) or hessian"
    )
    p.add_argument(
        "--bulk-noise",
        default=_DEFAULTS.bulk_noise,
        help="bulk c = kappa h matched to tr(Sigma) ('trace') or tr(C Sigma) ('curvature')",
    )
    p.add_argument("--bins", type=int, default=_DEFAULTS.bins, help="log bins of the bulk spectrum")
    p.add_argument(
        "--floor",
        type=float,
        default=_DEFAULTS.floor,
        help="drop directions flatter than floor*h_max",
    )
    p.add_argument(
        "--max-memory-mb",
        type=float,
        default=_DEFAULTS.max_memory_mb,
        help="refuse measurements whose buffers exceed this",
    )
    p.add_argument(
        "--lr-grid",
        default=_DEFAULTS.lr_grid,
        help="continuous: tune the LR continuously; sweep: SGD/momentum forecasts pick the best of the "
        "config's LR grid (the NQM LR is the network's there)",
    )
    p.add_argument(
        "--measure-at",
        default=_DEFAULTS.measure_at,
        help="init: curvature and start at initialisation; target: curvature, noise and start "
        "(theta_0 - theta_T) measured where the anchor run reaches the target",
    )
    p.add_argument(
        "--noise-at",
        default=_DEFAULTS.noise_at,
        help="target: gradient noise measured where the anchor run reaches the target; init",
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
        anchor=args.anchor,
        seed=args.seed,
        examples=args.examples,
        top_k=args.top_k,
        lanczos_iters=args.lanczos_iters,
        slq_probes=args.slq_probes,
        slq_iters=args.slq_iters,
        noise_examples=args.noise_examples,
        chunk=args.chunk,
        curvature=args.curvature,
        bulk_noise=args.bulk_noise,
        bins=args.bins,
        floor=args.floor,
        max_memory_mb=args.max_memory_mb,
        lr_grid=args.lr_grid,
        noise_at=args.noise_at,
        measure_at=args.measure_at,
    )
    try:
        opts.check()
        from cbs.sweep.config import load_config

        cfg = load_config(Path(args.config), args.overrides)
        from cbs.predict._run import predict

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
