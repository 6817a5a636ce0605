"""Where the seconds of one sweep CLI run go: wall and CPU time per stage.

Runs ``python -m cbs.sweep CONFIG [overrides]`` in this process (with the persistent
compilation cache as the CLI sets it up: on unless ``CBS_JAX_CACHE=off``) and
attributes time to: imports, the grid expansion (cells and their ids), the main NQM grid
(``evaluate_grid`` calls outside refinement), the batched LR refinement (``refine_lr``), risk
curves (``expected_risk``), the results rows per block, the Parquet parts written, their
merge, the analysis without three of its plots, those plots, and the rest (runner set-up,
the NQM back end's records and tuned rows, summary, table printing), and, from JAX's own
timers, the seconds spent tracing, lowering and XLA-compiling programs. CPU time is the
process's user + system time (XLA's threads included), which moves less with the load of a
shared machine than the wall time.

    python benchmarks/profile_sweep.py configs/nqm_fig3a.yaml output.dir=/tmp/p1
"""

from __future__ import annotations

import os
import sys
import time
from collections import defaultdict

T0_WALL, T0_CPU = time.perf_counter(), time.process_time()
STAGES: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
_depth = [0]


def _wrap(module, name: str, stage: str, inner: bool = False):
    """Times calls of module.name into ``stage``; calls nested in another timed stage count
    only there, except ``inner`` stages (plots inside the analysis), later subtracted."""
    fn = getattr(module, name)

    def timed(*args, **kwargs):
        if _depth[0] and not inner:
            return fn(*args, **kwargs)  # nested: counted by the outer stage
        _depth[0] += 0 if inner else 1
        w, c = time.perf_counter(), time.process_time()
        try:
            return fn(*args, **kwargs)
        finally:
            STAGES[stage][0] += time.perf_counter() - w
            STAGES[stage][1] += time.process_time() - c
            _depth[0] -= 0 if inner else 1

    setattr(module, name, timed)


# JAX's own compile-phase timers (jax.monitoring duration events), summed over the run:
# tracing to a jaxpr, lowering to StableHLO, and XLA's backend compile. They overlap the
# stages above (a compile happens inside the stage that first calls a program).
COMPILE_EVENTS = {
    "/jax/core/compile/jaxpr_trace_duration": "trace (Python -> jaxpr)",
    "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower (jaxpr -> StableHLO)",
    "/jax/core/compile/backend_compile_duration": "XLA compile",
}
COMPILES: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])


def _on_duration(event: str, seconds: float, **_) -> None:
    if event in COMPILE_EVENTS:
        COMPILES[event][0] += seconds
        COMPILES[event][1] += 1


def main() -> int:
    import jax

    jax.monitoring.register_event_duration_secs_listener(_on_duration)
    from cbs.sweep import __main__ as cli

    imports = (time.perf_counter() - T0_WALL, time.process_time() - T0_CPU)
    import cbs.analysis._plots as plots
    import cbs.nqm.backend as nqm_backend

    for fname in ("plot_steps_vs_batch", "plot_best_lr", "plot_data_efficiency"):
        _wrap(plots, fname, "plots (3 PNGs)", inner=True)
    _wrap(nqm_backend, "refine_lr", "LR refinement (batched golden section)")
    _wrap(nqm_backend, "evaluate_grid", "main grid (evaluate_grid)")
    _wrap(nqm_backend, "expected_risk", "risk curves")
    import cbs.store as store
    import cbs.sweep.runner as runner

    _wrap(runner, "expand_blocks", "grid expansion (cells, ids)")
    _wrap(runner, "_block_tables", "row tables per block")
    _wrap(store.RunStore, "write_block", "Parquet parts (write)")
    _wrap(store.RunStore, "merge", "merge of the parts")
    import cbs.analysis._report as report

    _wrap(report, "analyze_run", "analysis incl. plots")
    rc = cli.main(sys.argv[1:])
    total = (time.perf_counter() - T0_WALL, time.process_time() - T0_CPU)
    load = os.getloadavg()
    print(
        f"\nprofile (load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; {os.cpu_count()} cores):"
    )
    rows = [("imports (cbs CLI)", *imports)] + [(k, *v) for k, v in STAGES.items()]
    plots_row = STAGES.get("plots (3 PNGs)", [0.0, 0.0])
    if "analysis incl. plots" in STAGES:
        rows = [
            r
            if r[0] != "analysis incl. plots"
            else ("analysis without plots", r[1] - plots_row[0], r[2] - plots_row[1])
            for r in rows
        ]
    accounted = [sum(r[1] for r in rows), sum(r[2] for r in rows)]
    rows.append(
        ("rest (runner, Parquet I/O, printing)", total[0] - accounted[0], total[1] - accounted[1])
    )
    for name, w, c in rows:
        print(f"  {name:42s} {w:7.2f} s wall {c:7.2f} s CPU")
    print(f"  {'total (after Python start-up)':42s} {total[0]:7.2f} s wall {total[1]:7.2f} s CPU")
    print("compile phases (wall, inside the stages above; a persistent-cache hit skips XLA):")
    for event, label in COMPILE_EVENTS.items():
        secs, count = COMPILES.get(event, (0.0, 0))
        print(f"  {label:42s} {secs:7.2f} s wall ({count} programs)")
    return rc


if __name__ == "__main__":
    sys.exit(main())
